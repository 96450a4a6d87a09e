"""bench/trl_grpo.py: TRL's GRPOTrainer mirroring an AsyncFlow config, one step on the tiny model.

Checks the wiring (config → GRPOConfig, prompts in AsyncFlow's order, the reward function, the
per-step metrics file), not speed: there are no timing thresholds. Skipped without the `bench`
extra (TRL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tiny_config

pytest.importorskip("trl")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]


def test_trl_grpo_one_step_writes_metrics(tmp_path: Path, tiny_model_dir: Path, arith_dataset: Path) -> None:
    config = make_tiny_config(tmp_path, tiny_model_dir, arith_dataset, k=0, name="trl-tiny", steps=1)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config.to_yaml())
    out = tmp_path / "trl"

    result = subprocess.run(
        [sys.executable, "-m", "bench.trl_grpo", "--config", str(config_path), "--output-dir", str(out),
         "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    samples = config.samples_per_step  # 4 prompts x 4 samples
    assert row["step"] == 0
    assert row["samples"] == samples
    assert row["failed_samples"] == 0
    assert 0.0 <= row["reward_mean"] <= 1.0
    # Completion tokens, EOS included: at least one and at most max_new_tokens per sample.
    assert samples <= row["tokens"] <= samples * config.sampling.max_new_tokens
    assert row["time_s"] > 0 and row["grad_norm"] is not None

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["samples"] == samples
    assert summary["tokens"] == row["tokens"]
    assert "started_at" in summary

    info = json.loads((out / "run.json").read_text())
    assert info["prompts_match_asyncflow"] is True
    grpo = info["grpo_config"]
    assert grpo["num_generations"] == config.algorithm.samples_per_prompt
    assert grpo["per_device_train_batch_size"] * grpo["gradient_accumulation_steps"] == samples
    assert grpo["max_completion_length"] == config.sampling.max_new_tokens
    assert grpo["learning_rate"] == config.trainer.engine.lr
    assert grpo["loss_type"] == "grpo" and grpo["beta"] == 0.0 and grpo["use_vllm"] is False
    assert (out / "final" / "config.json").is_file()
