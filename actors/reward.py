"""Reward actor: scores responses with the user's reward function, loaded by dotted path.

The function is `fn(prompt: str, response: str, **row_fields) -> float`. A call that raises,
exceeds `reward.timeout_s` or returns something that is not a finite number marks that one
sample failed (counted, never trained) — it is never turned into a reward of 0.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pyarrow as pa
from transformers import AutoTokenizer

from actors.runtime import ActorRuntime, read_columns
from asyncflow.graph import REWARD
from asyncflow.hooks import load_callable
from asyncflow.partitions import group_of
from asyncflow.rewards import check_reward
from asyncflow.wire import ChunkRef, DoneEvent, WorkItem


class Reward:
    def __init__(self, runtime: ActorRuntime) -> None:
        self.rt = runtime
        self.config = runtime.config
        self.function = load_callable(self.config.reward.function, "reward.function")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.config.model.path))
        self.failed_total = 0

    async def run(self) -> None:
        await self.rt.serve_work(REWARD.name, self.handle)
        await self.rt.wait_stopped()

    async def score(self, meta: dict[str, Any], response: str) -> float:
        result = await asyncio.wait_for(
            asyncio.to_thread(self.function, meta["prompt"], response, **meta["fields"]),
            timeout=self.config.reward.timeout_s,
        )
        return check_reward(result)

    async def handle(self, item: WorkItem) -> None:
        started = time.time()
        columns = await asyncio.to_thread(read_columns, self.rt.store, item.inputs, ("meta", "response_ids"))
        rewards: dict[int, float] = {}
        failed: dict[int, str] = {}
        for sid in item.sample_ids:
            meta = json.loads(columns["meta"][sid])
            response = self.tokenizer.decode(columns["response_ids"][sid], skip_special_tokens=True)
            try:
                rewards[sid] = await self.score(meta, response)
            except TimeoutError:
                failed[sid] = f"reward function timed out after {self.config.reward.timeout_s} s"
            except Exception as error:  # user code: anything can happen; the sample fails, the actor lives
                failed[sid] = f"reward function {self.config.reward.function} {type(error).__name__}: {error}"
        if failed:
            self.failed_total += len(failed)
            self.rt.log.warning("reward failed for samples", item=item.item_id, failed=len(failed),
                                failed_total=self.failed_total, first_reason=next(iter(failed.values())))
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
    await Reward(runtime).run()
