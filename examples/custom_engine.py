"""A custom inference engine in ~50 lines: how to plug your own engine into AsyncFlow.

It samples from an HF model with plain full forward passes (no KV cache), so it is slow and
simple — the point is the contract: `generate` and `load_weights` (see docs/engines.md).
Use it with:

    rollout:
      engine: {type: custom, factory: examples.custom_engine:make_engine}

The engine contract tests (tests/test_engine_contract.py) run against it like any built-in one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asyncflow.engines import Generation, InferenceEngine, SamplingParams


class NoCacheSampler(InferenceEngine):
    def __init__(self, model_path: Path, dtype: str = "float32") -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
        self.eos_id = AutoTokenizer.from_pretrained(model_path).eos_token_id

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int]) -> list[Generation]:
        return [self._sample_one(list(prompt), params, seed) for prompt, seed in zip(prompts, seeds, strict=True)]

    def _sample_one(self, prompt: list[int], params: SamplingParams, seed: int) -> Generation:
        generator = torch.Generator().manual_seed(seed)
        tokens, logprobs = [], []
        for _ in range(params.max_new_tokens):
            logits = self.model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            logp = torch.log_softmax(logits / params.temperature, dim=-1)
            probs = logp.exp()
            if params.top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            token = int(torch.multinomial(probs, 1, generator=generator))
            tokens.append(token)
            logprobs.append(float(logp[token]))
            if token == self.eos_id:
                return Generation(tokens, logprobs, "stop")
        return Generation(tokens, logprobs, "length")

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.model.load_state_dict(dict(named_tensors), strict=True)


def make_engine(model_path: Path, dtype: str = "float32") -> NoCacheSampler:
    return NoCacheSampler(model_path, dtype)
