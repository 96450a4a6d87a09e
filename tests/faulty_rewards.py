"""Reward functions that break the contract on purpose, for the bad-input tests."""

from __future__ import annotations


def raises_on_two_plus_two(prompt: str, response: str, answer: str, **_: object) -> float:
    if prompt == "2+2=":
        raise ValueError("this reward function cannot score 2+2")
    return 1.0 if response.strip() == answer else 0.0


def returns_text(prompt: str, response: str, **_: object) -> str:
    return "high"
