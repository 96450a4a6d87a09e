"""Data-parallel training engine: two gloo ranks on CPU against one process, failures, clean-up.

Weights are compared with atol 1e-5. The two runs differ only in float summation order (each
rank sums its shard, then the all-reduce adds the shards), a relative gradient difference of
about 1e-7. AdamW turns a gradient into an update of at most ~lr = 1e-3 per element, and a
relative change δ in the gradient moves that update by about lr·δ, so honest runs agree to well
under 1e-6 (we see ~3e-7, a few float32 ulps of the weights), while a real mistake (a shard's
gradient missing, a rank stepping on its own gradient) moves many elements by O(lr) = 1e-3.
Adam is nearly blind to a global gradient scale, so grad_norm is compared too (that catches a
double-counted or unscaled gradient).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from asyncflow.algorithms import grpo_loss
from asyncflow.config import HFTrainingSettings
from asyncflow.engines import TrainBatch, TrainingEngine, make_local_training_engine, make_training_engine
from asyncflow.engines.data_parallel import DataParallelTrainingEngine, combine_stats, shard_bounds
from asyncflow.errors import EngineError
from asyncflow.tiny_model import DEFAULT_CHARS, build_tiny_llama

SETTINGS = HFTrainingSettings(lr=1e-3, micro_batch_size=2, data_parallel=2)
LOSS = functools.partial(grpo_loss, clip_low=0.2, clip_high=0.2, kl_coef=0.05)
WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores, two ranks: workers copy this setting
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", DEFAULT_CHARS, seed=0)


@pytest.fixture(scope="module")
def pair(model_path: Path) -> Iterator[tuple[DataParallelTrainingEngine, TrainingEngine]]:
    """A 2-rank engine (through the factory) and a 1-process engine, always driven in lockstep."""
    dp = make_training_engine(SETTINGS, model_path, seed=0)
    assert isinstance(dp, DataParallelTrainingEngine)
    single = make_local_training_engine(SETTINGS.model_copy(update={"data_parallel": 1}), model_path, seed=0)
    try:
        yield dp, single
    finally:
        dp.close()


def _batch(engine: TrainingEngine, size: int, seed: int) -> TrainBatch:
    """Varied lengths, off-policy behaviour logprobs (ratios ≠ 1, some clipped) and a reference."""
    g = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(4, 19, (n,), generator=g).tolist()

    prompts = [tokens(1, 7) for _ in range(size)]
    responses = [tokens(1, 9) for _ in range(size)]
    current = engine.compute_logprobs(prompts, responses)
    behaviour = [[v + 0.3 * float(torch.randn(1, generator=g)) for v in row] for row in current]
    reference = [[v - 0.1 for v in row] for row in current]
    advantages = torch.randn(size, generator=g).tolist()
    return TrainBatch(prompts, responses, behaviour, advantages, ref_logprobs=reference)


def _weights(engine: TrainingEngine) -> dict[str, torch.Tensor]:
    return dict(engine.export_weights())


def _max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _step_both(dp: DataParallelTrainingEngine, single: TrainingEngine, groups: list[TrainBatch]) -> None:
    """One trainer step on both engines: a forward_backward per streamed group, then the step."""
    for batch in groups:
        got, want = dp.forward_backward(batch, LOSS), single.forward_backward(batch, LOSS)
        assert got.keys() == want.keys()
        assert got["tokens"] == want["tokens"] and got["samples"] == want["samples"]
        assert got["clip_frac_tokens"] == want["clip_frac_tokens"]
        for key in ("loss_sum", "kl_sum", "ratio_max"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    n = sum(len(b) for b in groups)
    got_step, want_step = dp.optimizer_step(1.0 / n), single.optimizer_step(1.0 / n)
    assert got_step["grad_norm"] == pytest.approx(want_step["grad_norm"], rel=1e-5)


def _children_besides(pids: set[int]) -> list[psutil.Process]:
    """Live children of this process other than `pids` and multiprocessing's resource tracker."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in pids or "resource_tracker" in " ".join(child.cmdline()):
                continue
            if child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def _die_in(*args: object, pid: int, **kwargs: object) -> object:
    """A loss_fn that SIGKILLs the process `pid` when it runs there, else is grpo_loss."""
    if os.getpid() == pid:
        os.kill(pid, signal.SIGKILL)
    return grpo_loss(*args, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ pure helpers
def test_shard_bounds_are_contiguous_and_balanced() -> None:
    assert shard_bounds([5, 5, 5, 5], 2) == [(0, 2), (2, 4)]
    assert shard_bounds([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 11)]  # 10 | 10 tokens
    assert shard_bounds([3], 3) == [(0, 0), (0, 1), (1, 1)]  # fewer items than ranks: empty shards
    assert shard_bounds([], 3) == [(0, 0), (0, 0), (0, 0)]
    for sizes in ([1, 2, 3, 4, 5, 6, 7], [9, 1, 1, 9, 1], [2] * 13):
        for parts in (1, 2, 3, 5):
            bounds = shard_bounds(sizes, parts)
            assert bounds[0][0] == 0 and bounds[-1][1] == len(sizes)
            assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(bounds, bounds[1:], strict=False))
            loads = [sum(sizes[s:e]) for s, e in bounds]
            assert max(loads) - sum(sizes) / parts <= max(sizes)  # off the ideal by at most one item


def test_combine_stats_sums_and_maxes() -> None:
    combined = combine_stats([{"loss_sum": 1.0, "ratio_max": 1.5}, {"loss_sum": 2.0, "ratio_max": 1.2}, {}])
    assert combined == {"loss_sum": 3.0, "ratio_max": 1.5}


# ---------------------------------------------------------------------- agreement with 1 rank
def test_one_step_matches_one_process(pair: tuple[DataParallelTrainingEngine, TrainingEngine]) -> None:
    dp, single = pair
    before = _weights(single)
    assert _max_weight_diff(_weights(dp), before) == 0.0  # same folder, same seed
    _step_both(dp, single, [_batch(single, 6, seed=1)])
    after = _weights(single)
    assert _max_weight_diff(after, before) > 100 * WEIGHT_ATOL  # the step did move the weights
    assert _max_weight_diff(_weights(dp), after) < WEIGHT_ATOL


def test_streamed_steps_stay_in_agreement(pair: tuple[DataParallelTrainingEngine, TrainingEngine]) -> None:
    dp, single = pair
    for step in range(3):
        # Groups of uneven size, as they stream in; a one-sample group leaves rank 1's shard empty.
        groups = [_batch(single, 4, seed=10 * step + 2), _batch(single, 1, seed=10 * step + 3),
                  _batch(single, 3, seed=10 * step + 4)]
        _step_both(dp, single, groups)
        assert _max_weight_diff(_weights(dp), _weights(single)) < WEIGHT_ATOL


def test_discarded_gradients_are_discarded_on_every_rank(
        pair: tuple[DataParallelTrainingEngine, TrainingEngine]) -> None:
    """A failed item's partial gradient, discarded on rank 0 and rank 1 alike: the next step
    matches the single process that never saw it."""
    dp, single = pair
    dp.forward_backward(_batch(single, 4, seed=40), LOSS)
    dp.discard_gradients()
    _step_both(dp, single, [_batch(single, 3, seed=41)])
    assert _max_weight_diff(_weights(dp), _weights(single)) < WEIGHT_ATOL


def test_compute_logprobs_matches_one_process(pair: tuple[DataParallelTrainingEngine, TrainingEngine]) -> None:
    dp, single = pair
    batch = _batch(single, 7, seed=5)
    got = dp.compute_logprobs(batch.prompt_ids, batch.response_ids)
    want = single.compute_logprobs(batch.prompt_ids, batch.response_ids)
    assert [len(r) for r in got] == [len(r) for r in batch.response_ids]
    assert max(abs(x - y) for a, b in zip(got, want, strict=True) for x, y in zip(a, b, strict=True)) < 1e-5
    assert dp.compute_logprobs([], []) == []


# -------------------------------------------------------------------------------- failures
def test_dead_worker_is_reported_by_rank_and_close_leaves_no_children(
    model_path: Path, pair: tuple[DataParallelTrainingEngine, TrainingEngine]
) -> None:
    # `pair` holds this process's default group, so this engine also exercises the private group.
    others = set(pair[0].worker_pids)
    dp = DataParallelTrainingEngine(SETTINGS, model_path, seed=0, init_timeout_s=120, timeout_s=60)
    try:
        [worker] = dp.worker_pids
        batch = _batch(dp, 4, seed=7)
        started = time.monotonic()
        with pytest.raises(EngineError, match=r"rank 1 \(pid \d+\) died during forward_backward"):
            dp.forward_backward(batch, functools.partial(_die_in, pid=worker))
        assert time.monotonic() - started < 10  # noticed by polling, not by the 60 s timeout
        with pytest.raises(EngineError, match="broken"):
            dp.optimizer_step(1.0)
    finally:
        dp.close()
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    assert _children_besides(others) == []


def test_stuck_worker_times_out_naming_it(
    model_path: Path, pair: tuple[DataParallelTrainingEngine, TrainingEngine]
) -> None:
    others = set(pair[0].worker_pids)
    dp = DataParallelTrainingEngine(SETTINGS, model_path, seed=0, init_timeout_s=120, timeout_s=3)
    try:
        [worker] = dp.worker_pids
        dp.forward_backward(_batch(dp, 4, seed=8), LOSS)
        os.kill(worker, signal.SIGSTOP)  # alive but silent: only the timeout can tell
        started = time.monotonic()
        with pytest.raises(EngineError, match=r"optimizer_step.*rank\(s\) \[1\]"):
            dp.optimizer_step(0.25)
        assert time.monotonic() - started < 15
    finally:
        dp.close()  # must kill a stopped worker too
    assert _children_besides(others) == []


# ------------------------------------------------------------------------------------ CUDA
CUDA_SETTINGS = SETTINGS.model_copy(update={"device": "cuda"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ranks_need_a_gpu_each(model_path: Path) -> None:
    if torch.cuda.device_count() >= CUDA_SETTINGS.data_parallel:
        pytest.skip("this machine has a GPU for every rank")
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    with pytest.raises(EngineError, match="GPU"):
        make_training_engine(CUDA_SETTINGS, model_path, seed=0)
    assert time.monotonic() - started < 60
    assert _children_besides(before) == []


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL ranks take one GPU each)")
def test_cuda_two_ranks_match_one_process(model_path: Path) -> None:
    single = make_local_training_engine(CUDA_SETTINGS.model_copy(update={"data_parallel": 1}), model_path, seed=0)
    with DataParallelTrainingEngine(CUDA_SETTINGS, model_path, seed=0, init_timeout_s=300, timeout_s=120) as dp:
        for step in range(2):
            groups = [_batch(single, 4, seed=10 * step + 2), _batch(single, 1, seed=10 * step + 3)]
            _step_both(dp, single, groups)
            assert _max_weight_diff(_weights(dp), _weights(single)) < WEIGHT_ATOL
        batch = _batch(single, 5, seed=9)
        got = dp.compute_logprobs(batch.prompt_ids, batch.response_ids)
        want = single.compute_logprobs(batch.prompt_ids, batch.response_ids)
        assert max(abs(x - y) for a, b in zip(got, want, strict=True) for x, y in zip(a, b, strict=True)) < 1e-5
