"""Observability: OpenTelemetry spans and metrics, a Prometheus `/metrics` endpoint, `/status`,
a web dashboard and a live progress view in the terminal.

    with observe.start(pipeline, metrics_port=9464, progress=True) as obs:
        pipeline.run()

Without `start`, a run records telemetry only when OTEL_TRACES_EXPORTER or
OTEL_METRICS_EXPORTER ask for it; otherwise its observer does nothing per batch.
OpenTelemetry itself is imported only when a signal is on.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from streamfn.errors import ConfigError
from streamfn.observe.observer import Observer

if TYPE_CHECKING:
    from streamfn.observe.monitor import Monitor
    from streamfn.observe.progress import Progress
    from streamfn.observe.status import StatusServer
    from streamfn.pipeline import Pipeline
    from streamfn.runtime import Runtime

__all__ = ["Observation", "Observer", "current", "observer_for", "start"]

log = logging.getLogger("streamfn.observe")

_pending: dict[int, "Observation"] = {}  # id(pipeline) -> the observation its next runtime joins
_pending_lock = threading.Lock()
_running: dict[str, "Observation"] = {}  # pipeline name -> the observation of its run in this process


class Observation:
    """What `start` set up for a pipeline's run: exporters, the HTTP endpoint, the progress view."""

    def __init__(self, pipeline: "Pipeline", *, metrics_port: int | None, metrics_host: str | None,
                 progress: bool, quiet: bool, tracer_provider: Any, metric_readers: Sequence[Any],
                 sample_interval_s: float, stream: TextIO | None, implicit: bool = False) -> None:
        from streamfn.observe import metrics, tracing

        self.pipeline = pipeline
        self.implicit = implicit
        self._closed = False
        self.runtime: "Runtime | None" = None
        self.observer: Observer | None = None
        self._owned_tracer: Any = None  # a provider made here from OTEL_* (shut down on close)
        if tracer_provider is None:
            tracer_provider = tracing.tracer_provider_from_env(pipeline.name)
            if tracer_provider is not tracing._application_provider():
                self._owned_tracer = tracer_provider
        self.tracer_provider = tracer_provider
        env_readers, env_prometheus = metrics.env_metric_readers()
        readers = [*metric_readers, *env_readers]
        self.scrape_reader: Any = None
        self.server: "StatusServer | None" = None
        self.monitor: "Monitor | None" = None
        self.progress: "Progress | None" = None
        serve = metrics_port is not None or env_prometheus
        if serve:
            self.scrape_reader = metrics.scrape_reader()
            readers.append(self.scrape_reader)
        self.meter_provider = metrics.meter_provider(pipeline.name, readers) if readers else None
        self.instruments: Any = None
        if self.meter_provider is not None:  # once per provider; each run's observer answers the callbacks
            self.instruments = metrics.Instruments(self.meter_provider)
            self.instruments.observables({name: self._reader(name) for name in metrics.OBSERVABLES})
        if serve or (progress and not quiet):
            from streamfn.observe.monitor import Monitor

            self.monitor = Monitor(self, interval_s=sample_interval_s)
        if serve:
            from streamfn.observe.status import StatusServer, prometheus_address

            host, port = prometheus_address(metrics_host, metrics_port)
            try:
                self.server = StatusServer(self, host=host, port=port)
            except BaseException:  # the port is taken: release the exporters' threads, then say so
                self.close()
                raise
        if progress and not quiet:
            from streamfn.observe.progress import Progress

            assert self.monitor is not None
            self.progress = Progress(self.monitor, stream=stream)

    def _reader(self, name: str) -> Any:
        def read(options: Any) -> list[Any]:
            observables = getattr(self.observer, "observables", None)
            return observables[name](options) if observables else []
        return read

    @property
    def url(self) -> str | None:
        """The base URL of /status, /metrics and the dashboard, when served."""
        return self.server.url if self.server is not None else None

    def attach(self, runtime: "Runtime") -> Observer:
        """Make the observer for a runtime of this pipeline (the runtime calls this)."""
        if self.tracer_provider is not None or self.meter_provider is not None:
            from streamfn.observe.telemetry import TelemetryObserver

            observer: Observer = TelemetryObserver(runtime, tracer_provider=self.tracer_provider,
                                                   instruments=self.instruments)
        else:
            observer = Observer(runtime)
        observer.observation = self
        self.runtime, self.observer = runtime, observer
        with _pending_lock:
            _running[self.pipeline.name] = self
        if self.monitor is not None:
            self.monitor.start()
        if self.progress is not None:
            self.progress.start()
        return observer

    def run_finished(self) -> None:
        """The attached run ended: export what is buffered (an implicit observation closes)."""
        if self.monitor is not None:
            self.monitor.sample()
        if self.progress is not None:
            self.progress.draw(final=True)
        if self.implicit:
            self.close()
        else:
            self._flush()

    def _flush(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            flush = getattr(provider, "force_flush", None)
            if flush is not None:
                flush()

    def close(self) -> None:
        """Stop serving, stop the progress view, flush and shut down the exporters (once)."""
        if self._closed:
            return
        self._closed = True
        with _pending_lock:
            if _pending.get(id(self.pipeline)) is self:
                del _pending[id(self.pipeline)]
            if _running.get(self.pipeline.name) is self:
                del _running[self.pipeline.name]
        if self.progress is not None:
            self.progress.close()
        if self.monitor is not None:
            self.monitor.close()
        if self.server is not None:
            self.server.close()
        self._flush()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
        if self._owned_tracer is not None:
            self._owned_tracer.shutdown()
            self._owned_tracer = None

    def __enter__(self) -> "Observation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def current(pipeline: str) -> Observation | None:
    """The observation of a pipeline's run in this process (by name), if one is open.

    The HTTP trigger uses it to answer /metrics, /status and / on its own port too:
    `streamfn.observe.status.respond(current(ctx.pipeline), path)`.
    """
    with _pending_lock:
        return _running.get(pipeline)


def start(target: "Pipeline | Runtime", *, metrics_port: int | None = None, metrics_host: str | None = None,
          progress: bool = False, quiet: bool = False, tracer_provider: Any = None,
          metric_readers: Sequence[Any] = (), sample_interval_s: float = 1.0,
          stream: TextIO | None = None) -> Observation:
    """Observe the next run of a pipeline (or a runtime not yet running); close it after the run.

    Args:
        target: the Pipeline about to run, or a Runtime created but not yet run.
        metrics_port: serve /metrics, /status, /healthz, /readyz and the dashboard on this port
            (0: any free port; see `.url`). None: only if OTEL_METRICS_EXPORTER=prometheus.
        metrics_host: the address to listen on (default OTEL_EXPORTER_PROMETHEUS_HOST, else 127.0.0.1).
        progress: show progress: redrawn in place when the stream is a terminal, else a log
            line every 10 seconds.
        quiet: no progress at all (overrides `progress`).
        tracer_provider, metric_readers: OpenTelemetry SDK objects to use besides those the
            OTEL_* variables configure (tests pass in-memory exporters here).
        sample_interval_s: how often rates are sampled for /status and the progress view.
        stream: where the progress view goes (default stdout).
    """
    from streamfn.runtime import Runtime

    pipeline = target.pipeline if isinstance(target, Runtime) else target
    observation = Observation(pipeline, metrics_port=metrics_port, metrics_host=metrics_host,
                              progress=progress, quiet=quiet, tracer_provider=tracer_provider,
                              metric_readers=metric_readers, sample_interval_s=sample_interval_s,
                              stream=stream)
    if isinstance(target, Runtime):
        target.observer = observation.attach(target)
    else:
        with _pending_lock:
            _pending[id(pipeline)] = observation
    return observation


def observer_for(runtime: "Runtime") -> Observer:
    """The observer a new runtime uses: from `start`, else from the OTEL_* variables, else a no-op."""
    with _pending_lock:
        observation = _pending.get(id(runtime.pipeline))
    if observation is not None:
        return observation.attach(runtime)
    options = dict(getattr(runtime, "observe_options", None) or {})  # Pipeline.run(observe={...})
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigError(f"unknown observe option(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(_OPTIONS))}")
    wanted = options.get("metrics_port") is not None or (options.get("progress") and not options.get("quiet"))
    if not wanted:
        from streamfn.observe import metrics, tracing

        if not (tracing.traces_wanted() or metrics.metrics_wanted() or tracing._application_provider()):
            return Observer(runtime)
    settings: dict[str, Any] = {"metrics_port": None, "metrics_host": None, "progress": False, "quiet": False,
                                "tracer_provider": None, "metric_readers": (), "sample_interval_s": 1.0,
                                "stream": None}
    settings.update(options)
    return Observation(runtime.pipeline, implicit=True, **settings).attach(runtime)


_OPTIONS = {"metrics_port", "metrics_host", "progress", "quiet", "tracer_provider", "metric_readers",
            "sample_interval_s", "stream"}
