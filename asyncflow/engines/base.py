"""The two engine interfaces: inference (generate) and training (loss → update → export).

Everything outside `asyncflow/engines/` talks to engines only through these ABCs, so vLLM,
Megatron-core or a user's own engine plug in by implementing a handful of methods. Tensors
cross the boundary under HF parameter names; token data crosses as plain int/float lists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asyncflow.errors import EngineError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16


@dataclass(frozen=True)
class Generation:
    """One sampled response: its tokens, each token's logprob under log_softmax(logits / T), why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS sampled, included in token_ids) or "length"


class InferenceEngine(ABC):
    """Generates responses from token ids; swaps weights in place."""

    concurrent_requests: bool = False
    """True when `generate` may be called from several threads at once because the engine batches
    requests continuously; otherwise the rollout actor makes one call at a time."""

    @abstractmethod
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> list[Generation]:
        """Sample one response per prompt. `seeds[i]` alone decides row i's random draws, so the
        same (weights, prompt, seed) gives the same response whatever the batch around it."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model weights with HF-named tensors (a full state dict)."""


@dataclass
class TrainBatch:
    """Sequences to train on: prompt and response token ids plus per-token/per-sample targets."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    behaviour_logprobs: list[list[float]]
    advantages: list[float]
    ref_logprobs: list[list[float]] | None = None
    sample_ids: list[int] = field(default_factory=list)
    """The samples' ids, when the caller knows them (for error messages; engines need not use them)."""

    def __len__(self) -> int:
        return len(self.prompt_ids)


def check_generate_args(prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> None:
    """What every `generate` requires: one seed per prompt and no empty prompt."""
    if len(prompts) != len(seeds):
        raise EngineError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise EngineError(f"generate: prompt {index} is empty; a prompt needs at least one token")


def accumulate_stats(totals: dict[str, float], stats: dict[str, float]) -> dict[str, float]:
    """Merge loss stats into `totals` (in place, returned): keys ending in `_max` keep the largest
    value, every other key is a sum, so micro-batches, data-parallel shards and the items of a
    step all combine the same way."""
    for key, value in stats.items():
        if key in totals and key.endswith("_max"):
            totals[key] = max(totals[key], float(value))
        else:
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
"""loss_fn(logprobs, behaviour_logprobs, advantages, mask, ref_logprobs) → (sum of per-sample
losses, stats). Tensors are [B, T] over response positions (T = longest response), advantages [B]."""


class TrainingEngine(ABC):
    """Holds the trainable policy and its optimizer."""

    @abstractmethod
    def forward_backward(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        """Add the gradient of loss_fn's summed loss over `batch` to the accumulated gradients."""

    @abstractmethod
    def optimizer_step(self, grad_scale: float) -> dict[str, float]:
        """Multiply accumulated gradients by `grad_scale`, clip, step, zero them; returns {'grad_norm': …}."""

    def discard_gradients(self) -> None:
        """Drop every gradient accumulated since the last optimizer step. The trainer calls it when
        an item fails part-way, then replays the step's other items, so that no sample's gradient
        counts twice. An engine that cannot do this makes a failed item stop the trainer."""
        raise EngineError(f"{type(self).__name__} cannot discard accumulated gradients")

    def training_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the weights (which `save_pretrained` writes): the
        optimizer's state (moments, step counts) and any counters of the engine. Tensors, lists,
        dicts and numbers only, so checkpoints load with `torch.load(weights_only=True)`. Called at
        a step boundary, with no gradient accumulated. An engine that cannot makes checkpoints fail."""
        raise EngineError(f"{type(self).__name__} cannot save its training state, so it cannot checkpoint "
                          "(set trainer.checkpoint_every: 0 or implement training_state/load_training_state)")

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what `training_state` returned, into an engine built from the checkpoint's folder."""
        raise EngineError(f"{type(self).__name__} cannot load a training state, so it cannot resume from a checkpoint")

    @abstractmethod
    def compute_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Token logprobs of each response under the current weights (no gradient)."""

    @abstractmethod
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Current weights as (HF name, CPU tensor) pairs, for the inference side."""

    @abstractmethod
    def save_pretrained(self, path: Path) -> None:
        """Write the model (and tokenizer) as an HF folder that transformers and vLLM load."""
