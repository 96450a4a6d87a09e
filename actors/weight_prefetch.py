"""Background prefetch of announced policy versions into the rollout process's memory.

Param-sync announces each new version on `af.<run>.weights`. A rollout instance keeps generating
with the weights it has while they satisfy the staleness bound, so the download of the newest
version can happen meanwhile, in a thread, overlapped with generation. When the bound finally
requires a swap (at a batch boundary), the copy is usually already in host memory and only the
load into the engine is exposed. Only the newest version is kept: an older prefetched copy is
useless once a newer one is announced.

This is not an actor: it is a helper the rollout actor owns (like `actors/runtime.py`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from asyncflow.errors import EngineError, StoreError
from asyncflow.wire import WeightsEvent
from flight_store import StoreClient
from flight_store.weights import get_weights


@dataclass
class FetchedWeights:
    version: int
    tensors: dict[str, torch.Tensor]
    exposed_fetch_s: float
    """How long the caller waited for the download (0 when the prefetch had finished)."""


class WeightPrefetcher:
    """Follows announcements; `wait_for(v)` returns the newest version ≥ v, fetched or fetching."""

    def __init__(self, store: StoreClient, prefetch: bool = True, label: str = "rollout") -> None:
        self.store = store
        self.prefetch = prefetch
        self.label = label
        self.announced: WeightsEvent | None = None
        self._changed = asyncio.Event()
        self._fetches: dict[int, asyncio.Task[dict[str, torch.Tensor]]] = {}
        self.prefetched_versions = 0

    def announce(self, event: WeightsEvent) -> None:
        """Record a new announcement (older or repeated ones are ignored) and start its download."""
        if self.announced is not None and event.version <= self.announced.version:
            return
        self.announced = event
        self._changed.set()
        if self.prefetch:
            self._start_fetch(event)

    def _start_fetch(self, event: WeightsEvent) -> asyncio.Task[dict[str, torch.Tensor]]:
        task = self._fetches.get(event.version)
        if task is None:
            task = asyncio.create_task(asyncio.to_thread(get_weights, self.store, event.weights),
                                       name=f"prefetch-v{event.version}")
            self._fetches[event.version] = task
            task.add_done_callback(self._count)
        # Older downloads are no use any more: cancel those not finished, forget the rest.
        for version in [v for v in self._fetches if v < event.version]:
            self._fetches.pop(version).cancel()
        return task

    def _count(self, task: asyncio.Task[dict[str, torch.Tensor]]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.prefetched_versions += 1

    async def wait_for(self, needed: int, timeout_s: float) -> FetchedWeights:
        """The newest announced version (≥ needed), waiting up to timeout_s for its announcement."""
        deadline = time.monotonic() + timeout_s
        while self.announced is None or self.announced.version < needed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineError(f"{self.label}: policy version {needed} not announced within "
                                  f"{timeout_s} s (is param-sync running?)")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)
            except TimeoutError:
                continue
        started = time.monotonic()
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
                raise EngineError(f"{self.label}: fetching policy version {event.version} from "
                                  f"{event.weights.location} took over {timeout_s} s") from None
            except StoreError:
                self._fetches.pop(event.version, None)
                raise
        self._fetches.pop(event.version, None)  # the caller owns the copy now
        return FetchedWeights(event.version, tensors, time.monotonic() - started)

    def close(self) -> None:
        for task in self._fetches.values():
            task.cancel()
        self._fetches.clear()
