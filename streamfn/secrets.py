"""Secrets given as `env:NAME` (an environment variable), `file:PATH` (the file's first line) or
the value itself, resolved at start so that specs, logs and status output only ever hold the
reference."""
from __future__ import annotations

import os

from streamfn.errors import ConfigError

SECRET_PREFIXES = ("env:", "file:")


def resolve_secret(spec: str, what: str) -> str:
    """The secret a spec names: `env:NAME`, `file:PATH`, or the value itself."""
    if spec.startswith("env:"):
        value = os.environ.get(spec[4:])
        if not value:
            raise ConfigError(f"{what}: the environment variable {spec[4:]} is not set or empty")
        return value
    if spec.startswith("file:"):
        try:
            with open(spec[5:], encoding="utf-8") as f:
                value = f.readline().strip()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read the secret file {spec[5:]}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"{what}: the secret file {spec[5:]} is empty")
        return value
    if not spec:
        raise ConfigError(f"{what}: the secret is empty")
    return spec
