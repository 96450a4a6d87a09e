"""Reward actor: scores responses with the user's reward function, loaded by dotted path.

The function is `fn(prompt: str, response: str, **row_fields) -> float`. A call that raises,
exceeds `reward.timeout_s` or returns something that is not a finite number marks that one
sample failed (counted, never trained) — it is never turned into a reward of 0. Calls run on the
`RewardCaller`'s own threads (`asyncflow/rewards.py`): a hanging function holds at most
`DEFAULT_MAX_HUNG` of them, and samples fail without a call while that many are stuck.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pyarrow as pa

from actors.runtime import ActorRuntime, read_columns
from actors.tokenizer import response_decoder
from asyncflow.graph import REWARD
from asyncflow.hooks import load_callable
from asyncflow.partitions import group_of
from asyncflow.rewards import RewardCaller, RewardFailure
from asyncflow.wire import ChunkRef, DoneEvent, WorkItem


class Reward:
    def __init__(self, runtime: ActorRuntime) -> None:
        self.rt = runtime
        self.config = runtime.config
        self.function = load_callable(self.config.reward.function, "reward.function")
        self.caller = RewardCaller(self.function, self.config.reward.function, self.config.reward.timeout_s)
        # Responses are only decoded here: the `tokenizers` package does that as transformers does,
        # without importing torch and transformers where the model folder allows it.
        self.decode = response_decoder(self.config.model.path)
        self.failed_total = 0

    async def run(self) -> None:
        await self.rt.serve_work(REWARD.name, self.handle)
        await self.rt.wait_stopped()

    async def score(self, meta: dict[str, Any], response: str) -> float:
        return await self.caller(meta["prompt"], response, meta["fields"])

    async def handle(self, item: WorkItem) -> None:
        started = time.time()
        columns = await asyncio.to_thread(read_columns, self.rt.store, item.inputs, ("meta", "response_ids"))
        rewards: dict[int, float] = {}
        failed: dict[int, str] = {}
        for sid in item.sample_ids:
            meta = json.loads(columns["meta"][sid])
            response = self.decode(columns["response_ids"][sid])
            try:
                rewards[sid] = await self.score(meta, response)
            except RewardFailure as failure:
                failed[sid] = str(failure)[:1000]  # a user's exception text can be long
        if failed:
            self.failed_total += len(failed)
            counters = self.rt.counters
            counters["reward_failed"] = self.failed_total
            counters["reward_timeouts"], counters["reward_not_called"] = self.caller.timeouts, self.caller.not_called
            counters["reward_hung_now"], counters["reward_threads"] = self.caller.hung, self.caller.threads
            self.rt.log.warning("reward failed for samples", item=item.item_id, failed=len(failed),
                                failed_total=self.failed_total, hung_calls=self.caller.hung,
                                first_reason=next(iter(failed.values())))
        chunks = await asyncio.to_thread(self._write, item, rewards)
        event = DoneEvent(
            stage=REWARD.name, item_id=item.item_id, actor=self.rt.actor_id, partition=item.partition,
            groups=item.groups, sample_ids=sorted(rewards), chunks=chunks, failed=failed,
            busy_s=time.time() - started,
        )
        finished = time.time()  # before the event: downstream work can only start after it
        await self.rt.publish(self.rt.names.done(REWARD.name), event, msg_id=f"{item.item_id}-done")
        await self.rt.publish_metrics(item.item_id, REWARD.name, started, len(item.sample_ids), end=finished)

    def _write(self, item: WorkItem, rewards: dict[int, float]) -> list[ChunkRef]:
        algo = self.config.algorithm
        chunks = []
        for group in item.groups:
            ids = [sid for sid in rewards if group_of(sid, algo.prompts_per_step, algo.samples_per_prompt) == group]
            if ids:
                values = pa.array([rewards[sid] for sid in ids], pa.float64())
                chunks.append(self.rt.store.put_column(
                    self.config.run.name, item.partition, "reward", f"g{group}", ids, values))
        return chunks


async def run(runtime: ActorRuntime) -> None:
    # Loading the reward function imports the user's module, which may take seconds (one that
    # imports torch): off the event loop, so the actor's heartbeats and NATS pings go on meanwhile.
    reward = await asyncio.to_thread(Reward, runtime)
    await reward.run()
