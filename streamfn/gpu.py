"""GPU stages: detect a usable GPU once per process, pick each stage's engine, run it on cuDF.

A stage declared `engine="gpu"` or `"auto"` runs on the GPU in one of two ways:

- its first parameter is annotated `cudf.DataFrame`: it gets a cudf DataFrame built from the
  batch's Arrow table and returns one (converted back with `to_arrow()`). On the CPU
  (`"auto"` without a GPU, or `"cpu"`) the same function gets a pandas DataFrame instead.
- otherwise it is a polars stage: with cudf-polars importable it gets a LazyFrame, which is
  collected with polars' GPU engine. cudf-polars needs polars < 1.45, so beside polars 2.x
  this path is usually missing; `"auto"` then runs the function on the CPU as written.

`engine="gpu"` that cannot run on this machine is an error when the run starts
(`check_pipeline`), never a crash mid-stream. Detection is logged once.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import inspect
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa

from streamfn.errors import ConfigError
from streamfn.pipeline import Node

log = logging.getLogger("streamfn.gpu")

StageFn = Callable[[pl.DataFrame], Any]
CPU, GPU_CUDF, GPU_POLARS, CPU_PANDAS = "cpu", "gpu-cudf", "gpu-polars", "cpu-pandas"


@dataclass(frozen=True)
class GpuStatus:
    """What this process can run on a GPU, and why not when it cannot."""

    cudf: bool = False          # cudf imports and a probe ran on the device
    polars_gpu: bool = False    # cudf-polars imports and polars' GPU engine ran a probe
    device: str | None = None   # the first device's name
    reason: str = ""            # why the GPU is not (fully) usable; "" when both paths work

    @property
    def usable(self) -> bool:
        """True when at least one GPU path works."""
        return self.cudf or self.polars_gpu


_lock = threading.Lock()
_status: GpuStatus | None = None
_logged: set[str] = set()


def detect(*, refresh: bool = False) -> GpuStatus:
    """Detect the GPU once per process (refresh=True checks again)."""
    global _status
    with _lock:
        if _status is None or refresh:
            _status = _detect()
            _logged.clear()
            if _status.usable:
                log.info("GPU found", extra={"device": _status.device, "cudf": _status.cudf,
                                             "polars_gpu": _status.polars_gpu, "reason": _status.reason})
        return _status


def _detect() -> GpuStatus:
    if os.environ.get("STREAMFN_DISABLE_GPU", "").lower() in ("1", "true", "yes"):
        return GpuStatus(reason="the GPU is disabled by STREAMFN_DISABLE_GPU")
    has_cudf = importlib.util.find_spec("cudf") is not None
    has_cudf_polars = importlib.util.find_spec("cudf_polars") is not None
    if not (has_cudf or has_cudf_polars):
        return GpuStatus(reason="neither cudf nor cudf-polars is installed (pip install \"streamfn[gpu]\")")
    device, why = _device()
    if device is None:
        return GpuStatus(reason=why)
    reasons = []
    cudf_ok = polars_ok = False
    if has_cudf:
        cudf_ok, why = _probe(_probe_cudf, "cudf")
        reasons.append(why)
    else:
        reasons.append("cudf is not installed")
    if has_cudf_polars:
        polars_ok, why = _probe(_probe_polars_gpu, "polars' GPU engine")
        reasons.append(why)
    else:
        reasons.append("cudf-polars is not installed (it needs polars < 1.45)")
    return GpuStatus(cudf_ok, polars_ok, device, "; ".join(r for r in reasons if r))


def _device() -> tuple[str | None, str]:
    """The first CUDA device's name from the driver API (no CUDA library of ours needed)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return None, f"CUDA_VISIBLE_DEVICES={visible!r} hides every device"
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None, "no NVIDIA driver here (libcuda.so.1 cannot be loaded)"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None, "the NVIDIA driver sees no CUDA device"
    name = ctypes.create_string_buffer(256)
    dev = ctypes.c_int(0)
    if cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0 and cuda.cuDeviceGetName(name, 256, dev) == 0:
        return name.value.decode(errors="replace"), ""
    return "CUDA device 0", ""


def _probe(fn: Callable[[], bool], what: str) -> tuple[bool, str]:
    try:
        if fn():
            return True, ""
        return False, f"{what} gave a wrong answer to a probe query"
    except Exception as exc:  # any failure means: not usable; say why
        return False, f"{what} failed a probe query: {type(exc).__name__}: {exc}"


def _probe_cudf() -> bool:
    cudf = importlib.import_module("cudf")
    return int(cudf.DataFrame({"a": [1, 2, 3]})["a"].sum()) == 6


def _probe_polars_gpu() -> bool:
    lf = pl.LazyFrame({"a": [1, 2, 3]}).select(pl.col("a").sum())
    return int(lf.collect(engine=pl.GPUEngine(raise_on_fail=True)).item()) == 6


# -- choosing a stage's engine -------------------------------------------------------------------
def stage_api(fn: Callable[..., Any]) -> str:
    """'cudf', 'lazy' or 'polars': what the stage's first parameter is annotated as."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return "polars"
    if not params:
        return "polars"
    note = params[0].annotation
    text = note if isinstance(note, str) else f"{getattr(note, '__module__', '')}.{getattr(note, '__qualname__', '')}"
    if "cudf" in text and "DataFrame" in text:
        return "cudf"
    if "LazyFrame" in text:
        return "lazy"
    return "polars"


def plan_engine(node: Node, status: GpuStatus | None = None) -> tuple[str, str]:
    """(engine, why) for a function stage: cpu, gpu-cudf, gpu-polars or cpu-pandas."""
    wanted = node.options.get("engine", "cpu")
    api = stage_api(node.fn) if node.fn is not None else "polars"
    cpu = CPU_PANDAS if api == "cudf" else CPU
    if wanted == "cpu":
        return cpu, "engine='cpu'"
    status = status or detect()
    if api == "cudf" and status.cudf:
        return GPU_CUDF, ""
    if api != "cudf" and status.polars_gpu:
        return GPU_POLARS, ""
    if api == "cudf":
        why = status.reason if not status.cudf else ""
    elif status.cudf:
        why = ("polars' GPU engine needs cudf-polars, which is not importable here (it needs polars < 1.45); "
               "annotate the stage's parameter as cudf.DataFrame to run it on cudf")
    else:
        why = status.reason
    return cpu, why or "no usable GPU"


def check_pipeline(nodes: Iterable[Node], pipeline: str = "") -> None:
    """Fail before any lane opens if a stage needs a GPU this process cannot use; log fallbacks once."""
    stages = [n for n in nodes if n.kind == "stage" and n.options.get("engine", "cpu") != "cpu"]
    if not stages:
        return
    status = detect()
    for node in stages:
        if node.fn is None:  # built-in operators pick their own engine
            continue
        engine, why = plan_engine(node, status)
        wanted = node.options["engine"]
        if wanted == "gpu" and not engine.startswith("gpu"):
            raise ConfigError(f"stage {node.name!r} asks for engine='gpu' but cannot run on a GPU here: {why}; "
                              "use engine='auto' to fall back to the CPU")
        if not engine.startswith("gpu"):
            _log_once(f"fallback:{node.name}", "GPU not used; the stage runs on the CPU",
                      stage=node.name, pipeline=pipeline, engine=engine, reason=why)
        else:
            _log_once(f"gpu:{node.name}", "stage runs on the GPU", stage=node.name, pipeline=pipeline,
                      engine=engine, device=status.device)


def _log_once(key: str, message: str, **fields: Any) -> None:
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    level = logging.WARNING if message.startswith("GPU not used") else logging.INFO
    log.log(level, message, extra=fields)


# -- running ------------------------------------------------------------------------------------
def bind_stage(node: Node) -> tuple[str, StageFn]:
    """(engine, f(df) -> output) for a function stage; engine='cpu' keeps the function as it is."""
    assert node.fn is not None
    fn = node.fn
    engine, _ = plan_engine(node)
    api = stage_api(fn)
    if engine == GPU_CUDF:
        return engine, _on_cudf(fn)
    if engine == CPU_PANDAS:
        return engine, _on_pandas(fn)
    if engine == GPU_POLARS:
        return engine, _on_polars(fn, gpu=True)
    if api == "lazy":
        return engine, _on_polars(fn, gpu=False)
    return engine, fn


def arrow_of(frame: pl.DataFrame) -> pa.Table:
    """The frame as Arrow with classic string/binary types, which cudf and pandas read."""
    return frame.to_arrow(compat_level=pl.CompatLevel.oldest())


def _on_cudf(fn: Callable[..., Any]) -> StageFn:
    cudf = importlib.import_module("cudf")

    def run(frame: pl.DataFrame) -> Any:
        out = fn(cudf.DataFrame.from_arrow(arrow_of(frame)))
        if isinstance(out, cudf.DataFrame):
            return pl.from_arrow(out.to_arrow(preserve_index=False))
        return out

    return run


def _on_pandas(fn: Callable[..., Any]) -> StageFn:
    pd = importlib.import_module("pandas")

    def run(frame: pl.DataFrame) -> Any:
        out = fn(arrow_of(frame).to_pandas())
        if isinstance(out, pd.DataFrame):
            return pl.from_arrow(pa.Table.from_pandas(out, preserve_index=False))
        return out

    return run


def _on_polars(fn: Callable[..., Any], *, gpu: bool) -> StageFn:
    def run(frame: pl.DataFrame) -> Any:
        out = fn(frame.lazy())
        if isinstance(out, pl.LazyFrame):
            return collect(out, gpu=gpu)
        return out

    return run


def collect(lf: pl.LazyFrame, *, gpu: bool) -> pl.DataFrame:
    """Collect on polars' GPU engine (plans it cannot run fall back to the CPU) or on the CPU."""
    if gpu:
        return lf.collect(engine=pl.GPUEngine(raise_on_fail=False))
    return lf.collect()
