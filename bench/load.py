"""Load benchmark: a long run on the SIMULATED engines (100 000+ samples) with memory watched.

Run: ``.venv/bin/python -m bench.load [--steps 200] [--out runs/bench-load]``.

One real run through the launcher (embedded nats-server, a Flight store process, every actor its
own process; `bench/configs/load.yaml`: 512 samples per step, short simulated responses so that
the framework, not the sleeps, is what works). While it runs a sampler thread records, every
`--interval` seconds:

- the resident memory (RSS) of every process of the run: the actors (`actors.json`), the broker
  and the stores (`services.json`), and the launcher itself;
- each store's `stats` action: bytes held, keys, bytes put so far;
- the steps finished (`metrics.jsonl`).

It prints, per process, RSS at 10 %, 50 %, 90 % and 98 % of the steps, the kernel's peak (VmHWM)
and the growth from 10 % to 98 %; and for the stores the bytes held (max and at the
end) against the bytes put through them. Bounded memory looks like flat RSS after warm-up and
store bytes that stay at a few partitions' worth while the bytes put grow with the run.
JSON (every sample): OUT/load.json; table: OUT/load.md; picture: OUT/load.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from asyncflow.config import Config, load_config
from asyncflow.launcher import run
from asyncflow.monitor import peak_rss_mb
from flight_store import StoreClient

DEFAULT_CONFIG = Path("bench/configs/load.yaml")


@dataclass
class Sample:
    t_s: float
    steps: int
    rss_mb: dict[str, float]
    store: dict[str, dict[str, int]]


@dataclass
class LoadRecord:
    samples: list[Sample] = field(default_factory=list)
    peak_mb: dict[str, float] = field(default_factory=dict)
    """VmHWM per process, the last value read while it was alive."""


class Sampler(threading.Thread):
    """Reads the run directory for pids and store locations, and samples them until stopped."""

    def __init__(self, config: Config, interval_s: float) -> None:
        super().__init__(name="load-sampler", daemon=True)
        self.config = config
        self.interval_s = interval_s
        self.record = LoadRecord()
        self.started = time.time()
        self.halt = threading.Event()
        self._client: StoreClient | None = None

    def _processes(self) -> dict[str, int]:
        pids = {"launcher": psutil.Process().pid}
        for name in ("actors.json", "services.json"):
            try:
                entries = json.loads((self.config.run_dir / name).read_text())
            except (OSError, ValueError):
                continue  # not written yet, or being replaced
            pids.update({entry["actor"]: entry["pid"] for entry in entries})
        return pids

    def _store_stats(self) -> dict[str, dict[str, int]]:
        if self._client is None:
            files = sorted((self.config.run_dir / "stores").glob("*.location"))
            locations = [f.read_text().strip() for f in files if f.read_text().strip()]
            if not locations:
                return {}
            self._client = StoreClient(locations, timeout_s=5.0)
        try:
            return self._client.stats()
        except Exception:
            return {}  # between runs, or stopping: a missing sample, not a failed benchmark

    def run(self) -> None:
        metrics = self.config.run_dir / "metrics.jsonl"
        while not self.halt.wait(self.interval_s):
            rss = {}
            for name, pid in self._processes().items():
                try:
                    rss[name] = round(psutil.Process(pid).memory_info().rss / 1e6, 1)
                except psutil.Error:
                    continue
                peak = peak_rss_mb(pid)
                if peak is not None:
                    self.record.peak_mb[name] = max(peak, self.record.peak_mb.get(name, 0.0))
            try:
                steps = sum(1 for line in metrics.read_text().splitlines() if line.strip())
            except OSError:
                steps = 0
            self.record.samples.append(Sample(round(time.time() - self.started, 2), steps, rss, self._store_stats()))
        if self._client is not None:
            self._client.close()


def at_fraction(samples: list[Sample], name: str, fraction: float) -> float | None:
    """`name`'s RSS in the first sample at or after `fraction` of the steps (None if never seen)."""
    total = max((s.steps for s in samples), default=0)
    for sample in samples:
        if sample.steps >= fraction * total and name in sample.rss_mb:
            return sample.rss_mb[name]
    return None


def report(record: LoadRecord, summary: dict[str, Any], config: Config) -> str:
    samples = [s for s in record.samples if s.rss_mb]
    names = sorted({name for s in samples for name in s.rss_mb})
    lines = [f"load: {config.run.steps} steps x {config.samples_per_step} samples = "
             f"{summary['samples']} samples in {summary['wall_s']:.0f} s ({summary['samples_per_s']} samples/s); "
             f"failed {summary['failed_samples']}; {len(samples)} memory samples", "",
             "| process | RSS MB @10% | @50% | @90% | @98% | peak (VmHWM) | growth 10% -> 98% |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        # 98 %, not the last sample: once every step is done the processes are being stopped.
        values = [at_fraction(samples, name, f) for f in (0.1, 0.5, 0.9)]
        end = at_fraction(samples, name, 0.98)
        growth = f"{end - values[0]:+.1f}" if end is not None and values[0] is not None else "-"
        cells = ["-" if v is None else f"{v:.0f}" for v in (*values, end)]
        lines.append(f"| {name} | {' | '.join(cells)} | {record.peak_mb.get(name, 0):.0f} | {growth} |")
    store_rows = [(s.t_s, sum(v["bytes_used"] for v in s.store.values()), sum(v["bytes_in"] for v in s.store.values()),
                   sum(v["keys"] for v in s.store.values())) for s in samples if s.store]
    if store_rows:
        held = [r[1] for r in store_rows]
        lines += ["", f"stores: bytes held max {max(held) / 1e6:.1f} MB, mean {sum(held) / len(held) / 1e6:.1f} MB, "
                      f"at the last sample {held[-1] / 1e6:.1f} MB, keys max {max(r[3] for r in store_rows)}; "
                      f"bytes put through them by then {store_rows[-1][2] / 1e6:.0f} MB"]
    return "\n".join(lines)


def plot(record: LoadRecord, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in record.samples if s.rss_mb]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name in sorted({n for s in samples for n in s.rss_mb}):
        points = [(s.t_s, s.rss_mb[name]) for s in samples if name in s.rss_mb]
        top.plot([p[0] for p in points], [p[1] for p in points], label=name)
    top.set_ylabel("RSS (MB)")
    top.legend(fontsize=7, ncol=3)
    stored = [(s.t_s, sum(v["bytes_used"] for v in s.store.values()) / 1e6,
               sum(v["bytes_in"] for v in s.store.values()) / 1e6) for s in samples if s.store]
    bottom.plot([p[0] for p in stored], [p[1] for p in stored], label="bytes held by the stores")
    twin = bottom.twinx()
    twin.plot([p[0] for p in stored], [p[2] for p in stored], color="grey", linestyle="--", label="bytes put (total)")
    bottom.set_ylabel("held (MB)")
    twin.set_ylabel("put (MB)")
    bottom.set_xlabel("seconds since start")
    bottom.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_load(config: Config, interval_s: float) -> tuple[dict[str, Any], LoadRecord]:
    """The run with the sampler beside it; returns summary.json and what was sampled."""
    config = config.resolved()
    sampler = Sampler(config, interval_s)
    sampler.start()
    try:
        summary = run(config)
    finally:
        sampler.halt.set()
        sampler.join(timeout=30)
    return summary, sampler.record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=None, help="override run.steps (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-load"))
    parser.add_argument("--interval", type=float, default=1.0, help="sampling period (s)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"run.run_dir": str(args.out / "run")}
    if args.steps is not None:
        overrides["run.steps"] = args.steps
    config = load_config(args.config, overrides)
    summary, record = run_load(config, args.interval)
    text = report(record, summary, config.resolved())
    print("\n" + text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.md").write_text(text + "\n")
    (args.out / "load.json").write_text(json.dumps({"summary": summary, "peak_mb": record.peak_mb,
                                                    "samples": [asdict(s) for s in record.samples]}) + "\n")
    plot(record, args.out / "load.png")
    print(f"wrote {args.out / 'load.md'}, {args.out / 'load.json'}, {args.out / 'load.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
