"""Scheduler actor: admits partitions under the staleness bound and dispatches work by readiness.

It owns the run's bookkeeping and nothing else: it writes prompts into the store when a partition
is admitted (I2: once version ≥ p − k exists), then follows the EVENTS stream. Whenever a stage
reports columns for a GRPO group, every downstream stage whose inputs are now all present for
that group gets a work item at once — no barrier between stages or between groups.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import pyarrow as pa
from nats.aio.msg import Msg
from transformers import AutoTokenizer

from actors.runtime import ActorRuntime
from asyncflow.dataset import load_prompts, tokenize_prompt
from asyncflow.errors import WireError
from asyncflow.graph import GRPO_GRAPH, PROMPT, ROLLOUT, TRAINER, Stage
from asyncflow.partitions import group_sample_ids, prompt_index
from asyncflow.staleness import admissible_partitions, min_version
from asyncflow.wire import ChunkRef, DeadLetter, DoneEvent, StepEvent, WeightsEvent, WorkItem, decode
from broker.names import KV_PROGRESS
from flight_store.columns import token_lists


@dataclass
class GroupState:
    """What the scheduler knows about one GRPO group of one partition."""

    partition: int
    group: int
    sample_ids: list[int]
    refs: dict[str, ChunkRef] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    dispatched: set[str] = field(default_factory=set)

    @property
    def live_ids(self) -> list[int]:
        return [sid for sid in self.sample_ids if sid not in self.failed]

    def ready_for(self, stage: Stage) -> bool:
        # A group whose samples all failed still flows on (with no live samples) so that the
        # trainer can close its partition; otherwise it waits for every input column.
        return not self.live_ids or all(column in self.refs for column in stage.inputs)


class Scheduler:
    def __init__(self, runtime: ActorRuntime) -> None:
        self.rt = runtime
        config = runtime.config
        self.config = config
        self.algo = config.algorithm
        self.rows = load_prompts(config.data.path, config.data.prompt_field)
        self.tokenizer = AutoTokenizer.from_pretrained(str(config.model.path))
        self.latest_version = 0  # version 0 = the initial weights every engine loads from disk
        self.admitted: set[int] = set()
        self.trained: set[int] = set()
        self.groups: dict[tuple[int, int], GroupState] = {}
        self.bad_events = 0
        self._admit_lock = asyncio.Lock()

    async def run(self) -> None:
        await self.rt.subscribe_events(f"{self.rt.names.prefix}.>", self.on_event)
        await self.admit()
        self.rt.state = "ready"
        await self.rt.wait_stopped()

    # -- admission (I2) ---------------------------------------------------------------------

    async def admit(self) -> None:
        async with self._admit_lock:
            window = admissible_partitions(self.latest_version, self.algo.max_staleness, self.config.run.steps)
            for partition in window:
                if partition not in self.admitted:
                    self.admitted.add(partition)
                    await self._start_partition(partition)

    async def _start_partition(self, partition: int) -> None:
        started = time.time()
        groups = [self._new_group(partition, g) for g in range(self.algo.prompts_per_step)]
        # One put per column for the whole partition: per-call overhead, not bytes, dominates here.
        prompt_lengths = await asyncio.to_thread(self._write_prompts, partition, groups)
        for item_groups in self._pack_rollout_items(groups, prompt_lengths):
            await self._dispatch(ROLLOUT, item_groups)
        await self.rt.publish_metrics(f"prompt-p{partition}", PROMPT.name, started, self.config.samples_per_step)
        self.rt.log.info("partition admitted", partition=partition, latest_version=self.latest_version,
                         min_version=min_version(partition, self.algo.max_staleness))

    def _pack_rollout_items(self, groups: list[GroupState], prompt_lengths: list[int]) -> list[list[GroupState]]:
        """Rollout work items: `groups_per_item` groups each, or, with `rollout.item_tokens`, as many
        consecutive groups as fit the token budget (samples × (prompt + max_new_tokens)), so that
        every item costs about the same however long its prompts are."""
        budget = self.config.rollout.item_tokens
        if budget is None:
            per_item = self.config.rollout.groups_per_item
            return [groups[i:i + per_item] for i in range(0, len(groups), per_item)]
        items: list[list[GroupState]] = []
        current: list[GroupState] = []
        used = 0
        for state, length in zip(groups, prompt_lengths, strict=True):
            cost = len(state.sample_ids) * (length + self.config.sampling.max_new_tokens)
            if current and used + cost > budget:
                items.append(current)
                current, used = [], 0
            current.append(state)
            used += cost
        if current:
            items.append(current)
        return items

    def _new_group(self, partition: int, group: int) -> GroupState:
        ids = group_sample_ids(partition, group, self.algo.prompts_per_step, self.algo.samples_per_prompt)
        state = GroupState(partition, group, ids)
        self.groups[(partition, group)] = state
        return state

    def _write_prompts(self, partition: int, groups: list[GroupState]) -> list[int]:
        """Write the partition's prompt_ids and meta columns; returns each group's prompt length."""
        ids_column, meta_column, sample_ids, lengths = [], [], [], []
        for state in groups:
            index = prompt_index(state.partition, state.group, self.algo.prompts_per_step, len(self.rows),
                                 self.config.run.seed, self.config.data.shuffle)
            row = self.rows[index]
            ids = tokenize_prompt(self.tokenizer, row.prompt, self.config.data.chat_template,
                                  self.config.data.system_prompt)
            meta = json.dumps({"prompt": row.prompt, "row": index, "fields": row.fields})
            n = len(state.sample_ids)
            ids_column += [ids] * n
            meta_column += [meta] * n
            sample_ids += state.sample_ids
            lengths.append(len(ids))
        for column, values in (("prompt_ids", token_lists(ids_column)), ("meta", pa.array(meta_column))):
            ref = self.rt.store.put_column(self.config.run.name, partition, column, "prompts", sample_ids, values)
            for state in groups:
                state.refs[column] = ref
        return lengths

    # -- dispatch by readiness --------------------------------------------------------------

    async def _dispatch(self, stage: Stage, groups: list[GroupState]) -> None:
        partition = groups[0].partition
        item = WorkItem(
            stage=stage.name,
            item_id=f"{stage.name}-p{partition}-g{'_'.join(str(g.group) for g in groups)}",
            partition=partition,
            groups=[g.group for g in groups],
            sample_ids=[sid for g in groups for sid in g.live_ids],
            inputs=_unique_refs([g.refs[c] for g in groups for c in stage.inputs if c in g.refs]),
            min_version=min_version(partition, self.algo.max_staleness),
            failed={sid: reason for g in groups for sid, reason in g.failed.items()},
        )
        for g in groups:
            g.dispatched.add(stage.name)
        await self.rt.publish(self.rt.names.work(stage.name), item, msg_id=item.item_id)

    async def _advance(self, state: GroupState) -> None:
        for stage in GRPO_GRAPH:
            if stage.inputs and stage.name not in state.dispatched and state.ready_for(stage):
                if stage is TRAINER and self.algo.phase_barrier:
                    await self._release_partition_to_trainer(state.partition)
                else:
                    await self._dispatch(stage, [state])

    async def _release_partition_to_trainer(self, partition: int) -> None:
        """Baseline mode (`phase_barrier`): the trainer gets nothing until every group is ready."""
        groups = [g for (p, _), g in self.groups.items() if p == partition]
        if len(groups) == self.algo.prompts_per_step and all(g.ready_for(TRAINER) for g in groups):
            for group in groups:
                if TRAINER.name not in group.dispatched:
                    await self._dispatch(TRAINER, [group])

    # -- events -----------------------------------------------------------------------------

    async def on_event(self, msg: Msg) -> None:
        kind = msg.subject.removeprefix(self.rt.names.prefix + ".")
        try:
            if kind == "done.trainer":
                await self.on_step(decode(StepEvent, msg.data, msg.subject))
            elif kind.startswith("done."):
                await self.on_done(decode(DoneEvent, msg.data, msg.subject))
            elif kind == "weights":
                await self.on_weights(decode(WeightsEvent, msg.data, msg.subject))
            elif kind.startswith("dead."):
                await self.on_dead(decode(DeadLetter, msg.data, msg.subject))
        except WireError as error:
            self.bad_events += 1
            self.rt.log.error("bad event ignored", error=str(error), bad_events=self.bad_events)
        except Exception as error:
            # Losing an event would stall the run silently: stop loudly instead.
            self.rt.fail(error, f"handling {msg.subject}")

    async def on_done(self, event: DoneEvent) -> None:
        for group in event.groups:
            state = self.groups.get((event.partition, group))
            if state is None:
                continue  # a redelivered item of a partition already trained and dropped
            state.failed.update({sid: r for sid, r in event.failed.items() if sid in state.sample_ids})
            for ref in event.chunks:
                if ref.sample_ids and ref.sample_ids[0] in state.sample_ids:
                    state.refs[ref.column] = ref
            await self._advance(state)

    async def on_dead(self, letter: DeadLetter) -> None:
        try:
            item = decode(WorkItem, letter.payload.encode(), letter.subject)
        except WireError:
            self.rt.log.error("dead letter with unreadable item", stage=letter.stage, reason=letter.reason)
            return
        reason = f"dead-lettered at {letter.stage}: {letter.reason}"
        for group in item.groups:
            state = self.groups.get((item.partition, group))
            if state is None:
                continue
            for sid in item.sample_ids:
                state.failed.setdefault(sid, reason)
            if letter.stage == TRAINER.name:
                state.dispatched.discard(TRAINER.name)  # re-send with every sample failed: the step closes
            await self._advance(state)

    async def on_weights(self, event: WeightsEvent) -> None:
        if event.version > self.latest_version:
            self.latest_version = event.version
            await self.admit()

    async def on_step(self, event: StepEvent) -> None:
        self.trained.add(event.step)
        for key in [k for k in self.groups if k[0] == event.step]:
            del self.groups[key]
        dropped = await asyncio.to_thread(self.rt.store.drop_partition, self.config.run.name, event.step)
        await self.rt.kv.put(KV_PROGRESS, json.dumps({"step": event.step, "trained": len(self.trained)}).encode())
        self.rt.log.info("partition trained and dropped", partition=event.step, keys_dropped=dropped)


async def run(runtime: ActorRuntime) -> None:
    await Scheduler(runtime).run()


def _unique_refs(refs: list[ChunkRef]) -> list[ChunkRef]:
    """Several groups can share one chunk (the partition's prompts): list each chunk once."""
    seen: dict[str, ChunkRef] = {}
    for ref in refs:
        seen.setdefault(ref.key, ref)
    return list(seen.values())
