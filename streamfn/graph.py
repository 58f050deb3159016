"""Drawing a pipeline's graph as text or as a Mermaid flowchart."""
from __future__ import annotations

from streamfn.pipeline import Node, Pipeline


def _describe(node: Node) -> str:
    if node.connector is not None:
        return node.connector.describe()
    if node.operator is not None:
        return f"{node.operator[0]}.{node.operator[1]}"
    return ""


def render_text(pipeline: Pipeline) -> str:
    """One line a node, in topological order: kind, name, upstreams, what it is."""
    nodes = pipeline.validate()
    width = max(len(n.name) for n in nodes)
    lines = [f"pipeline {pipeline.name}"]
    for node in nodes:
        ups = ", ".join(u.name for u in node.upstreams)
        arrow = f"<- {ups}" if ups else ""
        lines.append(f"  {node.kind:<6}  {node.name:<{width}}  {arrow:<{width + 3}}  {_describe(node)}".rstrip())
    return "\n".join(lines)


def render_mermaid(pipeline: Pipeline) -> str:
    """A Mermaid `flowchart LR`: sources as stadiums, stages as boxes, sinks as parallelograms."""
    nodes = pipeline.validate()
    ids = {n.name: f"n{i}" for i, n in enumerate(nodes)}
    shapes = {"source": ('(["', '"])'), "stage": ('["', '"]'), "sink": ('[/"', '"/]')}
    lines = ["flowchart LR"]
    for node in nodes:
        left, right = shapes[node.kind]
        what = _describe(node).replace('"', "'")
        label = node.name + (f"<br/><small>{what}</small>" if what else "")
        lines.append(f"  {ids[node.name]}{left}{label}{right}")
    for node in nodes:
        for up in node.upstreams:
            lines.append(f"  {ids[up.name]} --> {ids[node.name]}")
    return "\n".join(lines)
