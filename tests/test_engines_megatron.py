"""Megatron-core training engine against the HF reference on tiny local models (float32, CPU).

Checked: the HF ↔ Megatron weight conversion round-trips bit for bit (MHA, GQA, tied, biases);
the Megatron model's token logprobs equal HFTrainingEngine's on the same weights; one GRPO step
moves both engines the same way (stats, gradients, grad norm, weights); exported / saved weights
load into transformers and give the same logprobs; data parallel over 2 processes equals one
process on the whole batch. Skipped where megatron-core is not installed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="the Megatron engine needs megatron-core (extra `megatron`)")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from asyncflow.algorithms import grpo_loss  # noqa: E402
from asyncflow.config import HFInferenceSettings, HFTrainingSettings, MegatronTrainingSettings  # noqa: E402
from asyncflow.engines import TrainBatch, make_training_engine  # noqa: E402
from asyncflow.engines.hf import HFInferenceEngine, HFTrainingEngine  # noqa: E402
from asyncflow.engines.megatron_convert import (  # noqa: E402
    hf_to_megatron,
    megatron_to_hf,
    transformer_config_from_hf,
)
from asyncflow.engines.megatron_engine import MegatronTrainingEngine  # noqa: E402
from asyncflow.errors import EngineError  # noqa: E402
from asyncflow.tiny_model import DEFAULT_CHARS, build_char_tokenizer, build_tiny_llama  # noqa: E402

PROMPTS = [[7, 14, 8, 17], [5, 6], [8, 9, 10, 11, 12, 13, 14, 15, 16], [4]]
RESPONSES = [[5, 6, 7, 2], [9, 9, 18, 9, 9, 1, 3], [12], []]
LOSS_FN = functools.partial(grpo_loss, kl_coef=0.05)  # picklable: data parallel ships it to ranks

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build_tiny_qwen2(path: Path, seed: int = 0) -> Path:
    """Qwen2 with GQA (4 query heads, 2 KV groups), tied embeddings, and random q/k/v biases and
    norm weights (HF initialises those to 0 and 1, which would hide a misplaced tensor)."""
    tokenizer = build_char_tokenizer(DEFAULT_CHARS)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rope_theta=5000.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith(".bias"):
                tensor.normal_(std=0.2)
            elif "norm" in name:
                tensor.copy_(1.0 + 0.2 * torch.randn_like(tensor))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("megatron-models")
    return {
        "llama": build_tiny_llama(root / "llama", DEFAULT_CHARS, seed=0),
        "qwen2": _build_tiny_qwen2(root / "qwen2", seed=1),
    }


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(
        (abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)), default=0.0
    )


def _batch(reference: HFTrainingEngine) -> TrainBatch:
    """Behaviour logprobs near the current policy, perturbed so some ratios leave the clip range."""
    current = reference.compute_logprobs(PROMPTS, RESPONSES)
    return TrainBatch(
        prompt_ids=PROMPTS,
        response_ids=RESPONSES,
        behaviour_logprobs=[[lp + 0.3 * ((i + j) % 3 - 1) for j, lp in enumerate(r)] for i, r in enumerate(current)],
        advantages=[1.0, -0.5, 2.0, -1.5],
        ref_logprobs=[[lp - 0.1 for lp in r] for r in current],
    )


# ----------------------------------------------------------------------------- conversion
def _llama_gqa() -> LlamaForCausalLM:
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=23, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("which", ["llama", "qwen2", "llama-gqa"])
def test_conversion_round_trip_is_exact(models: dict[str, Path], which: str) -> None:
    model = _llama_gqa() if which == "llama-gqa" else AutoModelForCausalLM.from_pretrained(models[which])
    hf = model.state_dict()
    megatron = hf_to_megatron(hf, model.config)
    back = megatron_to_hf(megatron, model.config)
    assert back.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name
    # The fused QKV has Megatron's size: groups × (heads/groups + 2) × head_dim rows.
    config = transformer_config_from_hf(model.config)
    rows = config.num_query_groups * (config.num_attention_heads // config.num_query_groups + 2) * config.kv_channels
    assert megatron["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (rows, config.hidden_size)
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in megatron) == (which == "qwen2")
    assert ("output_layer.weight" in megatron) == (which != "qwen2")  # Qwen2 here ties embeddings


def test_conversion_rejects_mismatches(models: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    hf = dict(model.state_dict())
    with pytest.raises(EngineError, match="no Megatron counterpart"):
        hf_to_megatron({**hf, "model.extra.weight": torch.zeros(1)}, model.config)
    del hf["model.norm.weight"]
    with pytest.raises(EngineError, match="model.norm.weight"):
        hf_to_megatron(hf, model.config)
    other = LlamaConfig(hidden_act="gelu")
    with pytest.raises(EngineError, match="silu"):
        transformer_config_from_hf(other)


# ------------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("which", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_hf(models: dict[str, Path], which: str, temperature: float) -> None:
    # Tiny micro-batches and chunks exercise the padding and chunked output-layer paths.
    settings = {"micro_batch_size": 3, "logprob_chunk_tokens": 5}
    megatron = MegatronTrainingEngine(models[which], MegatronTrainingSettings(**settings), temperature=temperature)
    hf = HFTrainingEngine(models[which], HFTrainingSettings(**settings), temperature=temperature)
    ours = megatron.compute_logprobs(PROMPTS, RESPONSES)
    assert ours[3] == []
    # Measured: ~2e-7 (float32 summation-order noise between the two implementations).
    assert _max_diff(ours, hf.compute_logprobs(PROMPTS, RESPONSES)) < 1e-4


# ------------------------------------------------------------------------------- training
@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_training_step_matches_hf(models: dict[str, Path], which: str) -> None:
    lr = 1e-3
    settings = {"lr": lr, "micro_batch_size": 3, "logprob_chunk_tokens": 7, "weight_decay": 0.01}
    megatron = MegatronTrainingEngine(models[which], MegatronTrainingSettings(**settings))
    hf = HFTrainingEngine(models[which], HFTrainingSettings(**settings))
    batch = _batch(hf)

    stats_m = megatron.forward_backward(batch, LOSS_FN)
    stats_h = hf.forward_backward(batch, LOSS_FN)
    assert stats_m.keys() == stats_h.keys()
    for key in stats_h:
        assert stats_m[key] == pytest.approx(stats_h[key], rel=1e-5, abs=1e-6), key
    assert stats_h["clip_frac_tokens"] > 0 and stats_h["samples"] == 3

    # Gradients, mapped to HF names with the same converter as the weights.
    grads_m = megatron_to_hf({n: p.grad for n, p in megatron.model.named_parameters()}, megatron.hf_config)
    for name, p in hf.model.named_parameters():
        torch.testing.assert_close(grads_m[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)

    norm_m = megatron.optimizer_step(1.0 / len(batch))["grad_norm"]
    norm_h = hf.optimizer_step(1.0 / len(batch))["grad_norm"]
    assert norm_m == pytest.approx(norm_h, rel=1e-5)

    # Adam's first step moves each weight by about lr·sign(grad) whatever the gradient's size, so
    # float noise in a near-zero gradient can move one engine's weight ±lr and the other's not.
    # Where the gradients are clearly non-zero the updates agree to float precision; elsewhere
    # the difference is bounded by 2·lr. Check both. Measured (lr 1e-3): max |Δ| 4e-6, and at
    # most 0.02% of a tensor's elements differ by more than 1e-6.
    exported = dict(megatron.export_weights())
    reference = hf.model.state_dict()
    assert exported.keys() == reference.keys()
    for name in dict(hf.model.named_parameters()):
        diff = (exported[name] - reference[name]).abs()
        assert float(diff.max()) <= 2 * lr + 1e-6, name
        assert float(diff.max()) < 1e-6 or float((diff > 1e-6).float().mean()) < 1e-3, name
    after_m = megatron.compute_logprobs(PROMPTS, RESPONSES)
    after_h = hf.compute_logprobs(PROMPTS, RESPONSES)
    assert _max_diff(after_m, batch.behaviour_logprobs) > 1e-3  # the step changed the policy
    assert _max_diff(after_m, after_h) < 1e-4


def test_empty_responses_and_validation(models: dict[str, Path]) -> None:
    engine = MegatronTrainingEngine(models["llama"], MegatronTrainingSettings(micro_batch_size=2))
    batch = TrainBatch(
        prompt_ids=[[4, 5], [6], [7, 8]],
        response_ids=[[], [], [9, 2]],
        behaviour_logprobs=[[], [], [-3.0, -3.0]],
        advantages=[1.0, 1.0, 1.0],
    )
    stats = engine.forward_backward(batch, grpo_loss)
    assert stats["tokens"] == 2.0 and stats["samples"] == 1.0
    assert engine.optimizer_step(1.0 / 3)["grad_norm"] > 0
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())
    with pytest.raises(EngineError, match="behaviour logprobs"):
        engine.forward_backward(TrainBatch([[4]], [[5, 6]], [[-1.0]], [1.0]), grpo_loss)
    with pytest.raises(EngineError, match="empty prompt"):
        engine.compute_logprobs([[]], [[5]])


# -------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_exported_and_saved_weights_load_into_hf(models: dict[str, Path], which: str, tmp_path: Path) -> None:
    engine = MegatronTrainingEngine(models[which], MegatronTrainingSettings(lr=1e-2))
    engine.forward_backward(TrainBatch([[4, 5, 6]], [[7, 8, 2]], [[-3.0, -3.0, -3.0]], [1.0]), grpo_loss)
    engine.optimizer_step(1.0)
    expected = engine.compute_logprobs(PROMPTS, RESPONSES)

    # export_weights → the HF inference engine's strict loader, then its trainer-side twin.
    inference = HFInferenceEngine(models[which], HFInferenceSettings())
    inference.load_weights(engine.export_weights())
    hf = HFTrainingEngine(models[which], HFTrainingSettings())
    hf.model.load_state_dict(dict(engine.export_weights()), strict=True)
    assert _max_diff(hf.compute_logprobs(PROMPTS, RESPONSES), expected) < 1e-5
    # Exported tensors are copies: a later step must not show through.
    snapshot = dict(engine.export_weights())
    engine.forward_backward(TrainBatch([[4, 5, 6]], [[7, 8, 2]], [[-3.0, -3.0, -3.0]], [1.0]), grpo_loss)
    engine.optimizer_step(1.0)
    assert not torch.equal(snapshot["model.layers.0.mlp.down_proj.weight"], dict(engine.export_weights())[
        "model.layers.0.mlp.down_proj.weight"])
    expected = engine.compute_logprobs(PROMPTS, RESPONSES)

    engine.save_pretrained(tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").eos_token_id == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.model_type == which
    with torch.no_grad():
        logits = reloaded(torch.tensor([[4, 5, 6, 7, 8, 2]])).logits[0, 2:5]
    reference = torch.log_softmax(logits, -1).gather(-1, torch.tensor([[7], [8], [2]])).squeeze(-1).tolist()
    assert _max_diff([reference], engine.compute_logprobs([[4, 5, 6]], [[7, 8, 2]])) < 1e-5
    # And the saved folder is a valid model path for a fresh Megatron engine.
    again = MegatronTrainingEngine(tmp_path / "out", MegatronTrainingSettings())
    assert _max_diff(again.compute_logprobs(PROMPTS, RESPONSES), expected) < 1e-6


def test_factory_builds_megatron(models: dict[str, Path]) -> None:
    engine = make_training_engine(MegatronTrainingSettings(), models["llama"], temperature=0.7, seed=3)
    assert isinstance(engine, MegatronTrainingEngine) and engine.temperature == 0.7
    with pytest.raises(EngineError, match="megatron_kwargs"):
        MegatronTrainingEngine(models["llama"], MegatronTrainingSettings(megatron_kwargs={"no_such_option": 1}))


# -------------------------------------------------------------------------- data parallel
def test_data_parallel_two_ranks_equal_one_process(models: dict[str, Path]) -> None:
    DataParallelTrainingEngine = pytest.importorskip("asyncflow.engines.data_parallel").DataParallelTrainingEngine

    settings = {"lr": 1e-2, "micro_batch_size": 2}
    batch = _batch(HFTrainingEngine(models["llama"], HFTrainingSettings()))
    single = MegatronTrainingEngine(models["llama"], MegatronTrainingSettings(**settings))
    stats_single = single.forward_backward(batch, LOSS_FN)
    norm_single = single.optimizer_step(1.0 / len(batch))["grad_norm"]

    with DataParallelTrainingEngine(
        MegatronTrainingSettings(data_parallel=2, **settings), models["llama"], init_timeout_s=120, timeout_s=120
    ) as parallel:
        stats = parallel.forward_backward(batch, LOSS_FN)
        norm = parallel.optimizer_step(1.0 / len(batch))["grad_norm"]
        weights = dict(parallel.export_weights())
        logprobs = parallel.compute_logprobs(PROMPTS, RESPONSES)
    for key in stats_single:
        assert stats[key] == pytest.approx(stats_single[key], rel=1e-5, abs=1e-6), key
    assert norm == pytest.approx(norm_single, rel=1e-5)
    # Same Adam caveat as against HF: a near-zero gradient summed in another order may flip sign.
    for name, tensor in single.export_weights():
        diff = (weights[name] - tensor).abs()
        assert float(diff.max()) < 1e-6 or float((diff > 1e-6).float().mean()) < 1e-3, name
    assert _max_diff(logprobs, single.compute_logprobs(PROMPTS, RESPONSES)) < 1e-4


# ----------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_cuda_logprobs_match_hf(models: dict[str, Path], which: str) -> None:
    megatron = MegatronTrainingEngine(models[which], MegatronTrainingSettings(device="cuda"))
    hf = HFTrainingEngine(models[which], HFTrainingSettings(device="cuda"))
    assert _max_diff(megatron.compute_logprobs(PROMPTS, RESPONSES), hf.compute_logprobs(PROMPTS, RESPONSES)) < 1e-4


@pytest.mark.gpu
@requires_cuda
def test_cuda_bfloat16_training_step(models: dict[str, Path]) -> None:
    engine = MegatronTrainingEngine(models["llama"], MegatronTrainingSettings(device="cuda", lr=1e-2), dtype="bfloat16")
    hf = HFTrainingEngine(models["llama"], HFTrainingSettings(device="cuda"), dtype="bfloat16")
    # bf16 logits: the two implementations round differently, so only a loose agreement holds.
    assert _max_diff(engine.compute_logprobs(PROMPTS, RESPONSES), hf.compute_logprobs(PROMPTS, RESPONSES)) < 0.5
    batch = _batch(hf)
    stats = engine.forward_backward(batch, LOSS_FN)
    assert stats["samples"] == 3
    assert engine.optimizer_step(1.0 / len(batch))["grad_norm"] > 0
    weights = dict(engine.export_weights())
    assert all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in weights.values())


@pytest.mark.gpu
@requires_cuda
def test_cpu_and_cuda_engines_share_a_process(models: dict[str, Path]) -> None:
    """A CPU engine next to a CUDA one (a test run, a CPU reference beside a GPU policy): each
    keeps its own device for Megatron's scratch buffers and RNG tracker, called in either order."""
    hf = HFTrainingEngine(models["qwen2"], HFTrainingSettings())
    want = hf.compute_logprobs(PROMPTS, RESPONSES)
    on_cpu = MegatronTrainingEngine(models["qwen2"], MegatronTrainingSettings())
    on_gpu = MegatronTrainingEngine(models["qwen2"], MegatronTrainingSettings(device="cuda"))
    for engine in (on_cpu, on_gpu, on_cpu, on_gpu):
        assert _max_diff(engine.compute_logprobs(PROMPTS, RESPONSES), want) < 1e-4
    batch = _batch(hf)
    for engine in (on_gpu, on_cpu):
        assert engine.forward_backward(batch, LOSS_FN)["samples"] == 3
        assert engine.optimizer_step(1.0 / len(batch))["grad_norm"] > 0
    assert isinstance(torch.cuda.current_device(), int)  # the CPU engine's patch is gone again
