"""Where framesd is and who we are: the connection options of every v3io connector."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamfn._optional import import_optional
from streamfn.errors import ConfigError

if TYPE_CHECKING:
    from streamfn.runtime import RunContext

# option -> (setting, environment variable); an explicit argument wins, then --set, then the environment
OPTIONS = {"address": ("v3io.address", "V3IO_FRAMESD"), "container": ("v3io.container", "V3IO_CONTAINER"),
           "access_key": ("v3io.access_key", "V3IO_ACCESS_KEY"), "user": ("v3io.user", "V3IO_USERNAME")}


def frames_module() -> Any:
    """The v3io_frames package (the `v3io` extra)."""
    import_optional("pytz", extra="v3io")  # v3io_frames imports it without declaring it
    return import_optional("v3io_frames", extra="v3io")


@dataclass(frozen=True)
class Connection:
    """framesd's address (http://… or grpc://…), the container, and the credentials."""

    address: str | None = None
    container: str | None = None
    access_key: str | None = None
    user: str | None = None

    def resolve(self, ctx: "RunContext | None") -> "Connection":
        """Fill what was not given from `--set v3io.*` settings, then the environment."""
        values = {}
        for name, (setting, env) in OPTIONS.items():
            given = getattr(self, name)
            if given is None and ctx is not None:
                given = ctx.settings.get(setting)
            values[name] = given if given is not None else os.environ.get(env)
        resolved = Connection(**values)
        if not resolved.address:
            raise ConfigError("v3io: no framesd address; pass address=..., --set v3io.address=URL or set "
                              "V3IO_FRAMESD (e.g. http://framesd:8080 or grpc://framesd:8081)")
        if not resolved.container:
            raise ConfigError("v3io: no container; pass container=..., --set v3io.container=NAME or set "
                              "V3IO_CONTAINER (e.g. bigdata)")
        return resolved

    def client(self) -> Any:
        """A new v3io-frames client (checks the server's version once)."""
        v3f = frames_module()
        assert self.address and self.container
        try:
            return v3f.Client(self.address, container=self.container, token=self.access_key or "",
                              user=self.user or "")
        except Exception as exc:
            raise ConfigError(f"v3io: cannot reach framesd at {self.address}: {type(exc).__name__}: {exc}") from exc

    def describe(self) -> str:
        """address/container, for logs (never the key)."""
        return f"{self.address}/{self.container}"


def ignore_if_exists() -> int:
    """frames' IGNORE error option."""
    return int(frames_module().IGNORE)
