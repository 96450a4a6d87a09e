"""Rollout actor: generates responses for work items with an inference engine.

Weights follow the staleness contract lazily: the actor keeps generating with the weights it has
while they are recent enough for the item (version ≥ item.min_version) and swaps, at a batch
boundary, only when the bound requires it. Every announced version is prefetched into memory in
the background meanwhile (`actors/weight_prefetch.py`), so a swap exposes only the engine load.

With `rollout.concurrent_items` > 1 and an engine that batches requests continuously, several
items are generated at once. A swap holds new items back until the new weights are in; the items
in flight either finish on the new weights (default, as AReaL's interruptible rollout; they keep
the version they started with as their label) or, with `rollout.drain_before_swap`, are waited
for first.

A version found gone from the stores (lost with a store that restarted empty) is reported to the
trainer on `af.<run>.weights.lost`; the swap waits, bounded by `rollout.weights_timeout_s`, for the
trainer to put its weights again (the prefetcher retries on the re-announcement), while items the
weights in use still satisfy go on.
"""

from __future__ import annotations

import asyncio
import time

import pyarrow as pa
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from actors.runtime import ActorRuntime, read_columns
from actors.weight_prefetch import WeightPrefetcher
from asyncflow.checkpoint import initial_policy
from asyncflow.engines import SamplingParams, make_inference_engine
from asyncflow.errors import WireError
from asyncflow.graph import ROLLOUT
from asyncflow.partitions import group_of, sample_seed
from asyncflow.wire import ChunkRef, DoneEvent, WeightsEvent, WeightsLostEvent, WorkItem, decode
from flight_store.columns import float_lists, token_lists

WEIGHT_SWAP_STAGE = "weight_swap"  # the busy spans of swaps show on the timeline under this name


class Rollout:
    def __init__(self, runtime: ActorRuntime) -> None:
        self.rt = runtime
        config = runtime.config
        self.config = config
        # model.path as version 0, or a resumed run's checkpoint as version N.
        start_path, start_version = initial_policy(config)
        self.engine = make_inference_engine(config.rollout.engine, start_path, config.model.dtype,
                                            instance=runtime.instance)
        self.params = SamplingParams(
            temperature=config.sampling.temperature,
            top_p=config.sampling.top_p,
            max_new_tokens=config.sampling.max_new_tokens,
        )
        self.version = start_version
        self.rt.policy_version = start_version
        self.prefetcher = WeightPrefetcher(runtime.store, config.rollout.prefetch_weights, runtime.actor_id,
                                           report=self._report_lost_weights)
        self.concurrency = config.rollout.concurrent_items if self.engine.concurrent_requests else 1
        # Generation calls in flight, and whether a swap is holding new ones back (batch boundary).
        self._generating = 0
        self._swapping = False
        self._boundary = asyncio.Condition()
        self._swap_lock = asyncio.Lock()

    async def run(self) -> None:
        await self.rt.subscribe_events(self.rt.names.weights, self.on_weights, DeliverPolicy.LAST)
        try:
            await self.rt.serve_work(ROLLOUT.name, self.handle, concurrency=self.concurrency)
            await self.rt.wait_stopped()
        finally:
            self.prefetcher.close()

    async def on_weights(self, msg: Msg) -> None:
        try:
            event = decode(WeightsEvent, msg.data, msg.subject)
        except WireError as error:
            self.rt.log.error("bad weights event ignored", error=str(error))
            return
        self.prefetcher.announce(event)

    async def _report_lost_weights(self, event: WeightsLostEvent) -> None:
        """Ask the trainer to put an announced version again: its key is gone from the stores."""
        try:
            await self.rt.nc.publish(self.rt.names.weights_lost, event.encode())
        except Exception as error:  # the prefetcher reports again while a swap waits
            self.rt.log.warning("could not report lost weights", version=event.version,
                                error=f"{type(error).__name__}: {error}")
            return
        self.rt.counters["weights_lost_reports"] += 1
        self.rt.log.warning("policy version gone from the stores; reported for a re-put", version=event.version,
                            republished=event.republished, key=event.weights.key,
                            location=event.weights.location, reports=self.rt.counters["weights_lost_reports"])

    async def ensure_version(self, needed: int) -> None:
        """Swap weights only if the current ones are too old for this item (deferred update)."""
        if self.version >= needed:
            return
        async with self._swap_lock:
            if self.version >= needed:
                return  # another item's swap already brought them
            waited = time.time()
            fetched = await self.prefetcher.wait_for(needed, self.config.rollout.weights_timeout_s)
            fetched_at = time.time()
            async with self._boundary:
                self._swapping = True
                if self.config.rollout.drain_before_swap:
                    await self._boundary.wait_for(lambda: self._generating == 0)
            started = time.time()
            try:
                await asyncio.to_thread(self.engine.load_weights, fetched.tensors.items())
            finally:
                async with self._boundary:
                    self._swapping = False
                    self._boundary.notify_all()
            self.version = fetched.version
            self.rt.policy_version = fetched.version
            now = time.time()
            download_started = fetched_at - fetched.exposed_fetch_s
            lost = {}
            if fetched.lost_wait_s:
                self.rt.counters["weights_recovered"] += 1
                lost = {"waited_for_lost_version_s": round(fetched.lost_wait_s, 4)}
            self.rt.log.info("weights updated", version=fetched.version, needed=needed,
                             wait_for_version_s=round(download_started - waited, 4),
                             exposed_download_s=round(fetched.exposed_fetch_s, 4),
                             drain_s=round(started - fetched_at, 4), load_s=round(now - started, 4), **lost)
            # On the timeline a swap is the part of the download not hidden by the prefetch plus
            # the load. Waiting for the trainer to produce the version is idle time, not a swap;
            # during a drain the instance is still generating (the items' own spans show it).
            if fetched.exposed_fetch_s > 0.001:
                await self.rt.publish_metrics(f"weights-v{fetched.version}-download", WEIGHT_SWAP_STAGE,
                                              download_started, 0, end=fetched_at)
            await self.rt.publish_metrics(f"weights-v{fetched.version}", WEIGHT_SWAP_STAGE, started, 0)

    async def handle(self, item: WorkItem) -> None:
        await self.ensure_version(item.min_version)
        started = time.time()
        prompts = (await asyncio.to_thread(read_columns, self.rt.store, item.inputs, ("prompt_ids",)))["prompt_ids"]
        sample_ids = item.sample_ids
        seeds = [sample_seed(self.config.run.seed, sid) for sid in sample_ids]
        async with self._boundary:
            await self._boundary.wait_for(lambda: not self._swapping)
            self._generating += 1
            version = self.version  # the weights these responses come from, whatever swaps next
        try:
            generations = await asyncio.to_thread(
                self.engine.generate, [prompts[sid] for sid in sample_ids], self.params, seeds
            )
        finally:
            async with self._boundary:
                self._generating -= 1
                self._boundary.notify_all()
        by_id = dict(zip(sample_ids, generations, strict=True))
        chunks = await asyncio.to_thread(self._write, item, by_id, version)
        tokens = sum(len(g.token_ids) for g in generations)
        event = DoneEvent(
            stage=ROLLOUT.name, item_id=item.item_id, actor=self.rt.actor_id, partition=item.partition,
            groups=item.groups, sample_ids=sample_ids, chunks=chunks, policy_version=version,
            busy_s=time.time() - started,
        )
        finished = time.time()  # before the event: downstream work can only start after it
        await self.rt.publish(self.rt.names.done(ROLLOUT.name), event, msg_id=f"{item.item_id}-done")
        await self.rt.publish_metrics(item.item_id, ROLLOUT.name, started, len(sample_ids), tokens, end=finished)

    def _write(self, item: WorkItem, by_id: dict, version: int) -> list[ChunkRef]:
        algo = self.config.algorithm
        chunks = []
        for group in item.groups:
            ids = [sid for sid in item.sample_ids
                   if group_of(sid, algo.prompts_per_step, algo.samples_per_prompt) == group]
            if not ids:
                continue
            gens = [by_id[sid] for sid in ids]
            columns = {
                "response_ids": token_lists([g.token_ids for g in gens]),
                "behaviour_logprobs": float_lists([g.logprobs for g in gens]),
                "policy_version": pa.array([version] * len(ids), pa.int64()),
                "finish_reason": pa.array([g.finish_reason for g in gens], pa.string()),
            }
            for column, values in columns.items():
                chunks.append(self.rt.store.put_column(
                    self.config.run.name, item.partition, column, f"g{group}", ids, values))
        return chunks


async def run(runtime: ActorRuntime) -> None:
    await Rollout(runtime).run()
