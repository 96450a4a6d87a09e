"""Connecting to NATS with the project's defaults: bounded timeouts, endless reconnects, logged errors,
and the run's authentication and TLS (`SecuritySettings`, see docs/security.md)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import ssl
from urllib.parse import urlsplit

from nats.aio.client import Client as NATS

from asyncflow.config import SecuritySettings
from asyncflow.errors import BrokerError
from asyncflow.logs import get_logger
from asyncflow.security import nats_connect_options, redact_url


def _refused(error: Exception) -> bool:
    """Errors that retrying cannot fix: the server refused the credentials or the TLS handshake failed."""
    if isinstance(error, ssl.SSLError | ssl.CertificateError):
        return True
    text = str(error).lower()
    return "authorization violation" in text or "authentication" in text or "tls required" in text


def _unreachable(error: Exception) -> bool:
    """Errors of a server that is not there (yet): retried without limit, as reconnects are."""
    if isinstance(error, ConnectionRefusedError | TimeoutError | asyncio.TimeoutError | socket.gaierror):
        return True
    return isinstance(error, OSError) and error.errno in (
        errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT)


# A server that accepts the connection and then drops it during the handshake this many times in a
# row is refusing us (it closes after "-ERR 'Authorization Violation'", often before we read it).
ORDERED_HEARTBEAT_S = 1.0
"""Idle heartbeat of the ordered consumers that follow the EVENTS stream. nats-py recreates one that
has missed two (after a broker restart its server-side consumer may be gone), so this bounds how long
a follower sits deaf after the broker comes back: ~2-4 s here, 10-20 s with nats-py's default of 5 s,
long enough for compaction to purge events it has not read yet."""
_MAX_HANDSHAKE_DROPS = 3


async def _offers_tls(url: str, timeout_s: float) -> bool | None:
    """Whether the server at `url` announces `tls_required` in its INFO line; None if unreachable.

    nats-py upgrades to TLS only when the server asks for it, so a client that must use TLS checks
    first rather than send its credentials in clear to a server that does not ask."""
    first = url.split(",")[0].strip()
    parts = urlsplit(first if "://" in first else f"nats://{first}")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 4222), timeout_s)
    except (OSError, TimeoutError):
        return None
    try:
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        if not line.startswith(b"INFO "):
            return False
        return bool(json.loads(line[5:]).get("tls_required"))
    except (OSError, TimeoutError, ValueError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), timeout_s)


async def connect(url: str, name: str, connect_timeout_s: float = 10.0,
                  security: SecuritySettings | None = None) -> NATS:
    """Connect to `url`, naming the connection `name` (visible in `nats server report connections`).

    `security` adds the token or user/password (from the environment) and the TLS context. Wrong
    credentials or a failed TLS handshake raise BrokerError at once instead of being retried forever.
    """
    shown = redact_url(url)
    log = get_logger(component="nats", connection=name)
    options = nats_connect_options(security)  # ConfigError if a required secret is missing
    if security is not None and security.nats_tls and await _offers_tls(url, connect_timeout_s) is False:
        raise BrokerError(f"NATS at {shown} does not offer TLS but security.nats_tls is on: refusing to "
                          "connect in clear (is the URL right? does the server have a tls block?)")
    client = NATS()
    connected = False
    drops = 0
    has_credentials = any(key in options for key in ("token", "user"))

    def closing() -> bool:
        return client.is_closed or client.is_draining

    async def on_error(error: Exception) -> None:
        nonlocal drops
        if not connected:
            # nats-py awaits this callback inside its connect loop, so raising here ends that loop:
            # without it an initial connect with max_reconnect_attempts=-1 retries a refusal forever.
            fix = "check security.nats_auth / nats_tls / tls_ca and the secret's environment variable"
            if _refused(error):
                raise BrokerError(f"NATS at {shown} refused connection {name!r}: {error} ({fix})")
            info = getattr(client, "_server_info", None) or {}
            if info.get("auth_required") and not has_credentials:
                raise BrokerError(f"NATS at {shown} requires authentication and connection {name!r} has no "
                                  f"credentials (security.nats_auth is 'none'; {fix})")
            if _unreachable(error):
                drops = 0  # not there (yet): only drops in a row by a server that answers count
            else:
                drops += 1
                if drops >= _MAX_HANDSHAKE_DROPS:
                    raise BrokerError(f"NATS at {shown} dropped connection {name!r} {drops} times during the "
                                      f"handshake (last: {type(error).__name__}: {error}); {fix}")
        log.warning("nats error", error=str(error))

    async def on_disconnect() -> None:
        if not closing():
            log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    try:
        await client.connect(
            url,
            name=name,
            connect_timeout=connect_timeout_s,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            **options,
        )
    except BrokerError:
        await _discard(client)
        raise
    except Exception as error:  # nats raises several unrelated types on connect failures
        await _discard(client)
        raise BrokerError(f"cannot connect to NATS at {shown}: {error}") from None
    connected = True
    return client


async def _discard(client: NATS, timeout_s: float = 2.0) -> None:
    """Close a client whose connect failed. Bounded: after a failed TLS handshake nats-py's close()
    can wait forever on a transport that never opened; nothing is left to clean up then."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), timeout_s)
