"""Small helpers shared by tests."""
from __future__ import annotations

import glob
import json


def read_dead_letters(run_dir: str) -> list[dict]:
    """Every dead letter a run wrote under its run directory's default dead-letter sink."""
    letters = []
    for path in sorted(glob.glob(f"{run_dir}/dead_letters/*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            letters += [json.loads(line) for line in fh]
    return letters
