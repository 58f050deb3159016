"""Dead letters: records that failed to parse or made a stage raise, with the reason."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timezone

import polars as pl

from streamfn.batch import Position

DEAD_LETTER_SCHEMA = {
    "time": pl.String, "pipeline": pl.String, "stage": pl.String, "source": pl.String,
    "partition": pl.String, "offset": pl.String, "row": pl.Int64, "error": pl.String,
    "payload": pl.String, "payload_encoding": pl.String,
}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One failed record: where it came from, what failed, and its payload."""

    stage: str
    source: str
    partition: str
    offset: Position
    error: str
    payload: bytes | str
    row: int | None = None  # index in the failed batch, when the offset is not exact


def payload_text(payload: bytes | str) -> tuple[str, str]:
    """The payload as text, and how it is encoded ('utf-8', or 'base64' for raw bytes)."""
    if isinstance(payload, str):
        return payload, "utf-8"
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii"), "base64"


def row_payload(frame: pl.DataFrame) -> bytes | str:
    """A one-row frame as JSON (a failed stage row's payload); a lone bytes column as its bytes."""
    if frame.width == 1 and frame.dtypes[0] == pl.Binary:
        return frame.item() or b""  # e.g. a raw Kafka value: kept as it came
    binary = [name for name, dtype in frame.schema.items() if dtype == pl.Binary]
    if binary:  # polars panics writing bytes as JSON (a BaseException, past the except below)
        frame = frame.with_columns(pl.col(binary).bin.encode("base64"))
    try:
        return frame.write_ndjson().strip()
    except Exception:  # e.g. an object column polars cannot serialise: keep what we can
        return json.dumps({k: repr(v) for k, v in frame.row(0, named=True).items()})


def dead_letter_frame(pipeline: str, letters: list[DeadLetter]) -> pl.DataFrame:
    """Dead letters as rows of the dead-letter schema."""
    now = datetime.now(timezone.utc).isoformat()
    texts = [payload_text(d.payload) for d in letters]
    return pl.DataFrame({
        "time": [now] * len(letters),
        "pipeline": [pipeline] * len(letters),
        "stage": [d.stage for d in letters],
        "source": [d.source for d in letters],
        "partition": [d.partition for d in letters],
        "offset": [None if d.offset is None else str(d.offset) for d in letters],
        "row": [d.row for d in letters],
        "error": [d.error for d in letters],
        "payload": [t for t, _ in texts],
        "payload_encoding": [e for _, e in texts],
    }, schema=DEAD_LETTER_SCHEMA)
