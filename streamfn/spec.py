"""The function spec: a versioned, reproducible description of a pipeline (`streamfn export`).

`build_spec` reads a loaded Pipeline and the environment it runs in; `load_spec` checks a
spec file against the JSON Schema (function.schema.json) and says what to run and with
which settings (`streamfn run spec.yaml`). Secrets never appear in a spec, only references.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamfn import __version__
from streamfn._optional import import_optional
from streamfn.errors import ConfigError
from streamfn.pipeline import Node, Pipeline
from streamfn.secrets import resolve_secret

if TYPE_CHECKING:
    from streamfn.nbexport import NotebookParts

log = logging.getLogger("streamfn.spec")

API_VERSION = "streamfn/v1"
SCHEMA_PATH = Path(__file__).with_name("function.schema.json")
TRIGGER_KINDS = ("kafka", "http", "cron", "files", "v3io", "memory")
_SECRET_WORDS = ("password", "passwd", "secret", "token", "access_key", "accesskey", "api_key", "apikey",
                 "credential", "private_key", "sasl.password")
_SECRET_REF = re.compile(r"^secret:(?P<name>[a-z0-9][-a-z0-9.]*)/(?P<key>[-._a-zA-Z0-9]+)$")
_VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_URL_PASSWORD = re.compile(r"://[^/\s:@]*:(?P<pw>[^/\s@]+)@")  # scheme://user:password@host
_ATTR = re.compile(r"^(?P<path>.+?):(?P<attr>[A-Za-z_][A-Za-z0-9_]*)$")
# packages a RAPIDS base image already has (pinning them again would fight conda)
_GPU_PROVIDED = re.compile(r"^(cudf|cupy|rmm|pylibcudf|libcudf|libkvikio|librmm|nvidia-|cuda-|numba|llvmlite|"
                           r"rapids|nvtx|kvikio|dask-cuda)", re.I)


def schema() -> dict[str, Any]:
    """The JSON Schema every spec file must match."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def code_hash(path: str) -> str:
    """`sha256:<hex>` of the pipeline file's bytes."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dns_name(name: str) -> str:
    """A pipeline name as a Kubernetes DNS-1123 label."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:53].strip("-")
    return label or "streamfn"


def is_secret_key(key: str) -> bool:
    """Whether a setting or variable name looks like it holds a secret."""
    lowered = key.lower().replace("-", "_")
    return any(word in lowered for word in _SECRET_WORDS)


def split_target(target: str) -> tuple[str, str | None]:
    """'file.py:attr' -> ('file.py', 'attr'); a plain path -> (path, None)."""
    match = _ATTR.match(target)
    if match and not os.path.exists(target):
        return match.group("path"), match.group("attr")
    return target, None


# -- building -----------------------------------------------------------------------------------
def build_spec(pipeline: Pipeline, source_path: str, *, settings: dict[str, str],
               notebook: NotebookParts | None = None) -> dict[str, Any]:
    """The spec of a loaded pipeline; `spec.*` settings set version, resources and replicas.

    `notebook`: what a notebook's magics declared (settings given here win over its config keys).
    """
    path, attr = split_target(source_path)
    if notebook is not None:
        settings = {**notebook.settings, **settings}
    opts = {k[len("spec."):]: v for k, v in settings.items() if k.startswith("spec.")}
    rest = {k: v for k, v in settings.items() if not k.startswith("spec.")}
    name = dns_name(opts.get("name") or pipeline.name)
    code = notebook.code if notebook is not None else None
    digest = code_hash(path) if code is None else "sha256:" + hashlib.sha256(code).hexdigest()
    engines = {n.name: n.options.get("engine", "cpu") for n in pipeline.nodes if n.kind == "stage"}
    gpu = _int(opts, "gpu", 1 if "gpu" in engines.values() else 0, minimum=0)
    triggers = [_trigger(n, rest) for n in pipeline.nodes if n.kind == "source"]
    packages, local = _pinned_packages(drop_gpu=gpu > 0)
    env, run_settings = _env_and_settings(rest, name)
    if notebook is not None:  # a variable given with --set env.X wins over the notebook's
        given = {item["name"] for item in env}
        env = sorted(env + [i for i in notebook.env_items(name) if i["name"] not in given],
                     key=lambda item: item["name"])
    entry: dict[str, Any] = {"file": os.path.basename(path)}
    if attr:
        entry["attr"] = attr
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    runtime = {"python": py, "streamfn": __version__, "image": opts.get("image", f"{name}:{digest[7:19]}"),
               "baseImage": opts.get("base_image", _base_image(py, gpu))}
    spec: dict[str, Any] = {
        "entryPoint": entry, "codeHash": digest, "runtime": runtime, "packages": packages,
        "env": env, "settings": run_settings, "triggers": triggers, "engines": engines,
        "resources": _resources(opts, gpu),
        "replicas": _replicas(opts, triggers),
        "checkpoint": {"url": settings.get("checkpoint", pipeline.checkpoint),
                       "intervalSeconds": pipeline.checkpoint_interval_s},
        "ports": {"metrics": _int(opts, "metrics_port", 9464, minimum=1)},
    }
    if local:
        spec["localPackages"] = local
    http_ports = [t["port"] for t in triggers if t["kind"] == "http" and "port" in t]
    if http_ports or any(t["kind"] == "http" for t in triggers):
        spec["ports"]["http"] = _int(opts, "http_port", http_ports[0] if http_ports else 8080, minimum=1)
        if "http_port" in opts:  # the triggers say the port the container listens on
            for t in (t for t in triggers if t["kind"] == "http"):
                t["port"] = spec["ports"]["http"]
                t.pop("url", None)
    metadata: dict[str, Any] = {"name": name, "pipeline": pipeline.name,
                                "version": opts.get("version", f"0.0.0+{digest[7:19]}")}
    if notebook is not None:
        _add_notebook_parts(spec, metadata, notebook)
    doc = {"apiVersion": API_VERSION, "kind": "Function", "metadata": metadata, "spec": spec}
    validate_spec(doc, where="the exported spec")
    return doc


def _resources(opts: dict[str, str], gpu: int) -> dict[str, Any]:
    out: dict[str, Any] = {"cpu": opts.get("cpu", "1"), "memory": opts.get("memory", "1Gi"), "gpu": gpu}
    if "cpu_limit" in opts:
        out["cpuLimit"] = opts["cpu_limit"]
    if "memory_limit" in opts:
        out["memoryLimit"] = opts["memory_limit"]
    return out


def _add_notebook_parts(spec: dict[str, Any], metadata: dict[str, Any], notebook: NotebookParts) -> None:
    """Build packages and commands, labels, and the config keys kept verbatim."""
    build = {k: v for k, v in (("packages", notebook.packages), ("commands", notebook.commands)) if v}
    if build:
        spec["build"] = build
    if notebook.verbatim:
        spec["nuclioConfig"] = notebook.verbatim
    if notebook.labels:
        metadata["labels"] = notebook.labels


def refers_to_secret(value: str) -> bool:
    """Whether a `${VAR}` in the value names a secret, or stands for a URL's password."""
    url = _URL_PASSWORD.search(value)
    return any(is_secret_key(a or b) for a, b in _VAR_REF.findall(value)) or bool(url and _VAR_REF.search(url["pw"]))


def _int(opts: dict[str, str], key: str, default: int, *, minimum: int) -> int:
    raw = opts.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"spec.{key} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"spec.{key} must be at least {minimum}, got {value}")
    return value


def _base_image(py: str, gpu: int) -> str:
    if gpu <= 0:
        return f"python:{py}-slim"
    try:  # match the RAPIDS release to the cudf this environment was tested with
        rapids = ".".join(metadata.version("cudf-cu12").split(".")[:2])
    except metadata.PackageNotFoundError:
        rapids = "26.10"
    return f"rapidsai/base:{rapids}-cuda12-py{py}"


def _pinned_packages(*, drop_gpu: bool) -> tuple[list[str], list[str]]:
    """`name==version` for every installed distribution; local/editable ones listed apart."""
    pins: dict[str, str] = {}
    local: set[str] = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or name.lower() in ("streamfn", "pip", "setuptools", "wheel"):
            continue
        direct = dist.read_text("direct_url.json")
        if direct and ('"dir_info"' in direct or direct.lstrip().startswith('{"url": "file:')):
            local.add(name)
            continue
        if drop_gpu and _GPU_PROVIDED.match(name):
            continue
        pins.setdefault(re.sub(r"[-_.]+", "-", name).lower(), f"{name}=={dist.version}")
    return sorted(pins.values(), key=str.lower), sorted(local, key=str.lower)


def _trigger(node: Node, settings: dict[str, str]) -> dict[str, Any]:
    """What starts this source's work, from the connector's `spec_trigger()` or its attributes."""
    connector = node.connector
    hook = getattr(connector, "spec_trigger", None)
    info: dict[str, Any] = dict(hook()) if callable(hook) else {}
    module = type(connector).__module__
    kind = info.get("kind") or next((k for k in TRIGGER_KINDS if f".{k}" in f".{module}"), "other")
    info.update({"kind": kind if kind in TRIGGER_KINDS else "other", "source": node.name})
    for key, attrs in (("topic", ("topic", "topics")), ("group", ("group", "group_arg")),
                       ("bootstrap", ("bootstrap", "brokers", "brokers_arg")),
                       ("path", ("path",)), ("port", ("port",)), ("method", ("method",)),
                       ("schedule", ("schedule", "expr", "interval")), ("url", ("url",))):
        if key not in info:
            value = _first_attr(connector, attrs)
            if value is not None:
                info[key] = value
    if kind == "kafka":
        if "brokers" in settings or "kafka.brokers" in settings:
            info["bootstrap"] = settings.get("kafka.brokers", settings.get("brokers", ""))
        if "kafka.group" in settings:
            info["group"] = settings["kafka.group"]
        if "partitions" not in info and (hint := _first_attr(connector, ("partitions_hint", "num_partitions"))):
            info["partitions"] = hint
        if "partitions" not in info and getattr(connector, "create", False):  # kafka.topic(create=True, partitions=N)
            wanted = getattr(connector, "partitions_wanted", None)
            if isinstance(wanted, int) and wanted > 0:
                info["partitions"] = wanted
    info["describe"] = connector.describe() if connector is not None else node.name
    return {k: v for k, v in info.items() if isinstance(v, (str, int)) and not isinstance(v, bool)}


def _first_attr(obj: Any, names: tuple[str, ...]) -> str | int | None:
    for name in names:
        for attr in (name, f"_{name}"):
            value = getattr(obj, attr, None)
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
                return ",".join(value)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
                return value
    return None


def _replicas(opts: dict[str, str], triggers: list[dict[str, Any]]) -> dict[str, int]:
    partitions = _int(opts, "partitions", 0, minimum=1) or next(
        (t["partitions"] for t in triggers if t["kind"] == "kafka" and "partitions" in t), 0)
    if partitions:
        for t in triggers:
            if t["kind"] == "kafka":
                t["partitions"] = partitions
    lo = _int(opts, "min_replicas", 1, minimum=0)
    hi = _int(opts, "max_replicas", partitions or max(lo, 1), minimum=1)
    if partitions and hi > partitions:
        log.warning("max replicas capped at the partition count",
                    extra={"max_replicas": hi, "partitions": partitions})
        hi = partitions
    if lo > hi:
        raise ConfigError(f"spec.min_replicas ({lo}) is more than the most replicas ({hi}"
                          + (", the topic's partition count)" if partitions else ")"))
    out = {"min": lo, "max": hi}
    if any(t["kind"] == "kafka" for t in triggers):
        out["lagThreshold"] = _int(opts, "lag_threshold", 1000, minimum=1)
    return out


def _env_and_settings(settings: dict[str, str], name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`env.X=...` become variables; secrets (by name, or `secret:NAME/KEY`) only by reference."""
    env: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for key, value in sorted(settings.items()):
        ref = _SECRET_REF.match(value)
        if key.startswith("env."):
            var = key[len("env."):]
            if ref:
                env[var] = {"name": var, "secretRef": {"name": ref["name"], "key": ref["key"]}}
            elif is_secret_key(var):
                env[var] = {"name": var, "secretRef": {"name": f"{name}-secrets", "key": var}}
            else:
                env[var] = {"name": var, "value": value}
        elif ref or is_secret_key(key):
            var = "STREAMFN_SECRET_" + re.sub(r"[^A-Za-z0-9]+", "_", key).upper().strip("_")
            secret = {"name": ref["name"], "key": ref["key"]} if ref else {"name": f"{name}-secrets", "key": key}
            env[var] = {"name": var, "secretRef": secret}
            out[key] = {"fromEnv": var}
        else:
            out[key] = value
    return [env[k] for k in sorted(env)], out


# -- checking and loading -----------------------------------------------------------------------
def validate_spec(doc: Any, *, where: str) -> None:
    """Check a spec against the JSON Schema and the rules it cannot say; one-line ConfigError."""
    jsonschema = import_optional("jsonschema", extra="deploy")
    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        raise ConfigError(f"{where}: {field or '(top level)'}: {_short(error.message)}")
    replicas = doc["spec"]["replicas"]
    if replicas["min"] > replicas["max"]:
        raise ConfigError(f"{where}: spec.replicas: min ({replicas['min']}) is more than max ({replicas['max']})")
    for i, item in enumerate(doc["spec"]["env"]):
        if "value" in item and is_secret_key(item["name"]):
            raise ConfigError(f"{where}: spec.env[{i}]: {item['name']} looks like a secret; give it as "
                              "secretRef {name, key}, never as a value")


def _short(message: str) -> str:
    line = message.splitlines()[0]
    return line if len(line) <= 200 else line[:197] + "..."


def read_spec(path: str) -> dict[str, Any]:
    """Parse and validate a spec file."""
    yaml = import_optional("yaml", extra="deploy")
    if not os.path.isfile(path):
        raise ConfigError(f"no such spec file: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    except UnicodeDecodeError as exc:  # a binary or mis-encoded file: say so, no traceback
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a spec is YAML") from None
    if not isinstance(doc, dict) or doc.get("kind") != "Function":
        raise ConfigError(f"{path}: not a streamfn function spec (expected 'kind: Function' and "
                          f"'apiVersion: {API_VERSION}'; write one with 'streamfn export')")
    validate_spec(doc, where=path)
    return doc


def load_spec(path: str) -> tuple[str, dict[str, str]]:
    """What `streamfn run spec.yaml` runs: (PATH[:attr] of the pipeline, settings to apply)."""
    doc = read_spec(path)
    spec = doc["spec"]
    entry = spec["entryPoint"]
    candidates = [Path(path).resolve().parent / entry["file"], Path.cwd() / entry["file"]]
    code = next((c for c in candidates if c.is_file()), None)
    if code is None:
        raise ConfigError(f"{path}: spec.entryPoint.file {entry['file']!r} is neither next to the spec nor in "
                          f"the current folder ({candidates[0].parent})")
    if code_hash(str(code)) != spec["codeHash"]:
        raise ConfigError(f"{path}: {code} changed since the spec was written (its sha256 is not "
                          f"spec.codeHash); run 'streamfn export' again to make a new version")
    settings: dict[str, str] = {}
    for item in spec["env"]:  # secrets first: a value may refer to one as ${VAR}
        var = item["name"]
        if "secretRef" in item and var not in os.environ:
            ref = item["secretRef"]
            if "localSecret" not in item:
                raise ConfigError(f"{path}: ${var} is not set; it comes from secret {ref['name']!r} key "
                                  f"{ref['key']!r} (Kubernetes sets it from the Secret; locally, export it)")
            # into the environment only: settings are shown in status output, secrets never are
            os.environ[var] = resolve_secret(item["localSecret"], f"{path}: ${var} ({item['localSecret']})")
    for item in (item for item in spec["env"] if "value" in item):
        raw = os.environ.get(item["name"], item["value"])  # the environment wins, as in Kubernetes
        value = os.path.expandvars(raw)  # ${VAR} expands when the function starts
        if value != raw and refers_to_secret(raw):
            os.environ[item["name"]] = value  # it holds a secret now: never in the (shown) settings
        else:
            settings[item["name"]] = value
    for key, value in spec["settings"].items():
        if isinstance(value, dict):
            settings[key] = os.environ[value["fromEnv"]] if value["fromEnv"] in os.environ else _missing(
                path, key, value["fromEnv"])
        else:
            settings[key] = value
    if spec.get("checkpoint", {}).get("url") and "checkpoint" not in settings:
        settings["checkpoint"] = spec["checkpoint"]["url"]
    target = str(code) + (f":{entry['attr']}" if entry.get("attr") else "")
    return target, settings


def _missing(path: str, key: str, var: str) -> str:
    raise ConfigError(f"{path}: setting {key!r} comes from ${var}, which is not set")
