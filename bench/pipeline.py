"""Pipeline benchmark: synchronous colocated RL vs AsyncFlow's streaming, task-separated pipeline.

Run: `.venv/bin/python -m bench.pipeline [--scenario sim tiny] [--steps N]`.

Every mode is a real run through the launcher (broker, Flight store, every actor a process);
only the engines differ between scenarios, and within a scenario only the settings below:

| mode  | what it is                                                                 | settings                                                  |
|-------|----------------------------------------------------------------------------|-----------------------------------------------------------|
| sync  | verl-style colocated baseline: all W workers generate, barrier, all W train | k = 0, `phase_barrier`, W rollout instances, trainer on W |
| k1/k2 | AsyncFlow: R workers generate, T train, streaming, at most k versions stale | k = 1 / 2, R rollout instances, trainer on T (R + T = W)  |
| kN-drain | the same, but a weight swap first drains the items in flight           | `rollout.drain_before_swap: true`                         |

The same total workers W and the same samples (same seed, same prompts) in every mode. In the
synchronous mode the rollout instances and the trainer are never busy at once (k = 0 and the
barrier), so W rollout instances + a W-wide trainer is exactly W colocated workers.

Scenarios:
- `sim`: the SIMULATED engines (asyncflow/engines/simulated.py; bench/configs/simulated.yaml), a
  continuous-batching server per rollout instance with long-tailed response lengths; the trainer's
  `workers` setting is the simulated data-parallel width. W = 4: sync 4 + 4, async R = 3, T = 1.
- `tiny`: the real tiny Llama on CPU (examples/arith.yaml), HF engines. W = 2 (this machine has
  2 cores): sync = 2 rollout instances + a 2-process data-parallel trainer; async R = 1, T = 1.

Figures per mode, all from the run's own records (spans.jsonl, metrics.jsonl):
- pipeline time: first prompt admitted → last optimizer step (actor start-up excluded, the same
  for every mode), samples/s over it, and the ratio to the synchronous mode of the same scenario;
- idle fraction per stage over that window (`asyncflow.report.utilisation`);
- the ideal bound for a task-separated pipeline from the stage costs measured in that run: the
  rollout work (sim: slot-seconds of the sequences generated, divided by the R × slots that do
  it; real: rollout busy time / R) and the trainer work (trainer busy time), which cannot finish
  sooner than max(rollout, trainer) + one step of the other stage (fill/drain of a two-stage
  pipeline). Achieved = ideal time / pipeline time.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asyncflow.config import Config, load_config
from asyncflow.launcher import run
from asyncflow.report import load_run, plot_timelines, utilisation

SCENARIOS = {
    "sim": {"config": "bench/configs/simulated.yaml", "workers": 4, "rollout": 3, "trainer": 1, "steps": 16},
    "tiny": {"config": "examples/arith.yaml", "workers": 2, "rollout": 1, "trainer": 1, "steps": 30},
}


@dataclass
class ModeResult:
    scenario: str
    mode: str
    samples: int
    steps: int
    pipeline_s: float
    samples_per_s: float
    idle_fraction: dict[str, float]
    rollout_work_s: float
    trainer_work_s: float
    ideal_s: float
    achieved_of_ideal: float
    max_staleness_seen: int
    speedup_vs_sync: float | None = None


def mode_overrides(scenario: str, mode: str, steps: int, out_dir: Path) -> dict[str, Any]:
    spec = SCENARIOS[scenario]
    sync = mode == "sync"
    rollout = spec["workers"] if sync else spec["rollout"]
    trainer = spec["workers"] if sync else spec["trainer"]
    overrides: dict[str, Any] = {
        "run.name": f"bench-{scenario}-{mode}",
        "run.run_dir": str(out_dir / f"{scenario}-{mode}"),
        "run.steps": steps,
        "algorithm.max_staleness": 0 if sync else int(mode.removeprefix("k").removesuffix("-drain")),
        "algorithm.phase_barrier": sync,
        "rollout.instances": rollout,
        "trainer.save_final": False,
        "rollout.drain_before_swap": mode.endswith("-drain"),
    }
    if scenario == "sim":
        overrides["trainer.engine.workers"] = trainer
    else:
        overrides["trainer.engine.data_parallel"] = trainer
        overrides["run.torch_threads"] = 1
    return overrides


def rollout_work_s(config: Config, spans: list[Any]) -> float:
    """Seconds the rollout stage needs for these spans' samples with every slot/instance busy."""
    rollout = [s for s in spans if s.stage == "rollout"]
    engine = config.rollout.engine
    if engine.type == "simulated":
        slot_seconds = sum(s.samples * engine.prefill_s + s.tokens * engine.per_token_s for s in rollout)
        return slot_seconds / (config.rollout.instances * engine.slots)
    return utilisation(rollout, min(s.start for s in rollout), max(s.end for s in rollout)).stage_busy_s["rollout"] \
        / config.rollout.instances


def measure(scenario: str, mode: str, config: Config) -> ModeResult:
    run_data = load_run(config.run_dir)
    spans = run_data.spans
    start = min(s.start for s in spans if s.stage == "prompt")
    end = max(s.end for s in spans if s.stage == "trainer")
    usage = utilisation(spans, start, end, run_data.actor_roles)
    samples = sum(row["samples"] for row in run_data.metrics)
    steps = len(run_data.metrics)
    roll = rollout_work_s(config, spans)
    train = usage.stage_busy_s.get("trainer", 0.0)
    ideal = max(roll, train) + min(roll, train) / max(steps, 1)
    pipeline = end - start
    return ModeResult(
        scenario=scenario, mode=mode, samples=samples, steps=steps, pipeline_s=round(pipeline, 3),
        samples_per_s=round(samples / pipeline, 2),
        idle_fraction={stage: round(1 - f, 3) for stage, f in usage.stage_fraction.items()
                       if stage in ("rollout", "reward", "trainer")},
        rollout_work_s=round(roll, 3), trainer_work_s=round(train, 3), ideal_s=round(ideal, 3),
        achieved_of_ideal=round(ideal / pipeline, 3),
        max_staleness_seen=max((row["staleness_max"] for row in run_data.metrics), default=0),
    )


def run_scenario(scenario: str, steps: int, modes: list[str], out_dir: Path = Path("runs/bench-pipeline"),
                 extra: dict[str, Any] | None = None) -> list[ModeResult]:
    """Run every mode of one scenario, one after the other; `extra` overrides config fields."""
    results = []
    for mode in modes:
        config = load_config(SCENARIOS[scenario]["config"], {**mode_overrides(scenario, mode, steps, out_dir),
                                                             **(extra or {})})
        started = time.time()
        run(config)
        result = measure(scenario, mode, config.resolved())
        print(f"  {scenario}/{mode}: {result.samples_per_s} samples/s over {result.pipeline_s} s "
              f"(run {time.time() - started:.0f} s with start-up)", flush=True)
        results.append(result)
    sync = next((r for r in results if r.mode == "sync"), None)
    for result in results:
        if sync is not None:
            result.speedup_vs_sync = round(result.samples_per_s / sync.samples_per_s, 3)
    plot_timelines({r.mode: out_dir / f"{scenario}-{r.mode}" for r in results},
                   out_dir / f"{scenario}-timelines.png")
    return results


def markdown(results: list[ModeResult]) -> str:
    lines = ["| scenario | mode | samples | pipeline s | samples/s | × sync | idle rollout | idle trainer "
             "| ideal s | % of ideal | max staleness |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.mode} | {r.samples} | {r.pipeline_s} | {r.samples_per_s} | "
            f"{r.speedup_vs_sync} | {r.idle_fraction.get('rollout', 0):.0%} | {r.idle_fraction.get('trainer', 0):.0%} | "
            f"{r.ideal_s} | {r.achieved_of_ideal:.0%} | {r.max_staleness_seen} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=sorted(SCENARIOS), default=["sim", "tiny"])
    parser.add_argument("--modes", nargs="+", default=["sync", "k1", "k2", "k2-drain"])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per scenario)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-pipeline"))
    args = parser.parse_args()
    results = []
    out = args.out
    for scenario in args.scenario:
        print(f"scenario {scenario}:", flush=True)
        results += run_scenario(scenario, args.steps or SCENARIOS[scenario]["steps"], args.modes, out)
    table = markdown(results)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    (out / "pipeline.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
