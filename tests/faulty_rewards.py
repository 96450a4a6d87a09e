"""Reward functions that break the contract on purpose, for the bad-input tests."""

from __future__ import annotations

import math
import time

HANG_S = 0.3
"""How long `misbehaves_by_row` hangs: longer than the tests' 0.2 s reward timeout, short enough
that fewer than `asyncflow.rewards.DEFAULT_MAX_HUNG` calls are ever stuck at once."""


def raises_on_two_plus_two(prompt: str, response: str, answer: str, **_: object) -> float:
    if prompt == "2+2=":
        raise ValueError("this reward function cannot score 2+2")
    return 1.0 if response.strip() == answer else 0.0


def returns_text(prompt: str, response: str, **_: object) -> str:
    return "high"


def misbehaves_by_row(prompt: str, response: str, behaviour: str, **_: object) -> object:
    """Does what the dataset row's `behaviour` field says: score (0.75), raise, hang, exit, or
    return None / NaN / inf / a string."""
    if behaviour == "raise":
        raise ValueError(f"cannot score {prompt}")
    if behaviour == "hang":
        time.sleep(HANG_S)
        return 1.0
    if behaviour == "exit":
        raise SystemExit(f"reward function exits on {prompt}")
    return {"ok": 0.75, "none": None, "nan": math.nan, "inf": math.inf, "text": "high"}[behaviour]
