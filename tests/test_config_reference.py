"""docs/config.md is the generated reference of every config field, and stays that way.

It is regenerated from the pydantic models (`asyncflow config --reference > docs/config.md`), so
the test fails the moment a field is added, renamed, retyped, re-defaulted or re-documented in
asyncflow/config.py without regenerating it, and fails for a field that has no docstring at all.
`asyncflow config CONFIG` prints the config the actors would read.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from asyncflow.config import Config, RunSettings, SimulatedInferenceSettings
from asyncflow.config_reference import (
    GENERATE_COMMAND,
    all_fields,
    field_docstrings,
    reference_markdown,
    render_type,
    sections,
)

ROOT = Path(__file__).parent.parent


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf field path, walked independently of config_reference (unions: every member)."""
    from asyncflow.config_reference import _model_members

    out: set[str] = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        members = _model_members(info.annotation)
        if members:
            for member in members:
                out |= _leaf_paths(member, path)
        else:
            out.add(path)
    return out


def test_docs_config_md_is_up_to_date_with_the_models():
    current = (ROOT / "docs" / "config.md").read_text()
    assert current == reference_markdown(), (
        f"docs/config.md is out of date with asyncflow/config.py: regenerate it with `{GENERATE_COMMAND}`")


def test_every_field_is_in_the_reference_with_a_docstring():
    rows = {path for path, _, _ in all_fields()}
    assert rows == _leaf_paths(Config)
    assert len(rows) > 80  # the walk really went through the sections and the engine variants
    undocumented = [path for path, model, name in all_fields() if not field_docstrings(model).get(name)]
    assert undocumented == [], f"config fields without a docstring: {undocumented}"
    text = reference_markdown()
    for path in rows:
        assert f"| `{path}` |" in text, path
    # Each section says what it is (a class docstring, or for an engine its `type` docstring).
    assert all(section.description for section in sections()), [s.title for s in sections() if not s.description]


def test_rows_carry_type_constraints_default_and_the_docstring():
    text = reference_markdown()
    steps_doc = field_docstrings(RunSettings)["steps"]
    assert f"| `run.steps` | int, ≥ 1 | `20` | {steps_doc} |" in text
    assert "| `model.path` | path | **required** |" in text
    assert '| `model.dtype` | "float32" \\| "bfloat16" | `"float32"` |' in text
    assert "## `rollout.engine` with `type: simulated`" in text
    assert f"| `rollout.engine.slots` | int, ≥ 1 | `64` | {field_docstrings(SimulatedInferenceSettings)['slots']} |" in text
    # Inherited fields are documented under every engine that has them.
    assert text.count("| `trainer.engine.lr` |") == len([m for m in ("hf", "megatron", "simulated", "custom")
                                                            if f"## `trainer.engine` with `type: {m}`" in text])
    assert render_type(int | None) == "int | null"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncflow", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_config_reference_command_prints_the_page():
    result = _cli("config", "--reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "docs" / "config.md").read_text()


def test_config_command_prints_the_resolved_config_with_overrides(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"path": "d.jsonl"},
                                      "reward": {"function": "examples.arith:reward"},
                                      "rollout": {"engine": {"type": "simulated"}}}))
    result = _cli("config", str(config), "--set", "run.steps=7", "--set", "algorithm.max_staleness=0")
    assert result.returncode == 0, result.stderr
    printed: dict[str, Any] = yaml.safe_load(result.stdout)
    parsed = Config.model_validate(printed)  # what it prints is a complete, valid config
    assert parsed.run.steps == 7 and parsed.algorithm.max_staleness == 0
    assert parsed.rollout.engine.type == "simulated" and printed["rollout"]["engine"]["slots"] == 64
    assert printed["model"]["path"] == str(ROOT / "m") and printed["run"]["run_dir"] == str(ROOT / "runs" / "asyncflow")


def test_config_command_errors_name_the_problem(tmp_path: Path):
    missing = _cli("config")
    assert missing.returncode == 2 and "needs CONFIG (or --reference)" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"path": "d"}, "reward": {"function": "a:b"},
                                   "run": {"stepz": 3}}))
    result = _cli("config", str(bad))
    assert result.returncode == 2 and "run.stepz" in result.stderr and "Traceback" not in result.stderr


def test_every_subcommand_has_help():
    top = _cli("--help")
    assert top.returncode == 0
    for command in ("run", "actor", "store", "report", "broker", "status", "inspect", "config"):
        assert f"    {command} " in top.stdout, command
        result = _cli(command, "--help")
        assert result.returncode == 0 and result.stdout.startswith("usage: asyncflow " + command), command
