"""The `asyncflow` command reports bad input as one clear line and a non-zero exit, before starting anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asyncflow.rewards import check_reward

ROOT = Path(__file__).parent.parent


def asyncflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncflow", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_invalid_config_names_the_field(tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"path": "d.jsonl"},
                                      "reward": {"function": "examples.arith:reward"},
                                      "algorithm": {"samples_per_prompt": 1}}))
    result = asyncflow("run", str(config))
    assert result.returncode == 2
    assert "algorithm.samples_per_prompt" in result.stderr and "Traceback" not in result.stderr


def test_unimportable_reward_fails_at_start_up(tmp_path: Path, tiny_model_dir: Path, arith_dataset: Path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"run_dir": str(tmp_path / "run")}, "model": {"path": str(tiny_model_dir)},
        "data": {"path": str(arith_dataset)}, "reward": {"function": "examples.arith:no_such_reward"},
    }))
    result = asyncflow("run", str(config))
    assert result.returncode == 2
    assert "reward.function: module 'examples.arith' has no attribute 'no_such_reward'" in result.stderr
    assert not (tmp_path / "run" / "actors.json").exists(), "no actor may start with a broken config"


def test_override_syntax_error_is_clear(tmp_path: Path):
    result = asyncflow("run", str(ROOT / "examples" / "arith.yaml"), "--set", "run.steps")
    assert result.returncode == 2 and "field.path=value" in result.stderr


@pytest.mark.parametrize("value", [1, 0.5, -2, 3])
def test_reward_contract_accepts_numbers(value):
    assert check_reward(value) == float(value)


@pytest.mark.parametrize("value", ["high", None, True, float("nan"), float("inf"), [1.0]])
def test_reward_contract_rejects_non_numbers(value):
    with pytest.raises((TypeError, ValueError)):
        check_reward(value)
