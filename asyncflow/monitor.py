"""Follows a run from the outside: step events and busy spans in, `metrics.jsonl` and progress out.

It is what the launcher waits on. It also notices when a run cannot finish: an actor process
that exited, no optimizer step for `stall_timeout_s` (the error names the stages with pending
work), or the run's overall timeout.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from asyncflow.config import Config
from asyncflow.errors import RunError, WireError
from asyncflow.graph import WORK_STAGES
from asyncflow.logs import get_logger
from asyncflow.report import utilisation
from asyncflow.wire import DeadLetter, MetricsEvent, StepEvent, decode
from broker import RunNames, connect


@dataclass
class ActorProcess:
    role: str
    instance: int
    process: subprocess.Popen[bytes]
    console_log: Path

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

    def add_span(self, span: MetricsEvent) -> None:
        self.busy[span.stage] += span.end - span.start

    def add_step(self, event: StepEvent) -> dict[str, Any]:
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
        self.spans: list[MetricsEvent] = []
        self.peak_rss_mb: dict[str, float] = {}
        self.actor_roles: dict[str, str] = {}
        """Actor name → role for every process the launcher started, busy or not."""
        self.dead_letters: dict[str, int] = {}
        """Stage → work items moved to its dead-letter subject during the run."""


def summarize(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """summary.json: totals plus mean reward over the first and last 10% of steps.

    From `MonitoredRows` it also gives `started_at` (unix seconds), `busy_fraction` per stage (busy
    seconds / (wall_s × instances of the stage), each actor's overlapping spans counted once),
    `peak_rss_mb` per actor and `dead_letters` per stage.
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
        used = utilisation(rows.spans, rows.started, rows.started + wall_s, rows.actor_roles)
        summary["started_at"] = round(rows.started, 3)
        summary["busy_fraction"] = {stage: round(f, 4) for stage, f in sorted(used.stage_fraction.items())}
        summary["peak_rss_mb"] = dict(sorted(rows.peak_rss_mb.items()))
        summary["dead_letters"] = dict(sorted(rows.dead_letters.items()))
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


class Monitor:
    def __init__(self, config: Config, nats_url: str, processes: list[ActorProcess], started: float) -> None:
        self.config = config
        self.nats_url = nats_url
        self.processes = processes
        self.names = RunNames(config.run.name)
        self.record = MonitoredRows(started)
        self.record.actor_roles = {actor.name: actor.role for actor in processes}
        self.writer = MetricsWriter(config.run_dir / "metrics.jsonl", started, rows=self.record)
        self.spans_path = config.run_dir / "spans.jsonl"
        self.started = started
        self.finished = asyncio.Event()
        self.log = get_logger(run=config.run.name, actor="launcher")

    async def watch(self) -> MonitoredRows:
        # Line-buffered and truncated: a run that fails still leaves its spans, and a run dir
        # reused for a new run does not mix in the old one's.
        with self.spans_path.open("w", buffering=1) as self._spans_file:
            nc = await connect(self.nats_url, name="asyncflow-launcher")
            try:
                js = nc.jetstream(timeout=self.config.broker.request_timeout_s)
                await nc.subscribe(f"{self.names.prefix}.metrics.>", cb=self._on_metrics)
                await js.subscribe(self.names.done("trainer"), stream=self.names.events_stream,
                                   ordered_consumer=True, cb=self._on_step, manual_ack=True)
                await js.subscribe(f"{self.names.prefix}.dead.>", stream=self.names.events_stream,
                                   ordered_consumer=True, cb=self._on_dead, manual_ack=True)
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
        self.record.spans.append(span)
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

    async def _on_step(self, msg: Msg) -> None:
        try:
            event = decode(StepEvent, msg.data, msg.subject)
        except WireError as error:
            self.log.error("bad step event", error=str(error))
            return
        row = self.writer.add_step(event)
        self._progress(row)
        if event.final:
            self.finished.set()

    def _progress(self, row: dict[str, Any]) -> None:
        reward = "n/a" if row["reward_mean"] is None else f"{row['reward_mean']:.3f}"
        busy = " ".join(f"{stage} {seconds:.1f}s" for stage, seconds in row["busy_s"].items())
        line = (f"step {row['step'] + 1}/{self.config.run.steps}  reward {reward}  "
                f"samples/s {row['samples_per_s']}  staleness<={row['staleness_max']}  "
                f"failed {row['failed_samples']}  busy[{busy}]")
        print(line, file=sys.stdout, flush=True)
        self.log.debug("step", **row)  # the JSON log keeps it; the console has the line above

    async def _wait(self, js: Any) -> None:
        deadline = self.started + self.config.run.timeout_s
        while not self.finished.is_set():
            self._sample_memory()
            for actor in self.processes:
                code = actor.process.poll()
                if code is not None:
                    raise RunError(
                        f"actor {actor.name} (pid {actor.process.pid}) exited with code {code}; "
                        f"last lines of {actor.console_log}:\n{actor.tail()}"
                    )
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.finished.wait(), timeout=0.5)

    async def _pending_work(self, js: Any) -> dict[str, str]:
        pending = {}
        for stage in WORK_STAGES:
            try:
                info = await js.consumer_info(self.names.work_stream, RunNames.consumer(stage))
                pending[stage] = f"{info.num_pending} queued, {info.num_ack_pending} in progress"
            except Exception as error:
                pending[stage] = f"unknown ({error})"
        return pending
