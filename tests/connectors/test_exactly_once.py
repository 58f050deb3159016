"""The replay filter and progress bookkeeping shared by the table sinks (no server needed)."""
from __future__ import annotations

import polars as pl

from streamfn.batch import Batch
from streamfn.connectors._exactly_once import Pending, Progress, ReplayFilter, already_committed


def batch(first: int | None, last: int | None, rows: int) -> Batch:
    return Batch(pl.DataFrame({"x": list(range(rows))}), "src", "0", first, last)


def test_nothing_recorded_admits_everything():
    f = ReplayFilter(Progress(), "src[0]", idempotent=False)
    assert f.admit(batch(0, 9, 10)).height == 10


def test_batches_at_or_below_the_recorded_offset_are_dropped():
    f = ReplayFilter(Progress("c1", 99), "src[0]", idempotent=False)
    assert f.admit(batch(0, 49, 50)) is None
    assert f.admit(batch(50, 99, 50)) is None
    assert f.admit(batch(100, 149, 50)).height == 50
    assert f.dropped_rows == 100


def test_a_straddling_batch_that_maps_to_offsets_is_cut():
    f = ReplayFilter(Progress("c1", 99), "src[0]", idempotent=False)
    out = f.admit(batch(90, 109, 20))
    assert out["x"].to_list() == list(range(10, 20))


def test_upsert_keeps_a_straddling_batch_whole_and_string_offsets_pass():
    assert ReplayFilter(Progress("c1", 99), "l", idempotent=True).admit(batch(90, 109, 5)).height == 5
    assert ReplayFilter(Progress("c1", 99), "l", idempotent=False).admit(
        Batch(pl.DataFrame({"x": [1]}), "s", "0", "a", "b")).height == 1


def test_pending_progress_keeps_the_highest_offset():
    pending = Pending()
    pending.add(batch(100, 149, 50).table, batch(100, 149, 50))
    pending.add(batch(150, 199, 50).table, batch(150, 199, 50))
    assert pending.rows == 100 and pending.first_offset == 100
    assert pending.progress("c2", Progress("c1", 99)) == Progress("c2", 199)
    unknown = Pending()
    unknown.add(batch(None, None, 1).table, batch(None, None, 1))
    assert unknown.progress(None, Progress("c1", 99)) == Progress("c1", 99)


def test_checkpoint_ids_sort_in_time():
    assert already_committed("0001-00000002", Progress("0001-00000002", 5))
    assert not already_committed("0002-00000001", Progress("0001-00000009", 5))
    assert not already_committed("0001-00000001", Progress())
