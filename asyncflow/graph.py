"""The stage graph: which columns each stage reads and writes.

The scheduler dispatches a GRPO group to a stage as soon as every input column of that stage is
ready for the group — no batch barrier between stages. The `prompt` stage is the scheduler itself
(it writes prompts at admission); the trainer computes GRPO advantages from `reward` as it trains.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


PROMPT = Stage("prompt", inputs=(), outputs=("prompt_ids", "meta"))
ROLLOUT = Stage(
    "rollout",
    inputs=("prompt_ids",),
    outputs=("response_ids", "behaviour_logprobs", "policy_version", "finish_reason"),
)
REWARD = Stage("reward", inputs=("meta", "response_ids"), outputs=("reward",))
TRAINER = Stage(
    "trainer",
    inputs=("prompt_ids", "response_ids", "behaviour_logprobs", "policy_version", "reward"),
    outputs=(),
)

GRPO_GRAPH: tuple[Stage, ...] = (PROMPT, ROLLOUT, REWARD, TRAINER)
"""Stages in data-flow order."""

WORK_STAGES: tuple[str, ...] = tuple(stage.name for stage in GRPO_GRAPH if stage.inputs)
"""Stages served by actors pulling from the work queue."""
