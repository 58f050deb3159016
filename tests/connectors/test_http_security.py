"""The HTTP trigger's guards over real loopback HTTP(S): token check, TLS, rate limit, loopback,
and the read-only status server. The TLS certificate is made here, self-signed, for 127.0.0.1."""
from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import ssl

import httpx
import polars as pl
import pytest
from streamfn.connectors import http

import streamfn as sf
from streamfn import observe
from streamfn.errors import ConfigError
from tests.servers.http import serving

pytestmark = pytest.mark.integration

TOKEN = "s3cr3t-token-4c1d"  # looked for in the logs: it must never appear


def echo_pipeline(run_dir: str, **options) -> sf.Pipeline:
    p = sf.Pipeline("guarded", run_dir=run_dir)
    requests = p.source(http.endpoint("/echo", port=0, **options), name="requests")

    @p.stage(requests)
    def echo(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns((pl.col("x") + 1).alias("y"))

    http.respond(echo)
    return p


def self_signed(tmp_path) -> tuple[str, str]:
    """A self-signed certificate and key for 127.0.0.1, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_token_is_required_as_bearer_or_api_key(run_dir, caplog):
    caplog.set_level(logging.DEBUG)
    p = echo_pipeline(run_dir, token=TOKEN)
    with serving(p) as run, httpx.Client() as client:
        url = run.url("requests")
        none = client.post(url, json={"x": 1})
        wrong = client.post(url, json={"x": 1}, headers={"authorization": "Bearer nope"})
        basic = client.post(url, json={"x": 1}, headers={"authorization": f"Basic {TOKEN}"})
        bearer = client.post(url, json={"x": 1}, headers={"authorization": f"Bearer {TOKEN}"})
        api_key = client.post(url, json={"x": 2}, headers={"x-api-key": TOKEN})
        health = client.get(url.rsplit("/", 1)[0] + "/healthz")  # probes need no token
    for refused in (none, wrong, basic):
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in refused.text
    assert (bearer.status_code, bearer.json()) == (200, {"x": 1, "y": 2})
    assert (api_key.status_code, api_key.json()) == (200, {"x": 2, "y": 3})
    assert health.status_code == 200
    assert run.summary is not None and run.summary.rows_out("echo") == 2  # refused bodies never reached a stage
    assert TOKEN not in caplog.text
    assert TOKEN not in p.node("requests").connector.describe()


@pytest.mark.parametrize("how", ["env", "file", "setting"])
def test_token_from_environment_file_or_setting(run_dir, tmp_path, monkeypatch, how):
    monkeypatch.setenv("ECHO_TOKEN", TOKEN)
    (tmp_path / "token").write_text(TOKEN + "\n")
    spec = {"env": "env:ECHO_TOKEN", "file": f"file:{tmp_path / 'token'}", "setting": None}[how]
    p = echo_pipeline(run_dir, token=spec) if spec else echo_pipeline(run_dir)
    settings = {"http.token": "env:ECHO_TOKEN"} if how == "setting" else None
    with serving(p, settings=settings) as run, httpx.Client() as client:
        url = run.url("requests")
        refused = client.post(url, json={"x": 1})
        allowed = client.post(url, json={"x": 1}, headers={"authorization": f"Bearer {TOKEN}"})
    assert (refused.status_code, allowed.status_code) == (401, 200)


def test_streamfn_invoke_sends_the_token_from_the_environment(run_dir, tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path)
    p = echo_pipeline(run_dir, token=TOKEN, tls_cert=cert, tls_key=key)
    with serving(p) as run:
        monkeypatch.setenv("STREAMFN_HTTP_CA", cert)
        monkeypatch.delenv("STREAMFN_HTTP_TOKEN", raising=False)
        refused, _ = http.invoke(run.url("requests"), b'{"x": 1}')
        monkeypatch.setenv("STREAMFN_HTTP_TOKEN", TOKEN)
        status, body = http.invoke(run.url("requests"), b'{"x": 1}')
    assert refused == 401
    assert (status, json.loads(body)) == (200, {"x": 1, "y": 2})


def test_a_missing_secret_is_a_clear_error(run_dir, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    p = echo_pipeline(run_dir, token="env:NO_SUCH_TOKEN")
    with pytest.raises(ConfigError, match="NO_SUCH_TOKEN is not set"):
        p.run(until_idle=True)


def test_tls_with_a_self_signed_certificate(run_dir, tmp_path):
    cert, key = self_signed(tmp_path)
    p = echo_pipeline(run_dir, tls_cert=cert, tls_key=key, token=TOKEN)
    with serving(p) as run:
        url = run.url("requests")
        assert url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=ssl.create_default_context(cafile=cert)) as client:
            reply = client.post(url, json={"x": 4}, headers={"x-api-key": TOKEN})
        with httpx.Client() as plain:  # the system's CAs do not know this certificate
            with pytest.raises(httpx.ConnectError):
                plain.post(url, json={"x": 4})
            with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port is not served
                plain.post(url.replace("https://", "http://"), json={"x": 4})
    assert (reply.status_code, reply.json()) == (200, {"x": 4, "y": 5})


def test_unusable_tls_files_are_a_clear_error(run_dir, tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate")
    p = echo_pipeline(run_dir, tls_cert=str(tmp_path / "junk.pem"), tls_key=str(tmp_path / "junk.pem"))
    with pytest.raises(ConfigError, match="cannot use the TLS certificate"):
        p.run(until_idle=True)
    with pytest.raises(ConfigError, match="needs both tls_cert and tls_key"):
        echo_pipeline(run_dir, tls_cert=str(tmp_path / "junk.pem")).run(until_idle=True)


def test_rate_limit_answers_429_with_retry_after(run_dir):
    p = echo_pipeline(run_dir, rate_limit="1/min")  # a burst of one, then one a minute: no timing in play
    with serving(p) as run, httpx.Client() as client:
        replies = [client.post(run.url("requests"), json={"x": i}) for i in range(5)]
    assert [r.status_code for r in replies] == [200, 429, 429, 429, 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in replies[1:])
    assert run.summary is not None and run.summary.rows_out("echo") == 1


def test_listens_on_loopback_unless_told_otherwise(run_dir):
    p = echo_pipeline(run_dir)
    with serving(p) as run:
        server = p.node("requests").connector._server
        assert server.sock.getsockname()[0] == "127.0.0.1"
        assert run.url("requests").startswith("http://127.0.0.1:")


def test_status_server_is_read_only(run_dir):
    p = echo_pipeline(run_dir)
    with serving(p) as run:
        obs = observe.start(run.runtime, metrics_port=0)
        try:
            with httpx.Client() as client:
                before = client.get(obs.url + "/status")
                writes = [client.request(m, obs.url + path, content=b"{}")
                          for m in ("POST", "PUT", "DELETE", "PATCH") for path in ("/status", "/", "/metrics")]
                after = client.get(obs.url + "/status")
        finally:
            obs.close()
    assert before.status_code == 200 and after.status_code == 200
    assert all(w.status_code in (405, 501) for w in writes), [w.status_code for w in writes]
    assert obs.url.startswith("http://127.0.0.1:")
