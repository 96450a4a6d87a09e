"""The load benchmark's harness on a short run: every process of the run is sampled, and the stores
hold a bounded window of the data while far more passes through them (trained partitions and old
weight versions are dropped). Sizes and times are not asserted: the full run is `bench/load.py`."""

from __future__ import annotations

import pytest

from asyncflow.config import load_config
from bench.load import DEFAULT_CONFIG, report, run_load

pytestmark = pytest.mark.slow


def test_a_long_run_keeps_the_stores_bounded_and_samples_every_process(tmp_path):
    steps = 16
    config = load_config(DEFAULT_CONFIG, {"run.steps": steps, "run.run_dir": str(tmp_path / "run"),
                                          "algorithm.prompts_per_step": 16, "trainer.engine.weights_bytes": 4 << 20})
    summary, record = run_load(config, interval_s=0.25)
    assert summary["steps"] == steps and summary["failed_samples"] == 0

    sampled = {name for sample in record.samples for name in sample.rss_mb}
    assert {"launcher", "broker-0", "store-0", "scheduler-0", "reward-0", "trainer-0", "param_sync-0",
            "rollout-0", "rollout-1"} <= sampled
    stats = [sample.store for sample in record.samples if sample.store]
    held = max(sum(s["bytes_used"] for s in store.values()) for store in stats)
    put = max(sum(s["bytes_in"] for s in store.values()) for store in stats)
    # 16 weight versions of 4 MiB alone are 64 MiB put; with max_staleness 2 only a few are needed at once.
    assert put > 16 * (4 << 20) * 0.9
    assert held < put / 3, (held, put)
    assert "| trainer-0 |" in report(record, summary, config.resolved())
