"""A whole run with decoupled-PPO off-policy correction: real actors, a tiny real model.

The loss's arithmetic is checked in test_grpo.py; here the run must complete with stale samples
allowed (k = 2) and keep the staleness contract: I1 and every sample trained exactly once.
"""

from __future__ import annotations

import pytest

from actors.trainer import read_records
from asyncflow.launcher import run
from tests.conftest import make_tiny_config

pytestmark = pytest.mark.slow

STEPS, PROMPTS, GROUP, K = 3, 4, 4, 2


def test_decoupled_correction_pipeline(tmp_path, tiny_model_dir, arith_dataset) -> None:
    config = make_tiny_config(tmp_path, tiny_model_dir, arith_dataset, K, "decoupled", steps=STEPS,
                              prompts=PROMPTS, group=GROUP,
                              algorithm={"off_policy_correction": "decoupled", "importance_weight_cap": 2.0})
    assert config.algorithm.off_policy_correction == "decoupled"
    summary = run(config)

    trained = read_records(config.run_dir)
    ids = [r["sample_id"] for r in trained]
    assert len(ids) == len(set(ids)), "a sample was trained twice"
    assert set(ids) == set(range(STEPS * PROMPTS * GROUP)), "a sample was lost"
    for record in trained:  # I1, from the versions the trainer actually saw
        assert 0 <= record["step"] - record["policy_version"] <= K
    assert summary["steps"] == STEPS and summary["failed_samples"] == 0
    assert summary["max_staleness_seen"] <= K
