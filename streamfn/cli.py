"""The `streamfn` command: run, graph, convert, export, broker, invoke, status, table."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from streamfn.errors import ConfigError, LoadError, StreamfnError

log = logging.getLogger("streamfn.cli")


class UsageError(Exception):
    """A command line that does not parse (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def build_parser() -> _Parser:
    """The command line of `streamfn`."""
    parser = _Parser(prog="streamfn", description="Run Python functions over Arrow batches as stream jobs.")
    parser.add_argument("--version", action="version", version=f"streamfn {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run a pipeline (.py, .ipynb or spec .yaml)")
    run.add_argument("path", metavar="PATH[:attr]")
    run.add_argument("--until-idle", action="store_true", help="stop once every source is drained")
    run.add_argument("--brokers", help="Kafka bootstrap servers (default: an embedded local broker)")
    run.add_argument("--group", help="Kafka consumer group")
    run.add_argument("--checkpoint", metavar="URL", help="where checkpoints go (any fsspec URL)")
    run.add_argument("--reset-state", action="store_true", help="ignore existing checkpoints and start over")
    run.add_argument("--workers", type=_positive, default=1, help="worker processes in one consumer group")
    run.add_argument("--threads", type=_positive, help="lane threads in this process")
    run.add_argument("--set", dest="settings", type=_key_value, action="append", default=[],
                     metavar="KEY=VALUE", help="a setting (also put in the environment); repeatable")
    run.add_argument("--env-file", help="a file of KEY=VALUE lines put in the environment")
    run.add_argument("--host", help="HTTP triggers listen here (default 127.0.0.1)")
    run.add_argument("--port", type=_port, help="HTTP trigger port")
    run.add_argument("--metrics-port", type=_port, help="serve /metrics, /status and the dashboard here")
    run.add_argument("--quiet", action="store_true", help="no progress view, only warnings")
    _log_options(run)

    graph = commands.add_parser("graph", help="print a pipeline's graph")
    graph.add_argument("path", metavar="PATH[:attr]")
    graph.add_argument("--format", choices=["text", "mermaid"], default="text")
    _log_options(graph)

    convert = commands.add_parser("convert", help="turn a notebook into a Python module")
    convert.add_argument("notebook")
    convert.add_argument("-o", "--output", required=True, metavar="FILE.py")

    export = commands.add_parser("export", help="write the function spec, Dockerfile and manifests")
    export.add_argument("path", metavar="PATH[:attr]")
    export.add_argument("-o", "--output", required=True, metavar="DIR")
    export.add_argument("--set", dest="settings", type=_key_value, action="append", default=[],
                        metavar="KEY=VALUE")

    broker = commands.add_parser("broker", help="run a local Kafka-compatible broker for development")
    broker.add_argument("--port", type=_port)

    invoke = commands.add_parser("invoke", help="send an event to a running HTTP trigger")
    invoke.add_argument("url", metavar="URL|PATH")
    invoke.add_argument("--data", required=True, help="the body; @FILE reads a file")
    invoke.add_argument("--content-type", default="application/json")

    status = commands.add_parser("status", help="show a running job's status")
    status.add_argument("url")

    table = commands.add_parser("table", help="table maintenance")
    table.add_argument("action", choices=["optimize"])
    table.add_argument("url")
    table.add_argument("--vacuum", action="store_true")
    return parser


def _log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=["json", "text"], default=None,
                        help="json lines, or text (default: text on a terminal, json otherwise)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")


def _version() -> str:
    from streamfn import __version__
    return __version__


def _setup_logging(args: argparse.Namespace) -> None:
    from streamfn.log import configure_logging

    fmt = getattr(args, "log_format", None) or ("text" if sys.stderr.isatty() else "json")
    level = "warning" if getattr(args, "quiet", False) else getattr(args, "log_level", "info")
    configure_logging(log_format=fmt, level=level)


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped)."""
    if not os.path.exists(path):
        raise ConfigError(f"no such env file: {path}")
    values: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for number, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.removeprefix("export ").partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
            values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def _run_settings(args: argparse.Namespace) -> dict[str, str]:
    settings: dict[str, str] = {}
    if args.env_file:
        settings.update(read_env_file(args.env_file))
    settings.update(dict(args.settings))
    flags = {"kafka.brokers": args.brokers, "kafka.group": args.group, "checkpoint": args.checkpoint,
             "http.host": args.host, "http.port": args.port}
    settings.update({k: str(v) for k, v in flags.items() if v is not None})
    if args.reset_state:
        settings["state.reset"] = "1"
    return settings


def _helper(module: str, name: str, what: str) -> Callable[..., Any]:
    """A function of an optional part of streamfn, or a clear error if it is missing."""
    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what} is not available in this installation ({exc})") from exc


def cmd_run(args: argparse.Namespace) -> int:
    settings = _run_settings(args)
    path = args.path
    if path.endswith((".yaml", ".yml")):
        load_spec = _helper("streamfn.spec", "load_spec", "running a spec file")
        path, spec_settings = load_spec(path)
        settings = {**spec_settings, **settings}
    os.environ.update(settings)  # module-level code and stages read configuration from the environment
    if args.workers > 1:
        run_workers = _helper("streamfn.supervisor", "run_workers", "--workers")
        worker_argv = [sys.executable, "-m", "streamfn.cli"] + [a for a in _worker_args(sys.argv[1:])]
        return int(run_workers(worker_argv, args.workers))
    from streamfn.loader import load_pipeline

    pipeline = load_pipeline(path)
    if args.threads:
        pipeline.threads = args.threads
    observe = _optional_observer(args)
    summary = pipeline.run(until_idle=args.until_idle, settings=settings, **observe)
    print(summary)
    return 0


def _worker_args(argv: Sequence[str]) -> list[str]:
    """The same command line without --workers (what each worker process runs)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return out


def _optional_observer(args: argparse.Namespace) -> dict[str, Any]:
    """Observability options for Pipeline.run, when the observe package is present."""
    try:
        importlib.import_module("streamfn.observe")
    except ImportError:
        return {}
    # progress: a live view on a terminal, periodic log lines otherwise (observe decides which)
    return {"observe": {"metrics_port": _worker_port(args.metrics_port), "progress": not args.quiet,
                        "quiet": args.quiet}}


def _worker_port(port: int | None) -> int | None:
    """--workers N: worker i serves on PORT + i, so N workers on one host do not clash (0 stays any port)."""
    worker = os.environ.get("STREAMFN_WORKER_ID")
    return port + int(worker) if port and worker else port


def cmd_graph(args: argparse.Namespace) -> int:
    from streamfn.graph import render_mermaid, render_text
    from streamfn.loader import load_pipeline

    pipeline = load_pipeline(args.path)
    print(render_mermaid(pipeline) if args.format == "mermaid" else render_text(pipeline))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if not args.notebook.endswith(".ipynb"):
        raise ConfigError(f"convert takes a notebook (.ipynb), got {args.notebook}")
    from streamfn.loader import read_source

    source = read_source(args.notebook)
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write(source)
    print(f"wrote {args.output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from streamfn.loader import load_pipeline

    export_pipeline = _helper("streamfn.export", "export_pipeline", "export")
    pipeline = load_pipeline(args.path)
    for path in export_pipeline(pipeline, args.path, args.output, settings=dict(args.settings)):
        print(path)
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    return int(_helper("streamfn.connectors.kafka.broker", "run_broker_cli", "the embedded broker")(args.port))


def cmd_invoke(args: argparse.Namespace) -> int:
    invoke = _helper("streamfn.connectors.http", "invoke", "invoke")
    data = args.data
    if data.startswith("@"):
        with open(data[1:], "rb") as fh:
            body = fh.read()
    else:
        body = data.encode()
    status, response = invoke(args.url, body, args.content_type)
    sys.stdout.write(response.decode(errors="replace") if isinstance(response, bytes) else str(response))
    sys.stdout.write("\n")
    return 0 if 200 <= int(status) < 300 else 1


def cmd_status(args: argparse.Namespace) -> int:
    return int(_helper("streamfn.observe.status", "status_cli", "status")(args.url))


def cmd_table(args: argparse.Namespace) -> int:
    return int(_helper("streamfn.connectors.delta", "optimize_cli", "table maintenance")(args.url, args.vacuum))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "graph": cmd_graph, "convert": cmd_convert, "export": cmd_export,
    "broker": cmd_broker, "invoke": cmd_invoke, "status": cmd_status, "table": cmd_table,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `streamfn` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"streamfn: error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(args)
    try:
        return COMMANDS[args.command](args)
    except (LoadError, StreamfnError) as exc:
        log.debug("command failed", exc_info=True)
        print(f"streamfn: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("streamfn: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected failure: one line here, the traceback in the log
        log.error("command failed", exc_info=True)
        print(f"streamfn: error: {type(exc).__name__}: {exc} (the traceback is in the log)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
