"""The training loop every torch-based engine shares: micro-batches, the loss, the AdamW step.

An engine subclasses `TorchTrainingEngine` and provides `self.model`, `self.optimizer`,
`self.settings` (micro_batch_size, grad_clip), `self.device` and `_logprobs(prompt_ids,
response_ids)`, the [B, T] token logprobs over response positions with a graph to the weights.
`_context()` may wrap all model work (Megatron-core installs its CPU shims there). The semantics
are the `TrainingEngine` contract: summed per-sample losses, gradients accumulated across calls,
scaled once per optimizer step.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import Any

import torch

from asyncflow.engines.base import LossFn, TrainBatch, TrainingEngine
from asyncflow.errors import EngineError


def padded(rows: list[list[float]], width: int, device: torch.device) -> torch.Tensor:
    """Ragged per-token values as a zero-padded float32 [len(rows), width] tensor on `device`."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(device)


class TorchTrainingEngine(TrainingEngine):
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    settings: Any
    device: torch.device

    @abstractmethod
    def _logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        """Token logprobs [B, T] of the responses (T = longest), with a graph to the weights."""

    def _context(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    @torch.no_grad()
    def compute_logprobs(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]]
    ) -> list[list[float]]:
        out: list[list[float]] = []
        size = self.settings.micro_batch_size
        with self._context():
            for start in range(0, len(prompt_ids), size):
                prompts, responses = prompt_ids[start : start + size], response_ids[start : start + size]
                values = self._logprobs(prompts, responses).cpu()
                out.extend(values[i, : len(r)].tolist() for i, r in enumerate(responses))
        return out

    # --------------------------------------------------------------------------------- training
    def forward_backward(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        """Accumulate the gradient of loss_fn over `batch`; stats add across micro-batches
        (keys ending in `_max` combine by max)."""
        n = len(batch)
        for name in ("response_ids", "behaviour_logprobs", "advantages"):
            if len(getattr(batch, name)) != n:
                raise EngineError(
                    f"TrainBatch.{name} has {len(getattr(batch, name))} entries, prompt_ids {n}"
                )
        for i, (response, behaviour) in enumerate(
            zip(batch.response_ids, batch.behaviour_logprobs, strict=True)
        ):
            if len(response) != len(behaviour):
                raise EngineError(
                    f"sample {i}: {len(response)} response tokens but {len(behaviour)} behaviour logprobs"
                )
        totals: dict[str, float] = {}
        size = self.settings.micro_batch_size
        with self._context():
            for start in range(0, n, size):
                end = min(start + size, n)
                responses = batch.response_ids[start:end]
                width = max(len(r) for r in responses)
                logprobs = self._logprobs(batch.prompt_ids[start:end], responses)
                mask = torch.zeros((end - start, width), dtype=torch.float32)
                for i, r in enumerate(responses):
                    mask[i, : len(r)] = 1.0
                ref = (
                    None
                    if batch.ref_logprobs is None
                    else padded(batch.ref_logprobs[start:end], width, self.device)
                )
                loss, stats = loss_fn(
                    logprobs,
                    padded(batch.behaviour_logprobs[start:end], width, self.device),
                    torch.tensor(batch.advantages[start:end], dtype=torch.float32, device=self.device),
                    mask.to(self.device),
                    ref,
                )
                # A micro-batch of empty responses has a loss with no graph: nothing to add.
                if loss.requires_grad:
                    loss.backward()
                for key, value in stats.items():
                    if key in totals and key.endswith("_max"):
                        totals[key] = max(totals[key], float(value))
                    else:
                        totals[key] = totals.get(key, 0.0) + float(value)
        return totals

    def optimizer_step(self, grad_scale: float) -> dict[str, float]:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        for p in parameters:
            p.grad.mul_(grad_scale)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(parameters, self.settings.grad_clip)
            if parameters
            else torch.tensor(0.0)
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm)}
