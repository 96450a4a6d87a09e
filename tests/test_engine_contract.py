"""One contract, every engine adapter: a new engine gets the same checks by adding one line here.

Inference engines must sample rows independently by seed, stop at EOS, and report each token's
logprob under log_softmax(logits / T) — the number the trainer's importance ratio is built on, so
it is checked against the HF training engine on the same weights. Training engines must accumulate
gradients additively, speak HF parameter names, and save folders transformers can load.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from asyncflow.algorithms.grpo import grpo_loss
from asyncflow.config import (
    CustomInferenceSettings,
    HFInferenceSettings,
    HFTrainingSettings,
    MegatronTrainingSettings,
    VLLMInferenceSettings,
)
from asyncflow.engines import SamplingParams, TrainBatch, make_inference_engine, make_training_engine

PROMPTS = [[5, 6, 14, 7, 15], [7, 14, 8, 15], [4, 14, 4, 15]]  # "12+3=", "3+4=", "0+0=" (char ids)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


INFERENCE = {
    "hf": lambda: HFInferenceSettings(),
    "vllm": lambda: VLLMInferenceSettings(device="cpu", cpu_kv_cache_gib=0.25),
    "custom-example": lambda: CustomInferenceSettings(factory="examples.custom_engine:make_engine"),
}
TRAINING = {
    "hf": lambda: HFTrainingSettings(lr=1e-3, micro_batch_size=2),
    "megatron": lambda: MegatronTrainingSettings(lr=1e-3, micro_batch_size=2),
}
NEEDS = {"vllm": ("vllm", "asyncflow.engines.vllm_engine"),
         "megatron": ("megatron.core", "asyncflow.engines.megatron_engine")}


def _skip_unless_available(name: str) -> None:
    for module in NEEDS.get(name, ()):
        if not _have(module):
            pytest.skip(f"{name} adapter needs {module}")


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    torch.set_num_threads(2)
    return make_training_engine(HFTrainingSettings(), tiny_model_dir, temperature=0.8)


@pytest.fixture(scope="module", params=list(INFERENCE))
def inference(request, tiny_model_dir: Path):
    _skip_unless_available(request.param)
    return make_inference_engine(INFERENCE[request.param](), tiny_model_dir, "float32")


@pytest.fixture(params=list(TRAINING))
def training_settings(request):
    _skip_unless_available(request.param)
    return TRAINING[request.param]()


@pytest.fixture
def training(training_settings, tiny_model_dir: Path):
    return make_training_engine(training_settings, tiny_model_dir, temperature=0.8, seed=0)


PARAMS = SamplingParams(temperature=0.8, top_p=1.0, max_new_tokens=6)


def test_generation_shape_and_stop(inference, tiny_model_dir):
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    out = inference.generate(PROMPTS * 4, PARAMS, list(range(12)))
    assert len(out) == 12
    for generation in out:
        assert 1 <= len(generation.token_ids) <= PARAMS.max_new_tokens
        assert len(generation.logprobs) == len(generation.token_ids)
        assert all(lp <= 1e-6 and lp == lp for lp in generation.logprobs)
        assert generation.finish_reason in ("stop", "length")
        if generation.finish_reason == "stop":
            assert generation.token_ids[-1] == eos and eos not in generation.token_ids[:-1]
        else:
            assert len(generation.token_ids) == PARAMS.max_new_tokens


def test_rows_depend_only_on_their_seed(inference):
    batch = inference.generate(PROMPTS, PARAMS, [7, 8, 9])
    alone = inference.generate([PROMPTS[1]], PARAMS, [8])
    again = inference.generate(PROMPTS, PARAMS, [7, 8, 9])
    assert [g.token_ids for g in batch] == [g.token_ids for g in again]
    assert alone[0].token_ids == batch[1].token_ids


def test_logprobs_match_the_trainer(inference, reference):
    out = inference.generate(PROMPTS, PARAMS, [1, 2, 3])
    expected = reference.compute_logprobs(PROMPTS, [g.token_ids for g in out])
    for generation, want in zip(out, expected, strict=True):
        assert torch.allclose(torch.tensor(generation.logprobs), torch.tensor(want), atol=1e-4)


def test_weight_update_takes_effect(inference, reference, tiny_model_dir):
    moved = make_training_engine(HFTrainingSettings(lr=5e-2), tiny_model_dir, temperature=0.8)
    before = inference.generate(PROMPTS, PARAMS, [4, 5, 6])
    responses = [g.token_ids for g in before]
    batch = TrainBatch(PROMPTS, responses, [g.logprobs for g in before], [1.0, -1.0, 0.5])
    moved.forward_backward(batch, grpo_loss)
    moved.optimizer_step(1 / 3)
    try:
        inference.load_weights(moved.export_weights())
        after = inference.generate(PROMPTS, PARAMS, [4, 5, 6])
        want = moved.compute_logprobs(PROMPTS, [g.token_ids for g in after])
        for generation, expected in zip(after, want, strict=True):
            assert torch.allclose(torch.tensor(generation.logprobs), torch.tensor(expected), atol=1e-4)
        old = reference.compute_logprobs(PROMPTS, [g.token_ids for g in after])
        assert any(not torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-3) for a, b in zip(old, want, strict=True))
    finally:
        inference.load_weights(reference.export_weights())  # module-scoped engine: restore


def _batch(n: int = 4) -> TrainBatch:
    prompts = (PROMPTS * 2)[:n]
    responses = [[5, 6, 2], [7, 2], [8, 9, 10, 2], [4]][:n]
    return TrainBatch(prompts, responses, [[-2.0] * len(r) for r in responses], [1.0, -0.5, 0.25, -1.0][:n])


def test_training_speaks_hf_names_and_matches_reference_logprobs(training, tiny_model_dir, reference):
    from transformers import AutoModelForCausalLM

    hf_names = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_pretrained(tiny_model_dir)
                .state_dict().items()}
    exported = {name: tuple(t.shape) for name, t in training.export_weights()}
    assert exported == hf_names
    batch = _batch()
    for got, want in zip(training.compute_logprobs(batch.prompt_ids, batch.response_ids),
                         reference.compute_logprobs(batch.prompt_ids, batch.response_ids), strict=True):
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4)


def test_gradient_accumulation_is_additive(training, training_settings, tiny_model_dir):
    twin = make_training_engine(training_settings, tiny_model_dir, temperature=0.8, seed=0)
    whole, halves = _batch(), _batch()
    stats = training.forward_backward(whole, grpo_loss)
    first = TrainBatch(halves.prompt_ids[:2], halves.response_ids[:2], halves.behaviour_logprobs[:2],
                       halves.advantages[:2])
    second = TrainBatch(halves.prompt_ids[2:], halves.response_ids[2:], halves.behaviour_logprobs[2:],
                        halves.advantages[2:])
    split = [twin.forward_backward(first, grpo_loss), twin.forward_backward(second, grpo_loss)]
    assert stats["loss_sum"] == pytest.approx(split[0]["loss_sum"] + split[1]["loss_sum"], rel=1e-5, abs=1e-7)
    training.optimizer_step(1 / 4)
    twin.optimizer_step(1 / 4)
    for (name, a), (_, b) in zip(training.export_weights(), twin.export_weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_discarded_gradients_leave_no_trace(training, training_settings, tiny_model_dir):
    """What the trainer relies on after an item failed part-way: discard, re-accumulate, and the
    step is exactly as if the discarded gradient had never been added."""
    twin = make_training_engine(training_settings, tiny_model_dir, temperature=0.8, seed=0)
    batch = _batch()
    training.forward_backward(batch, grpo_loss)
    training.forward_backward(_batch(2), grpo_loss)  # the "failed item", partly added
    training.discard_gradients()
    training.forward_backward(batch, grpo_loss)  # the replay
    twin.forward_backward(batch, grpo_loss)
    training.optimizer_step(1 / 4)
    twin.optimizer_step(1 / 4)
    for (name, a), (_, b) in zip(training.export_weights(), twin.export_weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_save_pretrained_loads_in_transformers(training, tmp_path, reference):
    from transformers import AutoModelForCausalLM

    batch = _batch()
    training.forward_backward(batch, grpo_loss)
    training.optimizer_step(1 / 4)
    training.save_pretrained(tmp_path / "saved")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    state = dict(training.export_weights())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], msg=name)
