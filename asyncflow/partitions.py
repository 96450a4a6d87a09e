"""How a run is laid out in samples: partitions (one per optimizer step), GRPO groups, sample ids.

Everything here is a pure function of the config and the seed, so the scheduler, the synchronous
reference loop and the tests agree on which prompt and which random seed every sample gets.
"""

from __future__ import annotations

import random
from functools import lru_cache


def group_sample_ids(partition: int, group: int, prompts_per_step: int, samples_per_prompt: int) -> list[int]:
    """Global ids of the `samples_per_prompt` samples of one group: dense, unique over the run."""
    first = (partition * prompts_per_step + group) * samples_per_prompt
    return list(range(first, first + samples_per_prompt))


def pack_by_budget(costs: list[int], budget: int) -> list[list[int]]:
    """Split indices 0..n-1, in order, into consecutive runs whose costs add up to at most
    `budget` (a single item costlier than the budget gets a run of its own). Rollout work items
    are packed this way by estimated tokens, so each costs about the same."""
    runs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, cost in enumerate(costs):
        if current and used + cost > budget:
            runs.append(current)
            current, used = [], 0
        current.append(index)
        used += cost
    if current:
        runs.append(current)
    return runs


def group_of(sample_id: int, prompts_per_step: int, samples_per_prompt: int) -> int:
    """Index of the sample's group within its partition."""
    return (sample_id // samples_per_prompt) % prompts_per_step


def partition_of(sample_id: int, prompts_per_step: int, samples_per_prompt: int) -> int:
    return sample_id // (prompts_per_step * samples_per_prompt)


def prompt_index(partition: int, group: int, prompts_per_step: int, n_prompts: int, seed: int, shuffle: bool) -> int:
    """Dataset row used by (partition, group): epochs over the dataset, each in a seeded order."""
    position = partition * prompts_per_step + group
    epoch, offset = divmod(position, n_prompts)
    if not shuffle:
        return offset
    return _epoch_order(seed, epoch, n_prompts)[offset]


@lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n_prompts: int) -> tuple[int, ...]:
    order = list(range(n_prompts))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def sample_seed(run_seed: int, sample_id: int) -> int:
    """The sampling seed of one sample: the same sample is drawn the same way wherever it runs."""
    return (run_seed * 0x9E3779B1 + sample_id * 0x85EBCA6B + 1) % (2**63 - 1)
