"""What sources and sinks may know and ask of the run they take part in."""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from streamfn.batch import Position
from streamfn.contracts import Sink, Source
from streamfn.deadletter import DeadLetter

if TYPE_CHECKING:
    from streamfn.runtime import Runtime


class RunContext:
    """What sources and sinks may know and ask of the run they take part in."""

    def __init__(self, runtime: "Runtime") -> None:
        self._rt = runtime
        self.pipeline = runtime.pipeline.name
        self.until_idle = runtime.until_idle
        self.settings: Mapping[str, str] = runtime.settings
        self.run_dir = runtime.pipeline.run_dir

    @property
    def stopping(self) -> bool:
        """True once the run is shutting down."""
        return self._rt.stopping

    def setting(self, key: str, default: str | None = None) -> str | None:
        """A `--set KEY=VALUE` setting, else the environment variable, else the default."""
        return self.settings.get(key, os.environ.get(key, default))

    def settings_with_prefix(self, prefix: str) -> dict[str, str]:
        """The `--set` settings under a prefix (e.g. 'kafka.'), with the prefix removed."""
        return {k[len(prefix):]: v for k, v in self.settings.items() if k.startswith(prefix)}

    def add_partitions(self, source: Source, partitions: Mapping[str, Position] | Iterable[str]) -> None:
        """Open lanes for partitions assigned during the run (a mapping gives resume positions)."""
        self._rt.add_partitions(source, partitions)

    def remove_partitions(self, source: Source, partitions: Iterable[str],
                          timeout_s: float = 60.0) -> dict[str, Position]:
        """Finish, commit and close these partitions' lanes; return their positions.

        Blocks until the lanes are closed: never call it from a lane's own thread.
        """
        return self._rt.remove_partitions(source, partitions, timeout_s)

    def wake(self, source: Source, partition: str) -> None:
        """Tell the runtime that a partition has rows ready (skips its idle back-off)."""
        self._rt.wake(source, partition)

    def report_lag(self, source: Source, partition: str, lag: int | None) -> None:
        """Say how many records a partition is behind its source's end (metrics, /status)."""
        self._rt.observer.lag(self._rt._source_node(source).name, partition, lag)

    def dead_letters(self, letters: list[DeadLetter]) -> None:
        """Send records a sink or source could not deliver to the dead-letter sink."""
        self._rt.count_dead_letters(len(letters))
        self._rt.write_dead_letters(self._rt.shared_dlq_writer, letters, "runtime")

    def others_done(self, source: Source) -> bool:
        """True once every other source of the run has ended (a trigger may then stop too)."""
        return self._rt.others_done(source)

    def source(self, name: str) -> Source | None:
        """The connector of the run's source node `name` (None: no such source)."""
        node = self._rt.sources.get(name)
        return None if node is None else node.connector  # type: ignore[return-value]

    def sinks(self) -> list[Sink]:
        """The sink connectors of the run's pipeline (the dead-letter sink not included)."""
        return [node.connector for node in self._rt.order if node.kind == "sink"]  # type: ignore[misc]

    def feeders(self, sink: Sink) -> list[Source]:
        """The sources whose lanes write to this sink."""
        return [self._rt.sources[name].connector for name, plan in self._rt.plans.items()  # type: ignore[misc]
                if any(node.connector is sink for node in plan)]

    def sources_done(self, sources: Iterable[Source]) -> bool:
        """True once none of these sources has an open lane or will open one."""
        return self._rt.sources_done(sources)
