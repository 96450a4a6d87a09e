"""Rollout actor: generates responses for work items with an inference engine.

Weights follow the staleness contract lazily: the actor keeps generating with the weights it has
while they are recent enough for the item (version ≥ item.min_version) and swaps, between items,
to the newest version param-sync announced only when the bound requires it.
"""

from __future__ import annotations

import asyncio
import time

import pyarrow as pa
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from actors.runtime import ActorRuntime, read_columns
from asyncflow.engines import SamplingParams, make_inference_engine
from asyncflow.errors import EngineError, WireError
from asyncflow.graph import ROLLOUT
from asyncflow.partitions import group_of, sample_seed
from asyncflow.wire import ChunkRef, DoneEvent, WeightsEvent, WorkItem, decode
from flight_store.columns import float_lists, token_lists
from flight_store.weights import get_weights


class Rollout:
    def __init__(self, runtime: ActorRuntime) -> None:
        self.rt = runtime
        config = runtime.config
        self.config = config
        self.engine = make_inference_engine(config.rollout.engine, config.model.path, config.model.dtype)
        self.params = SamplingParams(
            temperature=config.sampling.temperature,
            top_p=config.sampling.top_p,
            max_new_tokens=config.sampling.max_new_tokens,
        )
        self.version = 0
        self.rt.policy_version = 0
        self.announced: WeightsEvent | None = None
        self.announced_changed = asyncio.Event()

    async def run(self) -> None:
        await self.rt.subscribe_events(self.rt.names.weights, self.on_weights, DeliverPolicy.LAST)
        await self.rt.serve_work(ROLLOUT.name, self.handle)
        await self.rt.wait_stopped()

    async def on_weights(self, msg: Msg) -> None:
        try:
            event = decode(WeightsEvent, msg.data, msg.subject)
        except WireError as error:
            self.rt.log.error("bad weights event ignored", error=str(error))
            return
        if self.announced is None or event.version > self.announced.version:
            self.announced = event
            self.announced_changed.set()

    async def ensure_version(self, needed: int) -> None:
        """Swap weights only if the current ones are too old for this item (deferred update)."""
        if self.version >= needed:
            return
        deadline = time.monotonic() + self.config.rollout.weights_timeout_s
        while self.announced is None or self.announced.version < needed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineError(
                    f"{self.rt.actor_id}: policy version {needed} not announced within "
                    f"{self.config.rollout.weights_timeout_s} s (is param-sync running?)"
                )
            self.announced_changed.clear()
            try:
                await asyncio.wait_for(self.announced_changed.wait(), timeout=remaining)
            except TimeoutError:
                continue
        target = self.announced
        started = time.time()
        tensors = await asyncio.to_thread(get_weights, self.rt.store, target.weights)
        await asyncio.to_thread(self.engine.load_weights, tensors.items())
        self.version = target.version
        self.rt.policy_version = target.version
        self.rt.log.info("weights updated", version=target.version, needed=needed, seconds=round(time.time() - started, 3))

    async def handle(self, item: WorkItem) -> None:
        started = time.time()
        await self.ensure_version(item.min_version)
        prompts = (await asyncio.to_thread(read_columns, self.rt.store, item.inputs, ("prompt_ids",)))["prompt_ids"]
        sample_ids = item.sample_ids
        seeds = [sample_seed(self.config.run.seed, sid) for sid in sample_ids]
        generations = await asyncio.to_thread(
            self.engine.generate, [prompts[sid] for sid in sample_ids], self.params, seeds
        )
        by_id = dict(zip(sample_ids, generations, strict=True))
        chunks = await asyncio.to_thread(self._write, item, by_id)
        tokens = sum(len(g.token_ids) for g in generations)
        event = DoneEvent(
            stage=ROLLOUT.name, item_id=item.item_id, actor=self.rt.actor_id, partition=item.partition,
            groups=item.groups, sample_ids=sample_ids, chunks=chunks, policy_version=self.version,
            busy_s=time.time() - started,
        )
        await self.rt.publish(self.rt.names.done(ROLLOUT.name), event, msg_id=f"{item.item_id}-done")
        await self.rt.publish_metrics(item.item_id, ROLLOUT.name, started, len(sample_ids), tokens)

    def _write(self, item: WorkItem, by_id: dict) -> list[ChunkRef]:
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
                "policy_version": pa.array([self.version] * len(ids), pa.int64()),
                "finish_reason": pa.array([g.finish_reason for g in gens], pa.string()),
            }
            for column, values in columns.items():
                chunks.append(self.rt.store.put_column(
                    self.config.run.name, item.partition, column, f"g{group}", ids, values))
        return chunks


async def run(runtime: ActorRuntime) -> None:
    await Rollout(runtime).run()
