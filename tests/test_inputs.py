"""Bad input fails early with an error that names what and where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncflow.config import parse_config
from asyncflow.dataset import load_prompts
from asyncflow.errors import ConfigError, DataError, UserCodeError
from asyncflow.hooks import load_callable
from asyncflow.launcher import prepare_inputs


def test_dataset_row_errors_name_the_row(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"answer": "3"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl, row 2.*|row 2") as info:
        load_prompts(path)
    assert info.value.row == 2 and "prompt" in str(info.value)
    path.write_text('{"prompt": "a"}\n{not json\n')
    with pytest.raises(DataError, match="row 2"):
        load_prompts(path)
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="row 2"):
        load_prompts(path)


def test_dataset_missing_and_parquet(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["1+2=", "2+2="], "answer": ["3", "4"]}), tmp_path / "d.parquet")
    rows = load_prompts(tmp_path / "d.parquet", prompt_field="question")
    assert rows[1].prompt == "2+2=" and rows[1].fields == {"answer": "4"}
    with pytest.raises(DataError, match=r"row 1"):
        load_prompts(tmp_path / "d.parquet")


def test_user_hook_errors():
    with pytest.raises(UserCodeError, match="cannot import module 'no_such_module'"):
        load_callable("no_such_module:f", "reward.function")
    with pytest.raises(UserCodeError, match="has no attribute 'nope'"):
        load_callable("examples.arith:nope", "reward.function")
    with pytest.raises(UserCodeError, match="not a function"):
        load_callable("examples.arith:CHARS", "reward.function")
    assert load_callable("examples.arith:reward", "reward.function")("1+1=", "2", answer="2") == 1.0


def _config(tmp_path: Path, **sections):
    data = {
        "run": {"run_dir": str(tmp_path / "run")},
        "model": {"path": str(tmp_path / "model")},
        "data": {"path": str(tmp_path / "d.jsonl")},
        "reward": {"function": "examples.arith:reward"},
    }
    data.update(sections)
    return parse_config(data).resolved()


def test_prepare_inputs_fails_fast(tmp_path: Path, tiny_model_dir: Path, arith_dataset: Path):
    with pytest.raises(ConfigError, match=r"model.path .*model does not exist"):
        prepare_inputs(_config(tmp_path))
    with pytest.raises(ConfigError, match=r"data.path .* does not exist"):
        prepare_inputs(_config(tmp_path, model={"path": str(tiny_model_dir)}))
    with pytest.raises(UserCodeError, match="reward.function: cannot import"):
        prepare_inputs(_config(tmp_path, model={"path": str(tiny_model_dir)}, data={"path": str(arith_dataset)},
                               reward={"function": "missing_module:reward"}))
    built = _config(tmp_path, model={"path": str(tmp_path / "m2"), "create_with": "examples.arith:build_tiny_model"},
                    data={"path": str(tmp_path / "d2.jsonl"), "create_with": "examples.arith:write_dataset"})
    prepare_inputs(built)
    assert (tmp_path / "m2" / "config.json").is_file() and (tmp_path / "d2.jsonl").is_file()
