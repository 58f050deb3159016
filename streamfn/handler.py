"""The handler model: Nuclio-style `handler(context, event)` functions run as stages.

A handler stage calls the function once per row (an event), batched under the hood: a
batch from an HTTP trigger in `events` mode gives one event per request and the return value
becomes the answer; any other batch gives one event per row (`event.body` is the row as a
dict) and the return values become the output rows. A row whose handler raises goes to the
dead letters with the error (an HTTP request gets a 500 with a short message, never a
traceback); the log gets the traceback.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import polars as pl

from streamfn.batch import Batch
from streamfn.contracts import StageRunner
from streamfn.deadletter import DeadLetter, row_payload
from streamfn.errors import LoadError
from streamfn.events import Context, Event, Logger, Response, TriggerInfo

if TYPE_CHECKING:
    from streamfn.lane import Lane
    from streamfn.pipeline import Node, Pipeline

log = logging.getLogger("streamfn.handler")

Handler = Callable[[Context, Event], Any]
EVENT_COLUMNS = ("id", "method", "path", "query", "content_type", "headers", "body", "timestamp")
REQUEST_ID = "_request_id"  # the HTTP trigger's column that routes answers (see connectors/http)
ANSWER_SCHEMA = {"_http_status": pl.Int64, "_http_body": pl.Binary, "_http_content_type": pl.String,
                 "_http_headers": pl.String}

__all__ = ["Context", "Event", "HandlerStage", "Response", "TriggerInfo", "is_handler", "pipeline_for_handler",
           "wrap"]


def is_handler(fn: Any) -> bool:
    """True for a function shaped like `handler(context, event)`."""
    try:
        params = [p.name for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):
        return False
    return len(params) == 2 and params[0] in ("context", "ctx") and params[1] in ("event", "ev")


class HandlerStage:
    """A `handler(context, event)` as a stage function; `p.stage(src)(wrap(handler))`."""

    def __init__(self, handler: Handler, *, init_context: Callable[[Context], Any] | None = None,
                 name: str | None = None, context: Context | None = None) -> None:
        self.handler = handler
        self.init_context = init_context
        self.__name__ = name or getattr(handler, "__name__", "handler")
        self.context = context or Context(Logger(base={"stage": self.__name__}))

    def __call__(self, df: Any, event: Any = None) -> Any:
        """On a DataFrame: run the handler per row (errors propagate); else call it as it is."""
        if isinstance(df, pl.DataFrame) and event is None:
            return self.run(df, on_error=None, source="call")
        return self.handler(df, event)  # handler(context, event), e.g. in a notebook's test cell

    def make_runner(self, node: "Node", lane: "Lane") -> StageRunner:
        """The runner a lane uses for this stage (it dead-letters failing rows)."""
        return HandlerRunner(self, node, lane)

    def run(self, df: pl.DataFrame, *, on_error: Callable[[int, BaseException], None] | None,
            source: str) -> pl.DataFrame | None:
        """Call the handler per row; `on_error(row, exc)` keeps going past a raising row."""
        self.context.initialise(self.init_context)
        if set(EVENT_COLUMNS) <= set(df.columns):
            return self._answer_requests(df, on_error)
        outputs: list[dict[str, Any]] = []
        for i, row in enumerate(df.iter_rows(named=True)):
            event = Event(body=row, trigger=TriggerInfo("stream", source), offset=i)
            try:
                outputs.extend(_as_rows(self.handler(self.context, event)))
            except Exception as exc:
                if on_error is None:
                    raise
                on_error(i, exc)
        return pl.from_dicts(outputs, infer_schema_length=None) if outputs else None

    def _answer_requests(self, df: pl.DataFrame, on_error: Callable[[int, BaseException], None] | None,
                         ) -> pl.DataFrame:
        answers: list[dict[str, Any]] = []
        for i, row in enumerate(df.iter_rows(named=True)):
            event = _http_event(row)
            try:
                status, body, content_type, headers = as_answer(self.handler(self.context, event))
            except Exception as exc:
                if on_error is None:
                    raise
                on_error(i, exc)
                status, body, content_type, headers = (
                    500, json.dumps({"error": f"handler raised {type(exc).__name__}", "id": event.id}).encode(),
                    "application/json", {})
            answers.append({REQUEST_ID: row.get(REQUEST_ID), "id": event.id, "_http_status": status,
                            "_http_body": body, "_http_content_type": content_type,
                            "_http_headers": json.dumps(headers) if headers else None})
        return pl.DataFrame(answers, schema={REQUEST_ID: pl.Int64, "id": pl.String, **ANSWER_SCHEMA})


class HandlerRunner(StageRunner):
    """Runs a HandlerStage in one lane; a raising row becomes a dead letter."""

    def __init__(self, stage: HandlerStage, node: "Node", lane: "Lane") -> None:
        self.stage, self.node, self.lane = stage, node, lane

    def process(self, frame: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        letters: list[DeadLetter] = []

        def on_error(i: int, exc: BaseException) -> None:
            log.error("handler raised", exc_info=exc, extra={
                "stage": self.node.name, "lane": self.lane.id, "error": f"{type(exc).__name__}: {exc}"})
            offset, index = self.lane.row_offset(frame, batch, i)
            row = frame.slice(i, 1)
            payload = row.item(0, "body") if "body" in row.columns and row.schema["body"] == pl.Binary \
                else row_payload(row.drop("timestamp", strict=False))
            letters.append(DeadLetter(self.node.name, batch.source, batch.partition, offset,
                                      f"{type(exc).__name__}: {exc}", payload or b"", index))

        out = self.stage.run(frame, on_error=on_error, source=batch.source)
        self.lane.dead_letter(letters, stage=self.node.name)
        return out


def wrap(handler: Handler, *, init_context: Callable[[Context], Any] | None = None,
         name: str | None = None) -> HandlerStage:
    """Make `handler(context, event)` a stage function: `p.stage(src)(wrap(handler))`."""
    if not callable(handler):
        raise TypeError(f"wrap() takes a handler function, got {type(handler).__name__}")
    return HandlerStage(handler, init_context=init_context, name=name)


def as_stage(fn: Any, *, name: str | None = None, stateful: bool = False) -> Any:
    """`fn` as a stage function: a handler(context, event) is wrapped (with its module's
    init_context, as Nuclio does); anything else is returned as it is."""
    if isinstance(fn, (HandlerStage, StatefulHandlerStage)) or not is_handler(fn):
        return fn
    init = getattr(fn, "__globals__", {}).get("init_context")
    stage = wrap(fn, init_context=init if callable(init) else None, name=name)
    return StatefulHandlerStage(stage) if stateful else stage


class StatefulHandlerStage:
    """A handler stage with keyed state: `fn(df, table)` for the runtime, `context.state` for the handler."""

    def __init__(self, stage: HandlerStage) -> None:
        self.stage = stage
        self.__name__ = stage.__name__
        self._states: dict[int, RecordState] = {}

    def __call__(self, df: Any, table: Any) -> Any:
        """Run the handler per row with `context.state` on this lane's table (a raising row
        propagates: the stateful runner rolls the batch back and retries it row by row)."""
        if not isinstance(df, pl.DataFrame):
            return self.stage.handler(df, table)  # handler(context, event) called directly
        state = self._states.get(id(table))
        if state is None or state.table is not table:
            state = self._states[id(table)] = RecordState(table)
        self.stage.context.state = state
        return self.stage.run(df, on_error=None, source="stateful")


class RecordState:
    """`context.state` of a stateful handler: rows of the stage's table, one key at a time."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.key: list[str] = list(table.key)

    def _key_frame(self, key: Any) -> pl.DataFrame:
        values = key if isinstance(key, dict) else dict(zip(self.key, key if isinstance(key, tuple) else (key,)))
        return pl.DataFrame({k: [values[k]] for k in self.key})

    def get(self, key: Any, default: Any = None) -> dict[str, Any] | Any:
        """The row of `key` (a value, a tuple for several key columns, or a dict), else default."""
        wanted = self._key_frame(key)
        rows = self.table.frame().join(wanted, on=self.key, how="semi", nulls_equal=True)
        return rows.row(0, named=True) if rows.height else default

    def put(self, row: dict[str, Any]) -> None:
        """Insert or replace the row of its key."""
        self.table.put(pl.from_dicts([row]))

    def delete(self, key: Any) -> None:
        """Forget the row of `key`."""
        self.table.delete(self._key_frame(key))


# -- events in, answers out ---------------------------------------------------------------------
def _http_event(row: Mapping[str, Any]) -> Event:
    headers = json.loads(row["headers"]) if row.get("headers") else {}
    content_type = row.get("content_type") or ""
    body: Any = row.get("body") or b""
    if content_type.split(";", 1)[0].strip().lower() in ("application/json", "text/json") and body:
        try:  # Nuclio hands a JSON body over decoded
            body = json.loads(body)
        except ValueError:
            pass
    return Event(body=body, content_type=content_type or None, trigger=TriggerInfo("http", "http"),
                 headers=headers, id=row.get("id"), method=row.get("method") or "POST",
                 path=row.get("path") or "/", timestamp=row.get("timestamp"),
                 fields=dict(_query_fields(row.get("query") or "")), url=row.get("path") or "/")


def _query_fields(query: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(query, keep_blank_values=True)


def as_answer(value: Any) -> tuple[int, bytes, str, dict[str, str]]:
    """A handler's return value as (status, body, content type, headers), as Nuclio reads it."""
    if isinstance(value, Response):
        status, body, content_type, headers = as_answer(value.body)
        return (value.status_code, body, value.content_type or content_type, dict(value.headers or {}))
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int):
        _, body, content_type, headers = as_answer(value[1])
        return value[0], body, content_type, headers
    if value is None:
        return 200, b"", "text/plain", {}
    if isinstance(value, bytes):
        return 200, value, "application/octet-stream", {}
    if isinstance(value, str):
        return 200, value.encode(), "text/plain", {}
    if isinstance(value, pl.DataFrame):
        value = value.to_dicts()
    if isinstance(value, (dict, list)):
        return 200, json.dumps(value, default=str).encode(), "application/json", {}
    return 200, str(value).encode(), "text/plain", {}


def _as_rows(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, pl.DataFrame):
        return value.to_dicts()
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value
    if isinstance(value, Response):
        value = value.body
    return [{"body": value}]


# -- a file with only a handler -----------------------------------------------------------------
def pipeline_for_handler(module_globals: dict[str, Any], *, port: int | None = None,
                         host: str | None = None) -> "Pipeline":
    """A pipeline that serves the module's `handler(context, event)` on an HTTP trigger.

    port/host default to the run's `http.port`/`http.host` settings (`--port`/`--host`),
    else 8080 on 127.0.0.1.
    """
    from streamfn.pipeline import Pipeline

    handler = module_globals.get("handler")
    if not callable(handler):
        raise LoadError("the file defines no Pipeline and no handler(context, event) function; "
                        "define one of them")
    http = importlib.import_module("streamfn.connectors.http")
    source_file = str(module_globals.get("__file__") or "handler")
    stem = os.path.splitext(os.path.basename(source_file))[0]
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", stem).lstrip("_.-") or "handler"
    if not name[0].isalpha():
        name = f"fn_{name}"
    pipeline = Pipeline(name)
    requests = pipeline.source(http.endpoint("/*", port=port, host=host, method=None, events=True),
                               name="http")
    stage = requests.stage(wrap(handler, init_context=module_globals.get("init_context"), name="handler"))
    http.respond(stage)
    return pipeline
