"""Re-keying across processes: a repartition topic between a source and a keyed stage.

A keyed stage (window, aggregate, `state=sf.table`) whose key is not the key its consumer-group
source is partitioned by (`kafka.topic(..., key=...)`) cannot keep its state per source
partition: the group spreads those partitions over processes, so one key's rows reach several.
As in Kafka Streams, the run then splits the pipeline at that stage (`rewrite`):

    source -> ... -> U -> [route] -> [repartition writer]  ==topic==>  [repartition source] -> K -> ...

The source connector makes the topic's two ends (`connector.repartition(...)`: Kafka's are in
streamfn.connectors.kafka.repartition). This module decides where to split and what travels:

- **Routing** (`RouteStage`, in each source lane): every row goes to the topic partition that
  owns its key (`keyhash.owners`, stable across processes and polars versions), tagged with its
  upstream partition, the lane's *session* (a random id per lane opening), where that session
  started, and the source position after its batch.
- **Exactly once without broker transactions.** A source lane checkpoints as usual (flush the
  writer: every message delivered; then its manifest) and, after each checkpoint, sends every
  topic partition a *confirm* mark with the checkpointed position. A reading lane
  (`RepartitionedStage`) keeps each upstream partition's rows pending until a confirm covers
  them. A source lane that restarts does so at its latest checkpoint and with a new session, so
  a reader that sees a new session drops that upstream's pending rows past the new session's
  start (they will come again) and counts the start as confirmed. Pending rows are part of the
  reading lane's checkpoint. So a crash on either side loses nothing and counts nothing twice,
  on any Kafka-protocol broker (the embedded Tansu does not isolate aborted transactions).
  The price: rows wait up to one checkpoint interval of their source lane.
- **Event time**: each source lane computes every row's watermark from its own order (as the
  in-process exchange does) and sends it with the row; after each batch it sends every topic
  partition a progress mark (its largest event time). A reading lane emits a window once every
  upstream partition's progress passed its end. What is late thus never depends on how the
  upstream partitions interleave in the topic, nor on batch boundaries.
- **Bounded runs** (`--until-idle`): a source lane that reaches its end sends an end mark (with
  its position there) to every topic partition; a reading lane ends when it has an end mark of
  every upstream partition at or past where that partition ended when the run began (its high
  watermark, asked once: so an end mark of an earlier run counts only when nothing was added
  since), then emits its open windows. Workers of one group therefore end together. The end
  marks seen are part of the lane's checkpoint: a lane taken over after a rebalance knows them.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import TYPE_CHECKING, Any

import polars as pl

from streamfn.batch import Batch
from streamfn.contracts import StageRunner
from streamfn.errors import GraphError, StageError
from streamfn.pipeline import Node
from streamfn.stateful import keyhash
from streamfn.stateful import windowmath as W
from streamfn.stateful.exchange import concat_outputs
from streamfn.stateful.keygroup import stage_keys

if TYPE_CHECKING:
    from streamfn.lane import Lane
    from streamfn.runtime import Runtime

log = logging.getLogger("streamfn.stateful.repartition")

# columns added on the way (and dropped on arrival): which topic partition, which upstream
# partition of how many, what a row is (data, progress, end, confirm), the row's event time and
# watermark, the upstream's progress
OWNER, UP, UPS, KIND, TS, WM, MAX = "__rp_owner", "__rp_up", "__rp_ups", "__rp_kind", "__rp_ts", "__rp_wm", "__rp_max"
SESSION, FROM, AT = "__rp_session", "__rp_from", "__rp_at"  # a lane opening, where it began, the position after
INTERNAL = (OWNER, UP, UPS, KIND, TS, WM, MAX, SESSION, FROM, AT)
DATA, PROGRESS, END, CONFIRM = 0, 1, 2, 3
ARRIVAL = "__rp_arrival"  # a reading lane's order of arrival (pending rows first)


# -- the split ----------------------------------------------------------------------------------
def rewrite(rt: "Runtime") -> None:
    """Split the run's plans at every keyed stage that a Kafka source's key does not cover."""
    work = list(rt.sources)
    while work:
        name = work.pop(0)
        source = rt.sources[name]
        declared = getattr(source.connector, "partitioned_by", None)
        if not declared or not callable(getattr(source.connector, "repartition", None)):
            continue
        for node in rt.plans[name]:
            keys = stage_keys(node)
            if keys and not set(declared) <= set(keys):
                work += [_split(rt, source, node, keys), name]  # the new source, and this one's rest
                break


def _split(rt: "Runtime", source: Node, stage: Node, keys: list[str]) -> str:
    """Cut `stage` off the source's plan behind a repartition topic; return the new source's name."""
    plan = rt.plans[source.name]
    if len(stage.upstreams) != 1:
        raise GraphError(f"stage {stage.name!r} is keyed by {keys} and has several inputs; a stage re-keyed "
                         "through a repartition topic takes one")
    feeding = [name for name, other in rt.plans.items() if stage in other]
    if feeding != [source.name]:
        raise GraphError(f"stage {stage.name!r} is keyed by {keys} and fed by sources {feeding}, not all "
                         "partitioned by that key; re-keying serves one source: merge the inputs first")
    after = {stage.name}
    for node in plan[plan.index(stage) + 1:]:
        if any(u.name in after for u in node.upstreams):
            after.add(node.name)
    before = [n for n in plan if n.name not in after]
    later = [n for n in plan if n.name in after]
    crossing = [n.name for n in later[1:] if any(u.name not in after for u in n.upstreams)]
    if crossing:
        raise GraphError(f"stage(s) {crossing} take inputs from both sides of stage {stage.name!r}, which is "
                         f"re-keyed by {keys} through a repartition topic; join the streams before it")
    windowed = stage.operator is not None and stage.operator[0] == "windows"
    spec = stage.operator[2] if windowed and stage.operator else {}
    route_spec = {"keys": keys, "on": spec.get("on"), "lateness_ms": spec.get("allowed_lateness_ms", 0)}
    writer, reader = source.connector.repartition(stage.name, keys)  # type: ignore[union-attr]
    route = Node(stage.pipeline, "stage", f"{stage.name}.route", (stage.upstreams[0],),
                 operator=("repartition", "route_stage", route_spec))
    out = Node(stage.pipeline, "sink", f"{stage.name}.repartition", (route,), connector=writer)
    into = Node(stage.pipeline, "source", f"{stage.name}.repartitioned", connector=reader)
    moved = dataclasses.replace(stage, upstream_refs=(into,))
    rt.plans[source.name] = [*before, route, out]
    rt.sources[into.name] = into
    rt.plans[into.name] = [moved, *later[1:]]
    at = rt.order.index(stage)
    rt.order[at:at + 1] = [route, out, into, moved]
    log.info("stage re-keyed through a repartition topic", extra={
        "stage": stage.name, "keys": ",".join(keys), "source": source.name,
        "source_key": ",".join(source.connector.partitioned_by)})  # type: ignore[union-attr]
    return into.name


# -- on the way ----------------------------------------------------------------------------------
def route_stage(node: Node, spec: dict[str, Any], lane: "Lane") -> StageRunner:
    """Build the routing stage of one source lane (called by the runtime)."""
    return RouteStage(node, spec, lane)


class RouteStage(StageRunner):
    """In a source lane: each row with the topic partition owning its key, and the lane's marks.

    Its state is the lane's largest event time (the watermark of its next rows), checkpointed with
    the lane, so a restarted lane judges lateness as an uninterrupted one would.
    """

    def __init__(self, node: Node, spec: dict[str, Any], lane: "Lane") -> None:
        self.node, self.lane = node, lane
        self.keys: list[str] = list(spec["keys"])
        self.on: str | None = spec["on"]
        self.lateness_ms: int = spec["lateness_ms"]
        # the repartition topic this stage feeds: it numbers the source's partitions and its own
        self.topic = next(n.connector for n in lane.plan if n.kind == "sink" and n.upstreams[0].name == node.name)
        self.up, self.upstreams = self.topic.upstream_index(lane.partition)  # type: ignore[union-attr]
        self.session = secrets.randbits(62)
        self.start = lane.position if isinstance(lane.position, int) else 0  # where the lane (re)opened
        self.lane_max: int | None = None  # this source lane's largest event time so far

    def process(self, frame: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        """The rows, each with the partition owning its key (and, windowed: progress marks after them)."""
        if frame.height == 0:
            return None
        missing = [c for c in (*self.keys, *([self.on] if self.on else [])) if c not in frame.columns]
        if missing:
            raise StageError(self.node.name, batch.source, batch.partition, batch.first_offset,
                             f"the re-keyed stage needs column(s) {missing}; the rows have {frame.columns}")
        partitions = self.topic.partition_count()  # type: ignore[union-attr]
        after = batch.last_offset + 1 if isinstance(batch.last_offset, int) else self.start
        rows = frame.with_columns(keyhash.owners(frame, self.keys, partitions).alias(OWNER),
                                  *self._identity(DATA, after))
        if self.on is None:
            return rows
        marked = W.lane_marks(frame, self.on, self.lane_max, self.lateness_ms)
        rows = rows.with_columns(marked.get_column(W.TS).alias(TS), marked.get_column(W.WM).alias(WM))
        self.lane_max = W.latest(self.lane_max, marked)
        return pl.concat([rows, self._marks(PROGRESS, partitions, after)], how="diagonal_relaxed")

    def finish(self) -> pl.DataFrame | None:
        """The source lane ended: every partition gets this upstream partition's end mark."""
        at = self.lane.position if isinstance(self.lane.position, int) else self.start
        return self._marks(END, self.topic.partition_count(), at)  # type: ignore[union-attr]

    def _identity(self, kind: int, at: int) -> list[pl.Expr]:
        return [pl.lit(self.up, pl.Int32).alias(UP), pl.lit(self.upstreams, pl.Int32).alias(UPS),
                pl.lit(kind, pl.Int8).alias(KIND), pl.lit(self.session, pl.Int64).alias(SESSION),
                pl.lit(self.start, pl.Int64).alias(FROM), pl.lit(at, pl.Int64).alias(AT)]

    def _marks(self, kind: int, partitions: int, at: int) -> pl.DataFrame:
        """One mark row per topic partition: this upstream partition's progress, or its end."""
        return _each_partition(partitions).with_columns(*self._identity(kind, at),
                                                        pl.lit(self.lane_max, pl.Int64).alias(MAX))

    def snapshot(self, checkpoint_id: str) -> dict[str, Any]:
        return {"lane_max": self.lane_max}

    def restore(self, saved: dict[str, Any]) -> None:
        self.lane_max = saved.get("lane_max")


def confirm_marks(written: pl.DataFrame, partitions: int, position: int) -> pl.DataFrame:
    """After a source lane's checkpoint at `position`: a confirm mark per topic partition, for the
    upstream partition and session of `written` (a row the lane wrote)."""
    ident = written.select(UP, UPS, SESSION, FROM).head(1)
    return _each_partition(partitions).join(ident, how="cross").with_columns(
        pl.lit(CONFIRM, pl.Int8).alias(KIND), pl.lit(position, pl.Int64).alias(AT))


def _each_partition(partitions: int) -> pl.DataFrame:
    """One row per topic partition (the OWNER column), for marks that go to all of them."""
    return pl.DataFrame({OWNER: pl.Series(range(partitions), dtype=pl.UInt32)})


# -- on arrival ----------------------------------------------------------------------------------
class RepartitionedStage(StageRunner):
    """A keyed stage in a lane of its repartition topic: applies confirmed rows, follows the marks."""

    def __init__(self, node: Node, lane: "Lane", inner: StageRunner) -> None:
        self.node, self.lane, self.inner = node, lane, inner
        self.topic = lane.source.connector  # it ends the lane's partition by the end marks (note_ends)
        self.windowed = hasattr(inner, "fold_routed")
        self.upstreams: int | None = None  # how many upstream partitions write the topic
        self.sessions: dict[int, int] = {}  # each upstream partition's current session
        self.confirmed: dict[int, int] = {}  # each upstream partition's last checkpointed position
        self.pending: pl.DataFrame | None = None  # rows and marks not yet confirmed, in arrival order
        self.progress: dict[int, int] = {}  # each upstream partition's largest event time
        self.ended: dict[int, int] = {}  # upstream partitions whose end mark came last: where they ended

    def process(self, frame: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        if frame.height == 0 or KIND not in frame.columns:
            return None
        frame = frame.with_row_index(ARRIVAL).with_columns(pl.col(ARRIVAL).cast(pl.Int64))
        rows = frame.filter(pl.col(KIND) != CONFIRM)
        if self.pending is not None:  # (pending rows arrived before this frame)
            rows = pl.concat([self.pending.with_columns(pl.lit(-1, pl.Int64).alias(ARRIVAL)), rows],
                             how="diagonal_relaxed")
        waiting = self._follow_sessions(frame, rows).drop(ARRIVAL)
        confirms = frame.filter(pl.col(KIND) == CONFIRM)
        for up, at in confirms.group_by(UP).agg(pl.col(AT).max()).iter_rows():
            self.confirmed[up] = max(at, self.confirmed.get(up, at))
        if waiting.height == 0:
            self.pending = None
            return None
        known = pl.DataFrame({UP: list(self.confirmed), "__upto": list(self.confirmed.values())},
                             schema={UP: pl.Int32, "__upto": pl.Int64})
        ready = waiting.join(known, on=UP, how="left", maintain_order="left").select(
            (pl.col(AT) <= pl.col("__upto")).fill_null(False)).to_series()
        self.pending = waiting.filter(~ready) if not ready.all() else None
        return self._apply(waiting.filter(ready), batch)

    def _follow_sessions(self, frame: pl.DataFrame, waiting: pl.DataFrame) -> pl.DataFrame:
        """A new session of an upstream partition restarted at FROM: the rows that arrived before it
        from that partition past FROM come again (drop them), and everything up to FROM was
        checkpointed (it restarted from there)."""
        firsts = frame.group_by(UP, SESSION, maintain_order=True).agg(pl.col(FROM).first(), pl.col(ARRIVAL).min())
        for up, session, start, first in firsts.iter_rows():
            if self.sessions.get(up) == session:
                continue
            self.sessions[up] = session
            self.confirmed[up] = max(start, self.confirmed.get(up, start))
            stale = (pl.col(UP) == up) & (pl.col(ARRIVAL) < first) & (pl.col(AT) > start)
            waiting = waiting.filter(~stale)
        return waiting

    def _apply(self, rows: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        """Fold confirmed rows into the stage; follow the confirmed marks."""
        if rows.height == 0:
            return None
        kind = rows.get_column(KIND)
        data = rows.filter(kind == DATA)
        outs: list[pl.DataFrame | None] = []
        if data.height:
            if self.ended:  # rows after an end mark: that upstream partition has more input now
                for up in data.get_column(UP).unique().to_list():
                    self.ended.pop(up, None)
            plain = data.drop([c for c in INTERNAL if c in data.columns])
            if self.windowed:
                marks = data.select(pl.col(TS).alias(W.TS), pl.col(WM).alias(W.WM))
                outs.append(self.inner.fold_routed(plain, marks, batch))  # type: ignore[attr-defined]
            else:
                outs.append(self.inner.process(plain, batch))
        if data.height < rows.height:
            for up, ups, what, most, at in rows.filter(kind != DATA).select(UP, UPS, KIND, MAX, AT).iter_rows():
                self.upstreams = ups
                if most is not None and most > self.progress.get(up, most - 1):
                    self.progress[up] = most
                if what == END:
                    self.ended[up] = max(at, self.ended.get(up, at))
                else:
                    self.ended.pop(up, None)
            if self.windowed:
                outs.append(self.inner.advance_to(self._floor()))  # type: ignore[attr-defined]
            self._note_ends()
        return concat_outputs(outs)

    def _note_ends(self) -> None:
        if self.upstreams is not None:
            self.topic.note_ends(self.lane.partition, self.upstreams, dict(self.ended))  # type: ignore[union-attr]

    def _floor(self) -> int | None:
        """The least progress over the upstream partitions still open (None: one has none yet)."""
        if self.upstreams is None:
            return None
        times = [self.progress.get(u) for u in range(self.upstreams) if u not in self.ended]
        if not times or any(t is None for t in times):  # (none open: the end marks end the lane)
            return None
        return min(times)  # type: ignore[type-var]

    def finish(self) -> pl.DataFrame | None:
        """Every upstream partition ended (the only way this lane's input ends): emit everything."""
        return self.inner.finish()

    def snapshot(self, checkpoint_id: str) -> dict[str, Any]:
        def numbered(values: dict[int, int]) -> dict[str, int]:
            return {str(k): v for k, v in values.items()}

        return {"inner": self.inner.snapshot(checkpoint_id), "upstreams": self.upstreams,
                "pending": self.pending, "sessions": numbered(self.sessions),
                "confirmed": numbered(self.confirmed), "progress": numbered(self.progress),
                "ended": numbered(self.ended)}

    def restore(self, saved: dict[str, Any]) -> None:
        def numbered(key: str) -> dict[int, int]:
            return {int(k): v for k, v in (saved.get(key) or {}).items()}

        if saved.get("inner") is not None:
            self.inner.restore(saved["inner"])
        self.upstreams = saved.get("upstreams")
        self.pending = saved.get("pending")
        self.sessions, self.confirmed = numbered("sessions"), numbered("confirmed")
        self.progress, self.ended = numbered("progress"), numbered("ended")
        self._note_ends()
