"""Trainer actor: streams GRPO groups into gradient accumulation and steps once per partition.

Step s trains partition s. Groups of partition s are trained the moment they arrive (gradients
accumulate); items that arrived together go through the engine in one call of up to one micro-batch
(`trainer.engine.micro_batch_size` samples), since each engine pass has a cost of its own (it reads
every weight and writes every gradient). Items of later partitions wait, un-acked, until their step. When all groups of the
partition are in, the optimizer steps (gradients scaled by 1 / trained samples), the new weights
go to the store, and a StepEvent announces version s + 1. Items are acked only after that, and
sample ids already trained are skipped, so a redelivered item is never trained twice.

An item that raises (bad data, a crashing engine) is retried, and after `broker.max_deliver` tries
dead-lettered; the scheduler then re-sends its groups with every sample failed, so the step closes
without them (a call of several items that raises is first taken apart: each trains alone). If the failure came after the engine began adding the item's gradient, the step's
gradients are dropped and its earlier items trained again (`TrainingEngine.discard_gradients`).

With `trainer.checkpoint_every`, every N-th step boundary writes `checkpoints/step-<S>` (after the
step is announced, so the records cover it; `asyncflow/checkpoint.py`). A run resumed from one
(`run.resume_from`) starts here at step S with the checkpoint's weights, optimizer, RNG and
consumed ids.

Weights recovery: a store that dies and comes back empty takes the weight versions it held. An
actor that finds an announced version gone reports it on `af.<run>.weights.lost`; between items
(never while the engine is busy) the trainer puts its current weights again, version `self.step`,
which is ≥ the lost one and so within every item's staleness bound, and announces them on
`af.<run>.weights` itself (`WeightsEvent.republished` = n, msg id `weights-<v>-r<n>`), since
param-sync only announces new versions. Training is untouched. A report of an announcement older
than the last re-put is from an actor that has not seen it yet, and is ignored, so many reports
of one loss cost one re-put.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nats.aio.msg import Msg

from actors.runtime import ActorRuntime, lost_inputs, read_columns
from asyncflow.algorithms.grpo import group_advantages, grpo_loss
from asyncflow.checkpoint import restore_rng, resume_checkpoint, write_checkpoint
from asyncflow.engines import TrainBatch, make_local_training_engine, make_training_engine
from asyncflow.engines.base import TrainingEngine, accumulate_stats
from asyncflow.errors import EngineError, StalenessError, WireError
from asyncflow.graph import TRAINER
from asyncflow.id_runs import IdRuns
from asyncflow.partitions import group_of
from asyncflow.staleness import check_sample
from asyncflow.wire import StepEvent, WeightsEvent, WeightsLostEvent, WorkItem, decode
from flight_store.weights import put_weights

MERGE_WAIT_S = 0.05
"""How long an idle trainer waits for more of the step's items before it trains what it has: the
groups of one generation call reach it a few ms apart, and one engine call for all of them costs
far less than one per group (see `Trainer._take_items`)."""


@dataclass
class StepAccumulator:
    """What the current optimizer step has gathered so far."""

    groups: set[int] = field(default_factory=set)
    messages: list[Msg] = field(default_factory=list)
    items: list[WorkItem] = field(default_factory=list)
    """The items trained into this step so far (with `messages`): what a replay trains again."""
    sample_ids: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add_stats(self, stats: dict[str, float]) -> None:
        accumulate_stats(self.stats, stats)


class Trainer:
    def __init__(self, runtime: ActorRuntime) -> None:
        self.rt = runtime
        config = runtime.config
        self.config = config
        self.algo = config.algorithm
        options = {"temperature": config.sampling.temperature, "dtype": config.model.dtype, "seed": config.run.seed}
        resume = resume_checkpoint(config)
        # A resumed run trains on from the checkpoint's weights (policy version resume.step).
        start_path = resume.path if resume is not None else config.model.path
        self.engine = make_training_engine(config.trainer.engine, start_path, **options)
        # The KL reference is the initial policy (model.path), also after a resume. It only
        # computes logprobs: one local replica, never data-parallel.
        self.reference = (make_local_training_engine(config.trainer.engine, config.model.path, **options)
                          if self.algo.kl_coef > 0 else None)
        self.rt.log.info("training engine ready", engine=type(self.engine).__name__,
                         data_parallel=config.trainer.engine.data_parallel,
                         rank_pids=[os.getpid(), *getattr(self.engine, "worker_pids", [])])
        if config.trainer.checkpoint_every and type(self.engine).training_state is TrainingEngine.training_state:
            # Fail at start-up, not after checkpoint_every steps of work.
            raise EngineError(f"trainer.checkpoint_every is {config.trainer.checkpoint_every} but "
                              f"{type(self.engine).__name__} has no training_state(): it cannot checkpoint")
        self.loss_fn = functools.partial(
            grpo_loss, clip_low=self.algo.clip_low, clip_high=self.algo.clip_high, kl_coef=self.algo.kl_coef,
            correction=self.algo.off_policy_correction, weight_cap=self.algo.importance_weight_cap,
        )
        self.step = 0
        # Every sample id trained in this run (de-duplicates redeliveries and re-sends; a checkpoint
        # stores it). Kept as [start, end) runs: ids are dense, so it grows with failed samples
        # (gaps), not with the run's length.
        self.consumed = IdRuns()
        if resume is not None:
            state = resume.load_state()
            self.engine.load_training_state(state["training"])
            restore_rng(state["rng"])  # last: building the engines above re-seeds torch
            self.step = resume.step
            self.consumed = resume.consumed_sample_ids
            self.rt.log.info("resumed from checkpoint", checkpoint=str(resume.path), step=self.step,
                             consumed_samples=len(self.consumed))
        self.rt.policy_version = self.step
        self.waiting: dict[int, list[tuple[Msg, WorkItem]]] = {}
        self.current = StepAccumulator()
        self.failed_items = 0  # items that raised in train_item (each retried or dead-lettered)
        self._gradient_touched = False  # a forward_backward began and has not returned
        self._alone: set[str] = set()  # items of a merged call that raised: each now trains alone
        self._announcing: asyncio.Task[None] | None = None  # the last step's upload + StepEvent
        self._lost_weights: list[WeightsLostEvent] = []  # reports not yet answered
        self._reputs = 0
        self._last_reput: tuple[int, int] | None = None  # (version, republished) of the last re-put
        self.out_dir = config.run_dir / "trainer"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.record = (self.out_dir / "trained_samples.jsonl").open("a", buffering=1)
        self.failed_record = (self.out_dir / "failed_samples.jsonl").open("a", buffering=1)

    async def run(self) -> None:
        subscription = await self.rt.pull(TRAINER.name)
        await self.rt.nc.subscribe(self.rt.names.weights_lost, cb=self._on_weights_lost)
        keepalive = asyncio.create_task(self._keep_waiting_alive())
        self.rt.state = "ready"
        try:
            while not self.rt.stop.is_set() and self.step < self.config.run.steps:
                await self._reput_lost_weights()  # at least every fetch timeout (1 s) while waiting
                for msg in await self.rt.fetch(subscription, batch=self.algo.prompts_per_step):
                    await self.accept(msg)
                await self._gather_step_items(subscription)
                await self.train_ready_items()
            if self._announcing is not None:
                await self._announcing
        finally:
            keepalive.cancel()
        await self.rt.wait_stopped()

    async def accept(self, msg: Msg) -> None:
        try:
            item = decode(WorkItem, msg.data, msg.subject)
        except WireError as error:
            await self.rt.dead_letter(TRAINER.name, msg, str(error))
            return
        if item.partition < self.step:  # redelivery of a step already taken: nothing to train
            await msg.ack()
            return
        self.waiting.setdefault(item.partition, []).append((msg, item))

    async def train_ready_items(self) -> None:
        while self.waiting.get(self.step):
            await self._reput_lost_weights()
            taken = self._take_items(self.waiting[self.step])
            items = [item for _, item in taken]
            self.rt.state = "busy"
            started = time.time()
            self.rt.counters["engine_calls"] += 1
            try:
                trained = await asyncio.to_thread(self.train_items, items)
            except StalenessError:
                raise  # an I1 violation is a framework bug, not bad data: stop the run, loudly
            except Exception as error:
                if len(taken) > 1:
                    # Which item broke the merged pass is unknown: drop what it added and train
                    # those items one at a time, so only the bad one is retried or dead-lettered.
                    if self._gradient_touched:
                        await asyncio.to_thread(self._replay_step)
                    self._alone.update(item.item_id for item in items)
                    self.waiting[self.step][:0] = taken
                    self.rt.state = "ready"
                    continue
                await self._item_failed(taken[0][0], items[0], error)
                continue
            elapsed = time.time() - started
            total = max(sum(len(item.sample_ids) for item in items), 1)
            for (msg, item), samples in zip(taken, trained, strict=True):
                self.current.messages.append(msg)
                self.current.items.append(item)
                self._alone.discard(item.item_id)
                # One span per item, the call's time cut in proportion to their samples, so busy
                # time adds up and every item keeps its own span in the timeline.
                share = elapsed * len(item.sample_ids) / total
                await self.rt.publish_metrics(item.item_id, TRAINER.name, started, samples, end=started + share)
                started += share
            self.rt.state = "ready"
            if len(self.current.groups) == self.algo.prompts_per_step:
                await self.finish_step()

    async def _gather_step_items(self, subscription: object) -> None:
        """While the current step has some items waiting, less than a micro-batch of samples and
        groups still to come, take what arrives within `MERGE_WAIT_S` as well."""
        micro = self.config.trainer.engine.micro_batch_size
        while True:
            queued = self.waiting.get(self.step, [])
            groups_in = len(self.current.groups) + sum(len(item.groups) for _, item in queued)
            if not queued or groups_in >= self.algo.prompts_per_step:
                return
            if sum(len(item.sample_ids) for _, item in queued) >= micro:
                return
            arrived = await self.rt.fetch(subscription, batch=self.algo.prompts_per_step, timeout_s=MERGE_WAIT_S)
            if not arrived:
                return
            for msg in arrived:
                await self.accept(msg)

    def _take_items(self, queue: list[tuple[Msg, WorkItem]]) -> list[tuple[Msg, WorkItem]]:
        """The next items to train in one engine call: the first waiting item, and behind it as many
        as keep the call within one micro-batch of samples. Every engine pass reads all the weights
        (and the backward writes every gradient), so on a CPU a pass of 8 groups costs little more
        than a pass of 1: items that are ready together train together."""
        taken = [queue.pop(0)]
        budget = self.config.trainer.engine.micro_batch_size - len(taken[0][1].sample_ids)
        if taken[0][1].item_id in self._alone:
            return taken
        while queue and queue[0][1].item_id not in self._alone and len(queue[0][1].sample_ids) <= budget:
            budget -= len(queue[0][1].sample_ids)
            taken.append(queue.pop(0))
        return taken

    def train_item(self, item: WorkItem) -> int:
        """`train_items` of one item."""
        return self.train_items([item])[0]

    def train_items(self, items: list[WorkItem]) -> list[int]:
        """Accumulate the gradient of the items' groups in one engine call (blocking). Returns
        samples trained per item.

        The step's bookkeeping changes only once the gradient is in: a call that raises leaves
        the step as it was, except for whatever part of its gradient the engine had added."""
        # dict.fromkeys: a sample in two of the items (an item and its re-send) is trained once.
        live = list(dict.fromkeys(sid for item in items for sid in item.sample_ids if sid not in self.consumed))
        failed = {sid: reason for item in items for sid, reason in item.failed.items()}
        stats: dict[str, float] = {}
        columns: dict[str, dict[int, object]] = {}
        if live:
            columns = read_columns(self.rt.store, [ref for item in items for ref in item.inputs], TRAINER.inputs)
            missing = [sid for sid in live if sid not in columns["reward"] or sid not in columns["response_ids"]]
            failed.update({sid: "no reward or response reached the trainer" for sid in missing})
            live = [sid for sid in live if sid not in missing]
            for sid in live:
                check_sample(sid, self.step, columns["policy_version"][sid], self.algo.max_staleness)
        if live:
            advantages = self._advantages(live, columns["reward"])
            batch = TrainBatch(
                prompt_ids=[columns["prompt_ids"][sid] for sid in live],
                response_ids=[columns["response_ids"][sid] for sid in live],
                behaviour_logprobs=[columns["behaviour_logprobs"][sid] for sid in live],
                advantages=[advantages[sid] for sid in live],
                sample_ids=live,
            )
            if self.reference is not None:
                batch.ref_logprobs = self.reference.compute_logprobs(batch.prompt_ids, batch.response_ids)
            self._gradient_touched = True
            stats = self.engine.forward_backward(batch, self.loss_fn)
            self._gradient_touched = False
        acc = self.current
        for item in items:
            acc.groups.update(item.groups)
        acc.failed.update(failed)
        acc.add_stats(stats)
        for sid in live:
            self.consumed.add(sid)
            acc.sample_ids.append(sid)
            acc.versions.append(columns["policy_version"][sid])
            acc.rewards.append(columns["reward"][sid])
        trained = set(live)
        counts = []
        for item in items:
            counts.append(len(trained.intersection(item.sample_ids)))
            trained.difference_update(item.sample_ids)
        return counts

    async def _item_failed(self, msg: Msg, item: WorkItem, error: Exception) -> None:
        """An item raised: retry it later (nak) or, after `broker.max_deliver` tries, dead-letter it,
        and the scheduler re-sends its groups with their samples failed so the step still closes.
        If its gradient was partly added, the step's gradients are dropped and its other items
        trained again first, so nothing counts twice.

        An item whose inputs a store lost (it died and came back empty) is reported lost instead and
        dropped: the scheduler re-issues its groups and a new item brings them back. Its samples were
        not trained (inputs are read before any gradient), so they stay unconsumed."""
        lost = lost_inputs(item, error)
        if lost:
            if self._gradient_touched:
                await asyncio.to_thread(self._replay_step)
            await self.rt.report_lost(TRAINER.name, msg, item, lost, error)
            self.rt.state = "ready"
            return
        deliveries = msg.metadata.num_delivered if msg.metadata else 1
        reason = f"{type(error).__name__}: {error}"
        self.failed_items += 1
        self.rt.stats.items_failed += 1
        self.rt.log.error("trainer item failed", item=item.item_id, step=self.step, deliveries=deliveries,
                          max_deliver=self.config.broker.max_deliver, error=reason, failed_items=self.failed_items)
        if self._gradient_touched:
            await asyncio.to_thread(self._replay_step)
        if deliveries >= self.config.broker.max_deliver:
            await self.rt.dead_letter(TRAINER.name, msg, f"{item.item_id}: {reason}", item)
        else:
            await msg.nak(delay=min(2.0 * deliveries, 10.0))
        self.rt.state = "ready"

    def _replay_step(self) -> None:
        """Drop the step's accumulated gradients and train its items so far again (blocking)."""
        done = self.current
        self.engine.discard_gradients()  # an engine that cannot raises: the trainer stops, loudly
        self._gradient_touched = False
        self.consumed.difference_update(done.sample_ids)
        self.current = StepAccumulator(messages=done.messages, items=done.items, started=done.started)
        for item in done.items:
            self.train_item(item)
        self.rt.log.warning("step replayed after a failed item", step=self.step, items=len(done.items))

    def _advantages(self, live: list[int], rewards: dict[int, float]) -> dict[int, float]:
        """GRPO: normalise rewards within each group, over the group's samples that have a reward."""
        by_group: dict[int, list[int]] = {}
        for sid in live:
            by_group.setdefault(group_of(sid, self.algo.prompts_per_step, self.algo.samples_per_prompt), []).append(sid)
        out = {}
        for ids in by_group.values():
            values = group_advantages(np.array([rewards[s] for s in ids], dtype=np.float64),
                                      scale=self.algo.scale_rewards, eps=self.algo.adv_eps)
            out.update(zip(ids, values.tolist(), strict=True))
        return out

    async def finish_step(self) -> None:
        acc = self.current
        step = self.step
        final = step == self.config.run.steps - 1
        n = len(acc.sample_ids)
        grad = await asyncio.to_thread(self.engine.optimizer_step, 1.0 / n) if n else {"grad_norm": 0.0}
        # The export is a copy taken now; uploading it and announcing the step run in the
        # background while the next partition trains (the upload takes seconds for a real model).
        tensors = await asyncio.to_thread(lambda: list(self.engine.export_weights()))
        if final and self.config.trainer.save_final:
            await asyncio.to_thread(self.engine.save_pretrained, self.config.run_dir / "final")
        # Items of this partition still waiting are copies of groups it has trained (redeliveries):
        # acked with the step's own, and the partition's entry goes, so `waiting` holds only the
        # partitions ahead, not one empty list per step of the run.
        acc.messages.extend(msg for msg, _ in self.waiting.pop(step, []))
        previous = self._announcing
        self._announcing = asyncio.create_task(self._announce_step(step, acc, grad, tensors, final, previous))
        self.step = step + 1
        self.rt.policy_version = step + 1
        self.current = StepAccumulator()
        every = self.config.trainer.checkpoint_every
        if every and self.step % every == 0 and not final:
            await self.checkpoint()

    async def checkpoint(self) -> None:
        """Write `checkpoints/step-<self.step>` at this step boundary (the trainer waits for it).

        The step's announcement is awaited first, so the records of every step the checkpoint
        covers are on disk before the checkpoint can exist: a resume keeps exactly those records."""
        started = time.time()
        if self._announcing is not None:
            await self._announcing
        done = await asyncio.to_thread(write_checkpoint, self.config, self.step, self.engine, self.consumed.copy())
        self.rt.log.info("checkpoint written", step=self.step, path=str(done.path),
                         consumed_samples=len(self.consumed), seconds=round(time.time() - started, 3))

    async def _announce_step(self, step: int, acc: StepAccumulator, grad: dict[str, float], tensors: list,
                             final: bool, previous: asyncio.Task[None] | None) -> None:
        """Upload version step + 1, record the step's samples, publish its StepEvent, then ack its
        items (so a crash before the event redelivers them). Steps are announced in order."""
        try:
            if previous is not None:
                await previous
            version = step + 1
            nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
            ref = await asyncio.to_thread(put_weights, self.rt.store, self.config.run.name, version, tensors)
            del tensors
            n = len(acc.sample_ids)
            for sid, v, r in zip(acc.sample_ids, acc.versions, acc.rewards, strict=True):
                self.record.write(json.dumps({"step": step, "sample_id": sid, "policy_version": v, "reward": r}) + "\n")
            for sid, reason in sorted(acc.failed.items()):
                self.failed_record.write(json.dumps({"step": step, "sample_id": sid, "reason": reason}) + "\n")
            event = StepEvent(
                actor=self.rt.actor_id, step=step, policy_version=version, sample_ids=acc.sample_ids,
                sample_versions=acc.versions, failed_samples=len(acc.failed),
                reward_mean=float(np.mean(acc.rewards)) if acc.rewards else None,
                loss=acc.stats.get("loss_sum", 0.0) / max(n, 1), grad_norm=float(grad["grad_norm"]),
                tokens=int(acc.stats.get("tokens", 0)), weights=ref, weights_nbytes=nbytes, final=final,
            )
            await self.rt.publish(self.rt.names.done(TRAINER.name), event, msg_id=f"step-{step}")
            for msg in acc.messages:
                try:
                    await msg.ack_sync(timeout=self.rt.timeout_s)
                except Exception as error:
                    # The step is announced: an ack lost (e.g. to a broker restart) only brings the
                    # item back after ack_wait, and `accept` acks items of past steps untrained.
                    self.rt.log.warning("ack not confirmed; the item may be redelivered", step=step,
                                        error=f"{type(error).__name__}: {error}")
            self.rt.log.info("step done", step=step, samples=n, failed=len(acc.failed), reward=event.reward_mean,
                             loss=round(event.loss, 5), grad_norm=round(event.grad_norm, 4),
                             max_staleness=max((step - v for v in acc.versions), default=0),
                             **_importance_weight_stats(acc.stats),
                             seconds=round(time.time() - acc.started, 2))
        except Exception as error:
            self.rt.fail(error, f"announcing step {step}")
            raise

    async def _on_weights_lost(self, msg: Msg) -> None:
        try:
            report = decode(WeightsLostEvent, msg.data, msg.subject)
        except WireError as error:
            self.rt.counters["bad_weights_reports"] += 1
            self.rt.log.error("bad lost-weights report ignored", error=str(error))
            return
        self._lost_weights.append(report)  # answered by the main loop, between engine calls

    async def _reput_lost_weights(self) -> None:
        """Answer lost-weights reports: put the current weights (version self.step) again and announce
        them with the next `republished` number. Runs in the main loop, so no engine call overlaps the
        export, and the current version cannot change meanwhile."""
        if not self._lost_weights:
            return
        reports, self._lost_weights = self._lost_weights, []
        newest = max(reports, key=lambda r: r.order)
        if self._last_reput is not None and newest.order < self._last_reput:
            return  # the reporters have not seen the last re-put yet: it answers them
        started = time.time()
        if self._announcing is not None and not self._announcing.done():
            # The current version's own upload and StepEvent first: the re-put must not overtake them.
            await asyncio.wait([self._announcing])
        version = self.step
        if newest.version > version:
            self.rt.log.error("lost-weights report of a version this trainer has not made ignored",
                              version=newest.version, current=version, reported_by=newest.actor)
            return
        republished = self._reputs + 1
        try:
            tensors = await asyncio.to_thread(lambda: list(self.engine.export_weights()))
            nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
            ref = await asyncio.to_thread(put_weights, self.rt.store, self.config.run.name, version, tensors)
            del tensors
            announcement = WeightsEvent(version=version, weights=ref, nbytes=nbytes, republished=republished)
            await self.rt.publish(self.rt.names.weights, announcement, msg_id=f"weights-{version}-r{republished}")
        except Exception as error:  # a store or broker still restarting: the reporters report again
            self.rt.counters["weights_reput_failed"] += 1
            self.rt.log.error("re-putting lost weights failed; waiting for the next report", version=version,
                              lost_version=newest.version, error=f"{type(error).__name__}: {error}")
            return
        self._reputs = republished
        self._last_reput = (version, republished)
        self.rt.counters["weights_reput"] += 1
        self.rt.log.warning("weights re-put after a store loss", version=version, republished=republished,
                            lost_version=newest.version, lost_key=newest.weights.key,
                            reported_by=sorted({r.actor for r in reports}), key=ref.key, location=ref.location,
                            seconds=round(time.time() - started, 3))

    async def _keep_waiting_alive(self) -> None:
        """Held items must not be redelivered while they wait for their step."""
        period = max(1.0, self.config.broker.ack_wait_s / 3)
        while True:
            await asyncio.sleep(period)
            held = [m for items in self.waiting.values() for m, _ in items] + self.current.messages
            for msg in held:
                with contextlib.suppress(Exception):
                    await msg.in_progress()


def _importance_weight_stats(stats: dict[str, float]) -> dict[str, float]:
    """Decoupled off-policy correction: mean behaviour weight and truncated tokens of the step."""
    tokens = stats.get("importance_weight_tokens", 0.0)
    if not tokens:
        return {}
    return {"importance_weight_mean": round(stats["importance_weight_sum"] / tokens, 4),
            "importance_weight_truncated": int(stats.get("importance_weight_truncated", 0))}


async def run(runtime: ActorRuntime) -> None:
    trainer = Trainer(runtime)
    await trainer.run()


def read_records(run_dir: Path, name: str = "trained_samples") -> list[dict]:
    """The trainer's record of samples it trained (step, sample_id, policy_version, reward) or,
    with name="failed_samples", of samples it could not train (step, sample_id, reason)."""
    path = run_dir / "trainer" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
