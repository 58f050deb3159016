"""The reference ticks (../shared/bench/workload.py gen), cut into NDJSON files, for the benchmarks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WORKLOAD = Path(__file__).resolve().parent.parent.parent / "shared" / "bench" / "workload.py"


def make_input(n: int, files: int, folder: Path) -> Path:
    """The first n reference ticks cut into `files` NDJSON files (made once, then reused)."""
    target = folder / f"ticks-{n}-{files}"
    if (target / "done").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    whole = folder / f"ticks-{n}.jsonl"
    if not whole.exists():
        subprocess.run([sys.executable, str(WORKLOAD), "gen", str(n), str(whole)], check=True)
    per_file = -(-n // files)
    with open(whole, "rb") as src:
        for i in range(files):
            with open(target / f"part-{i:03d}.jsonl", "wb") as out:
                for _ in range(per_file):
                    line = src.readline()
                    if not line:
                        break
                    out.write(line)
    (target / "done").write_text("ok")
    return target
