"""SIMULATED engines, for benchmarks and scale tests only: they sleep instead of computing.

They let the pipeline benchmarks run dozens of rollout instances and long-tailed generation on a
2-core machine while exercising exactly the same actors, broker, store and scheduler code as a
real run: they are ordinary engine plug-ins (`type: simulated`) behind the same interfaces.

- `SimulatedInferenceEngine` models one continuous-batching inference server (what vLLM is):
  `slots` sequences decode at once; each sequence costs `prefill_s + per_token_s × length` of
  wall time and takes the slot that frees first (FIFO). Response lengths are log-normal with mean
  `mean_tokens` and shape `sigma`, clipped to [1, max_new_tokens] — the long tail that makes
  synchronous RL wait. A generate call returns when its last sequence is done, so several calls in
  flight at once (the rollout actor's `concurrent_items`) share the slots as a real server would.
  Token ids are random; each length is a pure function of the sample's seed, so a run is
  reproducible and the synchronous and asynchronous runs of a benchmark see the same lengths.
- `SimulatedTrainingEngine` sleeps `per_token_s × tokens / workers` per forward+backward
  (`workers` simulates data-parallel width) and `step_s` per optimizer step, and exports
  `weights_bytes` of meaningless weights so weight sync moves realistic amounts of data.

Nothing here learns: rewards of a simulated run mean nothing.
"""

from __future__ import annotations

import heapq
import json
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyncflow.config import SimulatedInferenceSettings, SimulatedTrainingSettings
from asyncflow.engines.base import (
    Generation,
    InferenceEngine,
    LossFn,
    SamplingParams,
    TrainBatch,
    TrainingEngine,
)
from asyncflow.errors import EngineError

SIMULATED_LOGPROB = -1.0  # every simulated token's logprob: on-policy ratios are exactly 1


def _model_vocab(model_path: Path) -> tuple[int, int | None]:
    """vocab_size and eos_token_id from the HF config (the tokenizer still decodes the ids)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    eos = config.get("eos_token_id")
    return int(config["vocab_size"]), (eos[0] if isinstance(eos, list) else eos)


def response_length(seed: int, mean_tokens: float, sigma: float, max_new_tokens: int) -> int:
    """The simulated length of the response with this sample seed (log-normal, clipped)."""
    rng = np.random.default_rng(seed)
    # Log-normal with the requested mean: E[exp(mu + sigma Z)] = exp(mu + sigma² / 2).
    mu = math.log(mean_tokens) - sigma * sigma / 2
    return int(min(max_new_tokens, max(1, round(float(np.exp(mu + sigma * rng.standard_normal()))))))


class SimulatedInferenceEngine(InferenceEngine):
    """A continuous-batching server with `slots` decode slots, simulated by sleeping."""

    concurrent_requests = True

    def __init__(self, model_path: Path, settings: SimulatedInferenceSettings, instance: int = 0) -> None:
        self.settings = settings
        self.slowdown = settings.instance_slowdown.get(instance, 1.0)
        self.vocab_size, self.eos_id = _model_vocab(model_path)
        self._lock = threading.Lock()
        self._slot_free_at = [0.0] * settings.slots  # a min-heap of the times each slot frees
        self.generated_tokens = 0
        self.loaded_versions = 0

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> list[Generation]:
        s = self.settings
        lengths = [response_length(seed, s.mean_tokens, s.sigma, params.max_new_tokens) for seed in seeds]
        with self._lock:
            now = time.monotonic()
            finish = now
            for length in lengths:
                start = max(now, heapq.heappop(self._slot_free_at))
                end = start + (s.prefill_s + s.per_token_s * length) * self.slowdown
                heapq.heappush(self._slot_free_at, end)
                finish = max(finish, end)
            self.generated_tokens += sum(lengths)
        time.sleep(max(0.0, finish - time.monotonic()))
        return [self._generation(length, params.max_new_tokens, seed) for length, seed in zip(lengths, seeds, strict=True)]

    def _generation(self, length: int, max_new_tokens: int, seed: int) -> Generation:
        rng = np.random.default_rng(seed + 1)
        tokens = rng.integers(0, self.vocab_size, size=length).tolist()
        stopped = length < max_new_tokens and self.eos_id is not None
        if stopped:
            tokens[-1] = self.eos_id
        else:  # a response cut at the limit must not contain EOS
            tokens = [t if t != self.eos_id else (t + 1) % self.vocab_size for t in tokens]
        return Generation(tokens, [SIMULATED_LOGPROB] * length, "stop" if stopped else "length")

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for _ in named_tensors:  # consume them, as a real engine would
            pass
        time.sleep(self.settings.load_s)
        self.loaded_versions += 1


class SimulatedTrainingEngine(TrainingEngine):
    """Sleeps in proportion to tokens; exports `weights_bytes` of weights that encode the step count."""

    def __init__(self, settings: SimulatedTrainingSettings) -> None:
        self.settings = settings
        self.steps = 0
        self.accumulated_samples = 0

    def forward_backward(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        poisoned = sorted(set(batch.sample_ids) & set(self.settings.fail_samples))
        if poisoned:
            raise EngineError(f"fault injection: samples {poisoned} are in fail_samples")
        tokens = sum(len(r) for r in batch.response_ids)
        all_tokens = tokens + sum(len(p) for p in batch.prompt_ids)
        time.sleep(self.settings.per_token_s * all_tokens / self.settings.workers)
        self.accumulated_samples += len(batch)
        # The loss is evaluated for real on the behaviour logprobs (ratio 1), so its stats are sound.
        width = max((len(r) for r in batch.response_ids), default=0)
        logprobs = torch.zeros(len(batch), width)
        mask = torch.zeros(len(batch), width)
        for row, values in enumerate(batch.behaviour_logprobs):
            logprobs[row, : len(values)] = torch.tensor(values)
            mask[row, : len(values)] = 1.0
        advantages = torch.tensor(batch.advantages, dtype=torch.float32)
        _, stats = loss_fn(logprobs, logprobs.clone(), advantages, mask, None)
        return stats

    def discard_gradients(self) -> None:
        self.accumulated_samples = 0

    def training_state(self) -> dict[str, Any]:
        return {"steps": self.steps}  # the simulated weights are a function of the step count

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])

    def optimizer_step(self, grad_scale: float) -> dict[str, float]:
        time.sleep(self.settings.step_s)
        self.steps += 1
        self.accumulated_samples = 0
        return {"grad_norm": 0.0}

    def compute_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        return [[SIMULATED_LOGPROB] * len(r) for r in response_ids]

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        weights = torch.full((self.settings.weights_bytes // 4,), float(self.steps), dtype=torch.float32)
        yield "simulated.weight", weights

    def save_pretrained(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "simulated.json").write_text(json.dumps({"engine": "simulated", "steps": self.steps}) + "\n")


def simulated_reward(prompt: str, response: str, **fields: object) -> float:
    """A reward for simulated runs: deterministic and meaningless (parity of the response length)."""
    return float(len(response) % 2)
