"""Response-length calibration for the SIMULATED engine: lengths SmolLM2 really generates.

Samples `--samples` responses per prompt from SmolLM2-135M-Instruct with vLLM (CPU, eager) on
open-ended chat prompts (the ones bench/generation.py uses, over 8 subjects) and on the
arithmetic task's prompts without the "only the number" system prompt, with `--max-new-tokens`
as the limit, then fits the log-normal the simulated engine draws from: mean length and sigma =
std of log(length) over the responses that ended on their own (EOS) and reports the share cut at
the limit. The defaults of `SimulatedInferenceSettings` (mean_tokens, sigma) come from this run.

Run: `.venv/bin/python -m bench.response_lengths [--samples 4] [--max-new-tokens 512]`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from asyncflow.config import VLLMInferenceSettings
from asyncflow.dataset import load_prompts, tokenize_prompt
from asyncflow.engines import SamplingParams, make_inference_engine
from bench.generation import ANIMALS, SMOLLM2_PROMPTS, smollm2_model
from examples.chat_arith import write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--arith-prompts", type=int, default=16)
    args = parser.parse_args()
    model = smollm2_model()
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = [template.format(animal) for template in SMOLLM2_PROMPTS for animal in ANIMALS]
    arith = load_prompts(write_dataset(Path(".cache/asyncflow/bench/chat_arith.jsonl"), 0), "prompt")
    texts += [row.prompt for row in arith[: args.arith_prompts]]
    prompts = [tokenize_prompt(tokenizer, t, True, None) for t in texts for _ in range(args.samples)]
    engine = make_inference_engine(VLLMInferenceSettings(cpu_kv_cache_gib=2, vllm_kwargs={"enforce_eager": True}),
                                   model)
    gens = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=args.max_new_tokens),
                           seeds=list(range(len(prompts))))
    lengths = np.array([len(g.token_ids) for g in gens])
    ended = np.array([g.finish_reason == "stop" for g in gens])
    logs = np.log(lengths[ended])
    result = {
        "responses": int(len(lengths)), "max_new_tokens": args.max_new_tokens,
        "mean_tokens": round(float(lengths.mean()), 1), "median_tokens": float(np.median(lengths)),
        "p90_tokens": float(np.percentile(lengths, 90)), "max_tokens": int(lengths.max()),
        "cut_at_limit": round(float(1 - ended.mean()), 3),
        "lognormal_sigma": round(float(logs.std()), 3),
        "lognormal_mean_tokens": round(float(math.exp(logs.mean() + logs.var() / 2)), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
