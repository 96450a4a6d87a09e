"""Prompt datasets: local `.jsonl` or `.parquet` files, one prompt per row, checked row by row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncflow.errors import DataError


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    fields: dict[str, Any]
    """Every other column of the row; passed to the reward function as keyword arguments."""


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


def load_prompts(path: Path, prompt_field: str = "prompt") -> list[PromptRow]:
    """Read every row; a missing or non-string prompt field raises DataError naming the row (1-based)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("dataset file not found", path=str(path))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        raw_rows = _read_jsonl(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        raw_rows = list(enumerate(pq.read_table(path).to_pylist(), start=1))
    else:
        raise DataError(f"unsupported dataset format {suffix!r} (use .jsonl or .parquet)", path=str(path))
    rows = []
    for number, raw in raw_rows:
        if not isinstance(raw, dict):
            raise DataError(f"row is a {type(raw).__name__}, expected an object", path=str(path), row=number)
        prompt = raw.get(prompt_field)
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"missing or empty string field {prompt_field!r}", path=str(path), row=number)
        rows.append(PromptRow(prompt, {k: v for k, v in raw.items() if k != prompt_field}))
    if not rows:
        raise DataError("dataset has no rows", path=str(path))
    return rows


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
