"""Reference-workload ticks from NDJSON files into PostgreSQL, Delta Lake and Iceberg:
streamfn's exactly-once sinks beside the plain client writing the whole table at once.

    python bench/tables_bench.py                       # 1,000,000 ticks in 2 files, every target
    python bench/tables_bench.py --n 5000000 --targets postgres,delta --repeat 1
    python bench/tables_bench.py --from-memory         # the sinks' own cost, files read beforehand

Plain client = read every file with polars, then one ADBC COPY (`adbc_ingest`) /
one `write_deltalake` / one Iceberg `table.append` of the whole Arrow table. Each run is its
own process (so peak RSS is its own) and writes a fresh table; the PostgreSQL server is a
throwaway cluster started here (tests/servers/postgres.py). Prints one JSON line a run and
a Markdown table; ratio = streamfn rows/s / plain rows/s (target: at least 0.8).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ticks_input import make_input  # a sibling module: the benchmarks run as scripts

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = ("postgres", "delta", "iceberg")


def _schema() -> dict:
    import polars as pl

    return {"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64, "volume": pl.Int64}


def _target_args(target: str, work: Path, dsn: str) -> dict:
    name = f"t_{uuid.uuid4().hex[:8]}"
    if target == "postgres":
        return {"dsn": dsn, "table": name}
    if target == "delta":
        return {"url": str(work / "delta" / name)}
    return {"catalog": str(work / "iceberg" / "catalog.db"), "identifier": f"bench.{name}"}


def _sink(target: str, args: dict) -> object:
    if target == "postgres":
        from streamfn.connectors import postgres
        sink = postgres.table(args["table"], dsn=args["dsn"])
    elif target == "delta":
        from streamfn.connectors import delta
        sink = delta.table(args["url"])
    else:
        from streamfn.connectors import iceberg
        sink = iceberg.table(args["catalog"], args["identifier"])
    return sink


def run_streamfn(target: str, folder: Path, args: dict, frames: list | None = None) -> None:
    """The streamfn pipeline: files.ndjson (or frames already read) -> the target's sink."""
    import streamfn as sf
    from streamfn.connectors import files, memory

    p = sf.Pipeline("tables-bench", run_dir=tempfile.mkdtemp(prefix="tables-bench-"))
    if frames is None:
        source = files.ndjson(str(folder / "*.jsonl"), schema=_schema())
    else:  # one partition a file, as files.ndjson has
        source = memory.source({str(i): f for i, f in enumerate(frames)}, batch_rows=100_000)
    p.source(source).sink(_sink(target, args))
    p.run(until_idle=True)


def read_frames(folder: Path) -> list:
    """Every input file read by polars (for --from-memory, before the timer starts)."""
    import polars as pl

    return [pl.read_ndjson(str(f), schema=_schema()) for f in sorted(folder.glob("*.jsonl"))]


def run_plain(target: str, folder: Path, args: dict, frames: list | None = None) -> None:
    """The plain client: read every file, write the whole table in one call."""
    import polars as pl

    from streamfn.connectors._exactly_once import plain_arrow

    if frames is None:
        frame = pl.read_ndjson(sorted(str(p) for p in folder.glob("*.jsonl")), schema=_schema())
    else:
        frame = pl.concat(frames)
    table = plain_arrow(frame.to_arrow())
    if target == "postgres":
        import adbc_driver_postgresql.dbapi as adbc
        with adbc.connect(args["dsn"]) as conn, conn.cursor() as cur:
            cur.adbc_ingest(args["table"], table, mode="create")
            conn.commit()
    elif target == "delta":
        from deltalake import write_deltalake
        write_deltalake(args["url"], table)
    else:
        from streamfn.connectors.iceberg import load_catalog
        catalog = load_catalog(args["catalog"])
        catalog.create_namespace_if_not_exists("bench")
        catalog.create_table(args["identifier"], schema=table.schema).append(table)


def _import_everything(target: str) -> None:
    import polars  # noqa: F401
    import pyarrow  # noqa: F401

    import streamfn  # noqa: F401
    from streamfn.connectors import files  # noqa: F401
    if target == "postgres":
        import adbc_driver_postgresql.dbapi  # noqa: F401
        from streamfn.connectors import postgres  # noqa: F401
    elif target == "delta":
        import deltalake  # noqa: F401
        from streamfn.connectors import delta  # noqa: F401
    else:
        # pyiceberg's Arrow IO too: else the first write imports it inside the timed part (0.3 s)
        import pyiceberg.catalog.sql
        import pyiceberg.io.pyarrow  # noqa: F401
        from streamfn.connectors import iceberg  # noqa: F401


def child(system: str, target: str, folder: str, args_json: str) -> None:
    """One measured run, in this process; prints its JSON line."""
    args = json.loads(args_json)
    _import_everything(target)  # imports are not timed (as in ../shared/bench)
    frames = read_frames(Path(folder)) if args.get("_from_memory") else None
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    run = run_streamfn if system == "streamfn" else run_plain
    run(target, Path(folder), args, frames)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rows = int(args["_rows"])
    print(json.dumps({"system": system, "target": target, "rows": rows, "seconds": round(seconds, 3),
                      "rows_per_s": round(rows / seconds),
                      # CPU seconds of the timed part of this process: steadier than wall time
                      # on a busy machine; the database server's own CPU is not in it
                      "cpu_s": round(usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def count_rows(target: str, args: dict) -> int:
    """Rows in the target table after a run (to check that nothing was lost or repeated)."""
    if target == "postgres":
        import adbc_driver_postgresql.dbapi as adbc
        with adbc.connect(args["dsn"]) as conn, conn.cursor() as cur:
            cur.execute(f'select count(*) from "{args["table"]}"')
            return int(cur.fetchone()[0])
    if target == "delta":
        from deltalake import DeltaTable
        return int(DeltaTable(args["url"]).count())
    from streamfn.connectors.iceberg import load_catalog
    return int(load_catalog(args["catalog"]).load_table(args["identifier"]).scan().count())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per system; the fastest is kept")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--from-memory", action="store_true",
                    help="both systems start from the files already read by polars (untimed): the "
                         "sink's own cost, without the NDJSON reader's")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "streamfn-tables-bench"))
    opts = ap.parse_args()
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = make_input(opts.n, opts.files, work)
    sys.path.insert(0, str(ROOT))
    from tests.servers.postgres import start_server

    server, pg_root = start_server()
    best: dict[tuple[str, str], dict] = {}
    try:
        for target in opts.targets.split(","):
            # plain and streamfn runs take turns, so a busy spell on a shared machine hits both
            for _, system in itertools.product(range(opts.repeat), ("plain", "streamfn")):
                args = {**_target_args(target, work, server.dsn), "_rows": opts.n,
                        "_from_memory": opts.from_memory}
                out = subprocess.run([sys.executable, __file__, "--child", system, target, str(folder),
                                      json.dumps(args)], check=True, capture_output=True, text=True,
                                     cwd=ROOT)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                result["rows_in_table"] = count_rows(target, args)
                print(json.dumps(result), flush=True)
                key = (target, system)
                if key not in best or result["rows_per_s"] > best[key]["rows_per_s"]:
                    best[key] = result
    finally:
        server.stop()
    start = "already read into memory (--from-memory)" if opts.from_memory else "read by each system"
    print(f"\n{opts.n:,} reference ticks in {opts.files} NDJSON files, {start}, fastest of {opts.repeat}\n")
    print("| target | system | rows/s | CPU s | peak RSS MB | rows in table | streamfn / plain |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for target in opts.targets.split(","):
        plain = best[(target, "plain")]
        for system in ("plain", "streamfn"):
            r = best[(target, system)]
            ratio = f"{r['rows_per_s'] / plain['rows_per_s']:.2f}" if system == "streamfn" else ""
            print(f"| {target} | {system} | {r['rows_per_s']:,} | {r['cpu_s']} | {r['peak_rss_mb']} | {r['rows_in_table']:,} "
                  f"| {ratio} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        main()
