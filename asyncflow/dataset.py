"""Prompt datasets: local `.jsonl` or `.parquet` files, or a folder written by HF `datasets`'
`save_to_disk`, one prompt per row, checked row by row.

A `save_to_disk` folder is read with pyarrow alone (`datasets` is not a runtime dependency): a
Dataset folder holds `state.json`, which lists its `data-*.arrow` shards (Arrow IPC *stream*
files) in order; a DatasetDict folder holds `dataset_dict.json` and one such folder per split,
chosen with `data.split`. `data.fields` renames columns to the keyword arguments the reward
function takes. Every error names the file and the row (1-based) it is about; see docs/datasets.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncflow.errors import DataError

if TYPE_CHECKING:
    from asyncflow.config import DataSettings

HF_STATE = "state.json"
"""Marks a folder written by `Dataset.save_to_disk`."""
HF_DATASET_DICT = "dataset_dict.json"
"""Marks a folder written by `DatasetDict.save_to_disk` (one sub-folder per split)."""


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    fields: dict[str, Any]
    """Every other column of the row (renamed by `data.fields`); passed to the reward function as
    keyword arguments."""


def tokenize_prompt(tokenizer: Any, prompt: str, chat_template: bool = False,
                    system_prompt: str | None = None) -> list[int]:
    """Prompt text → token ids, exactly as the model sees it.

    Plain prompts are tokenized as they are (no special tokens added); with `chat_template` the
    prompt becomes a user message rendered by the tokenizer's template, ready for the reply.
    """
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.chat_template is set but the model's tokenizer has no chat template")
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def load_data(settings: DataSettings) -> list[PromptRow]:
    """The prompts of the dataset `settings` (the config's `data` section) names."""
    return load_prompts(settings.path, settings.prompt_field, fields=settings.fields, split=settings.split)


def load_prompts(path: Path, prompt_field: str = "prompt", *, fields: Mapping[str, str] | None = None,
                 split: str | None = None) -> list[PromptRow]:
    """Read every row of a `.jsonl` / `.parquet` file or a `save_to_disk` folder.

    `fields` maps reward-argument names to dataset columns (`{"answer": "solution"}`); `split`
    picks a DatasetDict's split. A missing or non-string prompt, or a row without a mapped column,
    raises DataError naming the file and the row (1-based).
    """
    path = Path(path)
    fields = dict(fields or {})
    if path.is_dir():
        sources = _read_hf_folder(path, split)
    elif not path.exists():
        raise DataError("dataset file not found", path=str(path))
    else:
        if split is not None:
            raise DataError(f"data.split {split!r} is set but the dataset is a single file, which has no "
                            "splits (split is for `DatasetDict.save_to_disk` folders)", path=str(path))
        sources = _read_file(path)
    rows = []
    for dataset_row, (file, number, raw) in enumerate(sources, start=1):
        where = {"path": str(file), "row": number}
        # An .arrow shard's row numbers start again in each shard: say where the row is in the dataset too.
        where_text = f" (row {dataset_row} of the dataset)" if file.suffix == ".arrow" else ""
        if not isinstance(raw, dict):
            raise DataError(f"row is a {type(raw).__name__}, expected an object{where_text}", **where)
        prompt = raw.get(prompt_field)
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"missing or empty string field {prompt_field!r} (data.prompt_field){where_text}",
                            **where)
        rows.append(PromptRow(prompt, _reward_fields(raw, prompt_field, fields, where_text, where)))
    if not rows:
        raise DataError("dataset has no rows", path=str(path))
    return rows


def _reward_fields(raw: dict[str, Any], prompt_field: str, fields: dict[str, str], where_text: str,
                   where: dict[str, Any]) -> dict[str, Any]:
    """The row's columns other than the prompt, with `data.fields` applied: a mapped column is
    passed under its new name only (a column already called that is replaced)."""
    # A null counts as missing: in Arrow data every row has every column, so absent values are nulls.
    missing = sorted({column for column in fields.values() if raw.get(column) is None})
    if missing:
        present = ", ".join(k for k in sorted(raw) if raw[k] is not None) or "none"
        raise DataError(f"missing field {', '.join(map(repr, missing))} named in data.fields "
                        f"(non-null columns of the row: {present}){where_text}", **where)
    renamed = set(fields.values())
    out = {k: v for k, v in raw.items() if k != prompt_field and k not in renamed}
    for name, column in fields.items():
        out[name] = raw[column]
    return out


def _read_file(path: Path) -> Iterator[tuple[Path, int, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, raw in _read_jsonl(path):
            yield path, number, raw
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, raw in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield path, number, raw
    else:
        raise DataError(f"unsupported dataset format {suffix!r} (use .jsonl, .parquet or a `save_to_disk` "
                        "folder)", path=str(path))


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    rows = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"invalid JSON: {error.msg}", path=str(path), row=number) from None
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"unreadable: {error}", path=str(path)) from None


def _read_hf_folder(folder: Path, split: str | None) -> Iterator[tuple[Path, int, Any]]:
    """Rows of a `save_to_disk` folder: (shard file, row within the shard, row as a dict)."""
    if (folder / HF_DATASET_DICT).is_file():
        splits = _read_json(folder / HF_DATASET_DICT).get("splits") or []
        if split is None:
            if len(splits) != 1:
                raise DataError(f"a DatasetDict folder with splits {splits}: set data.split to one of them",
                                path=str(folder))
            split = splits[0]
        if split not in splits:
            raise DataError(f"data.split {split!r} is not a split of this DatasetDict (splits: {splits})",
                            path=str(folder / HF_DATASET_DICT))
        folder = folder / split
    elif split is not None:
        raise DataError(f"data.split {split!r} is set but the folder holds a single Dataset, not a "
                        f"DatasetDict (no {HF_DATASET_DICT})", path=str(folder))
    state_path = folder / HF_STATE
    if not state_path.is_file():
        raise DataError(f"not a dataset folder: no {HF_STATE} or {HF_DATASET_DICT} (write it with "
                        "`Dataset.save_to_disk`, or give a .jsonl / .parquet file)", path=str(folder))
    state = _read_json(state_path)
    try:
        shards = [folder / entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError) as error:
        raise DataError(f"no readable `_data_files` list ({type(error).__name__}: {error})",
                        path=str(state_path)) from None
    import pyarrow as pa

    for shard in shards:
        try:
            with pa.OSFile(str(shard), "rb") as source, pa.ipc.open_stream(source) as reader:
                table = reader.read_all()
        except (OSError, pa.ArrowInvalid) as error:
            raise DataError(f"cannot read an Arrow IPC stream shard: {error}", path=str(shard)) from None
        for number, raw in enumerate(table.to_pylist(), start=1):
            yield shard, number, raw
