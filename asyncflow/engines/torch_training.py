"""The training loop every torch-based engine shares: micro-batches, the loss, the AdamW step.

An engine subclasses `TorchTrainingEngine` and provides `self.model`, `self.optimizer`,
`self.settings` (micro_batch_size, grad_clip, logprob_chunk_tokens), `self.device`, `self.pad_id`,
`_hidden_states` (final hidden states of padded sequences) and `_chunk_logprobs` (the output layer
and log-softmax at the response positions); `_logprobs` turns them into the [B, T] token logprobs
over response positions with a graph to the weights. `_context()` may wrap all model work (Megatron-core installs its CPU shims there). The semantics
are the `TrainingEngine` contract: summed per-sample losses, gradients accumulated across calls,
scaled once per optimizer step; the training state a checkpoint keeps is the optimizer's.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from asyncflow.engines.base import LossFn, TrainBatch, TrainingEngine, accumulate_stats
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

    pad_id: int
    temperature: float

    @abstractmethod
    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, L, H] of right-padded sequences."""

    @abstractmethod
    def _chunk_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log_softmax(output_layer(hidden) / T)[target] for rows [N, H] and targets [N]."""

    def _logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        """[B, T] response-token logprobs (zeros past each response's end), T = longest response."""
        rows: list[int] = []
        cols: list[int] = []
        targets: list[int] = []
        for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            if response and not prompt:
                raise EngineError(
                    f"sample {row} has a response but an empty prompt; nothing predicts its first token"
                )
            rows.extend([row] * len(response))
            cols.extend(range(len(response)))
            targets.extend(response)
        out_shape = (len(prompt_ids), max(len(r) for r in response_ids))
        if not rows:
            return torch.zeros(out_shape, device=self.device)

        picked = self._response_hidden(prompt_ids, response_ids)  # [N, H], sample by sample
        row_index = torch.tensor(rows, device=self.device)
        col_index = torch.tensor(cols, device=self.device)
        target = torch.tensor(targets, device=self.device)
        # The output layer over response positions only, a chunk at a time, so at most
        # chunk × vocab float logits live at once. Under autograd each chunk is checkpointed:
        # the backward recomputes its logits instead of keeping every chunk's softmax alive.
        chunk = self.settings.logprob_chunk_tokens
        pieces = []
        for start in range(0, picked.shape[0], chunk):
            h, t = picked[start : start + chunk], target[start : start + chunk]
            if torch.is_grad_enabled():
                pieces.append(checkpoint(self._chunk_logprobs, h, t, use_reentrant=False))
            else:
                pieces.append(self._chunk_logprobs(h, t))
        flat = torch.cat(pieces)
        return torch.zeros(out_shape, dtype=flat.dtype, device=self.device).index_put(
            (row_index, col_index), flat
        )

    def _response_hidden(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        """Final hidden states [N, H] of the positions that predict the response tokens, sample by
        sample and token by token (N = total response tokens). Every prompt is non-empty.

        This default runs each whole prompt + response as one right-padded row; an engine may
        override it with something cheaper that computes the same values (the HF engine shares a
        prompt's forward between the samples of a group)."""
        batch = len(prompt_ids)
        sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        rows: list[int] = []
        positions: list[int] = []
        for row, (prompt, response, sequence) in enumerate(
            zip(prompt_ids, response_ids, sequences, strict=True)
        ):
            input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, : len(sequence)] = 1
            rows.extend([row] * len(response))
            # The position whose logits predict response[j] is the one before it.
            positions.extend(range(len(prompt) - 1, len(prompt) - 1 + len(response)))
        hidden = self._hidden_states(input_ids.to(self.device), attention_mask.to(self.device))
        return hidden[torch.tensor(rows, device=self.device), torch.tensor(positions, device=self.device)]

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
                accumulate_stats(totals, stats)
        return totals

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def training_state(self) -> dict[str, Any]:
        # torch's optimizer state dict names parameters by their index in `model.parameters()`,
        # which an engine rebuilt from the checkpoint's folder enumerates in the same order.
        return {"optimizer": self.optimizer.state_dict()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as error:
            raise EngineError(
                f"{type(self).__name__}: the checkpoint's optimizer state does not fit this model "
                f"({type(error).__name__}: {error}); was it written by another model or engine type?"
            ) from error

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
