"""What a notebook's %nuclio/%streamfn magics put into the function spec (`streamfn export NB.ipynb`).

`cmd` packages and build commands go to `spec.build` (requirements.txt and Dockerfile RUN lines),
`env`/`env_file` to `spec.env` (secrets only as references), and `config` keys onto their streamfn
counterparts (replicas, base image, resources, HTTP port, Kafka brokers and group, labels). Keys
without one are kept verbatim under `spec.nuclioConfig`, with one warning naming them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

from streamfn._optional import import_optional
from streamfn.errors import ConfigError
from streamfn.notebook import Magics, apply_magic, parse_env_file, read_notebook
from streamfn.secrets import SECRET_PREFIXES
from streamfn.spec import _SECRET_REF, _URL_PASSWORD, _VAR_REF, is_secret_key

log = logging.getLogger("streamfn.nbexport")

# nuclio spec key -> the `streamfn export --set` setting it becomes
SETTINGS = {
    "spec.build.baseImage": "spec.base_image",
    "spec.build.image": "spec.image",
    "spec.image": "spec.image",
    "spec.minReplicas": "spec.min_replicas",
    "spec.maxReplicas": "spec.max_replicas",
    "spec.resources.requests.cpu": "spec.cpu",
    "spec.resources.requests.memory": "spec.memory",
    "spec.resources.limits.cpu": "spec.cpu_limit",
    "spec.resources.limits.memory": "spec.memory_limit",
    "spec.resources.limits.nvidia.com/gpu": "spec.gpu",
    "metadata.name": "spec.name",
}
_WHOLE_NUMBERS = {"spec.min_replicas", "spec.max_replicas", "spec.gpu", "spec.http_port"}
_TRIGGER = re.compile(r"^spec\.triggers\.(?P<name>[^.]+)\.(?P<rest>.+)$")
_NO_EFFECT = {"show", "help", "verbose"}  # print things in Jupyter; nothing to deploy
_ENV_LINE = re.compile(r"^(?P<head>\s*(?:(?:--local-only|-l|--config-only|-c)\s+)?)(?P<key>[A-Za-z_]\w*)\s*=(?P<value>.*)$")
_ENV_MAGIC = re.compile(r"^(?P<magic>\s*%(?:streamfn|nuclio)\s+env\s+)(?P<rest>.*)$")
_ENV_FILE_MAGIC = re.compile(r"^(?P<indent>\s*)%(?:streamfn|nuclio)\s+env_file\b(?P<rest>.*)$")
_CELL = re.compile(r"^%%(?:streamfn|nuclio)\s+(?P<name>env_file|env)\b(?P<rest>.*)$")


@dataclass
class NotebookParts:
    """The parts of a function spec a notebook's magics declare."""

    settings: dict[str, str] = field(default_factory=dict)   # spec.*/kafka.* export settings
    env: dict[str, str] = field(default_factory=dict)         # variables for spec.env (unexpanded)
    packages: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    verbatim: dict[str, Any] = field(default_factory=dict)    # config keys with no counterpart
    code: bytes | None = None  # the notebook as exported, when secrets or env files were taken out

    def env_items(self, name: str) -> list[dict[str, Any]]:
        """The spec env items of the notebook's variables (secrets in the Secret `NAME-secrets`)."""
        return env_entries(self.env, name)[0]


def notebook_parts(path: str, *, trigger_kinds: set[str]) -> NotebookParts:
    """Read a notebook's magics into spec parts (a pipeline with these trigger kinds)."""
    magics = read_notebook(path).magics
    parts = NotebookParts(packages=list(magics.packages), commands=list(magics.commands))
    ignored: list[str] = []
    build = Magics()
    for key, op, raw in magics.config:
        _config(parts, build, key, op, _value(raw), ignored, path)
    _triggers(parts, magics.config, trigger_kinds, ignored, path)
    parts.packages += [p for p in build.packages if p not in parts.packages]
    parts.commands += build.commands
    for name, args in magics.other:
        _other(parts, name, args, ignored)
    base = os.path.dirname(os.path.abspath(path))
    parts.env = dict(magics.spec_env)
    for env_file in magics.env_files:  # loaded before the magics on run, so its values win
        parts.env.update(parse_env_file(env_file, base_dir=base))
    literal = env_entries({**magics.env, **parts.env}, "streamfn")[1]
    if literal:
        log.warning("the notebook (its env magics or env files) sets secrets in clear; the spec refers to a "
                    "Kubernetes Secret instead and the exported notebook leaves the values out",
                    extra={"notebook": path, "variables": sorted(literal)})
    if literal or magics.env_files:
        parts.code = exported_copy(path, literal, {**magics.env, **parts.env})
    if ignored:
        log.warning("notebook settings streamfn has no counterpart for; kept verbatim under spec.nuclioConfig",
                    extra={"notebook": path, "keys": ignored})
    return parts


def env_entries(values: dict[str, str], name: str) -> tuple[list[dict[str, Any]], set[str]]:
    """Spec env items for variables a notebook sets, and the names whose secret is written in clear.

    A secret (by its name, a `${VAR}` naming one, a password in a URL, `secret:NAME/KEY`) becomes a
    secretRef; `localSecret` (env:VAR or file:PATH) says where `streamfn run` finds it outside Kubernetes.
    Other values stay as written; `${VAR}` in them is expanded when the function starts.
    """
    items: dict[str, dict[str, Any]] = {}
    literal: set[str] = set()
    for key, value in values.items():
        refs = [a or b for a, b in _VAR_REF.findall(value)]
        url = _URL_PASSWORD.search(value)
        in_password = [a or b for a, b in _VAR_REF.findall(url["pw"])] if url else []
        ref = _SECRET_REF.match(value)
        if ref:
            items[key] = {"name": key, "secretRef": {"name": ref["name"], "key": ref["key"]}}
        elif is_secret_key(key) or (url and not in_password):
            item: dict[str, Any] = {"name": key, "secretRef": {"name": f"{name}-secrets", "key": key}}
            single = _VAR_REF.fullmatch(value)
            if single:
                item["localSecret"] = "env:" + (single[1] or single[2])
            elif value.startswith(SECRET_PREFIXES):
                item["localSecret"] = value
            else:
                literal.add(key)
            items[key] = item
        else:
            items[key] = {"name": key, "value": value}
            for var in refs:  # the secret a template refers to comes by reference
                if (is_secret_key(var) or var in in_password) and var not in values:
                    items.setdefault(var, {"name": var, "secretRef": {"name": f"{name}-secrets", "key": var}})
    return [items[k] for k in sorted(items)], literal


def _value(raw: str) -> Any:
    """A config value as nuclio-jupyter reads it: JSON when it parses, else the text unquoted."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _set(parts: NotebookParts, setting: str, value: Any, key: str, path: str) -> None:
    text = _text(value)
    if setting in _WHOLE_NUMBERS and not re.fullmatch(r"\d+", text):
        raise ConfigError(f"{path}: %nuclio config {key} = {value!r}: expected a whole number")
    parts.settings[setting] = text


def _config(parts: NotebookParts, build: Magics, key: str, op: str, value: Any, ignored: list[str],
            path: str) -> None:
    """One `config KEY = VALUE` line onto its counterpart, or into the verbatim keys."""
    if key in SETTINGS:
        _set(parts, SETTINGS[key], value, key, path)
    elif key == "spec.replicas":
        _set(parts, "spec.min_replicas", value, key, path)
        _set(parts, "spec.max_replicas", value, key, path)
    elif key == "spec.build.commands":  # nuclio-jupyter's own spelling of `cmd`
        lines = value if isinstance(value, list) else [value]
        apply_magic("cmd", "", [str(line) for line in lines], build, path)
    elif key.startswith("metadata.labels."):
        parts.labels[key[len("metadata.labels."):]] = _text(value)
    elif key == "spec.handler" and str(value).rsplit(":", 1)[-1] == "handler":
        pass  # streamfn serves `handler` too
    elif key == "spec.runtime" and str(value) in ("python", f"python:{sys.version_info[0]}.{sys.version_info[1]}"):
        pass  # the runtime is the Python that exports (spec.runtime.python)
    elif not _TRIGGER.match(key):
        _keep(parts, key, op, value, ignored)


def _keep(parts: NotebookParts, key: str, op: str, value: Any, ignored: list[str]) -> None:
    if op == "+=":
        old = parts.verbatim.get(key, [])
        parts.verbatim[key] = (old if isinstance(old, list) else [old]) + [value]
    else:
        parts.verbatim[key] = value
    if key not in ignored:
        ignored.append(key)


def _triggers(parts: NotebookParts, config: list[tuple[str, str, str]], kinds: set[str],
              ignored: list[str], path: str) -> None:
    """HTTP port, Kafka brokers and group from `spec.triggers.NAME.*`; the rest kept verbatim."""
    triggers: dict[str, list[tuple[str, str, Any]]] = {}
    for key, op, raw in config:
        match = _TRIGGER.match(key)
        if match:
            triggers.setdefault(match["name"], []).append((match["rest"], op, _value(raw)))
    for name, items in triggers.items():
        fields = {rest: value for rest, _, value in items}
        kind = str(fields.get("kind", "http" if "attributes.port" in fields else ""))
        mapped: dict[str, str] = {}
        if kind == "http" and "http" in kinds:
            mapped = {"kind": "", "attributes.port": "spec.http_port"}
        elif kind in ("kafka", "kafka-cluster") and "kafka" in kinds:
            mapped = {"kind": "", "attributes.brokers": "kafka.brokers", "attributes.consumerGroup": "kafka.group"}
        for rest, op, value in items:
            key = f"spec.triggers.{name}.{rest}"
            if rest not in mapped:
                _keep(parts, key, op, value, ignored)
            elif mapped[rest]:
                _set(parts, mapped[rest], value, key, path)


def _other(parts: NotebookParts, name: str, args: str, ignored: list[str]) -> None:
    """`deploy/build/export -n NAME` names the function; other flags and magics are noted."""
    if name in _NO_EFFECT:
        return
    try:
        words = shlex.split(args)
    except ValueError:
        words = args.split()
    rest: list[str] = []
    while words:
        word = words.pop(0)
        if name in ("deploy", "build", "export") and word in ("-n", "--name") and words:
            parts.settings.setdefault("spec.name", words.pop(0))
        else:
            rest.append(word)
    if rest or name not in ("deploy", "build", "export"):
        parts.verbatim.setdefault(f"%{name}", []).append(" ".join(rest))
        ignored.append(f"%{name} {' '.join(rest)}".strip())


# -- the exported copy --------------------------------------------------------------------------
def exported_copy(path: str, secrets: set[str], values: dict[str, str]) -> bytes:
    """The notebook with secret values as `${KEY}` references, env_file lines out, no outputs."""
    nbformat = import_optional("nbformat", extra="notebook")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.get("cell_type") == "code":
            cell["source"] = _redact_cell(cell.get("source") or "", secrets)
            cell["outputs"], cell["execution_count"] = [], None  # outputs may show a secret
    text = nbformat.writes(nb)
    for key in sorted(secrets):
        secret = values.get(key, "")
        if len(secret) >= 8 and secret in text:  # shorter values match ordinary words
            raise ConfigError(f"{path}: the value of {key} appears outside its env magic; read it from "
                              f"os.environ[{key!r}] instead, so that the exported notebook leaves it out")
    return text.encode("utf-8")  # type: ignore[no-any-return]


def _redact_cell(source: str, secrets: set[str]) -> str:
    lines = source.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    cell = _CELL.match(lines[first]) if first < len(lines) else None
    if cell and cell["name"] == "env_file":
        return f"%%{lines[first].lstrip('%').split()[0]} env_file\n# streamfn export: the variables are in function.yaml"
    out = []
    for number, line in enumerate(lines):
        if cell and number == first:
            out.append(line[:cell.start("rest")] + _redact_assignment(cell["rest"], secrets))
        elif cell and number > first:
            out.append(_redact_assignment(line, secrets))
        elif (magic := _ENV_MAGIC.match(line)) is not None:
            out.append(magic["magic"] + _redact_assignment(magic["rest"], secrets))
        elif (env_file := _ENV_FILE_MAGIC.match(line)) is not None:
            out.append(f"{env_file['indent']}pass  # streamfn export: env_file{env_file['rest']} is in function.yaml")
        else:
            out.append(line)
    return "\n".join(out)


def _redact_assignment(text: str, secrets: set[str]) -> str:
    match = _ENV_LINE.match(text)
    if match is None or match["key"] not in secrets:
        return text
    return f"{match['head']}{match['key']}=${{{match['key']}}}"
