"""The pipeline benchmark's harness on a few simulated steps: it runs every mode through the real
launcher and measures from the runs' own records. No speed is asserted (shared, noisy machines);
what is checked is that the modes are what they claim to be."""

from __future__ import annotations

import pytest

from bench.pipeline import run_scenario

pytestmark = pytest.mark.slow


def test_sync_baseline_and_async_modes_measure_sensibly(tmp_path, tiny_model_dir, arith_dataset):
    extra = {"model.path": str(tiny_model_dir), "data.path": str(arith_dataset),
             "algorithm.prompts_per_step": 8, "sampling.max_new_tokens": 64,
             "rollout.engine.per_token_s": 0.002, "rollout.engine.mean_tokens": 8}
    results = {r.mode: r for r in run_scenario("sim", 3, ["sync", "k1"], tmp_path, extra)}
    sync, k1 = results["sync"], results["k1"]
    for result in (sync, k1):
        assert result.samples == 3 * 8 * 8 and result.steps == 3
        assert all(0.0 <= idle <= 1.0 for idle in result.idle_fraction.values())
        assert result.ideal_s > 0 and result.pipeline_s > 0
    assert sync.max_staleness_seen == 0 and k1.max_staleness_seen <= 1
    assert sync.speedup_vs_sync == 1.0 and k1.speedup_vs_sync is not None
    assert (tmp_path / "sim-timelines.png").stat().st_size > 10_000
