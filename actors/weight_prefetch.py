"""Background prefetch of announced policy versions into the rollout process's memory.

Param-sync announces each new version on `af.<run>.weights`. A rollout instance keeps generating
with the weights it has while they satisfy the staleness bound, so the download of the newest
version can happen meanwhile, in a thread, overlapped with generation. When the bound finally
requires a swap (at a batch boundary), the copy is usually already in host memory and only the
load into the engine is exposed. Only the newest version is kept: an older prefetched copy is
useless once a newer one is announced.

An announced version can be gone from the stores (one died and came back empty, and no replica
survived). The prefetcher then reports it through `report` (a `WeightsLostEvent`, which the rollout
publishes to the trainer), at once from a background prefetch and again every `report_every_s`
while a swap waits for it, and the swap waits, within its timeout, for the trainer to put the
weights again and re-announce them (or for a newer version), instead of failing its item.

This is not an actor: it is a helper the rollout actor owns (like `actors/runtime.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from asyncflow.errors import EngineError, MissingChunkError, StoreError
from asyncflow.wire import WeightsEvent, WeightsLostEvent
from flight_store import StoreClient
from flight_store.weights import get_weights

REPORT_EVERY_S = 5.0
"""How often a swap waiting for a lost version reports it again (reports travel on core NATS, and
the trainer may be busy with an item): short next to `rollout.weights_timeout_s`."""

ReportLost = Callable[[WeightsLostEvent], Awaitable[None]]


@dataclass
class FetchedWeights:
    version: int
    tensors: dict[str, torch.Tensor]
    exposed_fetch_s: float
    """How long the caller waited for the download (0 when the prefetch had finished)."""
    lost_wait_s: float = 0.0
    """Of that, how long it waited for a lost version to be put again (0 when none was lost)."""


class WeightPrefetcher:
    """Follows announcements; `wait_for(v)` returns the newest version ≥ v, fetched or fetching."""

    def __init__(self, store: StoreClient, prefetch: bool = True, label: str = "rollout",
                 report: ReportLost | None = None, report_every_s: float = REPORT_EVERY_S) -> None:
        self.store = store
        self.prefetch = prefetch
        self.label = label
        self.report = report
        self.report_every_s = report_every_s
        self.announced: WeightsEvent | None = None
        self._changed = asyncio.Event()
        # Keyed by the announcement's (version, republished): a re-put of a lost version is a new download.
        self._fetches: dict[tuple[int, int], asyncio.Task[dict[str, torch.Tensor]]] = {}
        self._last_report: dict[tuple[int, int], float] = {}  # announcement → monotonic time last reported
        self._reporting: set[asyncio.Task[None]] = set()
        self.prefetched_versions = 0
        self.lost_reports = 0
        self.recovered = 0
        """Swaps that got their weights after waiting for a lost version to be put again."""

    def announce(self, event: WeightsEvent) -> None:
        """Record a new announcement (older or repeated ones are ignored) and start its download."""
        if self.announced is not None and event.order <= self.announced.order:
            return
        self.announced = event
        self._changed.set()
        for order in [o for o in self._last_report if o < event.order]:
            del self._last_report[order]  # superseded: never reported again
        if self.prefetch:
            self._start_fetch(event)

    def _start_fetch(self, event: WeightsEvent) -> asyncio.Task[dict[str, torch.Tensor]]:
        task = self._fetches.get(event.order)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.create_task(_in_daemon_thread(get_weights, self.store, event.weights),
                                       name=f"prefetch-v{event.version}-r{event.republished}")
            self._fetches[event.order] = task
            task.add_done_callback(lambda done: self._fetched(done, event))
        # Older downloads are no use any more: cancel those not finished, forget the rest.
        for order in [o for o in self._fetches if o < event.order]:
            self._fetches.pop(order).cancel()
        return task

    def _fetched(self, task: asyncio.Task[dict[str, torch.Tensor]], event: WeightsEvent) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            self.prefetched_versions += 1
        elif isinstance(error, MissingChunkError) and self.announced is not None and \
                self.announced.order == event.order:
            # Found gone in the background: report it now, so the trainer re-puts it before a swap needs it.
            reporting = asyncio.create_task(self._report_lost(event, error))
            self._reporting.add(reporting)
            reporting.add_done_callback(self._reporting.discard)

    async def _report_lost(self, event: WeightsEvent, error: MissingChunkError) -> None:
        """Report `event`'s version gone, at most once per `report_every_s` per announcement."""
        if self.report is None:
            return
        now = time.monotonic()
        last = self._last_report.get(event.order)
        if last is not None and now - last < self.report_every_s:
            return
        self._last_report[event.order] = now
        self.lost_reports += 1
        await self.report(WeightsLostEvent(version=event.version, republished=event.republished,
                                           weights=event.weights, actor=self.label, reason=str(error)[:2000]))

    async def _wait_changed(self, timeout_s: float, since: tuple[int, int] | None = None) -> None:
        """Until an announcement newer than `since` (default: the next one), or `timeout_s`."""
        if since is not None and self.announced is not None and self.announced.order > since:
            return  # it came while the caller was busy (e.g. reporting)
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=max(0.0, timeout_s))

    async def wait_for(self, needed: int, timeout_s: float) -> FetchedWeights:
        """The newest announced version (≥ needed), waiting up to timeout_s for its announcement and
        download, and for a lost one to be put again (reported meanwhile, when `report` is set)."""
        deadline = time.monotonic() + timeout_s
        while self.announced is None or self.announced.version < needed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineError(f"{self.label}: policy version {needed} not announced within "
                                  f"{timeout_s} s (is param-sync running?)")
            await self._wait_changed(remaining)
        started = time.monotonic()
        lost_since: float | None = None
        last_lost: tuple[WeightsEvent, MissingChunkError] | None = None
        while True:
            event = self.announced
            task = self._start_fetch(event)
            try:
                tensors = await asyncio.wait_for(asyncio.shield(task), timeout=max(0.0, deadline - time.monotonic()))
                break
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if task.cancelled() and not (current and current.cancelling()):
                    continue  # superseded by a newer announcement mid-download: take that one
                raise
            except TimeoutError:
                if last_lost is not None:  # the deadline passed while it fetched again after a loss
                    raise self._lost_error(*last_lost, timeout_s) from last_lost[1]
                raise EngineError(f"{self.label}: fetching policy version {event.version} from "
                                  f"{event.weights.location} took over {timeout_s} s") from None
            except MissingChunkError as error:
                self._fetches.pop(event.order, None)
                if self.report is None:
                    raise
                lost_since = lost_since if lost_since is not None else time.monotonic()
                last_lost = event, error
                await self._report_lost(event, error)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._lost_error(event, error, timeout_s) from error
                # A re-put (or a newer version) is announced, or it is time to report again; either
                # way fetch again: the key may also have come back under the same announcement.
                await self._wait_changed(min(remaining, self.report_every_s), since=event.order)
            except StoreError:
                self._fetches.pop(event.order, None)
                raise
        self._fetches.pop(event.order, None)  # the caller owns the copy now
        lost_wait_s = 0.0
        if lost_since is not None:
            self.recovered += 1
            lost_wait_s = time.monotonic() - lost_since
        return FetchedWeights(event.version, tensors, time.monotonic() - started, lost_wait_s)

    def _lost_error(self, event: WeightsEvent, error: MissingChunkError, timeout_s: float) -> EngineError:
        where = ", ".join(sorted({location for _, location in error.missing}))
        return EngineError(
            f"{self.label}: policy version {event.version} (key {event.weights.key!r}) is gone from the "
            f"store(s) {where} (lost with a store that restarted empty) and was neither put again nor "
            f"superseded by a newer version within {timeout_s} s, though reported to the trainer for a "
            f"re-put every {self.report_every_s} s: is the trainer running?")

    def close(self) -> None:
        for task in [*self._fetches.values(), *self._reporting]:
            task.cancel()
        self._fetches.clear()


T = TypeVar("T")


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a daemon thread of its own. A download only reads, so one still running when
    the actor stops can be abandoned: in the default executor (`asyncio.to_thread`) the process's
    exit would wait for it (seconds for a real model) after the run is over."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile: nobody wants the result
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as raised:  # handed to the awaiting task, as to_thread would
            result, error = None, raised
        with contextlib.suppress(RuntimeError):  # the loop is closed: the actor has stopped
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=f"download-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future
