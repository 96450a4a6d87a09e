"""Security: NATS token / user+password auth over TLS, Flight TLS + bearer token, secrets kept out of
the run directory. Real nats-server, real Flight servers, a throwaway CA made with openssl per session."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import SecretStr

from asyncflow.config import SecuritySettings
from asyncflow.errors import BrokerError, ConfigError, StoreError
from asyncflow.security import (
    CertificateFiles,
    child_env,
    make_certificates,
    redact_url,
    resolve_secrets,
    store_client_options,
    store_server_args,
)
from broker import EmbeddedNatsServer, connect
from flight_store import ColumnStoreServer, StoreClient

NATS_TOKEN = "nats-tok-7Qz!x 12345"  # a space and digits: must survive nats-server's config parser
NATS_PASSWORD = 'pw-"quoted"-$HOME-\\-9'  # quotes, a $reference and a backslash, taken literally
STORE_TOKEN = "store-tok-Kp3vW9"
WAIT_S = 20.0  # every connect attempt below is bounded by this


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return make_certificates(tmp_path_factory.mktemp("certs"), ["127.0.0.1", "localhost"], days=2)


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    """A second CA that did not sign the servers' certificate."""
    return make_certificates(tmp_path_factory.mktemp("other-certs"), ["127.0.0.1"], days=2)


def _run(coro):  # noqa: ANN001, ANN202
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


async def _round_trip(url: str, security: SecuritySettings) -> bytes:
    nc = await connect(url, "test-client", connect_timeout_s=5, security=security)
    try:
        sub = await nc.subscribe("sec.test")
        await nc.publish("sec.test", b"hello")
        msg = await sub.next_msg(timeout=5)
        js = nc.jetstream(timeout=5)
        await js.add_stream(name="SEC", subjects=["sec.js"])
        ack = await js.publish("sec.js", b"durable")
        assert ack.seq == 1
        return msg.data
    finally:
        await nc.close()


# -- configuration -------------------------------------------------------------------------------


def test_secret_fields_are_masked_and_never_serialised(tmp_path: Path) -> None:
    settings = SecuritySettings(nats_auth="token", nats_token="literal-nats-secret",
                                store_auth="token", store_token="literal-store-secret")
    assert "literal" not in repr(settings) and "**********" in repr(settings)
    dumped = settings.model_dump_json()
    assert "literal" not in dumped and '"nats_token":null' in dumped
    # The python dump keeps the value (Config.resolved() round-trips through it).
    assert settings.model_dump()["nats_token"].get_secret_value() == "literal-nats-secret"
    secrets = resolve_secrets(settings, environ={})
    assert secrets.nats_token.get_secret_value() == "literal-nats-secret"
    # The environment wins over the config, and a child gets the value under the variable's name.
    assert resolve_secrets(settings, environ={"ASYNCFLOW_NATS_TOKEN": "from-env"}).nats_token.get_secret_value() == "from-env"
    assert child_env(settings, environ={}) == {"ASYNCFLOW_NATS_TOKEN": "literal-nats-secret",
                                               "ASYNCFLOW_STORE_TOKEN": "literal-store-secret"}
    # A store process gets the variable's name on its command line, never the value.
    tls = settings.model_copy(update={"store_tls": True, "tls_cert": tmp_path / "c.pem", "tls_key": tmp_path / "k.pem"})
    args = store_server_args(tls)
    assert args[-2:] == ["--token-env", "ASYNCFLOW_STORE_TOKEN"] and "--tls-cert" in args
    assert not any("literal" in arg for arg in args)


def test_missing_or_malformed_secret_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="MY_NATS_TOKEN"):
        resolve_secrets(SecuritySettings(nats_auth="token", nats_token_env="MY_NATS_TOKEN"), environ={})
    with pytest.raises(ConfigError, match="ASYNCFLOW_STORE_TOKEN"):
        resolve_secrets(SecuritySettings(store_auth="token"), environ={})
    with pytest.raises(ConfigError, match="control characters"):
        resolve_secrets(SecuritySettings(nats_auth="token"), environ={"ASYNCFLOW_NATS_TOKEN": "a\nb"})
    with pytest.raises(ValueError, match="nats_user"):
        SecuritySettings(nats_auth="user")
    with pytest.raises(ValueError, match="tls_key"):
        SecuritySettings(tls_cert="cert.pem")
    assert redact_url("nats://alice:hunter2@10.0.0.1:4222") == "nats://***@10.0.0.1:4222"
    assert redact_url("tls://127.0.0.1:4222") == "tls://127.0.0.1:4222"


# -- NATS -----------------------------------------------------------------------------------------


def test_nats_token_over_tls(tmp_path: Path, certs: CertificateFiles, other_ca: CertificateFiles,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCFLOW_NATS_TOKEN", NATS_TOKEN)
    server_side = SecuritySettings(nats_auth="token", nats_tls=True, tls_cert=certs.cert, tls_key=certs.key,
                                   tls_ca=certs.ca)
    with EmbeddedNatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log", security=server_side) as server:
        assert server.url is not None and server.url.startswith("tls://127.0.0.1:")
        conf = (tmp_path / "nats" / "nats-server.conf").read_text()
        assert NATS_TOKEN not in conf and "$ASYNCFLOW_NATS_SERVER_TOKEN" in conf

        client = SecuritySettings(nats_auth="token", nats_tls=True, tls_ca=certs.ca)
        assert _run(_round_trip(server.url, client)) == b"hello"

        monkeypatch.setenv("ASYNCFLOW_NATS_TOKEN", "not-the-token")
        with pytest.raises(BrokerError, match="refused") as wrong:
            _run(connect(server.url, "wrong-token", connect_timeout_s=5, security=client))
        assert "not-the-token" not in str(wrong.value)

        # No credentials at all (TLS still right): refused.
        with pytest.raises(BrokerError, match="Authorization Violation"):
            _run(connect(server.url, "no-token", connect_timeout_s=5,
                         security=SecuritySettings(nats_tls=True, tls_ca=certs.ca)))

        # The right token, but a CA that did not sign the server's certificate: the handshake fails.
        monkeypatch.setenv("ASYNCFLOW_NATS_TOKEN", NATS_TOKEN)
        with pytest.raises(BrokerError, match="(?i)certificate"):
            _run(connect(server.url, "untrusted", connect_timeout_s=5,
                         security=SecuritySettings(nats_auth="token", nats_tls=True, tls_ca=other_ca.ca)))
    assert NATS_TOKEN not in (tmp_path / "nats.log").read_text()


def test_nats_user_password_over_tls(tmp_path: Path, certs: CertificateFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCFLOW_NATS_PASSWORD", NATS_PASSWORD)
    settings = SecuritySettings(nats_auth="user", nats_user="trainer", nats_tls=True,
                                tls_cert=certs.cert, tls_key=certs.key, tls_ca=certs.ca)
    with EmbeddedNatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log", security=settings) as server:
        assert server.url is not None
        assert _run(_round_trip(server.url, settings)) == b"hello"

        wrong_user = settings.model_copy(update={"nats_user": "mallory"})
        with pytest.raises(BrokerError, match="Authorization Violation"):
            _run(connect(server.url, "wrong-user", connect_timeout_s=5, security=wrong_user))
        monkeypatch.setenv("ASYNCFLOW_NATS_PASSWORD", NATS_PASSWORD + "x")
        with pytest.raises(BrokerError, match="Authorization Violation"):
            _run(connect(server.url, "wrong-password", connect_timeout_s=5, security=settings))


def test_tls_only_broker_refuses_a_plain_text_client(tmp_path: Path, certs: CertificateFiles,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCFLOW_NATS_TOKEN", NATS_TOKEN)
    settings = SecuritySettings(nats_auth="token", nats_tls=True, tls_cert=certs.cert, tls_key=certs.key,
                                tls_ca=certs.ca)
    with EmbeddedNatsServer(tmp_path / "nats", security=settings) as server:
        assert server.url is not None
        host, port = server.url.removeprefix("tls://").rsplit(":", 1)
        # A raw plain-text client with the right token: the server announces TLS as required and
        # never answers the plain CONNECT / PING with a PONG.
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.settimeout(5)
            info = sock.recv(4096).decode()
            assert info.startswith("INFO ") and json.loads(info[5:])["tls_required"] is True
            connect_line = json.dumps({"auth_token": NATS_TOKEN, "verbose": False, "pedantic": False})
            sock.sendall(f"CONNECT {connect_line}\r\nPING\r\n".encode())
            replies = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(4096)
                except (TimeoutError, ConnectionResetError):
                    break
                if not chunk:
                    break
                replies += chunk
            assert b"PONG" not in replies
        # nats-py without a CA that trusts the server (the plain client configuration): refused too.
        with pytest.raises(BrokerError):
            _run(connect(server.url.replace("tls://", "nats://"), "plain", connect_timeout_s=5,
                         security=SecuritySettings(nats_auth="token")))


def test_tls_client_refuses_a_plain_broker(tmp_path: Path, certs: CertificateFiles) -> None:
    with EmbeddedNatsServer(tmp_path / "nats") as server:
        assert server.url is not None
        with pytest.raises(BrokerError):
            _run(connect(server.url, "tls-client", connect_timeout_s=5,
                         security=SecuritySettings(nats_tls=True, tls_ca=certs.ca)))


def test_broker_command_with_token_and_tls(tmp_path: Path, certs: CertificateFiles) -> None:
    """`asyncflow broker` takes the same settings as flags; the token only through the environment."""
    command = [sys.executable, "-m", "asyncflow", "broker", "--store-dir", str(tmp_path / "broker"), "--port", "0",
               "--nats-auth", "token", "--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]
    process = subprocess.Popen(command, env={"PATH": "/usr/bin", "ASYNCFLOW_NATS_TOKEN": NATS_TOKEN},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready, "asyncflow broker printed nothing within 60 s"
        line = process.stdout.readline()
        url = line.split(" at ", 1)[1].split(";", 1)[0]
        assert url.startswith("tls://127.0.0.1:"), line
        assert NATS_TOKEN not in " ".join(command)
        right = SecuritySettings(nats_auth="token", nats_token=NATS_TOKEN, nats_tls=True, tls_ca=certs.ca)
        assert _run(_round_trip(url, right)) == b"hello"
        with pytest.raises(BrokerError):
            _run(connect(url, "anonymous", connect_timeout_s=5, security=SecuritySettings(nats_tls=True, tls_ca=certs.ca)))
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- Flight ---------------------------------------------------------------------------------------


@pytest.fixture
def secure_store(certs: CertificateFiles):
    server = ColumnStoreServer(capacity_bytes=16 * 1024**2, tls_cert=certs.cert, tls_key=certs.key,
                               token=SecretStr(STORE_TOKEN))
    try:
        yield server
    finally:
        server.shutdown()


def test_flight_tls_and_token(secure_store: ColumnStoreServer, certs: CertificateFiles,
                              other_ca: CertificateFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    location = secure_store.location
    assert location.startswith("grpc+tls://127.0.0.1:")
    table = pa.table({"sample_id": pa.array([1, 2], pa.int64()), "x": pa.array([0.5, 1.5])})
    monkeypatch.setenv("ASYNCFLOW_STORE_TOKEN", STORE_TOKEN)
    settings = SecuritySettings(store_auth="token", store_tls=True, tls_ca=certs.ca)
    with StoreClient([location], timeout_s=10, **store_client_options(settings)) as client:
        client.put_table("run/0/x/g0", table, location)
        assert client.get_table("run/0/x/g0", location).equals(table)
        assert client.health(location)
    ca = certs.ca.read_bytes()
    refusals = {
        "no token": StoreClient([location], timeout_s=10, tls_root_certs=ca),
        "wrong token": StoreClient([location], timeout_s=10, tls_root_certs=ca, token="not-the-token"),
        "plain-text client": StoreClient([location.replace("grpc+tls://", "grpc://")], timeout_s=10,
                                         token=STORE_TOKEN),
        "untrusted CA": StoreClient([location], timeout_s=10, tls_root_certs=other_ca.ca.read_bytes(),
                                    token=STORE_TOKEN),
    }
    for what, client in refusals.items():
        with client:
            target = client.locations[0]
            with pytest.raises(StoreError) as refused:
                client.get_table("run/0/x/g0", target)
            message = str(refused.value)
            assert target in message, what
            assert STORE_TOKEN not in message and "not-the-token" not in message, what
            if what.endswith("token"):
                assert "unauthenticated" in message, what
            with pytest.raises(StoreError):
                client.put_table("run/0/x/g1", table, target)
            assert not client.health(target), what
    assert secure_store.stats()["keys"] == 1  # nothing refused got in


def test_tls_client_refuses_plain_locations_before_sending_the_token(flight_store_server: ColumnStoreServer) -> None:
    with (StoreClient([flight_store_server.location], token=STORE_TOKEN, require_tls=True) as client,
          pytest.raises(StoreError, match="plain-text")):
        client.get_table("run/0/x/g0", flight_store_server.location)
    assert flight_store_server.stats()["gets"] == 0


def test_store_command_reads_its_token_from_the_environment(tmp_path: Path, certs: CertificateFiles) -> None:
    location_file = tmp_path / "store.location"
    command = [sys.executable, "-m", "asyncflow", "store", "--port", "0", "--location-file", str(location_file),
               "--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--token-env", "TEST_STORE_TOKEN"]
    missing = subprocess.run(command, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin"})
    assert missing.returncode == 2 and "TEST_STORE_TOKEN" in missing.stderr, missing.stderr
    process = subprocess.Popen(command, env={"PATH": "/usr/bin", "TEST_STORE_TOKEN": STORE_TOKEN},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not location_file.is_file():
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "store did not start"
            time.sleep(0.05)
        location = location_file.read_text().strip()
        assert location.startswith("grpc+tls://")
        with StoreClient([location], timeout_s=10, tls_root_certs=certs.ca.read_bytes(), token=STORE_TOKEN) as ok:
            assert ok.health(location)
        with StoreClient([location], timeout_s=10, tls_root_certs=certs.ca.read_bytes()) as anonymous:
            assert not anonymous.health(location)
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- a whole run ----------------------------------------------------------------------------------


def _files_containing(root: Path, secrets: list[str]) -> list[str]:
    found = []
    needles = [s.encode() for s in secrets]
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {needle.decode()}" for needle in needles if needle in data]
    return found


@pytest.mark.slow
def test_run_with_auth_and_tls_completes_and_leaks_no_secret(
    tmp_path: Path, tiny_model_dir: Path, arith_dataset: Path, certs: CertificateFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncflow.launcher import run
    from tests.conftest import make_tiny_config

    # The NATS password from the environment, the store token from the config itself: both paths.
    monkeypatch.setenv("ASYNCFLOW_NATS_PASSWORD", NATS_PASSWORD)
    monkeypatch.delenv("ASYNCFLOW_STORE_TOKEN", raising=False)
    security = {"nats_auth": "user", "nats_user": "asyncflow", "nats_tls": True,
                "store_auth": "token", "store_token": STORE_TOKEN, "store_tls": True,
                "tls_cert": str(certs.cert), "tls_key": str(certs.key), "tls_ca": str(certs.ca)}
    config = make_tiny_config(tmp_path, tiny_model_dir, arith_dataset, k=1, name="secure", steps=2,
                              security=security)
    summary = run(config)
    assert summary["steps"] == 2

    run_dir = config.run_dir
    written = (run_dir / "config.yaml").read_text()
    assert "nats_tls: true" in written and "store_tls: true" in written
    assert "store_token: null" in written
    logs = list((run_dir / "logs").glob("*"))
    assert any(p.name.startswith("trainer") for p in logs)
    assert _files_containing(run_dir, [NATS_PASSWORD, STORE_TOKEN]) == []
    # The launcher really used TLS on both planes: the actors logged tls:// and grpc+tls:// addresses.
    started = (run_dir / "logs" / "trainer-0.jsonl").read_text()
    assert "tls://127.0.0.1:" in started and "grpc+tls://127.0.0.1:" in started
