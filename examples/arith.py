"""Single-digit addition, the default example: prompts "3+4=", reward for answering "7".

Everything is built locally: `write_dataset` writes the prompts, `build_tiny_model` a small
randomly initialised Llama with a character-level tokenizer. A random model answers correctly
about 1 time in 15, so GRPO groups see successes from the first step and the reward climbs.

Run it: `asyncflow run examples/arith.yaml` (what `make run` does).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHARS = "0123456789+="
MAX_OPERAND = 4  # sums stay single digits


def write_dataset(path: Path, seed: int = 0) -> Path:
    """Every a+b with 0 ≤ a, b ≤ MAX_OPERAND, one JSON object per line: {"prompt", "answer"}."""
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)}
            for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(seed).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    # Imported here: it loads torch and transformers, which the reward actor (it imports this
    # module for `reward`) does not otherwise need.
    from asyncflow.tiny_model import build_tiny_llama

    # 2 heads of size 32: vLLM's CPU attention needs head sizes of at least 32.
    return build_tiny_llama(path, CHARS, seed=seed, num_heads=2)


def reward(prompt: str, response: str, answer: str, **_: object) -> float:
    """1 for exactly the answer (then EOS), 0.5 for the answer followed by more text, else 0."""
    text = response.strip()
    if text == answer:
        return 1.0
    if text.startswith(answer):
        return 0.5
    return 0.0
