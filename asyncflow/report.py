"""`asyncflow report RUN_DIR [--out PATH]`: a picture and tables of where a run's time went.

Reads what a run leaves in its directory: `spans.jsonl` (every busy span of every actor, written
by the launcher's monitor), `metrics.jsonl` (one line per optimizer step), `summary.json`,
`actors.json`, `config.yaml` and `trainer/trained_samples.jsonl`. Writes `report.png` (stage
timeline per actor, throughput over time, reward per step, staleness histogram), `report.html`
(the picture embedded, with the summary and busy-time tables) and `report.json` (busy and idle
fractions per actor and per stage).

The functions are public so a benchmark can reuse them: `load_spans` + `utilisation` for busy
fractions, `plot_timelines` to stack several runs' timelines on one time axis (sync vs async).
matplotlib is imported only inside the plotting functions, so the launcher's monitor can use
`utilisation` without paying for it.
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from asyncflow.errors import ReportError, WireError
from asyncflow.wire import MetricsEvent, decode

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ROLE_ORDER = ("scheduler", "rollout", "reward", "trainer", "param_sync")
"""Timeline rows go in data-flow order; roles not listed here follow, by name."""

STAGE_COLOURS = {"prompt": "tab:purple", "rollout": "tab:blue", "reward": "tab:orange", "trainer": "tab:green"}
OTHER_COLOURS = ("tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")

MAX_STEP_MARKERS = 60
"""Above this many steps, per-step lines on the timeline would be a grey wash: leave them out."""


# -- loading -------------------------------------------------------------------------------


@dataclass
class RunData:
    """Everything the report reads from one run directory, times as given in the files."""

    run_dir: Path
    spans: list[MetricsEvent]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    """None when the run did not finish (the launcher writes summary.json last)."""
    actor_roles: dict[str, str]
    """Actor name → role, idle actors included (from actors.json, else from the spans)."""
    started: float
    """Unix seconds the run started: the time axis' zero."""
    ended: float
    sample_staleness: list[int] | None
    """Per trained sample: optimizer step − policy version; None without trained_samples.jsonl."""
    max_staleness: int | None
    name: str = ""

    @property
    def wall_s(self) -> float:
        return self.ended - self.started

    @property
    def working(self) -> tuple[float, float]:
        """From the first busy span to the last optimizer step: the run without its start-up
        (processes importing, models loading) and shut-down, which can dominate short runs."""
        first = min((s.start for s in self.spans), default=self.started)
        last = self.started + self.metrics[-1]["time_s"] if self.metrics else max(
            (s.end for s in self.spans), default=self.ended)
        return max(first, self.started), max(min(last, self.ended), first)


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ReportError(str(path), f"not found ({what})")
    return path


def _json_lines(path: Path) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            yield number, line


def _check_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(str(run_dir), "no such run directory (give the run_dir of an `asyncflow run`)")
    return run_dir


def load_spans(run_dir: Path) -> list[MetricsEvent]:
    """Every busy span the monitor recorded for the run in `run_dir`, in arrival order."""
    path = _require(_check_run_dir(run_dir) / "spans.jsonl",
                    "the launcher writes it during `asyncflow run`; older runs have none")
    return list(iter_spans(path))


def iter_spans(path: Path) -> Iterator[MetricsEvent]:
    """The spans of a `spans.jsonl` file one at a time (a long run's spans need not all be in memory)."""
    with Path(path).open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield decode(MetricsEvent, line.encode(), f"{path}:{number}")
            except WireError as error:
                raise ReportError(f"{path}:{number}", error.reason) from None


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl: one per optimizer step (see `asyncflow.monitor.MetricsWriter`)."""
    path = _require(_check_run_dir(run_dir) / "metrics.jsonl",
                    "the launcher writes it during `asyncflow run`, one line per optimizer step")
    rows = []
    for number, line in _json_lines(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}:{number}", f"not JSON: {error}") from None
    return rows


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReportError(str(path), f"not JSON: {error}") from None


def role_of(actor: str) -> str:
    """`rollout-1` → `rollout`: actor names are `<role>-<instance>`."""
    return actor.rpartition("-")[0] or actor


def load_run(run_dir: Path) -> RunData:
    """Read a run directory; spans.jsonl and metrics.jsonl must exist, the rest is optional."""
    run_dir = _check_run_dir(run_dir)
    spans = load_spans(run_dir)
    metrics = load_metrics(run_dir)
    summary_path = run_dir / "summary.json"
    summary = _load_json(summary_path) if summary_path.is_file() else None

    actors_path = run_dir / "actors.json"
    roles = {entry["actor"]: entry["role"] for entry in _load_json(actors_path)} if actors_path.is_file() else {}
    for span in spans:
        roles.setdefault(span.actor, role_of(span.actor))

    # Zero is when the launcher started (summary.json); an unfinished run has no summary, and
    # then its first span is the best estimate.
    first_span = min((s.start for s in spans), default=0.0)
    started = summary.get("started_at", first_span) if summary else first_span
    if summary and "wall_s" in summary:
        ended = started + summary["wall_s"]
    else:
        ended = max([s.end for s in spans] + [started + r["time_s"] for r in metrics], default=started)

    staleness = None
    trained_path = run_dir / "trainer" / "trained_samples.jsonl"
    if trained_path.is_file():
        staleness = []
        for number, line in _json_lines(trained_path):
            try:
                record = json.loads(line)
                staleness.append(int(record["step"]) - int(record["policy_version"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ReportError(f"{trained_path}:{number}", f"not a trained-sample record: {error}") from None

    max_staleness, name = None, run_dir.name
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        config = yaml.safe_load(config_path.read_text()) or {}
        max_staleness = config.get("algorithm", {}).get("max_staleness")
        name = config.get("run", {}).get("name", name)
    return RunData(run_dir, spans, metrics, summary, roles, started, ended, staleness, max_staleness, name)


# -- utilisation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Utilisation:
    """Busy fractions over a window; idle = 1 − busy. Spans are clipped to the window, and one
    actor's overlapping spans count once, so every fraction lies in [0, 1]."""

    window_s: float
    actor_busy_s: dict[str, float] = field(default_factory=dict)
    actor_fraction: dict[str, float] = field(default_factory=dict)
    """Per actor: time busy on anything / window."""
    stage_busy_s: dict[str, float] = field(default_factory=dict)
    """Per stage: the busy seconds of each actor on that stage, summed over actors."""
    stage_instances: dict[str, int] = field(default_factory=dict)
    """Per stage: how many actors could do it (every actor of a role that did it, idle ones too)."""
    stage_fraction: dict[str, float] = field(default_factory=dict)
    """Per stage: busy seconds / (window × instances)."""


def covered_seconds(intervals: Iterable[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of `intervals` within [start, end]."""
    clipped = sorted((max(a, start), min(b, end)) for a, b in intervals)
    total, run_start, run_end = 0.0, None, None
    for a, b in clipped:
        if b <= a:
            continue
        if run_end is None or a > run_end:
            if run_end is not None:
                total += run_end - run_start
            run_start, run_end = a, b
        else:
            run_end = max(run_end, b)
    if run_end is not None:
        total += run_end - run_start
    return total


def utilisation(spans: Iterable[MetricsEvent], start: float, end: float,
                actor_roles: Mapping[str, str] | None = None) -> Utilisation:
    """Per-stage and per-actor busy fractions of `spans` over [start, end] (unix seconds).

    `actor_roles` (actor name → role) names the actors that exist even if they never worked, so
    an idle actor gets 0 and an idle rollout instance still counts in the rollout stage's
    instances. Without it, the actors are those seen in the spans.
    """
    window = max(end - start, 0.0)
    roles = dict(actor_roles or {})
    by_actor: dict[str, list[tuple[float, float]]] = defaultdict(list)
    by_actor_stage: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    roles_of_stage: dict[str, set[str]] = defaultdict(set)
    for span in spans:
        roles.setdefault(span.actor, role_of(span.actor))
        by_actor[span.actor].append((span.start, span.end))
        by_actor_stage[(span.actor, span.stage)].append((span.start, span.end))
        roles_of_stage[span.stage].add(roles[span.actor])

    def fraction(busy: float, instances: int = 1) -> float:
        return busy / (window * instances) if window > 0 and instances > 0 else 0.0

    actor_busy = {actor: covered_seconds(by_actor.get(actor, []), start, end) for actor in sorted(roles)}
    stage_busy: dict[str, float] = defaultdict(float)
    for (_, stage), intervals in by_actor_stage.items():
        stage_busy[stage] += covered_seconds(intervals, start, end)
    instances = {stage: sum(1 for role in roles.values() if role in stage_roles)
                 for stage, stage_roles in roles_of_stage.items()}
    return Utilisation(
        window_s=window,
        actor_busy_s=actor_busy,
        actor_fraction={actor: fraction(busy) for actor, busy in actor_busy.items()},
        stage_busy_s=dict(sorted(stage_busy.items())),
        stage_instances=dict(sorted(instances.items())),
        stage_fraction={stage: fraction(busy, instances[stage]) for stage, busy in sorted(stage_busy.items())},
    )


def run_utilisation(run: RunData, *, working_only: bool = False) -> Utilisation:
    """Busy fractions over the whole run (as in summary.json) or over its working part only."""
    start, end = run.working if working_only else (run.started, run.ended)
    return utilisation(run.spans, start, end, run.actor_roles)


# -- plotting --------------------------------------------------------------------------------


def _ordered_actors(actor_roles: Mapping[str, str]) -> list[str]:
    def key(actor: str) -> tuple[int, str, int, str]:
        role = actor_roles[actor]
        rank = ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)
        instance = actor.rpartition("-")[2]
        return rank, role, int(instance) if instance.isdigit() else 0, actor

    return sorted(actor_roles, key=key)


def _stage_colours(stages: Iterable[str]) -> dict[str, str]:
    colours = dict(STAGE_COLOURS)
    others = iter(OTHER_COLOURS * 4)
    for stage in sorted(set(stages)):
        colours.setdefault(stage, next(others))
    return colours


def _draw_timeline(ax: Axes, run: RunData, colours: Mapping[str, str], *, origin: float, legend: bool) -> None:
    """One row per actor (grouped by role, top to bottom in data-flow order), one bar per busy
    span; x is seconds since `origin` (unix seconds). The caller sets the x range."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    whole, working = run_utilisation(run), run_utilisation(run, working_only=True)
    actors = _ordered_actors(run.actor_roles)
    row = {actor: index for index, actor in enumerate(actors)}
    bars: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for span in run.spans:
        bars[(span.actor, span.stage)].append((span.start - origin, span.end - span.start))
    for (actor, stage), segments in bars.items():
        # A thin edge in the bar's own colour keeps millisecond spans visible at run scale.
        ax.broken_barh(segments, (row[actor] - 0.38, 0.76), facecolors=colours[stage],
                       edgecolors=colours[stage], linewidth=0.3)
    for index in range(1, len(actors)):  # a rule between role groups
        if run.actor_roles[actors[index]] != run.actor_roles[actors[index - 1]]:
            ax.axhline(index - 0.5, color="0.6", linewidth=0.8)
    steps = [run.started + r["time_s"] - origin for r in run.metrics]
    if len(steps) <= MAX_STEP_MARKERS:
        for seconds in steps:
            ax.axvline(seconds, color="0.35", linewidth=0.6, linestyle=":", zorder=0)
    _shade_idle_ends(ax, run, origin)
    ax.set_yticks(range(len(actors)))
    ax.set_yticklabels([f"{actor}  {whole.actor_fraction[actor]:.0%} ({working.actor_fraction[actor]:.0%})"
                        for actor in actors], fontsize=8)
    ax.set_ylim(len(actors) - 0.5, -0.5)  # first role on top
    ax.grid(axis="x", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    if legend:
        stages = sorted({s.stage for s in run.spans}, key=lambda s: (list(STAGE_COLOURS).index(s)
                                                                      if s in STAGE_COLOURS else 99, s))
        handles: list[Any] = [Patch(color=colours[s], label=s) for s in stages]
        if len(steps) <= MAX_STEP_MARKERS:
            handles.append(Line2D([], [], color="0.35", linewidth=0.8, linestyle=":", label="optimizer step done"))
        handles.append(Patch(color="0.9", label="start-up / shut-down"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8,
                  title="busy on stage", title_fontsize=8, frameon=False)


def _shade_idle_ends(ax: Axes, run: RunData, origin: float) -> None:
    """Grey out start-up and shut-down, so the eye goes to the working part of the run."""
    first, last = run.working
    for a, b in ((run.started, first), (last, run.ended)):
        if b > a:
            ax.axvspan(a - origin, b - origin, color="0.93", zorder=0, linewidth=0)


def _working_xlim(run: RunData, origin: float) -> tuple[float, float]:
    first, last = run.working
    margin = max(0.02 * (last - first), 0.05)
    return max(first - margin, run.started) - origin, min(last + margin, run.ended) - origin


def _draw_phases(ax: Axes, run: RunData) -> None:
    """The whole run as one bar: start-up, working, shut-down, with their seconds."""
    first, last = (t - run.started for t in run.working)
    phases = [(0.0, first, "start-up", "0.82"), (first, last, "working", "tab:green"),
              (last, run.wall_s, "shut-down", "0.82")]
    for a, b, name, colour in phases:
        if b <= a:
            continue
        ax.broken_barh([(a, b - a)], (0, 1), facecolors=colour, edgecolors="white", linewidth=1)
        text = f"{name} {b - a:.1f} s"
        if (b - a) > 0.12 * max(run.wall_s, 1e-9):  # only where the words fit
            ax.text((a + b) / 2, 0.5, text, ha="center", va="center", fontsize=8,
                    color="white" if name == "working" else "0.2")
    ax.set_xlim(0, max(run.wall_s, 1e-3))
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("seconds since run start (whole run; the panels below show its working part)", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(f"phases: start-up {first:.1f} s, working {last - first:.1f} s (first busy span to last "
                 f"optimizer step), shut-down {run.wall_s - last:.1f} s", fontsize=9)


def _rate_over_time(spans: Iterable[MetricsEvent], start: float, end: float,
                    bins: int = 40) -> tuple[list[float], list[float]]:
    """(bin edges relative to `start`, samples/s per bin) over [start, end], each span's samples
    spread evenly over its duration."""
    width = max(end - start, 1e-3) / bins
    counts = [0.0] * bins
    for span in spans:
        a, b = span.start - start, span.end - start
        if b <= a:  # instantaneous: all of it in one bin
            counts[min(max(int(a / width), 0), bins - 1)] += span.samples
            continue
        for index in range(max(int(a / width), 0), min(int(b / width), bins - 1) + 1):
            overlap = min(b, (index + 1) * width) - max(a, index * width)
            if overlap > 0:
                counts[index] += span.samples * overlap / (b - a)
    return [i * width for i in range(bins + 1)], [c / width for c in counts]


def _draw_throughput(ax: Axes, run: RunData, origin: float) -> None:
    first, last = run.working
    generated = [s for s in run.spans if s.stage == "rollout"]
    if generated:
        edges, rates = _rate_over_time(generated, first, max(last, max(s.end for s in generated)))
        ax.stairs(rates, [e + first - origin for e in edges], color=STAGE_COLOURS["rollout"], linewidth=1.4,
                  label="generated (rollout spans, spread over their duration)")
    if run.metrics:
        # Trained: each step's samples over the time since the previous step (the first step:
        # since work began, not since start-up).
        edges = [first - origin] + [run.started + r["time_s"] - origin for r in run.metrics]
        rates = [r["samples"] / max(b - a, 1e-9) for r, a, b in zip(run.metrics, edges, edges[1:], strict=False)]
        ax.stairs(rates, edges, color=STAGE_COLOURS["trainer"], linewidth=1.4,
                  label="trained (per optimizer step)")
    _shade_idle_ends(ax, run, origin)
    ax.set_ylabel("samples / s")
    ax.set_xlabel("seconds since run start")
    ax.set_ylim(bottom=0)
    ax.grid(color="0.9", linewidth=0.6)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False, title="throughput",
              title_fontsize=8)


def _draw_reward(ax: Axes, run: RunData) -> None:
    from matplotlib.ticker import MaxNLocator

    points = [(r["step"], r["reward_mean"]) for r in run.metrics if r.get("reward_mean") is not None]
    if points:
        steps, rewards = zip(*points, strict=True)
        ax.plot(steps, rewards, color="tab:green", linewidth=1.2, marker="o" if len(points) <= 50 else None,
                markersize=3)
    else:
        ax.text(0.5, 0.5, "no rewarded step", transform=ax.transAxes, ha="center", color="0.4")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("mean reward per step", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward (mean over trained samples)")
    ax.grid(color="0.9", linewidth=0.6)


def _draw_staleness(ax: Axes, run: RunData) -> None:
    if run.sample_staleness is not None:
        values, what = run.sample_staleness, "trained samples"
    else:  # no per-sample record: the worst sample of each step is what metrics.jsonl keeps
        values, what = [r["staleness_max"] for r in run.metrics], "steps (their stalest sample)"
    top = max([*values, run.max_staleness or 0, 0])
    ax.hist(values, bins=[b - 0.5 for b in range(top + 2)], color="tab:blue", edgecolor="white", rwidth=0.8)
    if run.max_staleness is not None:
        ax.axvline(run.max_staleness + 0.5, color="tab:red", linestyle="--", linewidth=1,
                   label=f"bound max_staleness = {run.max_staleness}")
        ax.legend(fontsize=8, frameon=False)
    ax.set_xticks(range(top + 1))
    ax.set_title("staleness", fontsize=10)
    ax.set_xlabel("optimizer step − policy version of the sample")
    ax.set_ylabel(what)
    ax.grid(axis="y", color="0.9", linewidth=0.6)


def _headline(run: RunData) -> str:
    if run.summary is None:
        return f"{run.name}: unfinished ({len(run.metrics)} steps recorded, no summary.json)"
    s = run.summary
    rate = s.get("samples_per_s")
    return (f"{run.name}: {s['steps']} steps, {s['samples']} samples in {s['wall_s']:.1f} s"
            + (f" ({rate:.1f} samples/s)" if rate is not None else ""))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_report(run_dir: Path, out: Path) -> Path:
    """Write the run's picture to `out` (PNG): phases of the whole run, then over its working
    part the stage timeline per actor and the throughput; reward per step; staleness."""
    return _plot_run(load_run(run_dir), Path(out))


def _plot_run(run: RunData, out: Path) -> Path:
    plt = _pyplot()
    fig = report_figure(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def report_figure(run: RunData) -> Figure:
    """The report's figure (the caller saves and closes it): a phases bar; the stage timeline per
    actor and the throughput over the working part; mean reward per step; the staleness histogram."""
    plt = _pyplot()
    colours = _stage_colours(s.stage for s in run.spans)
    timeline_height = 0.32 * len(run.actor_roles) + 0.8
    fig = plt.figure(figsize=(13, timeline_height + 7.4), dpi=110, layout="constrained")
    grid = fig.add_gridspec(4, 2, height_ratios=[0.9, timeline_height, 2.4, 3.2])
    _draw_phases(fig.add_subplot(grid[0, :]), run)
    timeline = fig.add_subplot(grid[1, :])
    throughput = fig.add_subplot(grid[2, :], sharex=timeline)
    _draw_timeline(timeline, run, colours, origin=run.started, legend=True)
    timeline.set_title("busy spans per actor over the working part; % = busy share of the whole run "
                       "(of the working part)", fontsize=10)
    timeline.tick_params(labelbottom=False)
    _draw_throughput(throughput, run, origin=run.started)
    throughput.set_xlim(*_working_xlim(run, run.started))
    _draw_reward(fig.add_subplot(grid[3, 0]), run)
    _draw_staleness(fig.add_subplot(grid[3, 1]), run)
    fig.suptitle(_headline(run), fontsize=12)
    return fig


def plot_timelines(run_dirs: Mapping[str, Path], out: Path, *, align: str = "work") -> Path:
    """Stack the timelines of several runs (label → run dir) on one shared time axis, e.g. a
    synchronous and an asynchronous run of the same job, and write them to `out` (PNG).

    `align="work"` puts each run's zero at its first busy span, so start-up times (which vary
    with the machine, not the algorithm) do not shift the comparison; `align="run"` puts it at
    the launcher's start.
    """
    if not run_dirs:
        raise ReportError(str(out), "no runs given to compare")
    if align not in ("work", "run"):
        raise ValueError(f"align must be 'work' or 'run', not {align!r}")
    plt = _pyplot()
    runs = {label: load_run(Path(path)) for label, path in run_dirs.items()}
    colours = _stage_colours(s.stage for run in runs.values() for s in run.spans)
    heights = [0.32 * len(run.actor_roles) + 0.7 for run in runs.values()]
    fig, axes = plt.subplots(len(runs), 1, figsize=(13, sum(heights) + 0.8), dpi=110, sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": heights}, layout="constrained")
    right = 0.0
    for index, ((label, run), ax) in enumerate(zip(runs.items(), axes[:, 0], strict=True)):
        origin = run.working[0] if align == "work" else run.started
        _draw_timeline(ax, run, colours, origin=origin, legend=index == 0)
        ax.set_title(f"{label} — {_headline(run)}", fontsize=10, loc="left")
        right = max(right, (run.working[1] if align == "work" else run.ended) - origin)
    last = axes[-1, 0]
    last.set_xlim(0, max(right * 1.02, 1e-3))
    last.set_xlabel("seconds since the first busy span" if align == "work" else "seconds since run start")
    fig.suptitle("% = busy share of the whole run (of the working part: first busy span to last step)",
                 fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# -- the report files ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    png: Path
    html: Path
    json: Path


def report_data(run: RunData) -> dict[str, Any]:
    """What report.json holds: the window and busy / idle fractions per actor and per stage."""
    used, working = run_utilisation(run), run_utilisation(run, working_only=True)
    memory = (run.summary or {}).get("peak_rss_mb", {})
    first, last = run.working
    return {
        "run_dir": str(run.run_dir),
        "started_at": run.started,
        "window_s": round(used.window_s, 3),
        "working_window_s": [round(first - run.started, 3), round(last - run.started, 3)],
        "stages": {
            stage: {"instances": used.stage_instances[stage], "busy_s": round(used.stage_busy_s[stage], 3),
                    "busy_fraction": round(used.stage_fraction[stage], 4),
                    "idle_fraction": round(1 - used.stage_fraction[stage], 4),
                    "busy_fraction_working": round(working.stage_fraction.get(stage, 0.0), 4)}
            for stage in used.stage_fraction
        },
        "actors": {
            actor: {"role": run.actor_roles[actor], "busy_s": round(used.actor_busy_s[actor], 3),
                    "busy_fraction": round(used.actor_fraction[actor], 4),
                    "idle_fraction": round(1 - used.actor_fraction[actor], 4),
                    "busy_fraction_working": round(working.actor_fraction[actor], 4),
                    "peak_rss_mb": memory.get(actor)}
            for actor in _ordered_actors(run.actor_roles)
        },
        "summary": run.summary,
    }


def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _percent(fraction: float) -> str:
    return f"{fraction:.1%}"


def _html(run: RunData, data: dict[str, Any], png: Path) -> str:
    image = base64.b64encode(png.read_bytes()).decode()  # embedded: the page survives being mailed
    summary = run.summary or {"status": "unfinished: no summary.json"}
    summary_rows = [(key, ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value)
                    for key, value in summary.items()]
    stage_rows = [(stage, s["instances"], s["busy_s"], _percent(s["busy_fraction"]), _percent(s["idle_fraction"]),
                   _percent(s["busy_fraction_working"])) for stage, s in data["stages"].items()]
    actor_rows = [(actor, a["role"], a["busy_s"], _percent(a["busy_fraction"]), _percent(a["idle_fraction"]),
                   _percent(a["busy_fraction_working"]), "" if a["peak_rss_mb"] is None else a["peak_rss_mb"])
                  for actor, a in data["actors"].items()]
    first, last = data["working_window_s"]
    title = html.escape(f"AsyncFlow report: {run.name}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; }}
th {{ background: #f2f2f2; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p>{html.escape(_headline(run))}. Run directory: <code>{html.escape(str(run.run_dir))}</code>.
Busy fractions are over the whole run ({data["window_s"]} s) and over its working part, from the first
busy span to the last optimizer step ({first} s to {last} s after the start). A stage's fraction is its
actors' busy seconds over (seconds × instances of the stage); one actor's overlapping spans count once.</p>
<img src="data:image/png;base64,{image}" alt="timeline, throughput, reward and staleness of the run">
<h2>Summary</h2>
{_table(["field", "value"], summary_rows)}
<h2>Busy time per stage</h2>
{_table(["stage", "instances", "busy s", "busy", "idle", "busy while working"], stage_rows)}
<h2>Busy time per actor</h2>
{_table(["actor", "role", "busy s", "busy", "idle", "busy while working", "peak RSS MB"], actor_rows)}
</body></html>
"""


def write_report(run_dir: Path, out: Path | None = None) -> ReportFiles:
    """Write report.png, report.html and report.json for the run in `run_dir`.

    `out` is the PNG's path (default `RUN_DIR/report.png`); the HTML and JSON go beside it with the
    same name and their own suffix.
    """
    run = load_run(run_dir)
    png = Path(out) if out is not None else run.run_dir / "report.png"
    files = ReportFiles(png=png, html=png.with_suffix(".html"), json=png.with_suffix(".json"))
    _plot_run(run, files.png)
    data = report_data(run)
    files.json.write_text(json.dumps(data, indent=2) + "\n")
    files.html.write_text(_html(run, data, files.png))
    return files
