"""What keeps an actor process's start-up and shutdown short changes nothing it computes:

- the scheduler's prompt tokens and the reward actor's decoded responses are those of
  `AutoTokenizer` (actors/tokenizer.py builds them without importing torch where it can);
- the light roles (scheduler, reward, param_sync) do not import torch, and torch still gets the
  configured thread count when something imports it after all;
- a work loop's fetch returns as soon as stop is set;
- an actor process that ends with `exit_now` still joins its threads, runs its atexit handlers and
  flushes its output.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from actors.runtime import ActorRuntime
from actors.tokenizer import generic_tokenizer_config, load_tokenizer, response_decoder
from asyncflow.dataset import tokenize_prompt

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 2+3?", "1+2=", "  leading spaces\tand a tab\n", "ünïcødé 😀 <|im_start|> <bos>", "", "9" * 300]


def _auto(model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


def _token_sequences(tokenizer: Any, count: int = 1500) -> list[list[int]]:
    """Every id alone (ids past the small vocabularies: a sample), random runs, runs rich in special tokens."""
    size = tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    rng = random.Random(0)
    special = list(tokenizer.all_special_ids)
    sequences = [[i] for i in range(0, size, max(1, size // 4000))] + [[]]
    sequences += [[rng.randrange(size) for _ in range(rng.randrange(1, 40))] for _ in range(count)]
    sequences += [[rng.choice([*special, rng.randrange(size)]) for _ in range(rng.randrange(1, 20))]
                  for _ in range(count)]
    return sequences


def _assert_same_as_auto(model: Path, chat: bool) -> None:
    auto, fast = _auto(model), load_tokenizer(model)
    assert type(fast) is type(auto)
    assert generic_tokenizer_config(model) is not None  # the fast path is the one under test
    for system_prompt in (None, "Reply with only the number."):
        for prompt in PROMPTS:
            expected = tokenize_prompt(auto, prompt, chat, system_prompt)
            assert tokenize_prompt(fast, prompt, chat, system_prompt) == expected, (prompt, system_prompt)
    decode = response_decoder(model)
    for ids in _token_sequences(auto):
        assert decode(ids) == auto.decode(ids, skip_special_tokens=True), ids


def test_tiny_model_tokenizer_paths_match_autotokenizer(tiny_model_dir: Path):
    _assert_same_as_auto(tiny_model_dir, chat=False)


def test_smollm2_tokenizer_paths_match_autotokenizer(smollm2_dir: Path):
    """The chat template of a real model, with and without a system prompt, token for token."""
    _assert_same_as_auto(smollm2_dir, chat=True)


def _copy_tokenizer(model: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, to / name)
    return to


def _edit(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change", ["no tokenizer.json", "model-specific class", "remote code", "overridden model type"])
def test_folders_autotokenizer_may_treat_differently_use_autotokenizer(tiny_model_dir: Path, tmp_path: Path,
                                                                       change: str):
    model = _copy_tokenizer(tiny_model_dir, tmp_path / "model")
    if change == "no tokenizer.json":
        (model / "tokenizer.json").unlink()
    elif change == "model-specific class":
        _edit(model / "tokenizer_config.json", tokenizer_class="LlamaTokenizer")
    elif change == "remote code":
        _edit(model / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "my_code.MyTokenizer"]})
    else:
        _edit(model / "config.json", model_type="qwen2")  # transformers ignores the Hub class of qwen2
    assert generic_tokenizer_config(model) is None


def test_a_special_token_only_the_config_names_is_skipped_as_transformers_does(tiny_model_dir: Path,
                                                                              tmp_path: Path):
    """transformers marks special at load what the config names special: the decoder then cannot be
    the bare tokenizer.json, and falls back to transformers (and still decodes the same)."""
    model = _copy_tokenizer(tiny_model_dir, tmp_path / "model")
    _edit(model / "tokenizer_config.json", additional_special_tokens=["7"])
    auto = _auto(model)
    decode = response_decoder(model)
    seven = auto.convert_tokens_to_ids("7")
    assert auto.decode([seven, seven], skip_special_tokens=True) == ""
    assert decode([seven, seven]) == ""
    for ids in _token_sequences(auto, count=200):
        assert decode(ids) == auto.decode(ids, skip_special_tokens=True)


def _python(code: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_light_roles_do_not_import_torch():
    result = _python("""
        import sys
        from asyncflow.logs import setup_logging
        setup_logging(None, console=False)
        import actors.scheduler, actors.reward, actors.param_sync
        print(sorted(m for m in ("torch", "transformers.models.auto") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_torch_imported_later_gets_the_configured_threads():
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: torch's default is 1 thread already, so 1 thread proves nothing")
    result = _python("""
        from asyncflow.actor_process import set_torch_threads_on_import
        set_torch_threads_on_import(1)
        import torch
        print(torch.get_num_threads())
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"  # torch's own default is one per core


class _SlowSubscription:
    """A pull subscription with nothing to deliver: fetch runs to its timeout."""

    def __init__(self) -> None:
        self.cancelled = False

    async def fetch(self, batch: int, timeout: float) -> list[Any]:
        try:
            await asyncio.sleep(timeout)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise TimeoutError


def test_fetch_returns_as_soon_as_stop_is_set():
    async def main() -> None:
        runtime = ActorRuntime.__new__(ActorRuntime)  # fetch needs only the stop event
        runtime.stop = asyncio.Event()
        subscription = _SlowSubscription()
        started = time.monotonic()
        assert await runtime.fetch(subscription, timeout_s=0.05) == []  # expired: no messages
        asyncio.get_running_loop().call_later(0.05, runtime.stop.set)
        assert await runtime.fetch(subscription, timeout_s=30.0) == []
        assert time.monotonic() - started < 5.0
        assert subscription.cancelled
        assert await runtime.fetch(_SlowSubscription(), timeout_s=30.0) == []  # stop already set: at once

    asyncio.run(main())


def test_exit_now_joins_threads_runs_atexit_and_flushes(tmp_path: Path):
    result = _python(f"""
        import atexit, sys, threading, time
        from pathlib import Path
        from asyncflow.actor_process import exit_now
        out = Path({str(tmp_path)!r})
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        def late():
            time.sleep(0.3)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()
        import concurrent.futures
        pool = concurrent.futures.ThreadPoolExecutor(1)  # its idle worker must not hold the exit up
        pool.submit(time.sleep, 0.01).result()
        sys.stdout.write("no newline, still in the buffer")
        exit_now(3)
        (out / "after").write_text("must not run")
    """)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "no newline, still in the buffer"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
    assert not (tmp_path / "after").exists()
