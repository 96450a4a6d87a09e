"""What every actor process has: NATS + JetStream + KV, the Flight store client, heartbeats, a
stop signal, and the work loop that turns queue messages into handler calls.

The work loop is where failures are contained: a message that does not parse is dead-lettered at
once; a handler that raises gets its item redelivered (nak) until `max_deliver`, then the item goes
to `af.<run>.dead.<stage>` so it cannot loop forever. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from asyncflow.config import Config
from asyncflow.errors import BrokerError, WireError
from asyncflow.logs import get_logger
from asyncflow.wire import Control, DeadLetter, Heartbeat, Message, MetricsEvent, WorkItem, decode
from broker import RunNames, connect, ensure_topology
from broker.names import KV_STORES
from flight_store import StoreClient


class ActorRuntime:
    """Async context manager owning an actor's connections and background tasks."""

    def __init__(self, role: str, config: Config, nats_url: str, instance: int = 0) -> None:
        self.role = role
        self.config = config
        self.nats_url = nats_url
        self.instance = instance
        self.actor_id = f"{role}-{instance}"
        self.names = RunNames(config.run.name)
        self.log = get_logger(run=config.run.name, actor=self.actor_id, role=role, stage=role)
        self.stop = asyncio.Event()
        self.state: str = "starting"
        self.policy_version: int | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.fatal: BaseException | None = None
        self._busy_items = 0
        self.timeout_s = config.broker.request_timeout_s

    async def __aenter__(self) -> ActorRuntime:
        self.nc = await connect(self.nats_url, name=f"asyncflow-{self.actor_id}")
        self.js = self.nc.jetstream(timeout=self.timeout_s)
        # Idempotent: an actor started by hand against a bare broker sets up what it needs.
        broker = self.config.broker
        await ensure_topology(self.js, self.names, ack_wait_s=broker.ack_wait_s, max_deliver=broker.max_deliver)
        self.kv: KeyValue = await self.js.key_value(self.names.kv_bucket)
        locations = await self._store_locations()
        self.store = StoreClient(locations)
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        await self.nc.subscribe(self.names.control, cb=self._on_control)
        self.log.info("actor started", nats=self.nats_url, stores=locations, pid=os.getpid())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.state = "stopping"
        with contextlib.suppress(Exception):
            await self._write_heartbeat()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # flush + close rather than drain: every publish here is already awaited, and draining a
        # pull subscription waits out its pending fetch request.
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=self.timeout_s)
        with contextlib.suppress(Exception):
            await self.nc.close()
        self.store.close()
        self.log.info("actor stopped")

    async def _store_locations(self) -> list[str]:
        """The stores the launcher registered in KV, else the ones the config names."""
        try:
            entry = await self.kv.get(KV_STORES)
            locations = list(json.loads(entry.value or b"[]"))
        except KeyNotFoundError:
            locations = []
        locations = locations or list(self.config.store.locations)
        if not locations:
            raise BrokerError(
                f"{self.actor_id}: no Flight store known: none registered under {KV_STORES!r} in KV bucket "
                f"{self.names.kv_bucket} and store.locations is empty in the config"
            )
        return locations

    # -- heartbeats and control -------------------------------------------------------------

    async def _write_heartbeat(self) -> None:
        beat = Heartbeat(
            actor=self.actor_id, role=self.role, host=socket.gethostname(), pid=os.getpid(),
            state=self.state, policy_version=self.policy_version, time=time.time(),  # type: ignore[arg-type]
        )
        await self.kv.put(f"actors.{self.actor_id}", beat.encode())

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self._write_heartbeat()
            except Exception as error:  # a broker blip must not kill the actor; the next beat retries
                self.log.warning("heartbeat failed", error=str(error))
            await asyncio.sleep(self.config.broker.heartbeat_s)

    async def _on_control(self, msg: Msg) -> None:
        try:
            command = decode(Control, msg.data, msg.subject)
        except WireError as error:
            self.log.warning("ignored bad control message", error=str(error))
            return
        if command.command == "stop":
            self.log.info("stop requested", reason=command.reason)
            self.stop.set()

    def fail(self, error: BaseException, where: str) -> None:
        """Record a fatal error from a callback and stop; `wait_stopped` re-raises it in the main task."""
        self.log.error("fatal error", where=where, error=f"{type(error).__name__}: {error}", exc_info=error)
        if self.fatal is None:
            self.fatal = error
        self.stop.set()

    async def wait_stopped(self) -> None:
        await self.stop.wait()
        if self.fatal is not None:
            raise self.fatal

    # -- publishing -------------------------------------------------------------------------

    async def publish(self, subject: str, message: Message, msg_id: str | None = None) -> None:
        """Durable publish (JetStream, acked by the server); `msg_id` de-duplicates re-sends."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await self.js.publish(subject, message.encode(), timeout=self.timeout_s, headers=headers)

    async def publish_many(self, messages: Sequence[tuple[str, Message, str | None]]) -> None:
        """Durable publish of (subject, message, msg_id) triples, pipelined: every message is sent
        before any server ack is awaited, so n messages cost about one round trip instead of n.
        Raises BrokerError if the server refuses one or does not ack them all within the timeout."""
        acks = []
        for subject, message, msg_id in messages:
            headers = {"Nats-Msg-Id": msg_id} if msg_id else None
            acks.append(await self.js.publish_async(subject, message.encode(), headers=headers))
        try:
            results = await asyncio.wait_for(asyncio.gather(*acks, return_exceptions=True), self.timeout_s)
        except TimeoutError:
            raise BrokerError(f"{self.actor_id}: {len(acks)} JetStream publishes (first on {messages[0][0]}) "
                              f"not acknowledged within {self.timeout_s} s") from None
        for (subject, _, _), result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                raise BrokerError(f"{self.actor_id}: JetStream publish on {subject} failed: {result!r}") from result

    async def publish_metrics(self, item_id: str, stage: str, start: float, samples: int, tokens: int = 0,
                              end: float | None = None) -> None:
        """One busy span (start → end, default now) for the timeline and the busy fractions."""
        span = MetricsEvent(actor=self.actor_id, stage=stage, item_id=item_id, start=start,
                            end=time.time() if end is None else end, samples=samples, tokens=tokens)
        await self.nc.publish(self.names.metrics(self.actor_id), span.encode())

    async def subscribe_events(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]], deliver_policy: DeliverPolicy = DeliverPolicy.ALL
    ) -> None:
        """Replay-then-follow `subject` on the EVENTS stream (ordered consumer: in order, gap-free)."""
        await self.js.subscribe(
            subject, stream=self.names.events_stream, ordered_consumer=True, deliver_policy=deliver_policy,
            cb=handler, manual_ack=True,
        )

    # -- the work loop ----------------------------------------------------------------------

    async def pull(self, stage: str) -> Any:
        return await self.js.pull_subscribe_bind(RunNames.consumer(stage), stream=self.names.work_stream)

    async def fetch(self, subscription: Any, batch: int = 1, timeout_s: float = 1.0) -> list[Msg]:
        try:
            return await subscription.fetch(batch, timeout=timeout_s)
        except TimeoutError:  # nats.errors.TimeoutError or asyncio's, depending on where it expired
            return []

    async def dead_letter(self, stage: str, msg: Msg, reason: str, item: WorkItem | None = None) -> None:
        deliveries = msg.metadata.num_delivered if msg.metadata else 1
        letter = DeadLetter(stage=stage, subject=msg.subject, deliveries=deliveries, reason=reason[:2000],
                            payload=msg.data[:8192].decode("utf-8", errors="replace"),
                            item_id=item.item_id if item else None, partition=item.partition if item else None,
                            groups=item.groups if item else [])
        await self.publish(self.names.dead(stage), letter)
        await msg.term()
        self.log.error("work item dead-lettered", stage=stage, deliveries=deliveries, reason=reason)

    async def serve_work(
        self, stage: str, handler: Callable[[WorkItem], Awaitable[None]], concurrency: int = 1
    ) -> None:
        """Pull items of `stage` until stop, at most `concurrency` in flight; ack on success, retry
        or dead-letter on failure. An instance only pulls when it has room, so faster ones pull more."""
        subscription = await self.pull(stage)
        self.state = "ready"
        if concurrency == 1:
            while not self.stop.is_set():
                for msg in await self.fetch(subscription):
                    await self.handle_one(stage, msg, handler)
            return
        in_flight: set[asyncio.Task[bool]] = set()
        try:
            while not self.stop.is_set():
                room = concurrency - len(in_flight)
                if room <= 0:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED, timeout=1.0)
                    in_flight = {t for t in in_flight if not t.done()}
                    continue
                for msg in await self.fetch(subscription, batch=room, timeout_s=0.2 if in_flight else 1.0):
                    in_flight.add(asyncio.create_task(self.handle_one(stage, msg, handler)))
                in_flight = {t for t in in_flight if not t.done()}
        finally:
            if in_flight:
                await asyncio.wait(in_flight, timeout=self.timeout_s)

    async def handle_one(self, stage: str, msg: Msg, handler: Callable[[WorkItem], Awaitable[None]]) -> bool:
        """Run `handler` on one message with the failure policy; True when it succeeded and was acked."""
        try:
            item = decode(WorkItem, msg.data, msg.subject)
        except WireError as error:
            await self.dead_letter(stage, msg, str(error))
            return False
        self.state = "busy"
        self._busy_items += 1
        keepalive = asyncio.create_task(self._keep_in_progress(msg))
        try:
            await handler(item)
        except Exception as error:
            deliveries = msg.metadata.num_delivered if msg.metadata else 1
            reason = f"{type(error).__name__}: {error}"
            self.log.exception("work item failed", item=item.item_id, deliveries=deliveries)
            if deliveries >= self.config.broker.max_deliver:
                await self.dead_letter(stage, msg, f"{item.item_id}: {reason}", item)
            else:
                await msg.nak(delay=min(2.0 * deliveries, 10.0))
            return False
        finally:
            keepalive.cancel()
            self._busy_items -= 1
            if self._busy_items == 0:
                self.state = "ready"
        await msg.ack_sync(timeout=self.timeout_s)
        return True

    async def _keep_in_progress(self, msg: Msg) -> None:
        """Tell JetStream a long item is still being worked on, so it is not redelivered meanwhile."""
        period = max(1.0, self.config.broker.ack_wait_s / 3)
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                await msg.in_progress()


def read_columns(store: StoreClient, refs: list[Any], columns: tuple[str, ...]) -> dict[str, dict[int, Any]]:
    """Fetch the chunks of `columns` named in `refs` (blocking; run it in a thread).

    Returns column → {sample id → value}; each chunk's rows are matched by their sample_id column.
    """
    values: dict[str, dict[int, Any]] = {column: {} for column in columns}
    for ref in refs:
        if ref.column not in values:
            continue
        table = store.get_column(ref)
        ids = table.column("sample_id").to_pylist()
        for sample_id, value in zip(ids, table.column(ref.column).to_pylist(), strict=True):
            values[ref.column][sample_id] = value
    return values
