"""Compaction of the EVENTS stream: bounded however long the run, and every restart still correct.

In-process first: a real scheduler follows a scripted stream on a real broker and Flight store, so
the compaction point can be checked exactly (a partition not yet trained pins the stream, dead
letters outlive their partition, a restarted scheduler rebuilds from KV, a failed purge is counted).

Then real runs on the simulated engines (real broker, Flight store and actor processes). A watcher
in this process follows each run from outside: a core NATS subscription counts every event
published on the EVENTS subjects (the run's whole history), and `stream_info` is sampled every
0.1 s (what the stream holds). The bound the stream must stay under is derived from the in-flight
window, not from time: what compaction keeps (actors/scheduler.py) is the newest
RECENT_EVENTS_KEPT events plus about the events of the partitions in flight and of the newest
announcements. The restart cases SIGKILL the scheduler and param-sync, or the broker, once events
have been purged: the run must still train every sample exactly once within the staleness bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.js.errors import KeyNotFoundError

from actors.scheduler import ANNOUNCEMENTS_KEPT, DEAD_LETTERS_KEPT, RECENT_EVENTS_KEPT, RecentSequences
from actors.trainer import read_records
from asyncflow.launcher import run
from asyncflow.status import _dead_letters
from broker import RunNames
from broker.names import KV_EVENTS_COMPACTION, KV_PROGRESS
from tests.conftest import make_tiny_config

PROMPTS, GROUP, K = 24, 2, 1
EVENTS_PER_PARTITION = 2 * PROMPTS + 2
"""One item per group (groups_per_item 1): a rollout and a reward done event per group, the step
event and the weights announcement."""
BOUND = RECENT_EVENTS_KEPT + (K + 3 + ANNOUNCEMENTS_KEPT) * EVENTS_PER_PARTITION
"""Most messages the stream may hold at any time: the newest RECENT_EVENTS_KEPT, plus the partitions a
compaction keeps from (the k + 2 admitted and not yet recorded trained, the one being recorded), plus
the steps behind the oldest kept announcement, which may lie before them."""


def _config(tmp_path: Path, model: Path, dataset: Path, nats_url: str | None, name: str, steps: int):
    """None for `nats_url`: the launcher's embedded broker (which it restarts if killed)."""
    return make_tiny_config(
        tmp_path, model, dataset, K, name, steps=steps, prompts=PROMPTS, group=GROUP,
        run={"stall_timeout_s": 90, "timeout_s": 400, "missing_stage_timeout_s": 60},
        # events_keep_s 0: compaction keeps only what it needs, which is what these tests bound.
        broker={"heartbeat_s": 0.5, "heartbeat_timeout_s": 5, "events_keep_s": 0,
                **({"url": nats_url} if nats_url else {})},
        rollout={"instances": 2, "concurrent_items": 2,
                 "engine": {"type": "simulated", "slots": 8, "per_token_s": 0.005, "mean_tokens": 6}},
        trainer={"save_final": False, "engine": {"type": "simulated", "per_token_s": 0.0005}},
        sampling={"max_new_tokens": 16},
        reward={"function": "asyncflow.engines.simulated:simulated_reward"},
    )


@dataclass
class Kill:
    actor: str
    after_steps: int
    pid: int | None = None
    first_seq: int = 0
    """The stream's first sequence when the actor was killed (> 1: events had been purged)."""


@dataclass
class Watch:
    published: int = 0
    published_bytes: int = 0
    largest_event: int = 0
    steps: set[int] = field(default_factory=set)
    versions: set[int] = field(default_factory=set)
    """Policy versions announced (weights messages)."""
    samples: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(messages, bytes, first_seq, last_seq) of the EVENTS stream, every 0.1 s."""
    kills: list[Kill] = field(default_factory=list)
    progress: dict | None = None
    compaction: dict | None = None
    error: str | None = None


class Watcher(threading.Thread):
    """Follows a run from outside (see the module docstring); SIGKILLs each of `kills` once the run
    has trained its `after_steps` steps and the stream has been compacted."""

    def __init__(self, nats_url: str | None, run_dir: Path, name: str, kills: list[Kill] = ()) -> None:
        """`nats_url` None: the run's embedded broker, found in its services.json once launched (the
        events published before the watcher connects are not counted then)."""
        super().__init__(daemon=True)
        self.nats_url, self.run_dir, self.names = nats_url, run_dir, RunNames(name)
        self.watch = Watch(kills=list(kills))
        self.subscribed = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._follow())
        except BaseException as error:  # reported by the test
            self.watch.error = f"{type(error).__name__}: {error}"
            self.subscribed.set()

    async def _follow(self) -> None:
        url = self.nats_url
        while url is None:
            with contextlib.suppress(LookupError, OSError, ValueError):
                url = _process(self.run_dir, "broker-0")["address"]
            await asyncio.sleep(0.1)
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        try:
            js = nc.jetstream(timeout=10)
            watch = self.watch

            async def on_event(msg) -> None:
                watch.published += 1
                watch.published_bytes += len(msg.data)
                watch.largest_event = max(watch.largest_event, len(msg.data))
                if msg.subject == self.names.done("trainer"):
                    watch.steps.add(json.loads(msg.data)["step"])
                elif msg.subject == self.names.weights:
                    watch.versions.add(json.loads(msg.data)["version"])

            for subject in self.names.events_subjects:
                await nc.subscribe(subject, cb=on_event)
            await nc.flush()
            self.subscribed.set()
            while not self.done.is_set():
                try:
                    state = (await js.stream_info(self.names.events_stream)).state
                    watch.samples.append((state.messages, state.bytes, state.first_seq, state.last_seq))
                except Exception:  # not created yet, or the broker restarting
                    state = None
                for kill in watch.kills:
                    if (kill.pid is None and state is not None and state.first_seq > 1
                            and max(watch.steps, default=-1) + 1 >= kill.after_steps):
                        kill.pid = _process(self.run_dir, kill.actor)["pid"]
                        kill.first_seq = state.first_seq
                        os.kill(kill.pid, signal.SIGKILL)
                await asyncio.sleep(0.1)
            if self.nats_url is None:
                return  # the embedded broker is gone with the run
            kv = await js.key_value(self.names.kv_bucket)
            for key, attr in ((KV_PROGRESS, "progress"), (KV_EVENTS_COMPACTION, "compaction")):
                with contextlib.suppress(KeyNotFoundError):
                    setattr(watch, attr, json.loads((await kv.get(key)).value or b"null"))
        finally:
            with contextlib.suppress(Exception):  # a broker that is gone
                await nc.close()

    def stop(self) -> Watch:
        self.done.set()
        self.join(timeout=30)
        assert self.watch.error is None, self.watch.error
        return self.watch


def _process(run_dir: Path, name: str) -> dict:
    """The actors.json / services.json entry of process `name` (e.g. scheduler-0, broker-0)."""
    for file in ("actors.json", "services.json"):
        if (run_dir / file).is_file():
            for entry in json.loads((run_dir / file).read_text()):
                if entry["actor"] == name:
                    return entry
    raise LookupError(name)


def _run_watched(config, nats_url: str | None, kills: list[Kill] = ()) -> tuple[dict, Watch]:
    watcher = Watcher(nats_url, config.run_dir, config.run.name, kills)
    watcher.start()
    if nats_url is not None:  # else the broker starts with the run
        assert watcher.subscribed.wait(30), "the watcher did not connect"
    try:
        summary = run(config)
    finally:
        watch = watcher.stop()
    return summary, watch


def _assert_trained_exactly_once_within_bound(run_dir: Path, steps: int) -> None:
    trained = read_records(run_dir)
    assert sorted(r["sample_id"] for r in trained) == list(range(steps * PROMPTS * GROUP)), \
        "every sample id must be trained exactly once"
    assert all(0 <= r["step"] - r["policy_version"] <= K for r in trained), "invariant I1"


def _log(run_dir: Path, actor: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / f"{actor}.jsonl").read_text().splitlines() if line]


def test_recent_sequences_give_the_first_event_handled_within_the_window():
    """What `broker.events_keep_s` keeps: from the first event that may have been handled after the
    horizon (marks are a second apart, so up to a second early), nothing when all are older."""
    recent = RecentSequences(resolution_s=1.0)
    for seq, now in ((1, 100.0), (2, 100.5), (3, 101.0), (4, 101.2), (5, 103.0), (6, 110.0)):
        recent.note(seq, now)  # marks: (100, 1), (101, 3), (103, 5), (110, 6)
    assert recent.first_since(99.0, default=7) == 1
    assert recent.first_since(100.9, default=7) == 1  # seq 2 (100.5) is within a mark's second of it
    assert recent.first_since(101.0, default=7) == 3
    assert recent.first_since(104.0, default=7) == 5  # 5 at 103 may be followed by more until 110
    assert recent.first_since(110.5, default=7) == 6
    assert recent.first_since(111.0, default=7) == 7, "every event handled before the horizon"
    recent.note(8, 200.0)
    assert recent.first_since(150.0, default=9) == 8


def test_compaction_keeps_what_a_restart_needs_and_a_restarted_scheduler_rebuilds_from_kv(
        tmp_path, tiny_model_dir, arith_dataset, nats_server, flight_store_server):
    """In-process, against a real broker and Flight store: the scheduler follows a scripted EVENTS
    stream. A partition not yet trained pins the stream from its first event on; once it is trained
    the stream keeps the newest RECENT_EVENTS_KEPT events and the dead letter; a second scheduler
    rebuilds the trained steps and the policy version from KV plus what is left; a purge that fails
    is counted, not fatal."""
    from actors.runtime import ActorRuntime
    from actors.scheduler import Scheduler
    from asyncflow.wire import ChunkRef, DeadLetter, DoneEvent, StepEvent, WeightsEvent

    name, steps = "compact-unit", 40
    config = make_tiny_config(tmp_path, tiny_model_dir, arith_dataset, 1, name, steps=steps, prompts=2, group=2,
                              broker={"url": nats_server.url, "events_keep_s": 0},
                              store={"locations": [flight_store_server.location]})
    names = RunNames(name)
    ref = ChunkRef(column="weights", key=f"{name}/weights/0/0", location=flight_store_server.location, sample_ids=[])

    def done(stage: str, partition: int, group: int) -> tuple[str, DoneEvent]:
        return names.done(stage), DoneEvent(stage=stage, item_id=f"{stage}-p{partition}-g{group}", actor="test",
                                            partition=partition, groups=[group], sample_ids=[], chunks=[])

    def step(partition: int) -> list[tuple[str, object]]:
        event = StepEvent(actor="test", step=partition, policy_version=partition + 1, sample_ids=[],
                          sample_versions=[], failed_samples=0, reward_mean=None, loss=0.0, grad_norm=0.0,
                          tokens=0, weights=ref, weights_nbytes=0)
        return [(names.done("trainer"), event),
                (names.weights, WeightsEvent(version=partition + 1, weights=ref, nbytes=0))]

    def partition_events(partition: int, groups: range = range(2)) -> list[tuple[str, object]]:
        return [done(stage, partition, g) for stage in ("rollout", "reward") for g in groups]

    async def until(condition, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.02)

    async def scenario() -> dict:
        nc = await nats.connect(nats_server.url, connect_timeout=5)
        js = nc.jetstream(timeout=10)
        seqs: dict[str, int] = {}

        async def publish(events: list[tuple[str, object]], label: str | None = None) -> int:
            last = 0
            for subject, event in events:
                last = (await js.publish(subject, event.encode())).seq
                if label and label not in seqs:
                    seqs[label] = last
            return last

        async def state() -> tuple[int, int, int]:
            info = (await js.stream_info(names.events_stream)).state
            return info.messages, info.first_seq, info.last_seq

        try:
            async with ActorRuntime("scheduler", config, nats_server.url) as runtime:
                first = Scheduler(runtime)
                drops = asyncio.create_task(first._keep_running(first._drop_trained(), "dropping"))
                # Partition 30 began long ago (its first rollout is event 1); 0-29 are trained since.
                await publish([done("rollout", 30, 0)], "pinned")
                for partition in range(30):
                    await publish(partition_events(partition))
                    if partition == 3:
                        letter = DeadLetter(stage="reward", subject=names.work("reward"), deliveries=5,
                                            reason="test", payload="{}", item_id="reward-p3-g1", partition=3,
                                            groups=[1])
                        await publish([(names.dead("reward"), letter)], "dead")
                    await publish(step(partition))
                await first._replay_then_follow()
                await until(lambda: first._recorded_step == 29 and first._trained_queue.empty(), "steps 0-29 recorded")
                await first._compact()  # the drop task skipped it during the replay
                pinned = await state()

                # Partition 30 is trained: the stream may now let go of everything but the newest.
                last = await publish([*partition_events(30, range(1, 2)), *partition_events(30, range(0, 1))[1:],
                                      *step(30)])
                await until(lambda: first._recorded_step == 30 and first.rt.counters["compactions"] >= 1,
                            "step 30 recorded and compacted")
                compacted = await state()
                kept_dead = await js.get_msg(names.events_stream, seqs["dead"])
                kv = await js.key_value(names.kv_bucket)
                record = json.loads((await kv.get(KV_EVENTS_COMPACTION)).value or b"null")
                progress = json.loads((await kv.get(KV_PROGRESS)).value or b"null")

                # A second scheduler (a restart) rebuilds from KV and the compacted stream.
                async with ActorRuntime("scheduler", config, nats_server.url, instance=1) as runtime2:
                    second = Scheduler(runtime2)
                    await second._replay_then_follow()
                    restarted = {"recorded": second._recorded_step, "trained": set(second.trained),
                                 "latest_version": second.latest_version, "partitions": set(second.partitions),
                                 "next_partition": second.next_partition, "bad_events": second.bad_events}

                # A purge that fails (here: the stream is gone) is counted and the scheduler goes on.
                last = await publish([done("reward", 30, 0)] * 20)
                await until(lambda: first._last_seq == last, "the last events handled")
                await js.delete_stream(names.events_stream)
                await first._compact()
                failures, fatal = first.rt.counters["compaction_failures"], first.rt.fatal
                drops.cancel()
            return {"seqs": seqs, "pinned": pinned, "compacted": compacted, "last": last, "record": record,
                    "progress": progress, "kept_dead": kept_dead.subject, "restarted": restarted,
                    "failures": failures, "fatal": fatal}
        finally:
            await nc.close()

    result = asyncio.run(scenario())
    messages, first_seq, last_seq = result["pinned"]
    assert first_seq == result["seqs"]["pinned"] == 1 and messages == last_seq, "partition 30 pins the stream"
    messages, first_seq, last_seq = result["compacted"]
    assert first_seq == result["seqs"]["dead"], "the dead letter outlives its partition"
    assert messages == RECENT_EVENTS_KEPT + 1, "the newest events, and the dead letter"
    assert result["kept_dead"] == RunNames(name).dead("reward")
    assert result["record"] == {"purged_below_seq": last_seq + 1 - RECENT_EVENTS_KEPT,
                                "dead_letters_purged_below_seq": result["seqs"]["dead"], "through_step": 30,
                                "dead_letters_purged": {}}
    assert result["progress"] == {"step": 30, "trained": 31}
    restarted = result["restarted"]
    assert restarted["recorded"] == 30 and set(range(31)) <= restarted["trained"]
    assert restarted["latest_version"] == 31 and restarted["next_partition"] == 31
    assert restarted["partitions"] == set() and restarted["bad_events"] == 0
    assert result["failures"] == 1 and result["fatal"] is None


@pytest.mark.slow
def test_the_events_stream_stays_bounded_however_many_steps(tmp_path, tiny_model_dir, arith_dataset, nats_server):
    steps = 40
    config = _config(tmp_path, tiny_model_dir, arith_dataset, nats_server.url, "compact-bound", steps)
    summary, watch = _run_watched(config, nats_server.url)
    assert summary["steps"] == steps and summary["failed_samples"] == 0
    _assert_trained_exactly_once_within_bound(config.run_dir, steps)

    # The run published its whole history; the stream held only a window of it, at every sample.
    assert watch.published >= steps * EVENTS_PER_PARTITION
    assert watch.published >= 4 * BOUND, "too short a run to tell bounded from growing"
    most = max(messages for messages, _, _, _ in watch.samples)
    assert most <= BOUND, f"the stream held {most} events at once, more than the window's {BOUND}"
    # Bytes likewise: at most BOUND of the largest events (plus the store's per-message overhead:
    # subject, msg id header, record framing), against all the run published.
    most_bytes = max(size for _, size, _, _ in watch.samples)
    assert most_bytes <= BOUND * (watch.largest_event + 200), (most_bytes, watch.largest_event)
    assert most_bytes * 3 < watch.published_bytes
    # Not growing with the run: over its last third (by events published) the stream held no more
    # than over its middle third, give or take one partition's events.
    last_seq = watch.samples[-1][3]
    middle, late = ([m for m, _, _, seq in watch.samples if low * last_seq / 3 < seq <= (low + 1) * last_seq / 3]
                    for low in (1, 2))
    assert middle and late
    assert max(late) <= max(middle) + EVENTS_PER_PARTITION, (max(middle), max(late))

    # KV records the trained steps and where the stream was compacted, and the stream starts there.
    # (The launcher may stop the scheduler before it records the last step or two.)
    assert watch.progress is not None and watch.progress["step"] >= steps - 3
    assert watch.progress["trained"] == watch.progress["step"] + 1
    assert watch.compaction is not None and watch.compaction["through_step"] >= steps - 2
    assert watch.samples[-1][2] >= watch.compaction["dead_letters_purged_below_seq"] > 1
    scheduler_stopped = [line for line in _log(config.run_dir, "scheduler-0") if line["event"] == "actor stopped"]
    assert scheduler_stopped[-1]["counters"].get("compaction_failures", 0) == 0
    assert scheduler_stopped[-1]["counters"]["compactions"] >= steps // 2


@pytest.mark.slow
def test_the_scheduler_and_param_sync_killed_after_compaction_rebuild_their_state_and_finish_exactly_once(
        tmp_path, tiny_model_dir, arith_dataset, nats_server):
    steps = 30
    config = _config(tmp_path, tiny_model_dir, arith_dataset, nats_server.url, "compact-kill", steps)
    kills = [Kill("scheduler-0", after_steps=10), Kill("param_sync-0", after_steps=18)]
    summary, watch = _run_watched(config, nats_server.url, kills)
    for kill in watch.kills:
        assert kill.pid is not None, f"{kill.actor} was never killed"
        assert kill.first_seq > 1, f"{kill.actor} was killed before any event was purged"
    assert summary["steps"] == steps and summary["failed_samples"] == 0
    assert summary["restarts"] == {"scheduler-0": 1, "param_sync-0": 1}, summary["restarts"]
    _assert_trained_exactly_once_within_bound(config.run_dir, steps)
    assert max(messages for messages, _, _, _ in watch.samples) <= BOUND

    # The restarted scheduler took the trained steps whose events were purged from KV: it rebuilt
    # its state from a stream that no longer starts at 1, and admitted no trained partition again.
    lines = _log(config.run_dir, "scheduler-0")
    started = [i for i, line in enumerate(lines) if line["event"] == "actor started"]
    assert len(started) == 2
    after = lines[started[1]:]
    rebuilt = next(line for line in after if line["event"] == "state rebuilt from the events stream")
    trained = rebuilt["trained"]
    assert rebuilt["first_seq"] > 1 and rebuilt["events"] < rebuilt["last_seq"]  # a compacted stream
    assert rebuilt["trained_from_kv"] is not None and 5 <= rebuilt["trained_from_kv"] <= trained
    assert trained >= 10
    admitted = [line["partition"] for line in after if line["event"] == "partition admitted"]
    assert admitted and min(admitted) >= trained, (trained, admitted)
    assert all(p >= trained for p in rebuilt["partitions_in_flight"])
    compacted = [line for line in after if line["event"] == "events stream compacted"]
    assert compacted, "the restarted scheduler went on compacting"

    # The restarted param-sync took its announced version from KV and announced only newer ones.
    lines = _log(config.run_dir, "param_sync-0")
    started = [i for i, line in enumerate(lines) if line["event"] == "actor started"]
    assert len(started) == 2
    after = lines[started[1]:]
    restored = next(line["version"] for line in after if line["event"] == "announced version restored from KV")
    assert restored >= 15
    announced = [line["version"] for line in after if line["event"] == "policy version announced"]
    assert announced and min(announced) > restored and max(announced) == steps
    # No version was skipped: the step events of versions not yet announced outlived compaction.
    assert watch.versions == set(range(1, steps + 1))


@pytest.mark.slow
def test_a_broker_killed_after_compaction_comes_back_compacted_and_the_run_finishes_exactly_once(
        tmp_path, tiny_model_dir, arith_dataset):
    """The embedded broker restarts on its JetStream directory: what was purged stays purged, a purge
    while it is down fails and is retried after the next step, and the followers' ordered consumers
    resume where they were, so no reader misses an event compaction had not yet let go of."""
    steps = 24
    config = _config(tmp_path, tiny_model_dir, arith_dataset, None, "compact-broker", steps)
    kills = [Kill("broker-0", after_steps=10)]
    summary, watch = _run_watched(config, None, kills)
    assert kills[0].pid is not None and kills[0].first_seq > 1, "the broker was not killed after compaction"
    assert summary["steps"] == steps and summary["failed_samples"] == 0
    assert summary["restarts"] == {"broker-0": 1}, summary["restarts"]
    _assert_trained_exactly_once_within_bound(config.run_dir, steps)
    # The launcher's monitor saw every step event once (its metrics rows), none purged before it read it.
    rows = [json.loads(line)["step"] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(steps))
    # The stream came back compacted, and compaction went on after the restart.
    after = [first for _, _, first, last in watch.samples if last > 0]
    assert min(after[after.index(kills[0].first_seq):]) >= kills[0].first_seq
    assert max(messages for messages, _, _, _ in watch.samples) <= BOUND
    lines = _log(config.run_dir, "scheduler-0")
    assert [line for line in lines if line["event"] == "events stream compacted"][-1]["through_step"] >= steps - 3


def test_dead_letters_past_those_kept_are_purged_and_still_counted(
        tmp_path, tiny_model_dir, arith_dataset, nats_server, flight_store_server):
    """In-process: DEAD_LETTERS_KEPT + 1 dead letters; compaction purges the oldest and counts it in
    KV `events_compaction`, which `asyncflow status` adds to those in the stream and a restarted
    scheduler goes on from."""
    from actors.runtime import ActorRuntime
    from actors.scheduler import Scheduler
    from asyncflow.wire import DeadLetter

    name = "compact-dead"
    config = make_tiny_config(tmp_path, tiny_model_dir, arith_dataset, 1, name, steps=4, prompts=2, group=2,
                              broker={"url": nats_server.url, "events_keep_s": 0},
                              store={"locations": [flight_store_server.location]})
    names = RunNames(name)
    # No partition (garbage on a work subject): such letters concern no group, so nothing else pins them.
    letter = DeadLetter(stage="reward", subject=names.work("reward"), deliveries=1, reason="garbage", payload="x")

    async def scenario() -> tuple[dict, dict, dict, int]:
        nc = await nats.connect(nats_server.url, connect_timeout=5)
        js = nc.jetstream(timeout=10)
        try:
            async with ActorRuntime("scheduler", config, nats_server.url) as runtime:
                first = Scheduler(runtime)
                await first._replay_then_follow()
                last = 0
                for _ in range(DEAD_LETTERS_KEPT + 1):
                    last = (await js.publish(names.dead("reward"), letter.encode())).seq
                deadline = time.monotonic() + 30
                while first._last_seq < last:
                    assert time.monotonic() < deadline, "the dead letters were not handled"
                    await asyncio.sleep(0.02)
                await first._compact()
                kv = await js.key_value(names.kv_bucket)
                record = json.loads((await kv.get(KV_EVENTS_COMPACTION)).value or b"null")
                counts = await _dead_letters(js, names, record)
                in_stream = (await js.stream_info(names.events_stream)).state.messages
                async with ActorRuntime("scheduler", config, nats_server.url, instance=1) as runtime2:
                    second = Scheduler(runtime2)
                    await second._replay_then_follow()
                    restored = dict(second._dead_letters_purged)
            return record, counts, restored, in_stream
        finally:
            await nc.close()

    record, counts, restored, in_stream = asyncio.run(scenario())
    assert in_stream == DEAD_LETTERS_KEPT, "the newest dead letters stay"
    assert record["dead_letters_purged"] == {"reward": 1}
    assert counts == {"reward": DEAD_LETTERS_KEPT + 1}, "status counts every dead letter, purged ones too"
    assert restored == {"reward": 1}, "a restarted scheduler goes on counting"
