"""The reward-function contract: `fn(prompt: str, response: str, **row_fields) -> float`.

`check_reward` is the one place that decides what counts as a reward: a finite real number
(bools are refused — `True` is far more often a bug than a score).
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_reward(result: Any) -> float:
    if isinstance(result, bool) or not isinstance(result, numbers.Real):
        raise TypeError(f"returned {type(result).__name__} {result!r}, expected a number")
    value = float(result)
    if not math.isfinite(value):
        raise ValueError(f"returned non-finite {result!r}")
    return value
