"""Follows a run from the outside: step events and busy spans in, `metrics.jsonl` and progress out.

It is what the launcher waits on. It also supervises: a child process of the launcher (actor,
embedded broker, Flight store) that exits is restarted (`run.restart_actors`, at most
`run.max_restarts` times each), and every actor's heartbeat in the run's KV bucket is watched, also
of actors started by hand on other hosts: one silent for `broker.heartbeat_timeout_s` is reported
dead (role, instance, host, pid) and counted. The run stops with an error when it cannot finish: a
process that may not be restarted exits, a stage has no live actor for
`run.missing_stage_timeout_s` (the error names the stage), no optimizer step for
`stall_timeout_s` (the error names the stages with pending work), or the run's overall timeout.

Besides the per-step rows it keeps what `asyncflow report` draws: every busy span, appended to
`spans.jsonl` as it arrives, and each actor process's peak resident memory (VmHWM), sampled
while it waits. `summarize` turns those into `busy_fraction` and `peak_rss_mb` in summary.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from asyncflow.config import Config
from asyncflow.errors import RunError, TrainerLostError, WireError
from asyncflow.graph import WORK_STAGES
from asyncflow.logs import get_logger
from asyncflow.metrics_sinks import MetricsSinks
from asyncflow.progress import make_progress
from asyncflow.report import iter_spans, utilisation
from asyncflow.wire import DeadLetter, Heartbeat, LostEvent, MetricsEvent, StepEvent, decode
from broker import RunNames, connect
from broker.connection import ORDERED_HEARTBEAT_S

ACTOR_ROLES = ("scheduler", "param_sync", "reward", "trainer", "rollout")
"""Every role a run needs at least one live actor of."""
NOT_RESTARTED = {"trainer": "a restarted trainer process would start again from step 0: with "
                            "trainer.checkpoint_every > 0 the launcher restarts the whole run from the newest "
                            "checkpoint instead (or by hand: `asyncflow run --resume RUN_DIR`)"}
"""Roles whose process the launcher does not restart on its own, and why."""


@dataclass
class ActorProcess:
    """A child process of the launcher: an actor, or a service (role `broker` or `store`)."""

    role: str
    instance: int
    process: subprocess.Popen[bytes]
    console_log: Path
    restart: Callable[[], subprocess.Popen[bytes]] | None = None
    """Starts the process again (blocking until it serves) and returns it; None: never restarted."""
    restarts: int = 0
    address: str = ""
    """Where a service serves (the broker's URL, a store's location); empty for actors."""

    @property
    def name(self) -> str:
        return f"{self.role}-{self.instance}"

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class MetricsWriter:
    """Turns step events + busy spans into one metrics.jsonl line per step."""

    path: Path
    started: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    busy: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    last_step_time: float = 0.0
    last_step: int = -1
    """The newest step with a row: a step event at or below it (a replay) adds nothing."""

    def keep_existing(self) -> None:
        """Take the rows already in `path` (a restarted `asyncflow follow`): the EVENTS stream is
        compacted, so their step events may be gone and the file is the only record of them."""
        if not self.path.exists():
            return
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill mid-write
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > self.last_step:
                self.rows.append(row)
                self.last_step = row["step"]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))

    def add_span(self, span: MetricsEvent) -> None:
        self.busy[span.stage] += span.end - span.start

    def add_step(self, event: StepEvent) -> dict[str, Any] | None:
        """The step's row, appended to `path`; None for a step that already has one."""
        if event.step <= self.last_step:
            return None
        self.last_step = event.step
        now = time.time()
        since = now - (self.last_step_time or self.started)
        self.last_step_time = now
        staleness = [event.step - v for v in event.sample_versions]
        row = {
            "step": event.step,
            "policy_version": event.policy_version,
            "time_s": round(now - self.started, 3),
            "samples": len(event.sample_ids),
            "failed_samples": event.failed_samples,
            "reward_mean": event.reward_mean,
            "loss": event.loss,
            "grad_norm": event.grad_norm,
            "tokens": event.tokens,
            "samples_per_s": round(len(event.sample_ids) / since, 3) if since > 0 else None,
            "staleness_max": max(staleness, default=0),
            "staleness_mean": round(sum(staleness) / len(staleness), 4) if staleness else 0.0,
            "busy_s": {stage: round(seconds, 4) for stage, seconds in sorted(self.busy.items())},
        }
        self.busy = defaultdict(float)
        self.rows.append(row)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        return row


class MonitoredRows(list[dict[str, Any]]):
    """The metrics.jsonl rows of a run, plus what the monitor saw besides steps.

    `Monitor.watch` returns this and the launcher hands it unchanged to `summarize`, so the extra
    facts reach summary.json without widening the launcher's one-line hand-over. A plain list of
    rows still summarizes (without busy fractions or memory).
    """

    def __init__(self, started: float) -> None:
        super().__init__()
        self.started = started
        self.spans_path: Path | None = None
        """The run's spans.jsonl, which the monitor appends every busy span to: read back once for
        the busy fractions, so that a long run's spans never sit in the launcher's memory."""
        self.peak_rss_mb: dict[str, float] = {}
        self.actor_roles: dict[str, str] = {}
        """Actor name → role for every process the launcher started, busy or not."""
        self.dead_letters: dict[str, int] = {}
        """Stage → work items moved to its dead-letter subject during the run."""
        self.lost_inputs: dict[str, int] = {}
        """Stage → work items it reported on `lost.<stage>`: inputs gone with a store (re-issued)."""
        self.restarts: dict[str, int] = {}
        """Process name (`rollout-1`, `broker-0`, `store-0`) → times the launcher restarted it."""
        self.dead_actors: dict[str, int] = {}
        """Actor id → times its heartbeat went silent for `broker.heartbeat_timeout_s`."""


def summarize(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """summary.json: totals plus mean reward over the first and last 10% of steps.

    From `MonitoredRows` it also gives `started_at` (unix seconds), `busy_fraction` per stage (busy
    seconds / (wall_s × instances of the stage), each actor's overlapping spans counted once),
    `peak_rss_mb` per actor, `dead_letters` per stage, `lost_inputs` per stage (items whose input
    chunks a store lost, re-issued by the scheduler), `restarts` per process and `dead_actors`
    (heartbeats that went silent) per actor.
    """
    steps = len(rows)
    window = max(1, round(steps * 0.1))
    rewards = [r["reward_mean"] for r in rows]

    def mean_of(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    samples = sum(r["samples"] for r in rows)
    summary: dict[str, Any] = {
        "steps": steps,
        "samples": samples,
        "wall_s": round(wall_s, 3),
        "samples_per_s": round(samples / wall_s, 3) if wall_s > 0 else None,
        "reward_first": mean_of(rewards[:window]),
        "reward_last": mean_of(rewards[-window:]),
        "max_staleness_seen": max((r["staleness_max"] for r in rows), default=0),
        "failed_samples": sum(r["failed_samples"] for r in rows),
    }
    if isinstance(rows, MonitoredRows):
        spans = iter_spans(rows.spans_path) if rows.spans_path is not None and rows.spans_path.is_file() else []
        used = utilisation(spans, rows.started, rows.started + wall_s, rows.actor_roles)
        summary["started_at"] = round(rows.started, 3)
        summary["busy_fraction"] = {stage: round(f, 4) for stage, f in sorted(used.stage_fraction.items())}
        summary["peak_rss_mb"] = dict(sorted(rows.peak_rss_mb.items()))
        summary["dead_letters"] = dict(sorted(rows.dead_letters.items()))
        summary["lost_inputs"] = dict(sorted(rows.lost_inputs.items()))
        summary["restarts"] = dict(sorted(rows.restarts.items()))
        summary["dead_actors"] = dict(sorted(rows.dead_actors.items()))
    return summary


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident set size of process `pid` in MB (10^6 bytes), from /proc/<pid>/status;
    None where there is no such process or no /proc (not Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):  # "VmHWM:     123456 kB"
            return round(int(line.split()[1]) * 1024 / 1e6, 1)
    return None  # a zombie keeps its status file but no memory lines


@dataclass
class _Beat:
    """The last heartbeat seen of one actor, and when (monitor clock) its KV revision last changed:
    comparing revisions, not the actor's own timestamps, keeps other hosts' clocks out of it."""

    beat: Heartbeat
    revision: int
    changed: float
    dead: bool = False


class Monitor:
    def __init__(self, config: Config, nats_url: str, processes: list[ActorProcess], started: float,
                 services: list[ActorProcess] | None = None, on_restart: Callable[[], None] | None = None,
                 keep_metrics: bool = False) -> None:
        self.config = config
        self.nats_url = nats_url
        self.processes = processes
        self.services = services or []
        """The embedded broker and launched stores: supervised like actors, not counted as actors."""
        self.on_restart = on_restart
        """Called after each restart (the launcher rewrites actors.json with the new pid)."""
        self.beats: dict[str, _Beat] = {}
        self.missing_since: dict[str, float] = {}
        self._next_heartbeat_check = 0.0
        self.names = RunNames(config.run.name)
        self.record = MonitoredRows(started)
        self.record.actor_roles = {actor.name: actor.role for actor in processes}
        self.writer = MetricsWriter(config.run_dir / "metrics.jsonl", started, rows=self.record)
        if keep_metrics:
            self.writer.keep_existing()
        self.spans_path = self.record.spans_path = config.run_dir / "spans.jsonl"
        self.started = started
        self.finished = asyncio.Event()
        self.log = get_logger(run=config.run.name, actor="launcher")
        # Live panel on a terminal, a line per step elsewhere (asyncflow/progress.py, run.progress).
        self.progress = make_progress(config, self.record, started)

    async def watch(self) -> MonitoredRows:
        # Line-buffered and truncated: a run that fails still leaves its spans, and a run dir
        # reused for a new run does not mix in the old one's. TensorBoard / wandb: metrics_sinks.py.
        with (self.spans_path.open("w", buffering=1) as self._spans_file, MetricsSinks(self.config) as self.sinks,
              self.progress):
            nc = await connect(self.nats_url, name="asyncflow-launcher", security=self.config.security)
            try:
                js = nc.jetstream(timeout=self.config.broker.request_timeout_s)
                await nc.subscribe(f"{self.names.prefix}.metrics.>", cb=self._on_metrics)
                await js.subscribe(self.names.done("trainer"), stream=self.names.events_stream,
                                   ordered_consumer=True, idle_heartbeat=ORDERED_HEARTBEAT_S, cb=self._on_step, manual_ack=True)
                await js.subscribe(f"{self.names.prefix}.dead.>", stream=self.names.events_stream,
                                   ordered_consumer=True, idle_heartbeat=ORDERED_HEARTBEAT_S, cb=self._on_dead, manual_ack=True)
                await js.subscribe(f"{self.names.prefix}.lost.>", stream=self.names.events_stream,
                                   ordered_consumer=True, idle_heartbeat=ORDERED_HEARTBEAT_S, cb=self._on_lost, manual_ack=True)
                await self._wait(js)
                self._sample_memory()
                # Spans travel on core NATS (no replay): a round trip to the server and a short
                # yield let the ones already on their way reach _on_metrics before we disconnect.
                with contextlib.suppress(Exception):
                    await nc.flush(timeout=self.config.broker.request_timeout_s)
                await asyncio.sleep(0.1)
                return self.record
            finally:
                await nc.close()

    async def _on_metrics(self, msg: Msg) -> None:
        try:
            span = decode(MetricsEvent, msg.data, msg.subject)
        except WireError as error:
            self.log.warning("bad metrics message", error=str(error))
            return
        self.writer.add_span(span)
        self._spans_file.write(span.model_dump_json() + "\n")

    def _sample_memory(self) -> None:
        """Keep each actor's peak RSS; VmHWM is the kernel's own high-water mark, so sampling
        every half second misses no peak, only the last moments of a process that is stopping."""
        for actor in self.processes:
            peak = peak_rss_mb(actor.process.pid)
            if peak is not None:
                self.record.peak_rss_mb[actor.name] = max(peak, self.record.peak_rss_mb.get(actor.name, 0.0))

    async def _on_dead(self, msg: Msg) -> None:
        try:
            letter = decode(DeadLetter, msg.data, msg.subject)
        except WireError as error:
            self.log.error("bad dead letter", error=str(error))
            return
        self.record.dead_letters[letter.stage] = self.record.dead_letters.get(letter.stage, 0) + 1
        line = (f"dead letter at {letter.stage} after {letter.deliveries} deliveries: "
                f"{letter.item_id or 'unreadable message'}: {letter.reason[:300]}")
        print(line, file=sys.stdout, flush=True)
        self.log.warning("dead letter", stage=letter.stage, item=letter.item_id, deliveries=letter.deliveries,
                         reason=letter.reason)

    async def _on_lost(self, msg: Msg) -> None:
        try:
            event = decode(LostEvent, msg.data, msg.subject)
        except WireError as error:
            self.log.error("bad lost event", error=str(error))
            return
        self.record.lost_inputs[event.stage] = self.record.lost_inputs.get(event.stage, 0) + 1
        self.log.warning("inputs lost with a store", stage=event.stage, item=event.item_id,
                         lost=[ref.key for ref in event.lost])

    async def _on_step(self, msg: Msg) -> None:
        try:
            event = decode(StepEvent, msg.data, msg.subject)
        except WireError as error:
            self.log.error("bad step event", error=str(error))
            return
        row = self.writer.add_step(event)
        if row is None:
            return  # replayed (a restarted follow, a re-sent event): its row is written
        self._progress(row)
        self.sinks.write(row)
        if event.final:
            self.finished.set()

    def _progress(self, row: dict[str, Any]) -> None:
        self.progress.step(row)
        self.log.debug("step", **row)  # the JSON log keeps it; the console has the progress

    async def _wait(self, js: Any) -> None:
        deadline = self.started + self.config.run.timeout_s
        while not self.finished.is_set():
            self._sample_memory()
            for child in (*self.services, *self.processes):
                code = child.process.poll()
                if code is not None:
                    await self._restart_or_fail(child, code)
            if time.monotonic() >= self._next_heartbeat_check:
                self._next_heartbeat_check = time.monotonic() + self.config.broker.heartbeat_s
                await self._check_heartbeats(js)
            now = time.time()
            last = self.writer.last_step_time or self.started
            if now - last > self.config.run.stall_timeout_s:
                pending = await self._pending_work(js)
                raise RunError(
                    f"no optimizer step for {self.config.run.stall_timeout_s:.0f} s; "
                    f"work pending per stage: {pending}; check the logs of the stages with pending work"
                )
            if now > deadline:
                raise RunError(f"run timeout of {self.config.run.timeout_s:.0f} s reached "
                               f"after {len(self.writer.rows)} of {self.config.run.steps} steps")
            await self.progress.poll(js)  # the live panel's queue depths and clock; nothing in plain mode
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.finished.wait(), timeout=0.5)

    async def _restart_or_fail(self, child: ActorProcess, code: int) -> None:
        """A child exited before the run is over: start it again, or fail the run naming it."""
        what = f"{child.name} (pid {child.process.pid}) exited with code {code}"
        run = self.config.run
        why_not = None
        if not run.restart_actors:
            why_not = "run.restart_actors is false"
        elif child.restart is None or child.role in NOT_RESTARTED:
            why_not = NOT_RESTARTED.get(child.role, "it cannot be restarted")
        elif child.restarts >= run.max_restarts:
            why_not = f"it was restarted run.max_restarts={run.max_restarts} times already"
        if why_not is not None:
            if child.role == "trainer" and run.restart_actors and self.config.trainer.checkpoint_every > 0:
                raise TrainerLostError(f"{what}; last lines of {child.console_log}:\n{child.tail()}")
            raise RunError(f"{what}; not restarted: {why_not}; last lines of {child.console_log}:\n{child.tail()}")
        child.restarts += 1
        self.record.restarts[child.name] = child.restarts
        print(f"{what}; restarting it ({child.restarts}/{run.max_restarts})", file=sys.stdout, flush=True)
        self.log.warning("process exited, restarting", process=child.name, role=child.role, pid=child.process.pid,
                         code=code, restart=child.restarts, max_restarts=run.max_restarts)
        assert child.restart is not None
        child.process = await asyncio.to_thread(child.restart)
        self.log.info("process restarted", process=child.name, pid=child.process.pid)
        if self.on_restart is not None:
            self.on_restart()

    async def _read_heartbeats(self, js: Any) -> dict[str, tuple[Heartbeat, int]]:
        """Actor id → (its heartbeat, the entry's KV revision), for every actor registered in the run."""
        kv = await js.key_value(self.names.kv_bucket)
        watcher = await kv.watch("actors.>", ignore_deletes=True)
        found: dict[str, tuple[Heartbeat, int]] = {}
        try:
            while True:
                entry = await watcher.updates(timeout=self.config.broker.request_timeout_s)
                if entry is None:  # the watcher's marker: every current value has been delivered
                    return found
                try:
                    beat = decode(Heartbeat, entry.value or b"", f"{self.names.kv_bucket}.{entry.key}")
                except WireError as error:
                    self.log.warning("bad heartbeat entry ignored", error=str(error))
                    continue
                found[beat.actor] = (beat, entry.revision or 0)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _check_heartbeats(self, js: Any) -> None:
        """Report actors whose heartbeat went silent and fail the run when a stage has had no live
        actor for `run.missing_stage_timeout_s`. Covers actors the launcher did not start."""
        try:
            current = await self._read_heartbeats(js)
        except Exception as error:  # the broker may be restarting: judge nobody on a failed read
            self.log.warning("heartbeats unreadable", error=f"{type(error).__name__}: {error}")
            return
        now = time.monotonic()
        timeout = self.config.broker.heartbeat_timeout_s
        for actor, (beat, revision) in current.items():
            known = self.beats.get(actor)
            if known is None or known.revision != revision:
                if known is not None and known.dead:
                    print(f"actor {actor} is alive again (host {beat.host}, pid {beat.pid})", flush=True)
                    self.log.info("actor alive again", actor=actor, role=beat.role, host=beat.host, pid=beat.pid)
                self.beats[actor] = _Beat(beat, revision, now)
        live_roles = set()
        for actor, seen in self.beats.items():
            silent = now - seen.changed
            if seen.beat.state == "stopping":
                continue  # it left on purpose; it neither counts as live nor as dead
            if silent <= timeout:
                live_roles.add(seen.beat.role)
            elif not seen.dead:
                seen.dead = True
                self.record.dead_actors[actor] = self.record.dead_actors.get(actor, 0) + 1
                beat = seen.beat
                print(f"actor {actor} (role {beat.role}, host {beat.host}, pid {beat.pid}) presumed dead: "
                      f"no heartbeat for {silent:.0f} s (broker.heartbeat_timeout_s={timeout:g})", flush=True)
                self.log.error("actor presumed dead", actor=actor, role=beat.role, host=beat.host, pid=beat.pid,
                               silent_s=round(silent, 1), last_state=beat.state)
        for role in ACTOR_ROLES:
            if role in live_roles:
                self.missing_since.pop(role, None)
                continue
            since = self.missing_since.setdefault(role, now)
            limit = self.config.run.missing_stage_timeout_s
            if not any(b.beat.role == role for b in self.beats.values()):
                # Never registered yet: actors may take long to start (imports, model loads), so a
                # role is given the stall timeout too before it counts as missing.
                limit = max(limit, self.config.run.stall_timeout_s)
            if now - since > limit:
                last = [f"{a} (host {b.beat.host}, pid {b.beat.pid}, last heartbeat {now - b.changed:.0f} s ago, "
                        f"state {b.beat.state})" for a, b in sorted(self.beats.items()) if b.beat.role == role]
                raise RunError(
                    f"stage {role!r} has had no live actor for {now - since:.0f} s "
                    f"(run.missing_stage_timeout_s={self.config.run.missing_stage_timeout_s:g}); "
                    f"last seen: {', '.join(last) or 'never registered'}; start one with "
                    f"`asyncflow actor {role} --config {self.config.run_dir / 'config.yaml'} --nats {self.nats_url}`"
                )

    async def _pending_work(self, js: Any) -> dict[str, str]:
        pending = {}
        for stage in WORK_STAGES:
            try:
                info = await js.consumer_info(self.names.work_stream, RunNames.consumer(stage))
                pending[stage] = f"{info.num_pending} queued, {info.num_ack_pending} in progress"
            except Exception as error:
                pending[stage] = f"unknown ({error})"
        return pending
