"""Progress of `asyncflow run` on stdout: a live rich panel on a terminal, one plain line per step elsewhere.

The launcher's monitor owns one `Progress` (from `make_progress`) and calls `step(row)` with every
metrics.jsonl row and `await poll(js)` from its wait loop (every ~0.5 s).

- `plain` (not a terminal: CI, pipes, files; or `run.progress: plain`): each step prints the line
  `plain_line` makes, as `asyncflow run` always did; `poll` does nothing.
- `rich` (a terminal; or `run.progress: rich`): the same lines scroll by above a live panel with
  step / total, elapsed time, samples/s, reward, loss, staleness against its bound, queue depth per
  work stage (the stage's JetStream consumer: queued and in-progress items, read at most every
  `QUEUE_POLL_S`), dead letters, restarts and silent actors. Everything happens on the monitor's
  event-loop thread (no auto-refresh thread), so the panel reads the monitor's counters without locks.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from asyncflow.config import Config
from asyncflow.graph import WORK_STAGES
from broker import RunNames

QUEUE_POLL_S = 2.0
"""Queue depth is read from the broker at most this often (one consumer-info request per stage)."""


class RunCounters(Protocol):
    """What the monitor counts besides steps (asyncflow.monitor.MonitoredRows has these)."""

    dead_letters: dict[str, int]
    restarts: dict[str, int]
    dead_actors: dict[str, int]


@dataclass(frozen=True)
class QueueDepth:
    """One work stage's durable consumer: items waiting and items delivered but not yet acked."""

    queued: int
    in_progress: int


def plain_line(row: Mapping[str, Any], total_steps: int) -> str:
    """The one-line summary of a metrics.jsonl row that `asyncflow run` prints per step."""
    reward = "n/a" if row["reward_mean"] is None else f"{row['reward_mean']:.3f}"
    busy = " ".join(f"{stage} {seconds:.1f}s" for stage, seconds in row["busy_s"].items())
    return (f"step {row['step'] + 1}/{total_steps}  reward {reward}  "
            f"samples/s {row['samples_per_s']}  staleness<={row['staleness_max']}  "
            f"failed {row['failed_samples']}  busy[{busy}]")


async def queue_depth(js: Any, names: RunNames, timeout_s: float) -> dict[str, QueueDepth | None]:
    """Stage → its work consumer's depth; None for a stage whose consumer could not be read (the
    broker restarting, the run not set up yet): the panel shows `?` rather than stale numbers."""
    async def one(stage: str) -> QueueDepth | None:
        try:
            info = await asyncio.wait_for(js.consumer_info(names.work_stream, RunNames.consumer(stage)), timeout_s)
        except Exception:  # any failure means "unknown right now"; the next poll tries again
            return None
        return QueueDepth(queued=info.num_pending or 0, in_progress=info.num_ack_pending or 0)

    depths = await asyncio.gather(*(one(stage) for stage in WORK_STAGES))
    return dict(zip(WORK_STAGES, depths, strict=True))


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items()) if n) or "none"


@dataclass
class ProgressView:
    """What the live panel shows; `render` draws it (also usable without a terminal, e.g. in tests)."""

    run: str
    total_steps: int
    max_staleness: int
    started: float
    """Unix seconds the run started (elapsed time is counted from it)."""
    row: Mapping[str, Any] | None = None
    """The newest metrics.jsonl row; None before the first step."""
    queues: dict[str, QueueDepth | None] = field(default_factory=dict)
    counters: RunCounters | None = None

    def render(self, now: float | None = None) -> RenderableType:
        now = time.time() if now is None else now
        row = self.row or {}
        done = row["step"] + 1 if row else 0
        elapsed = max(now - self.started, 0.0)
        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold")
        head.add_column()
        bar = ProgressBar(total=self.total_steps, completed=done, width=30)
        head.add_row("step", Group(Text(f"{done}/{self.total_steps}  ({elapsed:.0f} s elapsed)"), bar))
        head.add_row("samples/s", _number(row.get("samples_per_s"), 2))
        head.add_row("reward", f"{_number(row.get('reward_mean'))}  (loss {_number(row.get('loss'), 4)}, "
                               f"grad norm {_number(row.get('grad_norm'), 3)})")
        head.add_row("staleness", f"max {_number(row.get('staleness_max'))}, mean "
                                  f"{_number(row.get('staleness_mean'), 2)}  (bound {self.max_staleness})")
        head.add_row("failed samples", _number(row.get("failed_samples")))

        queues = Table(title="work queues", title_justify="left", expand=False)
        for name in ("stage", "queued", "in progress", "busy s (last step)"):
            queues.add_column(name, justify="left" if name == "stage" else "right")
        busy = row.get("busy_s", {})
        for stage in WORK_STAGES:
            depth = self.queues.get(stage)
            queues.add_row(stage, "?" if depth is None else str(depth.queued),
                           "?" if depth is None else str(depth.in_progress), _number(busy.get(stage), 1))

        counters = self.counters
        trouble = Table.grid(padding=(0, 2))
        trouble.add_column(style="bold")
        trouble.add_column()
        trouble.add_row("dead letters", _counts(counters.dead_letters) if counters else "none")
        trouble.add_row("restarts", _counts(counters.restarts) if counters else "none")
        trouble.add_row("silent actors", _counts(counters.dead_actors) if counters else "none")
        return Panel(Group(head, Text(""), queues, Text(""), trouble), title=f"asyncflow run {self.run}",
                     title_align="left", expand=False)


class Progress:
    """Plain progress: one line per step on `stream`; a context manager like the live one."""

    live = False

    def __init__(self, config: Config, counters: RunCounters | None = None, stream: TextIO | None = None) -> None:
        self.config = config
        self.counters = counters
        self.stream = stream

    def step(self, row: Mapping[str, Any]) -> None:
        print(plain_line(row, self.config.run.steps), file=self.stream or sys.stdout, flush=True)

    async def poll(self, js: Any) -> None:
        """Called from the monitor's wait loop; plain progress has nothing to refresh."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        return None


class RichProgress(Progress):
    """The live panel, with each step's plain line printed above it (the scrollback keeps them)."""

    live = True

    def __init__(self, config: Config, counters: RunCounters | None = None, stream: TextIO | None = None,
                 started: float | None = None, console: Console | None = None) -> None:
        super().__init__(config, counters, stream)
        # Forced: `auto` picks this class only on a terminal, and `rich` asks for it by name.
        self.console = console or Console(file=stream, force_terminal=True)
        self.view = ProgressView(config.run.name, config.run.steps, config.algorithm.max_staleness,
                                 time.time() if started is None else started, counters=counters)
        self.names = RunNames(config.run.name)
        self._next_poll = 0.0
        # No refresh thread: every refresh comes from the monitor's loop (step, poll), so the panel
        # never reads the monitor's counters while the loop changes them.
        self.display = Live(self.view.render(), console=self.console, auto_refresh=False,
                            redirect_stdout=True, redirect_stderr=True)

    def step(self, row: Mapping[str, Any]) -> None:
        self.view.row = row
        self.display.console.print(plain_line(row, self.config.run.steps), markup=False, highlight=False,
                                   soft_wrap=True)  # one line, as in plain mode: grep-able scrollback
        self._refresh()

    async def poll(self, js: Any) -> None:
        if time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + QUEUE_POLL_S
            self.view.queues = await queue_depth(js, self.names, min(QUEUE_POLL_S, self.config.broker.request_timeout_s))
        self._refresh()

    def _refresh(self) -> None:
        self.display.update(self.view.render(), refresh=True)

    def __enter__(self) -> RichProgress:
        self.display.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._refresh()
        self.display.stop()  # the last panel stays on screen, above what follows


def make_progress(config: Config, counters: RunCounters | None = None, started: float | None = None,
                  stream: TextIO | None = None) -> Progress:
    """The progress display `run.progress` asks for on `stream` (stdout): `auto` is rich on a terminal."""
    mode = config.run.progress
    out = stream or sys.stdout
    if mode == "auto":
        mode = "rich" if out.isatty() else "plain"
    if mode == "rich":
        return RichProgress(config, counters, stream, started)
    return Progress(config, counters, stream)
