"""Learning benchmark: AsyncFlow at k = 0, 1, 2 and TRL's GRPOTrainer on the default task, one after the other.

Each run is a separate process tree started by this module on the same config
(`examples/smollm2.yaml` unless `--config`), the same seed and number of steps:

- `asyncflow run CONFIG --set algorithm.max_staleness=K --set run.seed=S --set run.steps=N
  --run-dir OUT/kK` for each K in `--ks` (default 0,1,2);
- `python -m bench.trl_grpo --config CONFIG --set run.seed=S --set run.steps=N --output-dir OUT/trl`
  (TRL's GRPOTrainer with the same settings, see that module), unless `--skip-trl`.

While a run goes, a thread samples its whole process tree with psutil every `--interval` s
(0.5): the sum of the processes' resident set sizes (its peak is "peak MB (tree)"; shared pages
are counted once per process, so it over-counts what the processes share) and, per process, the
kernel's own peak (VmHWM from /proc, exact even between samples).

Figures per run, from its `metrics.jsonl` and the wall clock of this module:

- **wall s**: from starting the process to its exit (imports, model load, vLLM start-up, the
  steps, saving the final model, shutdown). samples/s and tokens/s (completion tokens, EOS
  included) are over that wall time; "steps samples/s" leaves out start-up and the first step:
  samples of steps 2..N / (time of step N - time of step 1). "median step s" is the median time
  between consecutive steps: on a shared machine it moves least with bursts of load from elsewhere.
- **Times of steps** are put on one clock, seconds since the process was started: each run
  reports `started_at` (unix seconds of its own clock's zero) in summary.json where it can, and
  the step times are shifted by `started_at - launch`.
- **reward first / last**: mean reward over the first and last 10% of steps (as summary.json).
- **reward at equal wall time**: T = the time the fastest run finished its last step; each run's
  mean reward over the steps it had finished by T (and how many).
- **time to level**: the first step whose trailing 3-step mean reward reaches `--level` (0.15),
  and its time; "-" if never.
- ratios of samples/s of each AsyncFlow run to TRL's.

Writes `OUT/learning.json` (everything, per-step rows included), `OUT/learning.md` (the tables
printed) and `OUT/learning.png` (reward vs step and reward vs wall time, all runs).

Run: ``python -m bench.learning [--seed 0] [--steps 20] [--skip-trl] [--ks 0,1,2]
[--config examples/smollm2.yaml] [--out runs/bench-learning] [--level 0.15]``;
``python -m bench.learning --report runs/bench-learning/learning.json`` recomputes the report of
earlier runs without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

DEFAULT_CONFIG = Path("examples/smollm2.yaml")
DEFAULT_OUT = Path("runs/bench-learning")
MOVING_WINDOW = 3  # steps in the trailing mean that "time to level" compares with the level


# ------------------------------------------------------------------------------------ memory
@dataclass
class MemoryPeaks:
    """Peak memory of one process tree: the tree's summed RSS (sampled) and each process's VmHWM."""

    tree_mb: float = 0.0
    per_process_mb: dict[str, float] = field(default_factory=dict)
    samples: int = 0


def _label(process: psutil.Process) -> str | None:
    """A readable, stable name for a process of a run: the actor role, the store, nats-server, …;
    None while its command line cannot be read (e.g. in the middle of exec)."""
    try:
        cmd = process.cmdline()
    except (psutil.Error, OSError):
        return None
    if not cmd:
        return None
    if "actor" in cmd and len(cmd) > cmd.index("actor") + 1:
        role = cmd[cmd.index("actor") + 1]
        instance = cmd[cmd.index("--instance") + 1] if "--instance" in cmd else "0"
        return f"{role}-{instance}"
    if "-m" in cmd and len(cmd) > cmd.index("-m") + 1:
        return cmd[cmd.index("-m") + 1]
    if "-c" in cmd:  # multiprocessing / compile helpers that a library started: name them after the parent
        parent = process.parent()
        return f"{_label(parent) or 'python'}>child" if parent is not None else "python -c"
    return Path(cmd[1] if len(cmd) > 1 and cmd[0].endswith(("python", "python3")) else cmd[0]).name


def _vm_hwm_mb(pid: int) -> float | None:
    """The kernel's peak resident set size of `pid` (VmHWM), in MB; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


class MemorySampler(threading.Thread):
    """Samples a process tree every `interval` s until stopped (and once more at the end)."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peaks = MemoryPeaks()
        self._halt = threading.Event()
        self._labels: dict[int, str] = {}

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> MemoryPeaks:
        self._halt.set()
        self.join()
        return self.peaks

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0.0
        for process in processes:
            try:
                rss_mb = process.memory_info().rss / 1e6
            except psutil.Error:
                continue
            total += rss_mb
            if process.pid not in self._labels:
                label = _label(process)
                if label is None:  # name it at a later sample; VmHWM keeps its peak until then
                    continue
                if label in self._labels.values():  # two processes with one label: keep them apart
                    label = f"{label}#{process.pid}"
                self._labels[process.pid] = label
            label = self._labels[process.pid]
            peak = max(rss_mb, _vm_hwm_mb(process.pid) or 0.0)
            self.peaks.per_process_mb[label] = round(max(self.peaks.per_process_mb.get(label, 0.0), peak), 1)
        self.peaks.tree_mb = round(max(self.peaks.tree_mb, total), 1)
        self.peaks.samples += 1


# -------------------------------------------------------------------------------------- runs
@dataclass
class RunResult:
    name: str
    command: list[str]
    launched_at: float
    wall_s: float
    returncode: int
    memory: MemoryPeaks
    rows: list[dict[str, Any]]
    """metrics.jsonl rows, each with `t_s`: seconds since the process was started."""
    summary: dict[str, Any]


def run_one(name: str, command: list[str], metrics_dir: Path, log_path: Path, interval: float) -> RunResult:
    """Run one benchmark process to completion, echoing its output and sampling its memory."""
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    launched = time.time()
    with log_path.open("w", buffering=1) as log:  # line-buffered: the log can be followed while it runs
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        sampler = MemorySampler(process.pid, interval)
        sampler.sample()
        sampler.start()
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if _worth_echoing(line):
                print(f"[{name}] {line.rstrip()}", flush=True)
        returncode = process.wait()
        wall_s = time.time() - launched
        memory = sampler.stop()
    if returncode != 0:
        raise RuntimeError(f"{name} exited with code {returncode}; see {log_path}")
    summary = json.loads((metrics_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (metrics_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # Put every step on the since-launch clock: the run's own clock starts at `started_at`.
    offset = summary["started_at"] - launched if "started_at" in summary else 0.0
    for row in rows:
        row["t_s"] = round(row["time_s"] + offset, 3)
    print(f"=== {name}: {wall_s:.1f} s, peak tree RSS {memory.tree_mb:.0f} MB", flush=True)
    return RunResult(name, command, launched, wall_s, returncode, memory, rows, summary)


def _worth_echoing(line: str) -> bool:
    """Progress lines only: the step lines of both runners and errors, not library chatter."""
    text = line.strip()
    return text.startswith(("step ", "trl step ", "Traceback", "Error", "error")) or "Error:" in text


# ----------------------------------------------------------------------------------- figures
def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def time_to_level(rows: list[dict[str, Any]], level: float) -> tuple[int | None, float | None]:
    """(step, seconds since launch) of the first step whose trailing 3-step mean reward ≥ level."""
    rewards = [r["reward_mean"] for r in rows]
    for i in range(MOVING_WINDOW - 1, len(rows)):
        window = _mean(rewards[i - MOVING_WINDOW + 1: i + 1])
        if window is not None and window >= level:
            return rows[i]["step"], rows[i]["t_s"]
    return None, None


def figures(results: list[RunResult], level: float) -> dict[str, dict[str, Any]]:
    """The per-run figures of the module docstring, keyed by run name."""
    equal_t = min(r.rows[-1]["t_s"] for r in results if r.rows)
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        rows = r.rows
        samples = sum(row["samples"] for row in rows)
        tokens = sum(row.get("tokens") or 0 for row in rows)
        window = max(1, round(len(rows) * 0.1))
        rewards = [row["reward_mean"] for row in rows]
        later = rows[1:]
        span = rows[-1]["t_s"] - rows[0]["t_s"] if len(rows) > 1 else 0.0
        intervals = [b["t_s"] - a["t_s"] for a, b in zip(rows, rows[1:], strict=False)]
        by_equal_t = [row["reward_mean"] for row in rows if row["t_s"] <= equal_t + 1e-6]
        level_step, level_t = time_to_level(rows, level)
        out[r.name] = {
            "wall_s": round(r.wall_s, 1),
            "steps": len(rows),
            "samples": samples,
            "tokens": tokens,
            "samples_per_s": round(samples / r.wall_s, 3),
            "steps_samples_per_s": round(sum(row["samples"] for row in later) / span, 3) if span > 0 else None,
            "median_step_s": round(statistics.median(intervals), 2) if intervals else None,
            "tokens_per_s": round(tokens / r.wall_s, 2),
            "first_step_t_s": rows[0]["t_s"] if rows else None,
            "last_step_t_s": rows[-1]["t_s"] if rows else None,
            "peak_tree_mb": r.memory.tree_mb,
            "peak_process_mb": r.memory.per_process_mb,
            "reward_first": _mean(rewards[:window]),
            "reward_last": _mean(rewards[-window:]),
            "equal_t_s": round(equal_t, 1),
            "reward_at_equal_t": _mean(by_equal_t),
            "steps_at_equal_t": len(by_equal_t),
            "level": level,
            "level_step": level_step,
            "level_t_s": level_t,
        }
    trl = out.get("trl")
    for name, fig in out.items():
        if trl and name != "trl":
            fig["samples_per_s_vs_trl"] = round(fig["samples_per_s"] / trl["samples_per_s"], 3)
            if fig["steps_samples_per_s"] and trl["steps_samples_per_s"]:
                fig["steps_samples_per_s_vs_trl"] = round(fig["steps_samples_per_s"] / trl["steps_samples_per_s"], 3)
    return out


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: list[RunResult], figs: dict[str, dict[str, Any]], header: str) -> str:
    """The printed report: a summary table, reward per step, and per-process memory peaks."""
    lines = [header, ""]
    level = next(iter(figs.values()))["level"]
    equal_t = next(iter(figs.values()))["equal_t_s"]
    lines += [
        f"| run | wall s | samples/s | steps samples/s | median step s | tokens/s | peak MB (tree) | reward first "
        f"| reward last | reward @ {equal_t:.0f} s (steps) | step, s to 3-step mean ≥ {level} | samples/s vs TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, fig in figs.items():
        level_text = "-" if fig["level_step"] is None else f"{fig['level_step'] + 1}, {fig['level_t_s']:.0f}"
        ratio = fig.get("samples_per_s_vs_trl")
        ratio_steps = fig.get("steps_samples_per_s_vs_trl")
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x ({_f(ratio_steps, 2)}x steps)"
        lines.append(
            f"| {name} | {fig['wall_s']:.0f} | {fig['samples_per_s']:.3f} | {_f(fig['steps_samples_per_s'])} "
            f"| {_f(fig['median_step_s'], 1)} | {fig['tokens_per_s']:.1f} | {fig['peak_tree_mb']:.0f} | {_f(fig['reward_first'])} "
            f"| {_f(fig['reward_last'])} | {_f(fig['reward_at_equal_t'])} ({fig['steps_at_equal_t']}) "
            f"| {level_text} | {ratio_text} |"
        )
    names = [r.name for r in results]
    steps = max(len(r.rows) for r in results)
    lines += ["", "Reward per step (time since launch, s):", "",
              "| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i in range(steps):
        cells = []
        for r in results:
            row = r.rows[i] if i < len(r.rows) else None
            cells.append("" if row is None else f"{_f(row['reward_mean'])} ({row['t_s']:.0f})")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += ["", "Peak resident memory per process (VmHWM, MB):", ""]
    for name, fig in figs.items():
        parts = ", ".join(f"{label} {mb:.0f}" for label, mb in sorted(fig["peak_process_mb"].items(),
                                                                     key=lambda item: -item[1]))
        lines.append(f"- {name}: {parts}")
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], level: float, path: Path) -> None:
    """Reward vs step and reward vs wall time (since launch), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps = [row["step"] + 1 for row in r.rows]
        times = [row["t_s"] for row in r.rows]
        rewards = [row["reward_mean"] for row in r.rows]
        by_step.plot(steps, rewards, marker="o", markersize=3, label=r.name)
        by_time.plot(times, rewards, marker="o", markersize=3, label=r.name)
    for axis, xlabel in ((by_step, "optimizer step"), (by_time, "wall time since launch (s)")):
        axis.axhline(level, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("mean reward of the step")
        axis.grid(alpha=0.3)
        axis.legend()
    by_step.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_step.set_title("reward vs step")
    by_time.set_title("reward vs wall time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------- main
def parse_variant(text: str) -> tuple[str, list[str]]:
    """`NAME:FIELD=VALUE,FIELD=VALUE` -> (NAME, ["FIELD=VALUE", ...])."""
    name, _, sets = text.partition(":")
    if not name or not sets or any("=" not in s for s in sets.split(",")):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:FIELD=VALUE[,FIELD=VALUE...]")
    return name, sets.split(",")


def commands(config: Path, out: Path, seed: int, steps: int, ks: Sequence[int], skip_trl: bool,
             variants: Sequence[tuple[str, list[str]]] = ()) -> list[tuple[str, list[str], Path]]:
    """(name, command, directory holding its metrics.jsonl and summary.json) for each run, in order."""
    bin_dir = Path(sys.executable).parent
    runs = []
    af_runs = [(f"k{k}", [f"algorithm.max_staleness={k}"]) for k in ks] + list(variants)
    for name, sets in af_runs:
        run_dir = out / name
        runs.append((name, [str(bin_dir / "asyncflow"), "run", str(config),
                            *[arg for field in sets for arg in ("--set", field)], "--set", f"run.seed={seed}",
                            "--set", f"run.steps={steps}", "--run-dir", str(run_dir)], run_dir))
    if not skip_trl:
        trl_dir = out / "trl"
        runs.append(("trl", [sys.executable, "-m", "bench.trl_grpo", "--config", str(config),
                             "--set", f"run.seed={seed}", "--set", f"run.steps={steps}",
                             "--output-dir", str(trl_dir)], trl_dir))
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the runs and the report go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ks", default="0,1,2", help="AsyncFlow max_staleness values to run, in order")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                        help="one more AsyncFlow run after the --ks ones, with these config overrides "
                             "(e.g. k1t2:algorithm.max_staleness=1,trainer.torch_threads=2); repeatable")
    parser.add_argument("--skip-trl", action="store_true", help="leave out the TRL run")
    parser.add_argument("--level", type=float, default=0.15, help="reward level for 'time to level'")
    parser.add_argument("--interval", type=float, default=0.5, help="memory sampling period (s)")
    parser.add_argument("--report", type=Path, default=None, metavar="LEARNING_JSON",
                        help="run nothing: recompute the tables and the plot from an earlier learning.json")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",") if k.strip()]

    machine = (f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}")
    if args.report is not None:  # recompute the figures of earlier runs, run nothing
        saved = json.loads(args.report.read_text())
        results = [RunResult(**{**r, "memory": MemoryPeaks(**r["memory"])}) for r in saved["runs"]]
        args.out, args.config, args.seed, args.steps = args.report.parent, saved["config"], saved["seed"], saved["steps"]
        machine = saved["machine"]
        total_s = saved.get("total_s") or sum(r.wall_s for r in results)
    else:
        started = time.time()
        results = [run_one(name, command, metrics_dir, args.out / f"{name}.console.log", args.interval)
                   for name, command, metrics_dir in commands(args.config, args.out, args.seed, args.steps, ks,
                                                               args.skip_trl, args.variant)]
        total_s = time.time() - started
    figs = figures(results, args.level)
    header = (f"learning: {args.config}, seed {args.seed}, {args.steps} steps; runs one after the other, "
              f"{total_s:.0f} s in all; {machine}")
    report = markdown(results, figs, header)
    print("\n" + report, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning.md").write_text(report)
    plot(results, args.level, args.out / "learning.png")
    (args.out / "learning.json").write_text(json.dumps({
        "config": str(args.config), "seed": args.seed, "steps": args.steps, "machine": machine, "total_s": total_s,
        "figures": figs, "runs": [asdict(r) for r in results],
    }, indent=2) + "\n")
    print(f"wrote {args.out / 'learning.json'}, {args.out / 'learning.md'}, {args.out / 'learning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
