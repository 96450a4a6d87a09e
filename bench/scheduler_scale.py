"""Scheduler-scale benchmark: one real scheduler process against N simulated rollout instances.

Run: ``.venv/bin/python -m bench.scheduler_scale [--instances 16 64 256 1024] [--seconds N]``

For each instance count N, from nothing: a real nats-server (`broker.EmbeddedNatsServer`), a real
Flight store process, the run's streams, consumers and KV set up by the launcher's `set_up_run`,
and the REAL scheduler as its own process (`python -m asyncflow actor scheduler --config C --nats
URL`) on the tiny arithmetic model's tokenizer and prompts (examples/arith.py): 64 prompts x 8
samples per step, one GRPO group per work item, `max_staleness` 32 so that admission never holds
the instances back. This process plays every other stage:

- N rollout instances: asyncio tasks sharing ceil(N / 64) NATS connections, each with its own pull
  subscription on the shared `rollout` consumer, fetching one item at a time like a rollout actor.
  Per item an instance takes `item_seconds` (below), publishes the rollout DoneEvent (JetStream,
  acked, msg id `<item>-done` as the real actor does), then acks the item.
- `--reward-workers` reward workers do the same for reward items, at once.
- one trainer: pulls trainer items; once every group of partition `step` is in, it publishes the
  StepEvent and, as param-sync would, the WeightsEvent of version step + 1, which admits the next
  partition (I2). Unlike the real trainer it acks items on receipt (see `Harness._trainer`).

Chunk refs: the DoneEvents carry the ChunkRefs the real actors would (rollout: its four output
columns per group, reward: one; keys `<run>/<partition>/<column>/g<group>` at the store's location,
with the group's sample ids), but those chunks are not written: the scheduler only forwards refs,
never reads columns, so its work is the same and the harness stays cheap. The scheduler's own Flight
calls (each partition's prompts, dropping trained partitions) are real.

Two windows of `--seconds` each, after `--warmup` seconds each:

- paced: rollout instances take busy x 24 / `--rate` s per item (x 0.5-1.5, seeded), busy = N capped
  at the consumer's max_ack_pending, so that `--rate` dispatched samples/s are offered whatever N.
  This is the window for latency and CPU per sample, at a fixed load.
- capacity: every stage answers at once, so the pipeline runs as fast as the scheduler, the broker
  and this harness together can on this machine.

Figures per window:

- dispatched samples/s: samples in the work items of every stage the scheduler published in the
  window, timed by the broker's timestamp of each item (its JetStream metadata);
- ready -> dispatched latency, p50 / p99: from the broker's timestamp of the event that made the
  item ready (rollout: the WeightsEvent that admitted its partition; reward: the group's rollout
  DoneEvent; trainer: the group's reward DoneEvent, with `phase_barrier` the partition's last one)
  to the broker's timestamp of the item. Both clocks are the broker's, read from an ordered
  headers-only consumer on the events, so delays in this harness do not count. Items of the
  partitions admitted at start have no trigger. JSON `receive_latency_ms`: to when an instance got it;
- CPU seconds per 1000 dispatched samples of the scheduler process, the broker and this harness
  (/proc and the process clock), and the scheduler's CPU use in cores.

Every received item is decoded as a `WorkItem`; the run checks each trained partition's samples
went to each stage exactly once and counts the instances that got work. `--profile DIR` runs the
scheduler under cProfile (CPU time; slower, figures not comparable). JSON: runs/bench-scheduler/scheduler.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from asyncflow.config import Config, parse_config
from asyncflow.errors import WireError
from asyncflow.graph import REWARD, ROLLOUT, TRAINER
from asyncflow.launcher import prepare_inputs, set_up_run, start_broker, start_stores, stop_processes
from asyncflow.partitions import group_of, group_sample_ids
from asyncflow.wire import ChunkRef, DoneEvent, StepEvent, WeightsEvent, WorkItem, decode
from broker import RunNames, connect
from broker.server import die_with_parent
from flight_store.keys import column_key, weights_key

ROOT = Path(__file__).resolve().parent.parent
RUN = "schedscale"
STAGES = (ROLLOUT.name, REWARD.name, TRAINER.name)
INSTANCES_PER_CONNECTION = 64
FETCH_TIMEOUT_S = 1.0
"""Pull requests expire after this, as the actors' (`ActorRuntime.fetch`)."""
START_TIMEOUT_S = 180.0
DRAIN_TIMEOUT_S = 60.0
TAIL_S = 0.5
PROFILED = """
import cProfile, time
from asyncflow.cli import main
profiler = cProfile.Profile(time.process_time)
try:
    profiler.runcall(main, {argv!r})
finally:
    profiler.dump_stats({out!r})
"""


@dataclass
class Received:
    """One work item as an instance got it."""

    stage: str
    item_id: str
    partition: int
    groups: list[int]
    sample_ids: list[int]
    input_columns: list[str]
    """The columns the item's input ChunkRefs point at."""
    input_sample_ids: dict[str, list[int]]
    """Column -> the samples its refs name, in order (a ref may be a slice of a bigger chunk)."""
    worker: int
    min_version: int
    stored_ns: int
    """When the broker stored the scheduler's publish (the message's JetStream timestamp)."""
    received_ns: int
    announced: int
    """The newest policy version the harness had announced when the item arrived."""


@dataclass
class Records:
    """Everything the harness saw in one run (for the figures, the checks and the test)."""

    received: list[Received] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    trained: dict[int, int] = field(default_factory=dict)
    """step -> when its StepEvent was published (ns)."""
    rollout_done_ns: dict[tuple[int, int], int] = field(default_factory=dict)
    reward_done_ns: dict[tuple[int, int], int] = field(default_factory=dict)
    """(partition, group) -> when the harness published the DoneEvent (taken just before)."""
    done_stored_ns: dict[tuple[str, int, int], int] = field(default_factory=dict)
    """(stage, partition, group) -> when the broker stored that stage's DoneEvent for the group."""
    weights_stored_ns: dict[int, int] = field(default_factory=dict)
    """version -> when the broker stored its WeightsEvent."""
    consumer_limits: dict[str, int | None] = field(default_factory=dict)
    """The rollout consumer's max_ack_pending (items out at once) and max_waiting (pull requests)."""


@dataclass
class Phase:
    """The figures of one measured window."""

    mode: str
    """`paced` (instances take `item_seconds` per rollout item) or `capacity` (every stage at once)."""
    offered_samples_per_s: float | None
    item_seconds: float
    window_s: float
    items: int
    samples: int
    samples_per_s: float
    steps_per_s: float
    latency_ms: dict[str, float]
    receive_latency_ms: dict[str, float]
    stages: dict[str, dict[str, float]]
    scheduler_cpu_s_per_1000: float
    scheduler_cores: float
    broker_cpu_s_per_1000: float
    harness_cpu_s_per_1000: float
    instances_fed: int
    """Rollout instances that got at least one item in the window."""
    items_per_instance: dict[str, float]


@dataclass
class ScaleResult:
    instances: int
    paced: Phase | None
    capacity: Phase | None
    consumer_limits: dict[str, int | None]
    exactly_once: bool
    invalid_items: int
    steps_trained: int


# -- set-up -------------------------------------------------------------------------------------


def bench_config(run_dir: Path, *, prompts: int = 64, group: int = 8, max_staleness: int = 32,
                 phase_barrier: bool = False) -> Config:
    """The scheduler's config: the tiny arithmetic model and prompts, steps enough never to end."""
    raw: dict[str, Any] = {
        "run": {"name": RUN, "seed": 0, "steps": 1_000_000, "run_dir": str(run_dir)},
        "model": {"path": str(ROOT / ".cache/asyncflow/models/tiny-arith"),
                  "create_with": "examples.arith:build_tiny_model"},
        "data": {"path": str(ROOT / ".cache/asyncflow/data/arith.jsonl"),
                 "create_with": "examples.arith:write_dataset"},
        "algorithm": {"prompts_per_step": prompts, "samples_per_prompt": group,
                      "max_staleness": max_staleness, "phase_barrier": phase_barrier},
        "reward": {"function": "examples.arith:reward"},
    }
    return parse_config(raw).resolved()


def start_scheduler(config: Config, nats_url: str, cleanup: ExitStack,
                    profile: Path | None = None) -> subprocess.Popen:
    config_path = config.run_dir / "config.yaml"
    config_path.write_text(config.to_yaml())
    argv = ["actor", "scheduler", "--config", str(config_path), "--nats", nats_url]
    command = [sys.executable, "-m", "asyncflow", *argv]
    if profile is not None:  # CPU time, not wall time: the machine may be shared
        command = [sys.executable, "-c", PROFILED.format(argv=argv, out=str(profile))]
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=python_path)
    with (config.run_dir / "logs" / "scheduler-0.console.log").open("ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent)
    cleanup.callback(stop_processes, [process], 0.0)  # SIGTERM: the actor stops cleanly
    return process


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stored_ns(msg: Msg) -> int:
    """When the broker stored this message (JetStream metadata, microsecond resolution)."""
    assert msg.metadata is not None
    return int(msg.metadata.timestamp.timestamp() * 1e6) * 1000


# -- the simulated stages -----------------------------------------------------------------------


class Harness:
    """Plays rollout (N instances), reward and trainer + param-sync against the real scheduler."""

    def __init__(self, config: Config, nats_url: str, store: str, instances: int, reward_workers: int) -> None:
        self.config = config
        self.algo = config.algorithm
        self.nats_url = nats_url
        self.store = store
        self.instances = instances
        self.reward_workers = reward_workers
        self.names = RunNames(config.run.name)
        self.records = Records()
        self.item_seconds = 0.0
        """Simulated generation time of a rollout item (each instance draws 0.5x-1.5x of it)."""
        self.random = random.Random(0)
        self.announced = 0
        self.step = 0
        self.stepped = asyncio.Condition()
        self.connections: list[NATS] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.failure: BaseException | None = None
        self.stopping = False

    async def start(self) -> None:
        count = max(1, math.ceil(self.instances / INSTANCES_PER_CONNECTION))
        self.connections = [await connect(self.nats_url, f"bench-sim-{i}") for i in range(count + 1)]
        timeout = self.config.broker.request_timeout_s
        own_js = self.connections[-1].jetstream(timeout=timeout)  # trainer, events, queue checks
        rollout = await own_js.consumer_info(self.names.work_stream, RunNames.consumer(ROLLOUT.name))
        self.records.consumer_limits = {"max_ack_pending": rollout.config.max_ack_pending,
                                        "max_waiting": rollout.config.max_waiting}
        await own_js.subscribe(f"{self.names.prefix}.>", stream=self.names.events_stream, ordered_consumer=True,
                               headers_only=True, cb=self._on_event)
        workers = [(ROLLOUT.name, i) for i in range(self.instances)]
        workers += [(REWARD.name, i) for i in range(self.reward_workers)]
        for index, (stage, number) in enumerate(workers):
            js = self.connections[index % count].jetstream(timeout=timeout)
            self.tasks.append(asyncio.create_task(self._guard(self._worker(stage, number, js))))
        self.tasks.append(asyncio.create_task(self._guard(self._trainer(own_js))))

    async def stop(self) -> None:
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        # nats-py can hold a cancelled fetch until its connection closes: close, then collect.
        await asyncio.wait(self.tasks, timeout=2.0)
        for connection in self.connections:
            await connection.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def drain(self, timeout_s: float) -> None:
        """Wait until no rollout or reward item is left in the queue."""
        js = self.connections[-1].jetstream(timeout=self.config.broker.request_timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            infos = [await js.consumer_info(self.names.work_stream, RunNames.consumer(stage))
                     for stage in (ROLLOUT.name, REWARD.name)]
            if all(info.num_pending == 0 for info in infos):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(TAIL_S)

    async def wait_for_step(self, step: int, timeout_s: float) -> None:
        async def reached() -> None:
            async with self.stepped:
                await self.stepped.wait_for(lambda: self.step > step or self.failure is not None)

        await asyncio.wait_for(reached(), timeout_s)
        if self.failure is not None:
            raise self.failure

    async def _guard(self, work: Any) -> None:
        try:
            await work
        except BaseException as error:
            if self.stopping:
                return
            self.failure = error  # a broken harness must not look like a slow scheduler
            async with self.stepped:
                self.stepped.notify_all()
            raise

    # -- what the scheduler sent and what the broker stored -------------------------------------

    def _receive(self, stage: str, worker: int, msg: Msg) -> WorkItem | None:
        received = time.time_ns()
        try:
            item = decode(WorkItem, msg.data, msg.subject)
        except WireError as error:
            self.records.invalid.append(str(error))
            return None
        if item.stage != stage:
            self.records.invalid.append(f"{item.item_id}: stage {item.stage!r} on the {stage} queue")
            return None
        self.records.received.append(Received(
            stage=stage, item_id=item.item_id, partition=item.partition, groups=list(item.groups),
            sample_ids=list(item.sample_ids), input_columns=sorted({ref.column for ref in item.inputs}),
            input_sample_ids={column: [sid for ref in item.inputs if ref.column == column for sid in ref.sample_ids]
                              for column in {ref.column for ref in item.inputs}},
            worker=worker, min_version=item.min_version, stored_ns=stored_ns(msg), received_ns=received,
            announced=self.announced,
        ))
        return item

    async def _on_event(self, msg: Msg) -> None:
        """Note when the broker stored each event (headers only: the msg id names the event)."""
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        stored = stored_ns(msg)
        if msg_id.startswith("weights-"):
            self.records.weights_stored_ns[int(msg_id.removeprefix("weights-"))] = stored
        elif msg_id.endswith("-done"):  # "<stage>-p<partition>-g<group>_<group>...-done": the item's id
            stage, partition, groups = msg_id.removesuffix("-done").split("-")
            for group in groups.removeprefix("g").split("_"):
                self.records.done_stored_ns[(stage, int(partition.removeprefix("p")), int(group))] = stored

    # -- rollout and reward instances ---------------------------------------------------------

    async def _worker(self, stage: str, worker: int, js: Any) -> None:
        subscription = await js.pull_subscribe_bind(RunNames.consumer(stage), stream=self.names.work_stream)
        while True:
            try:
                msgs = await subscription.fetch(1, timeout=FETCH_TIMEOUT_S)
            except TimeoutError:
                continue
            for msg in msgs:
                item = self._receive(stage, worker, msg)
                if item is not None:
                    if stage == ROLLOUT.name and self.item_seconds > 0:
                        await asyncio.sleep(self.item_seconds * self.random.uniform(0.5, 1.5))
                    await self._done(js, stage, worker, item)
                await msg.ack()

    async def _done(self, js: Any, stage: str, worker: int, item: WorkItem) -> None:
        columns = ROLLOUT.outputs if stage == ROLLOUT.name else REWARD.outputs
        by_group: dict[int, list[int]] = {}
        for sid in item.sample_ids:
            group = group_of(sid, self.algo.prompts_per_step, self.algo.samples_per_prompt)
            by_group.setdefault(group, []).append(sid)
        chunks = [
            ChunkRef(column=column, key=column_key(RUN, item.partition, column, f"g{group}"),
                     location=self.store, sample_ids=ids)
            for group, ids in by_group.items() for column in columns
        ]
        event = DoneEvent(
            stage=stage, item_id=item.item_id, actor=f"sim-{stage}-{worker}", partition=item.partition,
            groups=item.groups, sample_ids=item.sample_ids, chunks=chunks,
            policy_version=self.announced if stage == ROLLOUT.name else None,
        )
        done = self.records.rollout_done_ns if stage == ROLLOUT.name else self.records.reward_done_ns
        now = time.time_ns()  # before the publish: the scheduler cannot see the event earlier
        for group in item.groups:
            done[(item.partition, group)] = now
        await js.publish(self.names.done(stage), event.encode(), headers={"Nats-Msg-Id": f"{item.item_id}-done"})

    # -- trainer and param-sync ---------------------------------------------------------------

    async def _trainer(self, js: Any) -> None:
        """Steps in order, each once all its groups are in. The real trainer keeps the items of
        later partitions un-acked until their step; this one acks on receipt, because with more
        trainer items out than the consumer's max_ack_pending (1000 by default; here up to
        (k + 1) x 64) the broker would stop delivering and the run would stall."""
        subscription = await js.pull_subscribe_bind(RunNames.consumer(TRAINER.name), stream=self.names.work_stream)
        held: dict[int, list[WorkItem]] = {}
        all_groups = set(range(self.algo.prompts_per_step))
        while True:
            try:
                msgs = await subscription.fetch(self.algo.prompts_per_step, timeout=FETCH_TIMEOUT_S)
            except TimeoutError:
                msgs = []
            for msg in msgs:
                item = self._receive(TRAINER.name, 0, msg)
                if item is not None:
                    held.setdefault(item.partition, []).append(item)
                await msg.ack()
            while {g for item in held.get(self.step, []) for g in item.groups} == all_groups:
                await self._finish_step(js, held.pop(self.step))

    async def _finish_step(self, js: Any, items: list[WorkItem]) -> None:
        step, version = self.step, self.step + 1
        sample_ids = sorted(sid for item in items for sid in item.sample_ids)
        weights = ChunkRef(column="weights", key=weights_key(RUN, version, 0), location=self.store, sample_ids=[])
        event = StepEvent(
            actor="sim-trainer-0", step=step, policy_version=version, sample_ids=sample_ids,
            sample_versions=[max(0, step - self.algo.max_staleness)] * len(sample_ids), failed_samples=0,
            reward_mean=0.5, loss=0.0, grad_norm=0.0, tokens=0, weights=weights, weights_nbytes=0,
        )
        await js.publish(self.names.done(TRAINER.name), event.encode(), headers={"Nats-Msg-Id": f"step-{step}"})
        self.records.trained[step] = time.time_ns()
        # param-sync: announce the new version, which admits the next partition.
        self.announced = version
        announcement = WeightsEvent(version=version, weights=weights, nbytes=0)
        await js.publish(self.names.weights, announcement.encode(), headers={"Nats-Msg-Id": f"weights-{version}"})
        async with self.stepped:
            self.step = version
            self.stepped.notify_all()


# -- figures ------------------------------------------------------------------------------------


def percentiles(values_ms: Sequence[float]) -> dict[str, float]:
    if not values_ms:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "max": math.nan}
    ordered = sorted(values_ms)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    return {"n": len(ordered), "p50": round(at(0.50), 3), "p99": round(at(0.99), 3), "max": round(ordered[-1], 3)}


def exactly_once(records: Records, config: Config) -> bool:
    """Every sample of every trained partition went to every stage exactly once."""
    algo = config.algorithm
    expected = Counter(sid for p in records.trained for g in range(algo.prompts_per_step)
                       for sid in group_sample_ids(p, g, algo.prompts_per_step, algo.samples_per_prompt))
    return all(
        Counter(sid for r in records.received if r.stage == stage and r.partition in records.trained
                for sid in r.sample_ids) == expected
        for stage in STAGES
    )


def trigger_ns(item: Received, records: Records, config: Config) -> int | None:
    """When the broker stored the event that made `item` ready; None if there was none (the
    partitions admitted at start) or it was not seen."""
    if item.stage == ROLLOUT.name:  # admitted by version p - k
        return records.weights_stored_ns.get(item.min_version) if item.min_version > 0 else None
    upstream = ROLLOUT.name if item.stage == REWARD.name else REWARD.name
    groups = item.groups
    if item.stage == TRAINER.name and config.algorithm.phase_barrier:
        groups = list(range(config.algorithm.prompts_per_step))  # the partition's last reward
    times = [records.done_stored_ns.get((upstream, item.partition, g)) for g in groups]
    known = [t for t in times if t is not None]
    return max(known) if known and len(known) == len(times) else None


def summarize(records: Records, config: Config, instances: int, mode: str, item_seconds: float,
              offered: float | None, window: tuple[int, int], cpu: dict[str, float]) -> Phase:
    start, end = window
    seconds = (end - start) / 1e9
    inside = [r for r in records.received if start <= r.stored_ns < end]
    samples = sum(len(r.sample_ids) for r in inside)
    triggers = {id(r): trigger_ns(r, records, config) for r in inside}

    def latency(items: list[Received], until: str) -> list[float]:
        return [(getattr(r, until) - t) / 1e6 for r in items if (t := triggers[id(r)]) is not None]

    stages = {}
    for stage in STAGES:
        mine = [r for r in inside if r.stage == stage]
        figures = percentiles(latency(mine, "stored_ns"))
        stages[stage] = {"samples_per_s": round(sum(len(r.sample_ids) for r in mine) / seconds, 1),
                         "p50_ms": figures["p50"], "p99_ms": figures["p99"], "n": figures["n"]}
    per_instance = Counter(r.worker for r in records.received
                           if r.stage == ROLLOUT.name and start <= r.received_ns < end)
    counts = [per_instance.get(i, 0) for i in range(instances)]
    thousands = max(samples, 1) / 1000
    return Phase(
        mode=mode, offered_samples_per_s=offered, item_seconds=round(item_seconds, 4),
        window_s=round(seconds, 3), items=len(inside), samples=samples, samples_per_s=round(samples / seconds, 1),
        steps_per_s=round(sum(1 for t in records.trained.values() if start <= t < end) / seconds, 2),
        latency_ms=percentiles(latency(inside, "stored_ns")),
        receive_latency_ms=percentiles(latency(inside, "received_ns")),
        stages=stages,
        scheduler_cpu_s_per_1000=round(cpu["scheduler"] / thousands, 4),
        scheduler_cores=round(cpu["scheduler"] / seconds, 3),
        broker_cpu_s_per_1000=round(cpu["broker"] / thousands, 4),
        harness_cpu_s_per_1000=round(cpu["harness"] / thousands, 4),
        instances_fed=sum(1 for n in counts if n > 0),
        items_per_instance={"min": min(counts), "median": statistics.median(counts), "max": max(counts)},
    )


# -- one instance count -------------------------------------------------------------------------


def run_scale(instances: int, *, seconds: float = 10.0, warmup_s: float = 2.0, rate: float | None = 10_000.0,
              capacity: bool = True, reward_workers: int = 16, prompts: int = 64, group: int = 8,
              max_staleness: int = 32, phase_barrier: bool = False, workdir: Path | None = None,
              profile: Path | None = None) -> tuple[ScaleResult, Records]:
    """One instance count from nothing: broker, store, topology, scheduler process, harness; then a
    paced window (`rate` samples/s offered, if given) and a capacity window (if `capacity`)."""
    with ExitStack() as cleanup:
        if workdir is None:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-scheduler-")))
        config = bench_config(workdir / f"n{instances}", prompts=prompts, group=group,
                              max_staleness=max_staleness, phase_barrier=phase_barrier)
        (config.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        prepare_inputs(config)
        services: list = []  # the launcher's restart handles: unused here, a dead broker fails the benchmark
        broker_url = start_broker(config, cleanup, services)
        stores = start_stores(config, cleanup, services)
        asyncio.run(set_up_run(config, broker_url, stores))
        (ports,) = (config.run_dir / "nats" / "ports").glob("*.ports")  # nats-server_<pid>.ports
        broker_pid = int(ports.stem.rsplit("_", 1)[1])
        scheduler = start_scheduler(config, broker_url, cleanup, profile)
        harness = Harness(config, broker_url, stores[0], instances, reward_workers)
        phases = asyncio.run(_measure(harness, scheduler, broker_pid, seconds, warmup_s, rate, capacity))
    records = harness.records
    result = ScaleResult(
        instances=instances, paced=phases.get("paced"), capacity=phases.get("capacity"),
        consumer_limits=records.consumer_limits, exactly_once=exactly_once(records, config),
        invalid_items=len(records.invalid), steps_trained=len(records.trained),
    )
    return result, records


async def _measure(harness: Harness, scheduler: subprocess.Popen, broker_pid: int, seconds: float,
                   warmup_s: float, rate: float | None, capacity: bool) -> dict[str, Phase]:
    config = harness.config

    def clocks() -> dict[str, float]:
        return {"scheduler": cpu_seconds(scheduler.pid), "broker": cpu_seconds(broker_pid),
                "harness": time.process_time()}

    async def window() -> tuple[tuple[int, int], dict[str, float]]:
        await asyncio.sleep(warmup_s)
        before, start = clocks(), time.time_ns()
        await asyncio.sleep(seconds)
        after, end = clocks(), time.time_ns()
        if harness.failure is not None:
            raise harness.failure
        if scheduler.poll() is not None:
            raise RuntimeError(f"the scheduler exited with code {scheduler.returncode} "
                               f"(see {config.run_dir / 'logs'})")
        return (start, end), {name: after[name] - before[name] for name in before}

    windows = {}
    # This process holds torch (imported by the tiny model's builder) and every record: a full GC
    # collection would pause the simulated instances for ~0.5 s. The harness makes few cycles.
    gc.freeze()
    gc.disable()
    await harness.start()
    try:
        if rate:
            # Each sample is dispatched once per stage, so `rate` dispatched samples/s are rate / 3
            # rollout samples/s: `busy` instances give that at busy x samples-per-item / item time.
            per_item = config.rollout.groups_per_item * config.algorithm.samples_per_prompt
            cap = harness.records.consumer_limits["max_ack_pending"] or -1
            busy = min(harness.instances, cap) if cap > 0 else harness.instances
            harness.item_seconds = busy * per_item * len(STAGES) / rate
        try:
            await harness.wait_for_step(0, START_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"no step trained within {START_TIMEOUT_S} s; scheduler exit code "
                               f"{scheduler.poll()} (see {config.run_dir / 'logs'})") from None
        # Paced first: the capacity window leaves a backlog of up to max_staleness + 1 partitions.
        if rate:
            windows["paced"] = (harness.item_seconds, rate, *await window())
        harness.item_seconds = 0.0
        if capacity:
            windows["capacity"] = (0.0, None, *await window())
        # An item is timed by the broker's timestamp, which the harness learns when it takes the
        # item: let the (now instant) instances take what was dispatched in the windows.
        await harness.drain(DRAIN_TIMEOUT_S)
    finally:
        await harness.stop()
        gc.enable()
        gc.unfreeze()
    return {mode: summarize(harness.records, config, harness.instances, mode, item_seconds, offered, span, cpu)
            for mode, (item_seconds, offered, span, cpu) in windows.items()}


# -- report -------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpu": model, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def format_table(results: Sequence[ScaleResult], settings: dict[str, Any]) -> str:
    s = settings
    limits = results[0].consumer_limits if results else {}
    lines = [
        f"scheduler scale: {s['prompts']} prompts x {s['group']} samples per step, 1 group per work item, "
        f"max_staleness {s['max_staleness']}, phase_barrier {s['phase_barrier']}, {s['reward_workers']} reward "
        f"workers; rollout consumer max_ack_pending {limits.get('max_ack_pending')}, "
        f"max_waiting {limits.get('max_waiting')}",
        f"windows of {s['seconds']} s after {s['warmup_s']} s each. paced: {s['rate']:.0f} dispatched samples/s "
        "offered; capacity: every stage answers at once",
        "latency (paced): trigger event stored -> work item stored, broker clock; "
        "CPU (paced): seconds per 1000 dispatched samples; sched cores: paced/capacity",
        "",
        f"{'instances':>9} {'paced/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'capacity/s':>10} "
        f"{'sched CPU':>9} {'broker CPU':>10} {'harness CPU':>11} {'sched cores':>11} {'fed':>9} {'once':>5}",
    ]

    for r in results:
        paced, full = r.paced, r.capacity
        row = [f"{r.instances:>9}"]
        if paced is not None:
            lat = paced.latency_ms
            row += [f"{paced.samples_per_s:>8.0f} {lat['p50']:>7.2f} {lat['p99']:>7.2f} {lat['max']:>7.1f}"]
        else:
            row += [f"{'-':>8} {'-':>7} {'-':>7} {'-':>7}"]
        row += [f"{full.samples_per_s:>10.0f}" if full is not None else f"{'-':>10}"]
        if paced is not None:
            row += [f"{paced.scheduler_cpu_s_per_1000:>9.4f} {paced.broker_cpu_s_per_1000:>10.4f} "
                    f"{paced.harness_cpu_s_per_1000:>11.4f}"]
        else:
            row += [f"{'-':>9} {'-':>10} {'-':>11}"]
        cores = "/".join(f"{p.scheduler_cores:.2f}" if p is not None else "-" for p in (paced, full))
        fed = f"{paced.instances_fed}/{r.instances}" if paced is not None else "-"
        row += [f"{cores:>11} {fed:>9} {'yes' if r.exactly_once and not r.invalid_items else 'NO':>5}"]
        lines.append(" ".join(row))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduler_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--seconds", type=float, default=10.0, help="each measured window")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each window, not measured")
    parser.add_argument("--rate", type=float, default=10_000.0,
                        help="dispatched samples/s the paced window offers (0: no paced window)")
    parser.add_argument("--no-capacity", action="store_true", help="skip the capacity window")
    parser.add_argument("--reward-workers", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=64, help="prompts (GRPO groups) per step")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-staleness", type=int, default=32,
                        help="(k + 1) x prompts rollout items are admitted at once: enough for every instance")
    parser.add_argument("--phase-barrier", action="store_true", help="baseline mode (use with --max-staleness 0)")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the scheduler into DIR/n<N>.prof")
    parser.add_argument("--json", type=Path, default=Path("runs/bench-scheduler/scheduler.json"))
    args = parser.parse_args(argv)
    settings = {"prompts": args.prompts, "group": args.group, "max_staleness": args.max_staleness,
                "phase_barrier": args.phase_barrier, "reward_workers": args.reward_workers,
                "seconds": args.seconds, "warmup_s": args.warmup, "rate": args.rate}
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    results = []
    for instances in args.instances:
        profile = args.profile.resolve() / f"n{instances}.prof" if args.profile is not None else None
        result, _ = run_scale(instances, seconds=args.seconds, warmup_s=args.warmup, rate=args.rate,
                              capacity=not args.no_capacity, reward_workers=args.reward_workers,
                              prompts=args.prompts, group=args.group, max_staleness=args.max_staleness,
                              phase_barrier=args.phase_barrier, profile=profile)
        results.append(result)
        print(f"{instances} instances done", file=sys.stderr, flush=True)
    print(format_table(results, settings), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.scheduler_scale", *(argv if argv is not None else sys.argv[1:])])
    report = {"command": command, "settings": settings, "machine": machine_info(),
              "results": [asdict(r) for r in results]}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r.exactly_once and not r.invalid_items for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
