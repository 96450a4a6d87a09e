"""Addition for an instruct model: "What is 7+8?" answered with just "15".

The task for SmolLM2-135M-Instruct (`examples/smollm2.yaml`): the model mostly knows small sums
but wraps them in sentences. The reward is graded so GRPO sees a signal from the first step:
1.0 for exactly the number, 0.5 for a reply that starts with it, 0.25 for one that contains it.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

MAX_OPERAND = 9


def write_dataset(path: Path, seed: int = 0) -> Path:
    rows = [{"prompt": f"What is {a}+{b}?", "answer": str(a + b)}
            for a in range(1, MAX_OPERAND + 1) for b in range(1, MAX_OPERAND + 1)]
    random.Random(seed).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def reward(prompt: str, response: str, answer: str, **_: object) -> float:
    text = response.strip()
    if text == answer:
        return 1.0
    numbers = re.findall(r"-?\d+", text)
    if numbers and numbers[0] == answer and text.startswith(answer):
        return 0.5
    if answer in numbers:
        return 0.25
    return 0.0
