"""`streamfn invoke`: send one event to a running HTTP trigger."""
from __future__ import annotations

import os
import ssl
from collections.abc import Mapping

from streamfn._optional import import_optional
from streamfn.errors import ConfigError, StreamfnError


class InvokeError(StreamfnError):
    """The trigger could not be reached."""


def resolve_url(url_or_path: str, *, host: str = "127.0.0.1", port: int = 8080) -> str:
    """A full URL; a bare path ('/score') means that path on the local trigger."""
    if url_or_path.startswith(("http://", "https://")):
        return url_or_path
    if url_or_path.startswith("/"):
        return f"http://{host}:{port}{url_or_path}"
    if ":" in url_or_path.split("/", 1)[0]:  # host:port/path
        return f"http://{url_or_path}"
    raise ConfigError(f"expected a URL (http://127.0.0.1:8080/score) or a path (/score), got {url_or_path!r}")


def invoke(url_or_path: str, data: bytes, content_type: str = "application/json", *,
           method: str = "POST", headers: Mapping[str, str] | None = None, timeout_s: float = 30.0,
           host: str = "127.0.0.1", port: int = 8080) -> tuple[int, bytes]:
    """Send `data` to a trigger and return (status, body).

    $STREAMFN_HTTP_TOKEN, when set, goes along as `Authorization: Bearer ...` (unless `headers`
    carry credentials); $STREAMFN_HTTP_CA names the CA file that signed an HTTPS trigger's certificate.
    """
    httpx = import_optional("httpx", extra="http")
    url = resolve_url(url_or_path, host=host, port=port)
    sent = {"content-type": content_type, **(headers or {})}
    token = os.environ.get("STREAMFN_HTTP_TOKEN")
    if token and not any(k.lower() in ("authorization", "x-api-key") for k in sent):
        sent["authorization"] = f"Bearer {token}"
    ca = os.environ.get("STREAMFN_HTTP_CA")
    try:
        verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=ca) if ca else True
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"STREAMFN_HTTP_CA={ca}: not a readable PEM CA file ({exc})") from None
    try:
        with httpx.Client(timeout=timeout_s, trust_env=False, verify=verify) as client:
            response = client.request(method.upper(), url, content=data, headers=sent)
    except httpx.TransportError as exc:
        raise InvokeError(f"could not reach {url}: {type(exc).__name__}: {exc}; is `streamfn run` "
                          "serving there?") from exc
    return response.status_code, response.content
