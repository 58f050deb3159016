"""The graph-builder API: a Pipeline of source, stage and sink nodes."""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from streamfn.contracts import Sink, Source
from streamfn.errors import GraphError
from streamfn.timeparse import parse_duration_s

if TYPE_CHECKING:
    from streamfn.runtime import RunSummary

NodeKind = Literal["source", "stage", "sink"]
Engine = Literal["cpu", "gpu", "auto"]
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


@dataclass(eq=False)
class Node:
    """One source, stage or sink of a pipeline; stages and sinks hang off nodes."""

    pipeline: "Pipeline"
    kind: NodeKind
    name: str
    upstream_refs: tuple["Node | str", ...] = ()
    fn: Callable[..., Any] | None = None
    connector: Source | Sink | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: for built-in stateful stages: (module in streamfn.stateful, factory, spec)
    operator: tuple[str, str, dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name!r}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call a stage's function directly (handy in notebooks and tests)."""
        if self.fn is None:
            raise TypeError(f"{self.kind} {self.name!r} is not callable")
        return self.fn(*args, **kwargs)

    @property
    def upstreams(self) -> list["Node"]:
        """The resolved upstream nodes (names are looked up in the pipeline)."""
        return [self.pipeline.node(ref) if isinstance(ref, str) else ref for ref in self.upstream_refs]

    def stage(self, fn: Callable[..., Any] | None = None, *, name: str | None = None,
              state: Any = None, engine: Engine = "cpu") -> Any:
        """Add a stage fed by this node; usable as `node.stage(fn)` or `@node.stage()`."""
        decorate = self.pipeline.stage(self, name=name, state=state, engine=engine)
        return decorate if fn is None else decorate(fn)

    def sink(self, connector: Sink, *, name: str | None = None) -> "Node":
        """Send this node's output to a sink."""
        return self.pipeline.sink(connector, self, name=name)

    def window(self, spec: Any, *, by: str | Iterable[str], aggs: Iterable[Any], on: str = "ts",
               allowed_lateness: str | float = 0, early: bool = False, name: str | None = None) -> "Node":
        """Aggregate `aggs` (polars expressions) per key `by` over event-time windows of column `on`."""
        from streamfn.windows import Hopping, Session, Sliding, Tumbling

        if not isinstance(spec, (Tumbling, Hopping, Sliding, Session)):
            raise GraphError(f"window() takes sf.tumbling/hopping/sliding/session(...), got {spec!r}")
        options = {"window": spec, "by": _names(by, "by"), "on": on, "aggs": _exprs(aggs),
                   "allowed_lateness_ms": round(parse_duration_s(allowed_lateness) * 1000), "early": early}
        stage_name = name or self.pipeline._unique(f"{self.name}_{spec.kind}")
        return self.operator_stage("windows", "window_stage", options, name=stage_name)

    def aggregate(self, *, by: str | Iterable[str], aggs: Iterable[Any], name: str | None = None) -> "Node":
        """Running (unwindowed) aggregates per key; emits the updated rows of the keys in each batch."""
        options = {"by": _names(by, "by"), "aggs": _exprs(aggs)}
        stage_name = name or self.pipeline._unique(f"{self.name}_aggregate")
        return self.operator_stage("aggregate", "aggregate_stage", options, name=stage_name)

    def join(self, table_node: "Node | str", *, on: str | Iterable[str], name: str | None = None) -> "Node":
        """Enrich this stream with the latest row per key of `table_node` (a left join)."""
        table = self.pipeline.node(table_node) if isinstance(table_node, str) else table_node
        options = {"on": _names(on, "on"), "table": table.name, "stream": self.name}
        stage_name = name or self.pipeline._unique(f"{self.name}_join_{table.name}")
        return self.operator_stage("join", "join_stage", options, name=stage_name, extra_upstreams=(table,))

    def operator_stage(self, module: str, factory: str, spec: dict[str, Any], *, name: str,
                       extra_upstreams: Iterable["Node | str"] = ()) -> "Node":
        """Add a built-in stage that `streamfn.stateful.<module>.<factory>` implements."""
        node = Node(self.pipeline, "stage", name, (self, *extra_upstreams), operator=(module, factory, spec))
        return self.pipeline._add(node)


class Pipeline:
    """A named graph of sources, stages and sinks, and how to run it.

    Args:
        name: the pipeline's name, used in logs, metrics and the run directory.
        checkpoint: where checkpoints go (any fsspec URL); None: under the run directory.
        checkpoint_interval: how often each lane flushes its sinks and commits, e.g. "5s".
        run_dir: the local folder for dead letters and checkpoints (default .streamfn/NAME).
        batch_rows: the most rows a source hands over in one batch.
        threads: lanes run on this many threads (default: twice the number of CPUs, at least 4).
        max_dead_letters: stop the run once more records than this have failed.
    """

    def __init__(self, name: str, *, checkpoint: str | None = None,
                 checkpoint_interval: str | float = "5s", run_dir: str | None = None,
                 batch_rows: int = 100_000, threads: int | None = None,
                 max_dead_letters: int | None = None) -> None:
        if not _NAME.match(name):
            raise GraphError(f"pipeline name {name!r} must start with a letter and hold only "
                             "letters, digits, '_', '.' or '-'")
        if batch_rows < 1:
            raise GraphError(f"batch_rows must be at least 1, got {batch_rows}")
        self.name = name
        self.checkpoint = checkpoint
        self.checkpoint_interval_s = parse_duration_s(checkpoint_interval)
        self.run_dir = run_dir or f".streamfn/{name}"
        self.batch_rows = batch_rows
        self.threads = threads
        self.max_dead_letters = max_dead_letters
        self.dead_letter_sink: Sink | None = None
        self._nodes: dict[str, Node] = {}

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r}: {len(self._nodes)} nodes>"

    # -- building ---------------------------------------------------------------------------
    @property
    def nodes(self) -> list[Node]:
        """Every node, in the order it was added."""
        return list(self._nodes.values())

    def node(self, name: str) -> Node:
        """The node with this name."""
        try:
            return self._nodes[name]
        except KeyError:
            known = ", ".join(self._nodes) or "none"
            raise GraphError(f"pipeline {self.name!r} has no node {name!r} (known: {known})") from None

    def source(self, connector: Source, *, name: str | None = None) -> Node:
        """Add a source; its node feeds stages and sinks."""
        if not isinstance(connector, Source):
            raise GraphError(f"p.source() takes a source connector (e.g. files.ndjson(...)), "
                             f"got {type(connector).__name__}")
        name = name or _default_name(connector, "source")
        return self._add(Node(self, "source", name, connector=connector))

    def stage(self, *upstreams: Node | str, name: str | None = None, state: Any = None,
              engine: Engine = "cpu") -> Callable[[Callable[..., Any]], Node]:
        """Decorate `def f(df) -> df | None` as a stage fed by `upstreams`."""
        if engine not in ("cpu", "gpu", "auto"):
            raise GraphError(f"engine must be 'cpu', 'gpu' or 'auto', got {engine!r}")

        def decorate(fn: Callable[..., Any]) -> Node:
            if not callable(fn):
                raise GraphError(f"@p.stage decorates a function, got {type(fn).__name__}")
            stage_name = name or getattr(fn, "__name__", "stage")
            if not upstreams:
                raise GraphError(f"stage {stage_name!r} has no upstream: "
                                 "write @p.stage(source_node, ...)")
            from streamfn.handler import as_stage  # a Nuclio-style handler(context, event): once per row

            fn = as_stage(fn, name=stage_name, stateful=state is not None)
            _check_arity(fn, stage_name, 2 if state is not None else 1)
            options = {"state": state, "engine": engine}
            return self._add(Node(self, "stage", stage_name, tuple(upstreams), fn=fn, options=options))

        return decorate

    def sink(self, connector: Sink, *upstreams: Node | str, name: str | None = None) -> Node:
        """Send the output of `upstreams` to a sink."""
        if not isinstance(connector, Sink):
            raise GraphError(f"a sink takes a sink connector (e.g. files.parquet(...)), "
                             f"got {type(connector).__name__}")
        sink_name = name or self._unique(_default_name(connector, "sink"))
        if not upstreams:
            raise GraphError(f"sink {sink_name!r} has no upstream: write node.sink(connector)")
        return self._add(Node(self, "sink", sink_name, tuple(upstreams), connector=connector))

    def dead_letter(self, connector: Sink) -> None:
        """Send records that failed to parse or made a stage raise to this sink."""
        if not isinstance(connector, Sink):
            raise GraphError(f"p.dead_letter() takes a sink connector, got {type(connector).__name__}")
        self.dead_letter_sink = connector

    def _unique(self, base: str) -> str:
        name, i = base, 2
        while name in self._nodes:
            name, i = f"{base}_{i}", i + 1
        return name

    def _add(self, node: Node) -> Node:
        if node.name in self._nodes:
            raise GraphError(f"pipeline {self.name!r} already has a node named {node.name!r}; "
                             "pass name=... to tell them apart")
        for ref in node.upstream_refs:
            if isinstance(ref, Node) and ref.pipeline is not self:
                raise GraphError(f"{node.kind} {node.name!r}: upstream {ref.name!r} belongs to "
                                 f"pipeline {ref.pipeline.name!r}")
            if isinstance(ref, Node) and ref.kind == "sink":
                raise GraphError(f"{node.kind} {node.name!r}: a sink ({ref.name!r}) has no output "
                                 "to feed it")
            if not isinstance(ref, (Node, str)):
                raise GraphError(f"{node.kind} {node.name!r}: an upstream must be a node or a "
                                 f"node's name, got {type(ref).__name__}")
        self._nodes[node.name] = node
        return node

    # -- checking ---------------------------------------------------------------------------
    def validate(self) -> list[Node]:
        """Check the graph and return its nodes in topological order."""
        if not any(n.kind == "source" for n in self._nodes.values()):
            raise GraphError(f"pipeline {self.name!r} has no source: add p.source(connector)")
        for node in self._nodes.values():
            for ref in node.upstream_refs:
                if isinstance(ref, str) and ref not in self._nodes:
                    raise GraphError(f"{node.kind} {node.name!r}: unknown upstream {ref!r} "
                                     f"(known: {', '.join(self._nodes)})")
                if isinstance(ref, str) and self._nodes[ref].kind == "sink":
                    raise GraphError(f"{node.kind} {node.name!r}: a sink ({ref!r}) has no output "
                                     "to feed it")
        return self._topological_order()

    def _topological_order(self) -> list[Node]:
        order: list[Node] = []
        state: dict[str, int] = {}  # 1 = on the path being visited, 2 = done

        def visit(node: Node, path: list[str]) -> None:
            if state.get(node.name) == 2:
                return
            if state.get(node.name) == 1:
                cycle = " -> ".join(path[path.index(node.name):] + [node.name])
                raise GraphError(f"pipeline {self.name!r} has a cycle: {cycle}")
            state[node.name] = 1
            for up in node.upstreams:
                visit(up, path + [node.name])
            state[node.name] = 2
            order.append(node)

        for node in self._nodes.values():
            visit(node, [])
        return order

    def downstream(self, node: Node) -> list[Node]:
        """The nodes fed directly by `node`."""
        return [n for n in self._nodes.values() if any(u is node for u in n.upstreams)]

    # -- running ----------------------------------------------------------------------------
    def run(self, *, until_idle: bool = False, settings: dict[str, str] | None = None,
            handle_signals: bool = True, observe: dict[str, Any] | None = None) -> "RunSummary":
        """Run the pipeline here; with until_idle, stop once every source is drained.

        Args:
            until_idle: end once every source is drained (a Kafka topic: read to where it
                ended when the run started) and everything is flushed.
            settings: `--set KEY=VALUE` settings for connectors (e.g. "kafka.brokers").
            handle_signals: finish gracefully on SIGINT/SIGTERM (main thread only).
            observe: observability options (metrics port, progress view), see docs/observability.md.
        """
        from streamfn.runtime import Runtime  # the runtime imports this module

        return Runtime(self, until_idle=until_idle, settings=settings or {},
                       handle_signals=handle_signals, observe=observe or {}).run()


def _names(value: str | Iterable[str], what: str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise GraphError(f"{what}= takes a column name or a list of them, got {value!r}")
    return names


def _exprs(aggs: Iterable[Any]) -> tuple[Any, ...]:
    import polars as pl

    exprs = tuple(aggs)
    if not exprs or not all(isinstance(e, pl.Expr) for e in exprs):
        raise GraphError("aggs= takes a list of polars expressions, e.g. [pl.len(), pl.col('v').sum()]")
    return exprs


def _default_name(connector: Source | Sink, fallback: str) -> str:
    name = getattr(connector, "default_name", None)
    return name() if callable(name) else fallback


def _check_arity(fn: Callable[..., Any], name: str, wanted: int) -> None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: trust the caller
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    if len(required) > wanted or (len(positional) < wanted and not varargs):
        shape = "(df, state)" if wanted == 2 else "(df)"
        raise GraphError(f"stage {name!r} must take {shape}; it takes "
                         f"({', '.join(p.name for p in positional)})")
