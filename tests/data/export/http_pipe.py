"""A pipeline with an HTTP-triggered source (port given by the connector)."""
from collections.abc import Sequence

import streamfn as sf
from streamfn.connectors import memory


class Endpoint(sf.Source):
    """A real Source with the attributes an HTTP trigger has."""

    path, port, method = "/events", 8088, "POST"

    def partitions(self) -> Sequence[str]:
        return []

    def open(self, partition, resume):
        raise NotImplementedError

    def spec_trigger(self) -> dict:
        return {"kind": "http"}


p = sf.Pipeline("events")
events = p.source(Endpoint(), name="events")
events.sink(memory.sink())
