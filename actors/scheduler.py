"""Scheduler actor: admits partitions under the staleness bound and dispatches work by readiness.

It owns the run's bookkeeping and nothing else: it admits partitions (I2: once version ≥ p − k
exists) with their prompts, which worker threads tokenize and write into the store a few partitions
ahead, then follows the EVENTS stream. Whenever a stage
reports columns for a GRPO group, every downstream stage whose inputs are now all present for
that group gets a work item at once — no barrier between stages or between groups.

Handling an event is bookkeeping only: work items go to an outbox that a background task
publishes in pipelined batches (sent at once, acks awaited together), and another task drops
trained partitions from the store; so the event stream never waits for a broker or store round trip.

A restarted scheduler rebuilds its state from the run's KV bucket and the EVENTS stream before it
dispatches anything: the steps recorded in KV `progress` are trained; then it replays every event
still in the stream up to its last sequence at start (done events, steps, weights, dead letters),
admits the partitions the staleness bound allows again, skipping trained ones, and sends each
group the work it has not finished. Re-sent items keep their ids, so JetStream's
duplicate window (2 minutes) drops those still queued; one sent again after that is done twice
and harmless: done events only add refs, and the trainer skips sample ids it has trained.

Lineage recovery: a stage that finds its input chunks gone (a store died and came back empty)
reports them on `af.<run>.lost.<stage>` (`LostEvent`) instead of retrying. The scheduler forgets
those refs and every column that re-creating them makes stale (a new response invalidates the old
reward), re-writes the partition's prompts if they were lost (a pure function of seed, partition and
group, so identical), and re-dispatches the groups from the earliest stage whose inputs survive,
under new item ids (`-r<n>`: JetStream would drop a re-send under the old id as a duplicate).
Re-issued rollout keeps the partition's `min_version` (I2); the trainer skips ids it has trained.

Compaction keeps the EVENTS stream bounded (`_compact`): once a trained step is recorded in KV
`progress`, the events that only partitions up to it needed are purged, in the background. Only a
prefix of the stream goes (a purge below sequence S): S is the first sequence of the oldest event a
restart may still need: every event of a partition not yet recorded, the step events a restart or
param-sync has yet to learn from, the newest step events and weights announcements, the newest
RECENT_EVENTS_KEPT events and those of the last `broker.events_keep_s` (a margin for readers that
lag), dead letters: DEAD_LETTERS_KEPT more. So what stays is about the in-flight window and the
last minute, however long the run.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from actors.runtime import ActorRuntime
from actors.tokenizer import load_tokenizer
from asyncflow.checkpoint import initial_policy
from asyncflow.dataset import load_data, tokenize_prompt
from asyncflow.errors import BrokerError, WireError
from asyncflow.graph import GRPO_GRAPH, PROMPT, ROLLOUT, TRAINER, Stage
from asyncflow.id_runs import IdRuns
from asyncflow.partitions import group_sample_ids, pack_by_budget, prompt_index
from asyncflow.staleness import admissible_partitions, min_version
from asyncflow.wire import (
    ChunkRef,
    DeadLetter,
    DoneEvent,
    LostEvent,
    StepEvent,
    WeightsEvent,
    WorkItem,
    decode,
)
from broker.names import KV_EVENTS_COMPACTION, KV_POLICY_VERSION, KV_PROGRESS
from flight_store.columns import token_lists

REPLAY_TIMEOUT_S = 120.0
"""Longest a (re)started scheduler waits to replay the EVENTS stream before it gives up, loudly."""
DROP_ATTEMPTS = 5
"""Tries to drop a trained partition (and record progress) before the scheduler gives up, loudly."""
MAX_BATCHES_IN_FLIGHT = 8
"""Batches of work items whose broker acks the scheduler awaits at once (back-pressure beyond)."""
PROMPT_LOOKAHEAD = 2
"""Partitions past the one being admitted whose prompts are already written to the store."""
RECENT_EVENTS_KEPT = 100
"""Newest EVENTS messages compaction always keeps, whatever they concern: `asyncflow inspect` shows
the last events, and they are the short history one debugs a run from."""
ANNOUNCEMENTS_KEPT = 2
"""Newest step events and weights announcements compaction keeps: rollout reads the newest
announcement (DeliverPolicy.LAST), `asyncflow status` the newest step event and a rate over those
left, and the store holds the two newest versions (param-sync), whose announcements stay readable."""
DEAD_LETTERS_KEPT = 100
"""Newest dead letters compaction keeps, whatever partition they concern: they are the operator's
record of what failed (`asyncflow status` counts them, `nats stream view` shows them)."""


@dataclass
class GroupState:
    """What the scheduler knows about one GRPO group of one partition."""

    partition: int
    group: int
    sample_ids: list[int]
    refs: dict[str, ChunkRef] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    dispatched: set[str] = field(default_factory=set)
    resent: dict[str, int] = field(default_factory=dict)
    """Stage → times its item was sent again (a dead-lettered trainer item is re-sent, and a group whose
    inputs a store lost is re-issued, each with a new id: JetStream would drop a re-send under the same
    msg id as a duplicate)."""

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
        self.rows = load_data(config.data)
        self.tokenizer = load_tokenizer(config.model.path)  # AutoTokenizer's, without torch where it can
        # The version every engine loads from disk: 0, or N for a run resumed from checkpoint step-N,
        # whose partitions below N are trained already.
        _, start = initial_policy(config)
        self.latest_version = start
        self.next_partition = start  # admission goes in order: every partition below this one is admitted
        # Partitions trained: dense from 0 (steps finish in order), so as runs this is one [0, W) run
        # plus the odd partition past it, however long the run (`in` and `len` as on a set).
        self.trained = IdRuns(range(start))
        # partition -> group -> state, for partitions admitted and not yet trained.
        self.partitions: dict[int, dict[int, GroupState]] = {}
        # phase_barrier: partition -> groups whose trainer inputs are all ready.
        self.trainer_ready: dict[int, set[int]] = {}
        self.bad_events = 0
        self._admit_lock = asyncio.Lock()
        # partition -> its prompts being written ahead of admission: (column refs, group prompt lengths)
        self._staged: dict[int, asyncio.Task[tuple[dict[str, ChunkRef], list[int]]]] = {}
        self._rewrites: set[asyncio.Task[None]] = set()  # prompts being written again after a store loss
        self._outbox: list[WorkItem] = []
        self._outbox_filled = asyncio.Event()
        self._batches: set[asyncio.Task[None]] = set()  # published, awaiting their acks
        self._trained_queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        # Replaying the EVENTS stream at start: state is rebuilt, nothing is dispatched or admitted.
        self._replaying = False
        self._replay_until = 0
        self._caught_up = asyncio.Event()
        # Compaction of the EVENTS stream (`_compact`): where the events it must keep are.
        self._recorded_step = start - 1  # newest step recorded in KV progress (every one below is trained)
        self._last_seq = 0  # newest stream sequence handled
        self._first_seq: dict[int, int] = {}  # partition above _recorded_step -> sequence of its first event
        self._step_seqs: dict[int, int] = {}  # step -> sequence of its step event, for those not yet purged
        self._weights_seqs: deque[int] = deque(maxlen=ANNOUNCEMENTS_KEPT)
        # Dead letters still in the stream (sequence, stage), oldest first: compaction keeps the newest
        # DEAD_LETTERS_KEPT; and how many per stage it has purged so far (KV events_compaction):
        # `asyncflow status` counts them all from the two.
        self._dead_in_stream: deque[tuple[int, str]] = deque()
        self._dead_letters_purged: Counter[str] = Counter()
        self._recent = RecentSequences()  # compaction keeps events handled within broker.events_keep_s
        self._purged_below = 1  # every event below this sequence but dead letters is purged
        self._dead_purged_below = 1  # every event below this sequence is purged

    async def run(self) -> None:
        # What is loaded by now (torch, transformers, the tokenizer, the prompts) lives as long as the
        # process: keep it out of the cyclic GC, whose full collections would otherwise walk those
        # millions of objects and stall the event stream for ~0.5 s each time.
        gc.freeze()
        background = [
            asyncio.create_task(self._keep_running(self._send_work(), "publishing work items")),
            asyncio.create_task(self._keep_running(self._drop_trained(), "dropping trained partitions")),
        ]
        try:
            await self._replay_then_follow()
            await self.admit()
            for groups in list(self.partitions.values()):
                for state in groups.values():
                    self._advance(state)  # a restart: what the replay found ready and not yet done
            self.rt.state = "ready"
            await self.rt.wait_stopped()
        finally:
            for task in background:
                task.cancel()
            for task in self._rewrites:
                task.cancel()
            await asyncio.gather(*background, *self._staged.values(), *self._rewrites, return_exceptions=True)
            if self._outbox and self.rt.fatal is None:
                await self._publish(self._outbox)
            await asyncio.gather(*self._batches)  # their acks (each batch fails the actor on its own)

    async def _replay_then_follow(self) -> None:
        """Subscribe to every event from the start; return once the events that were in the stream
        when we started have all been handled (at once on a fresh run)."""
        info = await self.rt.js.stream_info(self.rt.names.events_stream)
        recorded = await self._restore_progress()
        # A stream compacted to nothing has no message to wait for (compaction keeps the newest ones,
        # so that is a stream someone else purged).
        self._replay_until = info.state.last_seq if info.state.messages else 0
        self._replaying = self._replay_until > 0
        if not self._replaying:
            self._caught_up.set()
        started = time.time()
        await self.rt.subscribe_events(f"{self.rt.names.prefix}.>", self.on_event)
        try:
            await asyncio.wait_for(self._caught_up.wait(), timeout=REPLAY_TIMEOUT_S)
        except TimeoutError:
            raise BrokerError(f"scheduler: replaying stream {self.rt.names.events_stream} up to sequence "
                              f"{self._replay_until} took over {REPLAY_TIMEOUT_S:.0f} s") from None
        if self._replay_until:
            self.rt.log.info("state rebuilt from the events stream", events=info.state.messages,
                             first_seq=info.state.first_seq, last_seq=self._replay_until,
                             trained_from_kv=recorded + 1 if recorded is not None else None,
                             seconds=round(time.time() - started, 3), trained=len(self.trained),
                             latest_version=self.latest_version, partitions_in_flight=sorted(self.partitions))

    async def _restore_progress(self) -> int | None:
        """What compaction purged from the EVENTS stream, from KV: the steps recorded as trained
        (`progress`, written before any of their events is purged) and the newest policy version.
        Returns the newest recorded step (None: none recorded)."""
        progress = await self._kv_json(KV_PROGRESS)
        step: int | None = None
        if progress is not None:
            try:
                step = int(progress["step"])
            except (KeyError, TypeError, ValueError):
                self.rt.counters["bad_kv_values"] += 1
                self.rt.log.error("unreadable progress in KV ignored", key=KV_PROGRESS, value=str(progress)[:200])
            else:
                if step > self._recorded_step:
                    self._recorded_step = step
                    self.trained.update(range(step + 1))
                    self.next_partition = max(self.next_partition, step + 1)  # admission goes in order
        version = await self._kv_json(KV_POLICY_VERSION)
        if isinstance(version, int) and version > self.latest_version:
            self.latest_version = version
        compaction = await self._kv_json(KV_EVENTS_COMPACTION)
        purged = compaction.get("dead_letters_purged") if isinstance(compaction, dict) else None
        if isinstance(purged, dict):  # go on counting what a previous scheduler purged
            self._dead_letters_purged.update({str(k): v for k, v in purged.items() if isinstance(v, int)})
        return step

    async def _kv_json(self, key: str) -> Any:
        """The run's KV value at `key` as JSON; None when absent; unreadable ones are logged and None."""
        try:
            entry = await self.rt.kv.get(key)
        except KeyNotFoundError:
            return None
        try:
            return json.loads(entry.value or b"null")
        except ValueError:
            self.rt.counters["bad_kv_values"] += 1
            self.rt.log.error("unreadable KV value ignored", key=key, value=(entry.value or b"")[:200].decode(errors="replace"))
            return None

    async def _keep_running(self, work: Coroutine[Any, Any, None], what: str) -> None:
        try:
            await work
        except Exception as error:
            self.rt.fail(error, what)  # stops the actor loudly, like a failure on the event path

    # -- admission (I2) ---------------------------------------------------------------------

    async def admit(self) -> None:
        if self._replaying:
            return  # admission resumes once the replay has caught up
        async with self._admit_lock:
            window = admissible_partitions(self.latest_version, self.algo.max_staleness, self.config.run.steps)
            while self.next_partition < window.stop:
                partition, self.next_partition = self.next_partition, self.next_partition + 1
                await self._start_partition(partition)

    async def _start_partition(self, partition: int) -> None:
        if partition in self.trained:
            return  # a restarted scheduler re-admits from 0: trained partitions are done
        started = time.time()
        self._stage_prompts_ahead(partition)
        refs, prompt_lengths = await self._staged.pop(partition)  # normally written long before
        groups = [self._group(partition, g) for g in range(self.algo.prompts_per_step)]
        self._set_prompt_refs(partition, refs)
        for item_groups in self._pack_rollout_items(groups, prompt_lengths):
            # After a restart some items are done already; the packing is deterministic, so the
            # others get the ids they had (and JetStream drops those still queued as duplicates).
            # Groups of an item re-issued after a store loss (replayed) go alone, under new ids.
            pending = [g for g in item_groups if ROLLOUT.name not in g.dispatched]
            if len(pending) == len(item_groups) and not any(g.resent.get(ROLLOUT.name) for g in pending):
                self._dispatch(ROLLOUT, item_groups)
            else:
                for state in pending:
                    self._dispatch(ROLLOUT, [state])
        await self.rt.publish_metrics(f"prompt-p{partition}", PROMPT.name, started, self.config.samples_per_step)
        self.rt.log.info("partition admitted", partition=partition, latest_version=self.latest_version,
                         min_version=min_version(partition, self.algo.max_staleness))

    def _set_prompt_refs(self, partition: int, refs: dict[str, ChunkRef]) -> None:
        """Give every group of `partition` its rows of the partition's prompt chunks. Each group names
        only its own rows: items stay small and a rollout instance reads its prompts, not the whole
        partition's."""
        first_row = 0
        for group in range(self.algo.prompts_per_step):
            state = self._group(partition, group)
            state.refs.update({column: ref.rows(first_row, len(state.sample_ids)) for column, ref in refs.items()})
            first_row += len(state.sample_ids)

    def _stage_prompts_ahead(self, partition: int) -> None:
        """Tokenize and write the prompts of `partition` and the PROMPT_LOOKAHEAD partitions after it,
        each in a worker thread, so that admitting a partition is only bookkeeping and publishing:
        tokenizing and two Flight puts on the event path cost 3-20 ms of every rollout item's
        ready-to-dispatched latency and stalled the events queued behind the admission."""
        last = min(partition + PROMPT_LOOKAHEAD, self.config.run.steps - 1)
        for ahead in range(partition, last + 1):
            if ahead not in self._staged and ahead not in self.trained:
                self._staged[ahead] = asyncio.create_task(asyncio.to_thread(self._write_prompts, ahead))

    def _pack_rollout_items(self, groups: list[GroupState], prompt_lengths: list[int]) -> list[list[GroupState]]:
        """Rollout work items: `groups_per_item` groups each, or, with `rollout.item_tokens`, as many
        consecutive groups as fit the token budget (samples × (prompt + max_new_tokens)), so that
        every item costs about the same however long its prompts are."""
        budget = self.config.rollout.item_tokens
        if budget is None:
            per_item = self.config.rollout.groups_per_item
            return [groups[i:i + per_item] for i in range(0, len(groups), per_item)]
        costs = [len(state.sample_ids) * (length + self.config.sampling.max_new_tokens)
                 for state, length in zip(groups, prompt_lengths, strict=True)]
        return [[groups[i] for i in item] for item in pack_by_budget(costs, budget)]

    def _group(self, partition: int, group: int) -> GroupState:
        """The group's state, created on first sight (at admission, or from a replayed event)."""
        groups = self.partitions.setdefault(partition, {})
        state = groups.get(group)
        if state is None:
            ids = group_sample_ids(partition, group, self.algo.prompts_per_step, self.algo.samples_per_prompt)
            state = groups[group] = GroupState(partition, group, ids)
        return state

    def _write_prompts(self, partition: int) -> tuple[dict[str, ChunkRef], list[int]]:
        """Write the partition's prompt_ids and meta columns (one put per column for the whole
        partition: per-call overhead, not bytes, dominates); returns their refs and each group's
        prompt length. Runs in a worker thread."""
        ids_column: list[list[int]] = []
        meta_column: list[str] = []
        sample_ids: list[int] = []
        lengths: list[int] = []
        for group in range(self.algo.prompts_per_step):
            ids, meta = self._prompt(partition, group)
            group_ids = group_sample_ids(partition, group, self.algo.prompts_per_step, self.algo.samples_per_prompt)
            ids_column += [ids] * len(group_ids)
            meta_column += [meta] * len(group_ids)
            sample_ids += group_ids
            lengths.append(len(ids))
        refs = {column: self.rt.store.put_column(self.config.run.name, partition, column, "prompts", sample_ids, values)
                for column, values in (("prompt_ids", token_lists(ids_column)), ("meta", pa.array(meta_column)))}
        return refs, lengths

    def _prompt(self, partition: int, group: int) -> tuple[list[int], str]:
        """The group's prompt token ids and its meta (prompt text and dataset fields, JSON)."""
        index = prompt_index(partition, group, self.algo.prompts_per_step, len(self.rows),
                             self.config.run.seed, self.config.data.shuffle)
        row = self.rows[index]
        ids = tokenize_prompt(self.tokenizer, row.prompt, self.config.data.chat_template,
                              self.config.data.system_prompt)
        return ids, json.dumps({"prompt": row.prompt, "row": index, "fields": row.fields})

    # -- dispatch by readiness --------------------------------------------------------------

    def _dispatch(self, stage: Stage, groups: list[GroupState]) -> None:
        partition = groups[0].partition
        item = WorkItem(
            stage=stage.name,
            item_id=f"{stage.name}-p{partition}-g{'_'.join(str(g.group) for g in groups)}"
                    + (f"-r{groups[0].resent[stage.name]}" if groups[0].resent.get(stage.name) else ""),
            partition=partition,
            groups=[g.group for g in groups],
            sample_ids=[sid for g in groups for sid in g.live_ids],
            inputs=_unique_refs([g.refs[c] for g in groups for c in stage.inputs if c in g.refs]),
            min_version=min_version(partition, self.algo.max_staleness),
            failed={sid: reason for g in groups for sid, reason in g.failed.items()},
        )
        for g in groups:
            g.dispatched.add(stage.name)
        self._outbox.append(item)
        self._outbox_filled.set()

    async def _send_work(self) -> None:
        """Publish the outbox as it fills: whatever was queued goes out at once as one batch whose
        acks are awaited together, in the background, so that no item waits for an earlier batch's
        round trip; at most MAX_BATCHES_IN_FLIGHT batches await their acks."""
        while True:
            await self._outbox_filled.wait()
            self._outbox_filled.clear()
            batch, self._outbox = self._outbox, []
            self._batches = {task for task in self._batches if not task.done()}
            publishing = self._keep_running(self._publish(batch), "publishing work items")
            self._batches.add(asyncio.create_task(publishing))
            if len(self._batches) >= MAX_BATCHES_IN_FLIGHT:
                await asyncio.wait(self._batches, return_when=asyncio.FIRST_COMPLETED)

    async def _publish(self, items: list[WorkItem]) -> None:
        # msg id = item id: a re-sent item (e.g. after a restart replays the events) is stored once.
        await self.rt.publish_many([(self.rt.names.work(item.stage), item, item.item_id) for item in items])

    def _advance(self, state: GroupState) -> None:
        if self._replaying:
            return  # what is still to do is known only once every event has been replayed
        for stage in GRPO_GRAPH:
            if stage.inputs and stage.name not in state.dispatched and state.ready_for(stage):
                if stage is TRAINER and self.algo.phase_barrier:
                    self._release_partition_to_trainer(state)
                else:
                    self._dispatch(stage, [state])

    def _release_partition_to_trainer(self, state: GroupState) -> None:
        """Baseline mode (`phase_barrier`): the trainer gets nothing until every group is ready."""
        ready = self.trainer_ready.setdefault(state.partition, set())
        ready.add(state.group)
        if len(ready) == self.algo.prompts_per_step:
            for group in self.partitions[state.partition].values():
                if TRAINER.name not in group.dispatched:
                    self._dispatch(TRAINER, [group])

    # -- events -----------------------------------------------------------------------------

    async def on_event(self, msg: Msg) -> None:
        kind = msg.subject.removeprefix(self.rt.names.prefix + ".")
        seq = msg.metadata.sequence.stream if msg.metadata is not None else 0
        self._last_seq = max(self._last_seq, seq)
        if seq:
            self._recent.note(seq, time.monotonic())
        try:
            # Each handled event's sequence is noted first: compaction keeps what a restart needs.
            # (A JetStream message always has one; 0, none, would pin compaction.)
            if kind == "done.trainer":
                step = decode(StepEvent, msg.data, msg.subject)
                if seq:
                    self._step_seqs.setdefault(step.step, seq)
                self.on_step(step)
            elif kind.startswith("done."):
                done = decode(DoneEvent, msg.data, msg.subject)
                self._note_event(done.partition, seq)
                self.on_done(done)
            elif kind == "weights":
                weights = decode(WeightsEvent, msg.data, msg.subject)
                if seq:
                    self._weights_seqs.append(seq)
                await self.on_weights(weights)
            elif kind.startswith("dead."):
                if seq:
                    # Kept even when unreadable: a record of what failed.
                    self._dead_in_stream.append((seq, kind.removeprefix("dead.")))
                letter = decode(DeadLetter, msg.data, msg.subject)
                if letter.partition is not None:
                    self._note_event(letter.partition, seq)
                self.on_dead(letter)
            elif kind.startswith("lost."):
                lost = decode(LostEvent, msg.data, msg.subject)
                self._note_event(lost.partition, seq)
                self.on_lost(lost)
        except WireError as error:
            self.bad_events += 1
            self.rt.counters["bad_events"] = self.bad_events
            self.rt.log.error("bad event ignored", error=str(error), bad_events=self.bad_events)
        except Exception as error:
            # Losing an event would stall the run silently: stop loudly instead.
            self.rt.fail(error, f"handling {msg.subject}")
        if self._replaying and msg.metadata is not None and msg.metadata.sequence.stream >= self._replay_until:
            self._replaying = False
            self._caught_up.set()
        if self._outbox:
            # nats-py runs this callback for each queued event without returning to the loop while
            # events are waiting, so a backlog would hold every work item it made until it is gone.
            await asyncio.sleep(0)

    def on_done(self, event: DoneEvent) -> None:
        if event.partition in self.trained or event.partition >= self.config.run.steps:
            return  # a redelivered item of a partition already trained and dropped
        for group in event.groups:
            if not 0 <= group < self.algo.prompts_per_step:
                self.rt.log.error("done event names an unknown group", group=group, item=event.item_id)
                continue
            state = self._group(event.partition, group)  # replay: the partition may not be admitted yet
            state.dispatched.add(event.stage)
            state.failed.update({sid: r for sid, r in event.failed.items() if sid in state.sample_ids})
            for ref in event.chunks:
                if ref.sample_ids and ref.sample_ids[0] in state.sample_ids:
                    state.refs[ref.column] = ref
            self._advance(state)

    def on_dead(self, letter: DeadLetter) -> None:
        if letter.partition is None:
            # Not a readable work item (garbage on a work subject): no group of ours to account for.
            self.rt.log.error("dead letter of an unreadable message", stage=letter.stage, reason=letter.reason)
            return
        reason = f"dead-lettered at {letter.stage}: {letter.reason}"
        if letter.partition in self.trained or letter.partition >= self.config.run.steps:
            return
        for group in letter.groups:
            if not 0 <= group < self.algo.prompts_per_step:
                continue
            state = self._group(letter.partition, group)  # replay: the partition may not be admitted yet
            for sid in state.live_ids:
                state.failed.setdefault(sid, reason)
            if letter.stage == TRAINER.name:
                state.dispatched.discard(TRAINER.name)  # re-send with every sample failed: the step closes
                state.resent[TRAINER.name] = state.resent.get(TRAINER.name, 0) + 1
            else:
                state.dispatched.add(letter.stage)  # the stage is over for these samples: never re-send
            self._advance(state)

    def on_lost(self, event: LostEvent) -> None:
        """Lineage recovery for the groups of an item whose input chunks a store lost."""
        if event.partition in self.trained or event.partition >= self.config.run.steps:
            return  # a redelivered item of a partition already trained and dropped
        lost_keys = {ref.key for ref in event.lost}
        rewrite_prompts = False
        reissued: list[int] = []
        redone: set[str] = set()
        for group in event.groups:
            if not 0 <= group < self.algo.prompts_per_step:
                self.rt.log.error("lost event names an unknown group", group=group, item=event.item_id)
                continue
            state = self._group(event.partition, group)  # replay: the partition may not be admitted yet
            lost = {column for column, ref in state.refs.items() if ref.key in lost_keys}
            redo = self._stages_to_redo(state, event.stage, lost)
            if not redo and not lost:
                continue  # a stale report: the group has moved on since
            rewrite_prompts |= bool(lost & set(PROMPT.outputs))
            regenerated = {column for stage in GRPO_GRAPH if stage.name in redo for column in stage.outputs}
            for column in lost | regenerated:
                state.refs.pop(column, None)
            for name in redo:
                if name in state.dispatched:
                    state.dispatched.discard(name)
                    state.resent[name] = state.resent.get(name, 0) + 1  # a new item id
            if TRAINER.name in redo:
                self.trainer_ready.get(event.partition, set()).discard(group)
            reissued.append(group)
            redone |= redo
        if rewrite_prompts:
            # The prompt chunks (one per column, on one store) hold every group of the partition: none
            # may be dispatched from them until they are written again (a restarted scheduler re-writes
            # them at admission).
            for state in self.partitions.get(event.partition, {}).values():
                for column in PROMPT.outputs:
                    state.refs.pop(column, None)
            if not self._replaying:
                task = asyncio.create_task(self._keep_running(self._rewrite_prompts(event.partition),
                                                              f"re-writing the prompts of partition {event.partition}"))
                self._rewrites.add(task)
                task.add_done_callback(self._rewrites.discard)
        self.rt.counters["lost_reports"] += 1
        self.rt.counters["reissued_groups"] += len(reissued)
        self.rt.log.warning("groups re-issued after a store loss", partition=event.partition, groups=reissued,
                            reported_by=event.stage, item=event.item_id, lost=sorted(lost_keys),
                            stages=[stage.name for stage in GRPO_GRAPH if stage.name in redone],
                            prompts_rewritten=rewrite_prompts, reissued_groups=self.rt.counters["reissued_groups"])
        for group in reissued:
            self._advance(self.partitions[event.partition][group])

    @staticmethod
    def _stages_to_redo(state: GroupState, reporter: str, lost: set[str]) -> set[str]:
        """The work stages to run again for a group whose columns `lost` are gone: the reporting stage
        (its item was dropped) unless its outputs are all there (a stale report), every stage that
        wrote a lost column, and every stage reading a column those re-runs write anew. Lost prompts
        are written again identically, so they make no later column stale."""
        redo: set[str] = set()
        regenerated: set[str] = set()
        for stage in GRPO_GRAPH:
            if not stage.inputs:
                continue  # the prompt stage: the scheduler writes its columns again
            outputs = set(stage.outputs)
            finished = bool(outputs) and all(column in state.refs for column in outputs) and not outputs & lost
            if (stage.name == reporter and not finished) or outputs & lost or set(stage.inputs) & regenerated:
                redo.add(stage.name)
                regenerated |= outputs
        return redo

    async def _rewrite_prompts(self, partition: int) -> None:
        """Write a partition's prompt chunks again (same keys, same contents) and dispatch what waited."""
        refs, _ = await asyncio.to_thread(self._write_prompts, partition)
        if partition in self.trained or partition not in self.partitions:
            return
        self._set_prompt_refs(partition, refs)
        self.rt.log.info("prompts re-written after a store loss", partition=partition)
        for state in self.partitions[partition].values():
            self._advance(state)

    async def on_weights(self, event: WeightsEvent) -> None:
        if event.version > self.latest_version:
            self.latest_version = event.version
            await self.admit()

    def on_step(self, event: StepEvent) -> None:
        self.trained.add(event.step)
        self.partitions.pop(event.step, None)
        self.trainer_ready.pop(event.step, None)
        if event.step > self._recorded_step:  # a replayed step KV records is dropped already
            self._trained_queue.put_nowait((event.step, len(self.trained)))

    async def _drop_trained(self) -> None:
        """Free trained partitions in the store and record progress, in step order."""
        while True:
            step, trained = await self._trained_queue.get()
            for attempt in range(1, DROP_ATTEMPTS + 1):
                try:
                    dropped = await asyncio.to_thread(self.rt.store.drop_partition, self.config.run.name, step)
                    await self.rt.kv.put(KV_PROGRESS, json.dumps({"step": step, "trained": trained}).encode())
                    break
                except Exception as error:
                    # A store or broker restarting: both calls are idempotent, so try again shortly.
                    if attempt == DROP_ATTEMPTS:
                        raise
                    self.rt.log.warning("dropping a trained partition failed, retrying", partition=step,
                                        attempt=attempt, error=f"{type(error).__name__}: {error}")
                    await asyncio.sleep(1.0)
            self._recorded_step = max(self._recorded_step, step)
            self.rt.log.info("partition trained and dropped", partition=step, keys_dropped=dropped)
            if self._trained_queue.empty():  # once per burst of steps (a restart's: at the next step)
                await self._compact()

    # -- compaction of the EVENTS stream ----------------------------------------------------

    def _note_event(self, partition: int, seq: int) -> None:
        """Remember where the first event of a partition not yet recorded as trained is."""
        if seq and self._recorded_step < partition < self.config.run.steps:
            self._first_seq.setdefault(partition, seq)

    def _compaction_point(self) -> tuple[int, int]:
        """(S, D): every event below sequence S but dead letters may go, and every event below D.

        An event below S is one the scheduler has handled (S ≤ its newest + 1) and that only
        partitions recorded as trained in KV needed, or one of no partition (a bad event, an older
        announcement). Kept, from the first of them on: every event of a partition not yet recorded
        (a restart rebuilds its groups from them), the step events of steps not yet recorded (a
        restart learns them from there) or not yet announced (param-sync announces from them),
        the newest ANNOUNCEMENTS_KEPT step events and weights announcements, the newest
        RECENT_EVENTS_KEPT events and those handled within broker.events_keep_s, and (D) the
        newest DEAD_LETTERS_KEPT dead letters."""
        recorded = self._recorded_step
        newest_steps = sorted(self._step_seqs)[-ANNOUNCEMENTS_KEPT:]
        unannounced = self.latest_version  # step s makes version s + 1
        bounds = [self._last_seq + 1 - RECENT_EVENTS_KEPT, *self._weights_seqs]
        keep_s = self.config.broker.events_keep_s
        if keep_s > 0:
            bounds.append(self._recent.first_since(time.monotonic() - keep_s, self._last_seq + 1))
        bounds += [seq for partition, seq in self._first_seq.items() if partition > recorded]
        bounds += [seq for step, seq in self._step_seqs.items()
                   if step > recorded or step >= unannounced or step in newest_steps]
        below = min(bounds)
        dead = self._dead_in_stream  # ascending: the first of the newest DEAD_LETTERS_KEPT is the oldest kept
        oldest_kept = dead[max(0, len(dead) - DEAD_LETTERS_KEPT)][0] if dead else below
        return below, min(below, oldest_kept)

    async def _compact(self) -> None:
        """Purge the EVENTS stream below the compaction point (`_compaction_point`). Runs in the
        drop task, after KV `progress` records the step, never on the event path; a failure is
        logged and counted, and the next trained step tries again (nothing is lost but bytes)."""
        if self._replaying:
            return  # the state is partial until the replay is over
        below, dead_below = self._compaction_point()
        self._first_seq = {p: seq for p, seq in self._first_seq.items() if p > self._recorded_step}
        stream = self.rt.names.events_stream
        if dead_below <= self._dead_purged_below and below <= self._purged_below:
            return  # nothing new to purge
        try:
            # Both bounds are > 1 here: nats-py sends no sequence for 0, and a purge without one
            # empties the stream. One purge of the whole prefix, then (when dead letters are kept
            # further back) one per other subject of the stream.
            if dead_below > self._dead_purged_below:
                await self.rt.js.purge_stream(stream, seq=dead_below)
                self._dead_purged_below = dead_below
                while self._dead_in_stream and self._dead_in_stream[0][0] < dead_below:
                    self._dead_letters_purged[self._dead_in_stream.popleft()[1]] += 1
                self._purged_below = max(self._purged_below, dead_below)
            if below > self._purged_below:
                for subject in self.rt.names.events_subjects:
                    if subject != self.rt.names.dead(">"):
                        await self.rt.js.purge_stream(stream, seq=below, subject=subject)
                self._purged_below = below
            record = {"purged_below_seq": self._purged_below, "dead_letters_purged_below_seq": self._dead_purged_below,
                      "through_step": self._recorded_step, "dead_letters_purged": dict(self._dead_letters_purged)}
            await self.rt.kv.put(KV_EVENTS_COMPACTION, json.dumps(record).encode())
        except Exception as error:
            self.rt.counters["compaction_failures"] += 1
            self.rt.log.warning("compacting the events stream failed; the next step tries again",
                                error=f"{type(error).__name__}: {error}",
                                compaction_failures=self.rt.counters["compaction_failures"])
            return
        self._step_seqs = {step: seq for step, seq in self._step_seqs.items() if seq >= self._purged_below}
        self.rt.counters["compactions"] += 1
        self.rt.log.info("events stream compacted", purged_below_seq=self._purged_below,
                         dead_letters_purged_below_seq=self._dead_purged_below, through_step=self._recorded_step)


class RecentSequences:
    """When the scheduler handled which stream sequences, to a second: marks (time, first sequence
    handled from then on), at most one per `resolution_s`, so it stays small however fast events come."""

    def __init__(self, resolution_s: float = 1.0) -> None:
        self.resolution_s = resolution_s
        self._marks: deque[tuple[float, int]] = deque()

    def note(self, seq: int, now: float) -> None:
        if not self._marks or now - self._marks[-1][0] >= self.resolution_s:
            self._marks.append((now, seq))

    def first_since(self, horizon: float, default: int) -> int:
        """The first sequence that may have been handled at or after `horizon` (up to
        `resolution_s` early); `default` when every noted one was handled before it. Marks wholly
        before the horizon are forgotten."""
        marks = self._marks
        while marks and (marks[1][0] if len(marks) > 1 else marks[0][0] + self.resolution_s) <= horizon:
            marks.popleft()  # every sequence from this mark to the next was handled before the horizon
        return marks[0][1] if marks else default


async def run(runtime: ActorRuntime) -> None:
    await Scheduler(runtime).run()


def _unique_refs(refs: list[ChunkRef]) -> list[ChunkRef]:
    """Several groups can share one chunk (a reward chunk of a multi-group item): list each once."""
    seen: dict[tuple[str, int | None], ChunkRef] = {}
    for ref in refs:
        seen.setdefault((ref.key, ref.offset), ref)
    return list(seen.values())
