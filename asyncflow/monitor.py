"""Follows a run from the outside: step events and busy spans in, `metrics.jsonl` and progress out.

It is what the launcher waits on. It also notices when a run cannot finish: an actor process
that exited, no optimizer step for `stall_timeout_s` (the error names the stages with pending
work), or the run's overall timeout.
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
from asyncflow.wire import MetricsEvent, StepEvent, decode
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


def summarize(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """summary.json: totals plus mean reward over the first and last 10% of steps."""
    steps = len(rows)
    window = max(1, round(steps * 0.1))
    rewards = [r["reward_mean"] for r in rows]

    def mean_of(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    samples = sum(r["samples"] for r in rows)
    return {
        "steps": steps,
        "samples": samples,
        "wall_s": round(wall_s, 3),
        "samples_per_s": round(samples / wall_s, 3) if wall_s > 0 else None,
        "reward_first": mean_of(rewards[:window]),
        "reward_last": mean_of(rewards[-window:]),
        "max_staleness_seen": max((r["staleness_max"] for r in rows), default=0),
        "failed_samples": sum(r["failed_samples"] for r in rows),
    }


class Monitor:
    def __init__(self, config: Config, nats_url: str, processes: list[ActorProcess], started: float) -> None:
        self.config = config
        self.nats_url = nats_url
        self.processes = processes
        self.names = RunNames(config.run.name)
        self.writer = MetricsWriter(config.run_dir / "metrics.jsonl", started)
        self.started = started
        self.finished = asyncio.Event()
        self.log = get_logger(run=config.run.name, actor="launcher")

    async def watch(self) -> list[dict[str, Any]]:
        nc = await connect(self.nats_url, name="asyncflow-launcher")
        try:
            js = nc.jetstream(timeout=self.config.broker.request_timeout_s)
            await nc.subscribe(f"{self.names.prefix}.metrics.>", cb=self._on_metrics)
            await js.subscribe(self.names.done("trainer"), stream=self.names.events_stream,
                               ordered_consumer=True, cb=self._on_step, manual_ack=True)
            await self._wait(js)
            return self.writer.rows
        finally:
            await nc.close()

    async def _on_metrics(self, msg: Msg) -> None:
        try:
            self.writer.add_span(decode(MetricsEvent, msg.data, msg.subject))
        except WireError as error:
            self.log.warning("bad metrics message", error=str(error))

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
