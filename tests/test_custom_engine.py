"""The example custom engine (examples/custom_engine.py) runs a whole pipeline like a built-in one."""

from __future__ import annotations

import pytest

from actors.trainer import read_records
from asyncflow.launcher import run
from tests.conftest import make_tiny_config

pytestmark = pytest.mark.slow


def test_custom_inference_engine_through_a_pipeline(tmp_path, tiny_model_dir, arith_dataset):
    engine = {"type": "custom", "factory": "examples.custom_engine:make_engine"}
    config = make_tiny_config(tmp_path, tiny_model_dir, arith_dataset, 0, "custom", steps=2,
                              rollout={"engine": engine})
    summary = run(config)
    assert summary["steps"] == 2 and summary["failed_samples"] == 0
    trained = read_records(config.run_dir)
    assert sorted(r["sample_id"] for r in trained) == list(range(2 * 4 * 4))
    assert all(r["policy_version"] == r["step"] for r in trained)  # k = 0: the engine took the update
    rollout_log = (config.run_dir / "logs" / "rollout-0.jsonl").read_text()
    assert '"weights updated"' in rollout_log
