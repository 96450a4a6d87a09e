"""What every actor process has: NATS + JetStream + KV, the Flight store client, heartbeats, a
stop signal, and the work loop that turns queue messages into handler calls.

The work loop is where failures are contained: a message that does not parse is dead-lettered at
once; a handler that raises gets its item redelivered (nak) until `max_deliver`, then the item goes
to `af.<run>.dead.<stage>` so it cannot loop forever. An item whose input chunks a store lost (it
died and came back empty: `MissingChunkError`) is not retried: it is reported on
`af.<run>.lost.<stage>` and dropped, and the scheduler re-issues its groups (lineage recovery).
Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from actors.micro import ActorService, ActorStats
from asyncflow.config import Config
from asyncflow.errors import BrokerError, MissingChunkError, WireError
from asyncflow.logs import bind_process, get_logger
from asyncflow.security import store_client_options
from asyncflow.wire import (
    REJECTED,
    ChunkRef,
    Control,
    DeadLetter,
    Heartbeat,
    LostEvent,
    Message,
    MetricsEvent,
    WorkItem,
    decode,
)
from broker import RunNames, connect, ensure_topology
from broker.connection import ORDERED_HEARTBEAT_S
from broker.names import KV_STORES
from flight_store import StoreClient

PUBLISH_ATTEMPTS = 3
"""Sends of one JetStream publish that carries a msg id before giving up (acks lost to a broker restart)."""
STORE_UNAVAILABLE_WAIT_S = 30.0
"""How long a put or get to an unreachable store is retried: far longer than the launcher takes to
restart a store on its port (~1-2 s), far shorter than a run's stall timeout."""


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
        # The same keys on every line of the process, also from loggers of shared code (NATS connection).
        bind_process(run=config.run.name, actor=self.actor_id, role=role, stage=role)
        self.stop = asyncio.Event()
        self.state: str = "starting"
        self.policy_version: int | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.fatal: BaseException | None = None
        self._busy_items = 0
        self.timeout_s = config.broker.request_timeout_s
        self.stats = ActorStats()
        self.counters: Counter[str] = Counter()
        """Role-specific counts of bad input met (failed reward calls, bad events, ...): in `stats`
        and in the final log line, with the messages `decode` rejected in this process."""

    async def __aenter__(self) -> ActorRuntime:
        # Credentials and TLS from config.security + this process's environment (docs/security.md).
        self.nc = await connect(self.nats_url, name=f"asyncflow-{self.actor_id}", security=self.config.security)
        self.js = self.nc.jetstream(timeout=self.timeout_s)
        # Idempotent: an actor started by hand against a bare broker sets up what it needs.
        broker = self.config.broker
        await ensure_topology(self.js, self.names, ack_wait_s=broker.ack_wait_s, max_deliver=broker.max_deliver,
                              replicas=broker.replicas)
        self.kv: KeyValue = await self.js.key_value(self.names.kv_bucket)
        locations = await self._store_locations()
        # A full store makes producers wait for room (the trainer frees it) rather than fail their
        # work; a store full for a whole stall timeout fails the run anyway, so no longer than that.
        self.store = StoreClient(locations, backpressure_wait_s=self.config.run.stall_timeout_s,
                                 unavailable_wait_s=STORE_UNAVAILABLE_WAIT_S,
                                 **store_client_options(self.config.security))
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        await self.nc.subscribe(self.names.control, cb=self._on_control)
        # `asyncflow-<role>` micro service (actors/micro.py): `nats micro ls` / `stats` / `health`.
        self.service = ActorService(self.nc, self.names, self.role, self.actor_id, self.instance,
                                    self.stats_snapshot, self.timeout_s)
        await self.service.start()
        self.log.info("actor started", nats=self.nats_url, stores=locations, pid=os.getpid())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.state = "stopping"
        try:  # first, so discovery stops listing the actor before it goes
            await self.service.stop()
        except Exception as error:
            self.log.warning("micro service stop failed", error=f"{type(error).__name__}: {error}")
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
        self.log.info("actor stopped", rejected_messages=dict(REJECTED), counters=self.counts())

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
            self.log.warning("ignored bad control message", error=str(error), rejected=REJECTED["control"])
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

    def counts(self) -> dict[str, int]:
        """`counters` plus the puts that had to wait for room in a full store."""
        store = getattr(self, "store", None)
        waits = ({"store_backpressure_waits": store.backpressure_waits,
                  "store_unavailable_waits": store.unavailable_waits} if store is not None else {})
        return {**self.counters, **waits}

    def stats_snapshot(self) -> dict[str, Any]:
        """What the micro service's `stats` endpoint serves (JSON)."""
        stats, now = self.stats, time.time()
        return {
            "run": self.names.run, "actor": self.actor_id, "role": self.role, "instance": self.instance,
            "host": socket.gethostname(), "pid": os.getpid(), "state": self.state,
            "policy_version": self.policy_version, "uptime_s": round(now - stats.started, 3),
            "items_done": stats.items_done, "samples_done": stats.samples_done,
            "items_failed": stats.items_failed, "dead_lettered": stats.dead_lettered,
            "in_flight": self._busy_items, "busy_s": round(stats.busy_s, 3),
            "last_item_age_s": None if stats.last_item_at is None else round(now - stats.last_item_at, 3),
            "error": None if self.fatal is None else f"{type(self.fatal).__name__}: {self.fatal}",
            "rejected_messages": dict(REJECTED), "counters": self.counts(),
        }

    async def wait_stopped(self) -> None:
        await self.stop.wait()
        if self.fatal is not None:
            raise self.fatal

    # -- publishing -------------------------------------------------------------------------

    async def publish(self, subject: str, message: Message, msg_id: str | None = None) -> None:
        """Durable publish (JetStream, acked by the server); `msg_id` de-duplicates re-sends, so a
        publish with one is retried (PUBLISH_ATTEMPTS in all) when its ack is lost, e.g. to a broker
        restart."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                await self.js.publish(subject, message.encode(), timeout=self.timeout_s, headers=headers)
                return
            except Exception as error:
                if msg_id is None or attempt == PUBLISH_ATTEMPTS:
                    raise
                self.log.warning("publish not acknowledged, retrying", subject=subject, attempt=attempt,
                                 error=f"{type(error).__name__}: {error}")

    async def publish_many(self, messages: Sequence[tuple[str, Message, str | None]]) -> None:
        """Durable publish of (subject, message, msg_id) triples, pipelined: every message is sent
        before any server ack is awaited, so n messages cost about one round trip instead of n.
        Messages with a msg id whose ack is lost (a broker restart) are sent again, up to
        PUBLISH_ATTEMPTS times in all: the id makes that safe. Raises BrokerError if the server
        refuses one or does not ack them all in the end."""
        pending = list(messages)
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            acks = []
            for subject, message, msg_id in pending:
                headers = {"Nats-Msg-Id": msg_id} if msg_id else None
                acks.append(await self.js.publish_async(subject, message.encode(), headers=headers))
            done, not_done = await asyncio.wait(acks, timeout=self.timeout_s)
            for future in not_done:
                future.cancel()
            failed: list[tuple[tuple[str, Message, str | None], BaseException]] = []
            for entry, future in zip(pending, acks, strict=True):
                if future not in done:
                    failed.append((entry, TimeoutError(f"no ack within {self.timeout_s} s")))
                elif (error := future.exception()) is not None:
                    failed.append((entry, error))
            if not failed:
                return
            subject, _, msg_id = failed[0][0]
            if attempt == PUBLISH_ATTEMPTS or any(entry[2] is None for entry, _ in failed):
                raise BrokerError(f"{self.actor_id}: {len(failed)} of {len(pending)} JetStream publishes (first on "
                                  f"{subject}) failed after {attempt} attempt(s): {failed[0][1]!r}")
            self.log.warning("publishes not acknowledged, retrying", failed=len(failed), first_subject=subject,
                             attempt=attempt, error=repr(failed[0][1]))
            pending = [entry for entry, _ in failed]

    async def publish_metrics(self, item_id: str, stage: str, start: float, samples: int, tokens: int = 0,
                              end: float | None = None) -> None:
        """One busy span (start → end, default now) for the timeline and the busy fractions."""
        span = MetricsEvent(actor=self.actor_id, stage=stage, item_id=item_id, start=start,
                            end=time.time() if end is None else end, samples=samples, tokens=tokens)
        self.stats.span(span.start, span.end, samples)
        await self.nc.publish(self.names.metrics(self.actor_id), span.encode())

    async def subscribe_events(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]], deliver_policy: DeliverPolicy = DeliverPolicy.ALL
    ) -> None:
        """Replay-then-follow `subject` on the EVENTS stream (ordered consumer: in order, gap-free)."""
        await self.js.subscribe(
            subject, stream=self.names.events_stream, ordered_consumer=True, deliver_policy=deliver_policy,
            cb=handler, manual_ack=True, idle_heartbeat=ORDERED_HEARTBEAT_S,
        )

    # -- the work loop ----------------------------------------------------------------------

    async def pull(self, stage: str) -> Any:
        return await self.js.pull_subscribe_bind(RunNames.consumer(stage), stream=self.names.work_stream)

    async def fetch(self, subscription: Any, batch: int = 1, timeout_s: float = 1.0) -> list[Msg]:
        """Up to `batch` messages of a pull subscription, [] after `timeout_s` without any, and []
        at once when stop is set: an idle work loop would otherwise notice a stop only when its
        fetch expires, up to `timeout_s` later, and the whole run's shutdown waits for the slowest.
        A fetch cut short by stop may leave a pull request open at the server: a message it still
        delivers is never acked here, so JetStream redelivers it after ack_wait (at-least-once, as
        for any actor that exits)."""
        if self.stop.is_set():
            return []
        fetching = asyncio.ensure_future(subscription.fetch(batch, timeout=timeout_s))
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait((fetching, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this task is cancelled: neither waiter may outlive it
            stopping.cancel()
            if not fetching.done():
                fetching.cancel()
                await asyncio.wait((fetching,))  # its clean-up done; raises nothing of its own
        if fetching.cancelled():
            return []
        try:
            return fetching.result()  # messages that arrived as stop was set are still handled
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
        self.stats.dead_lettered += 1
        self.log.error("work item dead-lettered", stage=stage, deliveries=deliveries, reason=reason)

    async def report_lost(self, stage: str, msg: Msg, item: WorkItem, lost: list[ChunkRef],
                          error: BaseException) -> None:
        """Report that `item`'s inputs `lost` are gone from their store (LostEvent on
        `af.<run>.lost.<stage>`) and drop the item from the queue (term): the scheduler re-issues its
        groups under new item ids. If the report cannot be published the item is retried later."""
        event = LostEvent(stage=stage, item_id=item.item_id, actor=self.actor_id, partition=item.partition,
                          groups=item.groups, sample_ids=item.sample_ids, lost=lost, reason=str(error)[:2000])
        try:
            await self.publish(self.names.lost(stage), event, msg_id=f"{item.item_id}-lost")
        except Exception as publish_error:
            self.log.error("could not report lost inputs; retrying the item", item=item.item_id,
                           error=f"{type(publish_error).__name__}: {publish_error}")
            with contextlib.suppress(Exception):
                await msg.nak(delay=2.0)
            return
        with contextlib.suppress(Exception):  # a term lost to a broker blip: redelivered, reported again (dedup'd)
            await msg.term()
        self.counters["inputs_lost"] += 1
        self.log.warning("inputs lost with a store; item reported for re-issue", item=item.item_id,
                         partition=item.partition, groups=item.groups, lost=[ref.key for ref in lost],
                         inputs_lost=self.counters["inputs_lost"])

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
            lost = lost_inputs(item, error)
            if lost:  # lineage recovery: retrying cannot bring the chunks back; the scheduler re-issues
                await self.report_lost(stage, msg, item, lost, error)
                return False
            deliveries = msg.metadata.num_delivered if msg.metadata else 1
            reason = f"{type(error).__name__}: {error}"
            self.stats.items_failed += 1
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
        try:
            await msg.ack_sync(timeout=self.timeout_s)
        except Exception as error:
            # The work is done and announced (done events carry msg ids); an ack lost to a broker
            # restart only means the item comes back after ack_wait and is done again, harmlessly.
            self.log.warning("ack not confirmed; the item may be redelivered", item=item.item_id,
                             error=f"{type(error).__name__}: {error}")
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
    Chunks a store no longer holds are all looked for before one MissingChunkError names every one
    of them, so that a work item's loss is reported whole (see `lost_inputs`).
    """
    values: dict[str, dict[int, Any]] = {column: {} for column in columns}
    missing: list[tuple[str, str]] = []
    for ref in refs:
        if ref.column not in values:
            continue
        try:
            table = store.get_column(ref)
        except MissingChunkError as error:
            missing += error.missing
            continue
        ids = table.column("sample_id").to_pylist()
        for sample_id, value in zip(ids, table.column(ref.column).to_pylist(), strict=True):
            values[ref.column][sample_id] = value
    if missing:
        raise MissingChunkError(missing)
    return values


def lost_inputs(item: WorkItem, error: BaseException) -> list[ChunkRef]:
    """The refs among `item`'s inputs whose keys `error` says a store no longer holds; empty when the
    error is anything else (or a missing key that is not an input, e.g. a policy version's weights)."""
    if not isinstance(error, MissingChunkError):
        return []
    keys = error.keys
    return [ref for ref in item.inputs if ref.key in keys]
