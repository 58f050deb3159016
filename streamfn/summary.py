"""What a run did: records in and out per stage, dead letters, wall time."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class NodeStats:
    """Counts of one node, summed over lanes."""

    kind: str
    rows_in: int = 0
    rows_out: int = 0
    batches: int = 0
    errors: int = 0
    seconds: float = 0.0

    def add(self, other: "NodeStats") -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.batches += other.batches
        self.errors += other.errors
        self.seconds += other.seconds


@dataclass
class RunSummary:
    """The outcome of `Pipeline.run()`."""

    pipeline: str
    nodes: dict[str, NodeStats] = field(default_factory=dict)
    dead_letters: int = 0
    dead_letter_url: str | None = None
    lanes: int = 0
    wall_s: float = 0.0
    stopped_by: str = "end of input"

    def rows_in(self, node: str) -> int:
        """Rows that entered a node (for a source: rows read)."""
        return self.nodes[node].rows_in

    def rows_out(self, node: str) -> int:
        """Rows a node emitted (for a sink: rows written)."""
        return self.nodes[node].rows_out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        width = max([len(n) for n in self.nodes] + [4])
        lines = [f"pipeline {self.pipeline}: {self.lanes} lanes, {self.wall_s:.2f}s, stopped by {self.stopped_by}",
                 f"  {'node':<{width}}  {'kind':<6} {'rows in':>12} {'rows out':>12} {'errors':>7}"]
        for name, s in self.nodes.items():
            lines.append(f"  {name:<{width}}  {s.kind:<6} {s.rows_in:>12,} {s.rows_out:>12,} {s.errors:>7,}")
        where = f" -> {self.dead_letter_url}" if self.dead_letters and self.dead_letter_url else ""
        lines.append(f"  dead letters: {self.dead_letters:,}{where}")
        return "\n".join(lines)
