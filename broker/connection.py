"""Connecting to NATS with the project's defaults: bounded timeouts, endless reconnects, logged errors."""

from __future__ import annotations

import nats
from nats.aio.client import Client as NATS

from asyncflow.errors import BrokerError
from asyncflow.logs import get_logger


async def connect(url: str, name: str, connect_timeout_s: float = 10.0) -> NATS:
    """Connect to `url`, naming the connection `name` (visible in `nats server report connections`)."""
    log = get_logger(component="nats", connection=name)
    holder: list[NATS] = []

    def closing() -> bool:
        return bool(holder) and (holder[0].is_closed or holder[0].is_draining)

    async def on_error(error: Exception) -> None:
        log.warning("nats error", error=str(error))

    async def on_disconnect() -> None:
        if not closing():
            log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    try:
        client = await nats.connect(
            url,
            name=name,
            connect_timeout=connect_timeout_s,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
    except Exception as error:  # nats raises several unrelated types on connect failures
        raise BrokerError(f"cannot connect to NATS at {url}: {error}") from None
    holder.append(client)
    return client
