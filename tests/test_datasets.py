"""Prompt datasets: HF `save_to_disk` folders (written here by the real `datasets` library, read back
with pyarrow alone), field mapping, splits, chat-template prompting, and errors that name the file
and the row. A short simulated run reads its prompts from such a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncflow.config import parse_config
from asyncflow.dataset import load_data, load_prompts, tokenize_prompt
from asyncflow.errors import DataError

datasets = pytest.importorskip("datasets", reason="the dev dependency `datasets` writes the test folders")

ROWS = {"question": [f"{a}+{a}=" for a in range(7)], "solution": [str(2 * a) for a in range(7)],
        "level": list(range(7))}


def save(folder: Path, rows: dict | None = None, shards: int = 3) -> Path:
    datasets.Dataset.from_dict(rows or ROWS).save_to_disk(str(folder), num_shards=shards)
    return folder


def test_save_to_disk_folder_reads_every_shard_in_order_with_the_real_layout(tmp_path: Path):
    folder = save(tmp_path / "ds", shards=3)
    shards = sorted(p.name for p in folder.glob("data-*.arrow"))
    assert len(shards) == 3 and (folder / "state.json").is_file()  # the layout the loader relies on
    rows = load_prompts(folder, prompt_field="question")
    assert [r.prompt for r in rows] == ROWS["question"]
    assert [r.fields for r in rows] == [{"solution": s, "level": n} for s, n in zip(ROWS["solution"], ROWS["level"],
                                                                                    strict=True)]
    # Same rows as `datasets` itself loads.
    reference = datasets.load_from_disk(str(folder))
    assert [r.prompt for r in rows] == reference["question"]


def test_field_mapping_renames_columns_for_the_reward_function(tmp_path: Path):
    folder = save(tmp_path / "ds")
    rows = load_prompts(folder, "question", fields={"answer": "solution"})
    assert rows[3].prompt == "3+3=" and rows[3].fields == {"answer": "6", "level": 3}
    # The same through the config section, on a jsonl file.
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"q": q, "solution": s}) + "\n" for q, s in [("1+1=", "2"), ("2+2=", "4")]))
    config = parse_config({"model": {"path": "m"}, "reward": {"function": "examples.arith:reward"},
                           "data": {"path": str(path), "prompt_field": "q", "fields": {"answer": "solution"}}})
    assert [r.fields for r in load_data(config.data)] == [{"answer": "2"}, {"answer": "4"}]
    # The arithmetic reward takes `answer`: the mapped row fits it.
    from examples.arith import reward

    assert reward("1+1=", "2", **load_data(config.data)[0].fields) == 1.0


def test_a_missing_mapped_field_names_the_row_and_the_file(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    lines = [{"prompt": "1+1=", "solution": "2"}, {"prompt": "2+2=", "solution": "4"}, {"prompt": "3+3="}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DataError) as info:
        load_prompts(path, fields={"answer": "solution"})
    assert info.value.row == 3 and info.value.path == str(path)
    assert "'solution'" in str(info.value) and "data.fields" in str(info.value) and f"{path}, row 3" in str(info.value)

    # In a sharded folder: the shard file, the row within it and the row in the whole dataset.
    folder = save(tmp_path / "ds", {"prompt": ["a", "b", "c", "d"], "other": ["x"] * 4}, shards=2)
    with pytest.raises(DataError, match=r"missing field 'solution'.*row 1 of the dataset") as info:
        load_prompts(folder, fields={"answer": "solution"})
    assert info.value.path.endswith("data-00000-of-00002.arrow") and info.value.row == 1
    # A null is missing too (Arrow columns exist in every row; the value is what is absent).
    folder = save(tmp_path / "ds-null", {"prompt": ["a", "b", "c", "d"], "solution": ["1", "2", "3", None]}, shards=2)
    with pytest.raises(DataError, match=r"'solution'.*row 4 of the dataset") as info:
        load_prompts(folder, fields={"answer": "solution"})
    assert info.value.path.endswith("data-00001-of-00002.arrow") and info.value.row == 2

    # A missing prompt in the second shard: shard-relative row 1 is dataset row 3.
    folder = save(tmp_path / "ds2", {"prompt": ["a", "b", None, "d"]}, shards=2)
    with pytest.raises(DataError, match=r"'prompt'.*row 3 of the dataset") as info:
        load_prompts(folder)
    assert info.value.path.endswith("data-00001-of-00002.arrow") and info.value.row == 1


def test_dataset_dict_folders_need_a_split(tmp_path: Path):
    train = datasets.Dataset.from_dict({"prompt": ["t1", "t2"], "answer": ["1", "2"]})
    test = datasets.Dataset.from_dict({"prompt": ["e1"], "answer": ["9"]})
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder))
    assert [r.prompt for r in load_prompts(folder, split="test")] == ["e1"]
    assert [r.prompt for r in load_prompts(folder, split="train")] == ["t1", "t2"]
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]: set data.split"):
        load_prompts(folder)
    with pytest.raises(DataError, match="'validation' is not a split"):
        load_prompts(folder, split="validation")
    # One split only: no need to name it.
    single = tmp_path / "single"
    datasets.DatasetDict({"train": train}).save_to_disk(str(single))
    assert len(load_prompts(single)) == 2
    # A split for something that has none is a mistake, not ignored.
    with pytest.raises(DataError, match="single Dataset"):
        load_prompts(save(tmp_path / "ds", {"prompt": ["a"]}, shards=1), split="train")
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match="single file"):
        load_prompts(path, split="train")


def test_folders_that_are_not_datasets_say_so(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"not a dataset folder: no state.json"):
        load_prompts(tmp_path / "empty")
    folder = save(tmp_path / "ds", {"prompt": ["a", "b"]}, shards=1)
    shard = next(folder.glob("data-*.arrow"))
    shard.write_bytes(b"not arrow")
    with pytest.raises(DataError, match="cannot read an Arrow IPC stream shard") as info:
        load_prompts(folder)
    assert info.value.path == str(shard)
    with pytest.raises(DataError, match="unsupported dataset format '.csv'"):
        (tmp_path / "d.csv").write_text("prompt\na\n")
        load_prompts(tmp_path / "d.csv")


def test_chat_template_prompting_uses_the_tokenizers_template_and_system_prompt(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = tokenize_prompt(tokenizer, "1+2=")
    assert tokenizer.decode(plain) == "1+2="
    with pytest.raises(DataError, match="no chat template"):
        tokenize_prompt(tokenizer, "1+2=", chat_template=True)
    # A template in the tiny model's alphabet: each message opens with <bos>, the reply with "=".
    tokenizer.chat_template = ("{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}={% endif %}")
    bos = tokenizer.bos_token_id
    chars = tokenize_prompt(tokenizer, "1+2")[0:3]
    user_only = tokenize_prompt(tokenizer, "1+2", chat_template=True)
    assert user_only == [bos, *chars, tokenizer.convert_tokens_to_ids("=")]
    with_system = tokenize_prompt(tokenizer, "1+2", chat_template=True, system_prompt="9")
    assert with_system == [bos, tokenizer.convert_tokens_to_ids("9"), *user_only]


@pytest.mark.slow
def test_a_run_reads_its_prompts_from_a_save_to_disk_folder(tmp_path: Path, tiny_model_dir: Path):
    """Simulated engines, the real actors, broker and store: every trained sample's prompt came from
    the folder's `train` split, through the config's field mapping (the dataset says `question` and
    `solution`; the reward function takes `prompt` and `answer` and checks they belong together)."""
    from actors.trainer import read_records
    from asyncflow.launcher import run
    from tests.conftest import make_tiny_config

    folder = tmp_path / "arith-ds"
    prompts = [f"{a}+{b}=" for a in range(4) for b in range(4)]
    train = datasets.Dataset.from_dict({"question": prompts, "solution": [str(eval(p[:-1])) for p in prompts]})
    wrong = datasets.Dataset.from_dict({"question": ["1+1="], "solution": ["3"]})  # any use of it fails
    datasets.DatasetDict({"train": train, "test": wrong}).save_to_disk(str(folder), num_shards={"train": 2, "test": 1})
    config = make_tiny_config(
        tmp_path, tiny_model_dir, folder, 1, "hf-dataset", steps=2, prompts=4, group=2,
        data={"path": str(folder), "split": "train", "prompt_field": "question", "fields": {"answer": "solution"}},
        rollout={"engine": {"type": "simulated", "per_token_s": 0.0, "prefill_s": 0.0, "mean_tokens": 3}},
        trainer={"save_final": False, "engine": {"type": "simulated", "per_token_s": 0.0}},
        reward={"function": "tests.test_datasets:reward_needs_answer"},
    )
    summary = run(config)
    assert summary["steps"] == 2 and summary["failed_samples"] == 0
    assert len(read_records(config.run_dir)) == 2 * 4 * 2


def reward_needs_answer(prompt: str, response: str, answer: str, **_: object) -> float:
    """Fails the sample (raises) unless the row's answer is the sum its prompt asks for."""
    a, b = prompt.rstrip("=").split("+")
    if answer != str(int(a) + int(b)):
        raise ValueError(f"row fields do not belong to prompt {prompt!r}: answer {answer!r}")
    return 1.0
