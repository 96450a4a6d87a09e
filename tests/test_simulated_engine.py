"""The SIMULATED benchmark engines: lengths, slot scheduling, and that they drive the real pipeline.

The engines only sleep, but what they model must hold: the length distribution has the requested
mean and a long tail, a generate call waits for a free slot like a continuous-batching server,
and a run on them goes through the same actors, broker and store as a real one (staleness and
exactly-once checked from the trainer's record). A slow instance must not stall the others:
the faster ones pull more work.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from actors.trainer import read_records
from asyncflow.config import SimulatedInferenceSettings, SimulatedTrainingSettings
from asyncflow.engines import SamplingParams, TrainBatch, make_inference_engine, make_training_engine
from asyncflow.engines.simulated import response_length
from asyncflow.launcher import run
from asyncflow.partitions import group_sample_ids
from tests.conftest import make_tiny_config


def test_lengths_are_long_tailed_with_the_requested_mean_and_a_pure_function_of_the_seed():
    lengths = np.array([response_length(seed, 100.0, 1.0, 10_000) for seed in range(20_000)])
    assert abs(lengths.mean() - 100.0) < 4.0
    assert np.median(lengths) < 0.75 * lengths.mean()  # log-normal: the mean sits above the median
    assert (lengths > 400).mean() > 0.02  # a real tail, not a bell
    assert response_length(7, 100.0, 1.0, 10_000) == response_length(7, 100.0, 1.0, 10_000)
    assert max(response_length(s, 100.0, 1.0, 50) for s in range(2000)) == 50  # clipped at the limit
    assert {response_length(s, 100.0, 0.0, 10_000) for s in range(10)} == {100}


def test_generate_returns_the_modelled_responses(tiny_model_dir: Path):
    settings = SimulatedInferenceSettings(per_token_s=0.0, prefill_s=0.0, mean_tokens=4, sigma=1.0)
    engine = make_inference_engine(settings, tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    gens = engine.generate([[1, 2]] * 200, SamplingParams(max_new_tokens=8), seeds=list(range(200)))
    for seed, gen in enumerate(gens):
        assert len(gen.token_ids) == len(gen.logprobs) == response_length(seed, 4, 1.0, 8)
        assert all(0 <= t < config["vocab_size"] for t in gen.token_ids)
        assert gen.finish_reason == ("length" if len(gen.token_ids) == 8 else "stop")
        if gen.finish_reason == "stop":
            assert gen.token_ids[-1] == config["eos_token_id"]
    assert Counter(g.finish_reason for g in gens)["length"] > 0


def test_requests_share_the_slots_like_a_continuous_batching_server(tiny_model_dir: Path):
    # sigma 0: every sequence lasts exactly 10 tokens × 5 ms = 50 ms.
    settings = SimulatedInferenceSettings(slots=4, prefill_s=0.0, per_token_s=0.005, mean_tokens=10, sigma=0.0)
    engine = make_inference_engine(settings, tiny_model_dir)
    params = SamplingParams(max_new_tokens=100)
    started = time.monotonic()
    engine.generate([[1]] * 4, params, seeds=[0, 1, 2, 3])  # fills the 4 slots once
    one_wave = time.monotonic() - started

    finished: list[float] = []
    started = time.monotonic()

    def call(seed: int) -> None:
        engine.generate([[1]] * 4, params, seeds=[seed] * 4)
        finished.append(time.monotonic() - started)

    threads = [threading.Thread(target=call, args=(s,)) for s in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Two calls of 4 sequences on 4 slots: the second waits for the first wave to free its slots.
    assert one_wave >= 0.05
    assert max(finished) >= 2 * 0.05
    assert min(finished) < max(finished)


def test_simulated_training_sleeps_per_token_and_exports_sized_weights(tiny_model_dir: Path):
    from functools import partial

    from asyncflow.algorithms.grpo import grpo_loss

    settings = SimulatedTrainingSettings(per_token_s=0.001, workers=2, weights_bytes=4096)
    engine = make_training_engine(settings, tiny_model_dir)
    batch = TrainBatch(prompt_ids=[[1] * 10] * 2, response_ids=[[2] * 40] * 2,
                       behaviour_logprobs=[[-1.0] * 40] * 2, advantages=[1.0, -1.0])
    started = time.monotonic()
    stats = engine.forward_backward(batch, partial(grpo_loss, clip_low=0.2, clip_high=0.2, kl_coef=0.0))
    assert time.monotonic() - started >= 0.001 * 100 / 2
    assert stats["tokens"] == 80
    engine.optimizer_step(0.5)
    (name, weights), = list(engine.export_weights())
    assert weights.numel() * weights.element_size() == 4096 and float(weights[0]) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("drain", [True, False])
def test_simulated_pipeline_streams_and_faster_instances_pull_more(tmp_path, tiny_model_dir, arith_dataset, drain):
    """Two rollout instances, the second 4× slower, several items in flight each, weight swaps with
    and without draining them: the run completes, exactly once, I1 holds, and the fast instance
    generated most items (items are pulled, not assigned)."""
    steps, prompts, group, k = 4, 8, 4, 1
    config = make_tiny_config(
        tmp_path, tiny_model_dir, arith_dataset, k, f"sim-slow-{drain}".lower(), steps=steps, prompts=prompts,
        group=group,
        rollout={"instances": 2, "concurrent_items": 2, "drain_before_swap": drain,
                 "engine": {"type": "simulated", "slots": 8, "per_token_s": 0.01, "mean_tokens": 6,
                            "instance_slowdown": {1: 4.0}}},
        trainer={"save_final": False, "engine": {"type": "simulated", "per_token_s": 0.0005}},
        sampling={"max_new_tokens": 24},
        reward={"function": "asyncflow.engines.simulated:simulated_reward"},
    )
    summary = run(config)
    assert summary["steps"] == steps and summary["failed_samples"] == 0

    trained = read_records(config.run_dir)
    ids = [r["sample_id"] for r in trained]
    assert sorted(ids) == list(range(steps * prompts * group))
    assert all(0 <= r["step"] - r["policy_version"] <= k for r in trained)

    spans = [json.loads(line) for line in (config.run_dir / "spans.jsonl").read_text().splitlines()]
    per_actor = Counter(s["actor"] for s in spans if s["stage"] == "rollout")
    assert per_actor["rollout-0"] > per_actor["rollout-1"] > 0


def _partition_of(item_id: str) -> int:
    return int(item_id.split("-p")[1].split("-")[0])


@pytest.mark.slow
def test_phase_barrier_baseline_trains_only_after_every_reward(tmp_path, tiny_model_dir, arith_dataset):
    """The synchronous baseline of the benchmarks: no trainer work on a partition before its last
    reward is in; the same run without the barrier streams (trains groups while others generate)."""
    spans_of = {}
    for barrier in (True, False):
        name = f"sim-barrier-{barrier}".lower()
        config = make_tiny_config(
            tmp_path, tiny_model_dir, arith_dataset, 0, name, steps=3, prompts=6, group=4,
            algorithm={"phase_barrier": barrier},
            # Groups cost 4 × (prompt ≈ 6 + 24) tokens: a 250-token budget packs two per item.
            rollout={"instances": 2, "item_tokens": 250,
                     "engine": {"type": "simulated", "slots": 4, "per_token_s": 0.01,
                                                "mean_tokens": 6, "instance_slowdown": {1: 4.0}}},
            trainer={"save_final": False, "engine": {"type": "simulated", "per_token_s": 0.0005}},
            sampling={"max_new_tokens": 24},
            reward={"function": "asyncflow.engines.simulated:simulated_reward"},
        )
        assert run(config)["steps"] == 3
        assert sorted(r["sample_id"] for r in read_records(config.run_dir)) == list(range(3 * 6 * 4))
        spans_of[barrier] = [json.loads(line) for line in (config.run_dir / "spans.jsonl").read_text().splitlines()]
        assert {s["samples"] for s in spans_of[barrier] if s["stage"] == "rollout"} == {8}

    def first_training_before_last_reward(spans: list[dict]) -> list[bool]:
        out = []
        for partition in range(3):
            rewards = [s["end"] for s in spans if s["stage"] == "reward" and _partition_of(s["item_id"]) == partition]
            trains = [s["start"] for s in spans if s["stage"] == "trainer" and _partition_of(s["item_id"]) == partition]
            out.append(min(trains) < max(rewards))
        return out

    assert not any(first_training_before_last_reward(spans_of[True]))
    # Streaming: with one instance 4× slower, groups from the fast one are trained before the slow
    # one's last group has its reward, in at least one partition.
    assert any(first_training_before_last_reward(spans_of[False]))


@pytest.mark.slow
def test_a_trainer_item_that_keeps_failing_is_dead_lettered_and_its_step_closes_without_it(
        tmp_path, tiny_model_dir, arith_dataset):
    """A poison trainer item (fault injection: the simulated trainer raises whenever a batch holds
    one of partition 1's group-2 samples). The trainer retries it `max_deliver` times, dead-letters
    it, the scheduler re-sends the group with its samples failed under a new msg id (JetStream would
    drop a same-id re-send as a duplicate), and the run ends with every step: those samples failed
    and counted, every other sample trained exactly once."""
    steps, prompts, group = 3, 4, 4
    poisoned = group_sample_ids(1, 2, prompts, group)
    config = make_tiny_config(
        tmp_path, tiny_model_dir, arith_dataset, 1, "sim-poison", steps=steps, prompts=prompts, group=group,
        broker={"max_deliver": 2},
        rollout={"engine": {"type": "simulated", "slots": 8, "per_token_s": 0.001, "mean_tokens": 4}},
        trainer={"save_final": False, "engine": {"type": "simulated", "per_token_s": 0.0001,
                                                 "fail_samples": [poisoned[1]]}},
        sampling={"max_new_tokens": 8},
        reward={"function": "asyncflow.engines.simulated:simulated_reward"},
    )
    summary = run(config)
    assert summary["steps"] == steps
    assert summary["failed_samples"] == group
    assert summary["dead_letters"] == {"trainer": 1}

    trained = sorted(r["sample_id"] for r in read_records(config.run_dir))
    assert trained == sorted(set(range(steps * prompts * group)) - set(poisoned))
    failed = read_records(config.run_dir, "failed_samples")
    assert sorted(r["sample_id"] for r in failed) == poisoned
    assert all(r["step"] == 1 and "dead-lettered at trainer" in r["reason"] and "fault injection" in r["reason"]
               for r in failed)
    spans = [json.loads(line) for line in (config.run_dir / "spans.jsonl").read_text().splitlines()]
    assert "trainer-p1-g2-r1" in {s["item_id"] for s in spans if s["stage"] == "trainer"}


def test_the_trainer_trains_the_groups_of_one_generation_call_in_one_engine_call(
        tmp_path, tiny_model_dir, arith_dataset):
    """k = 0, a partition's 4 groups generated in one rollout item: their trainer items reach the
    trainer a few ms apart and go through the engine together (micro-batch 16 = the partition), not
    one call per group; every sample is still trained exactly once."""
    steps, prompts, group = 4, 4, 4
    config = make_tiny_config(
        tmp_path, tiny_model_dir, arith_dataset, 0, "sim-merge", steps=steps, prompts=prompts, group=group,
        rollout={"groups_per_item": prompts,
                 "engine": {"type": "simulated", "slots": 16, "per_token_s": 0.001, "mean_tokens": 4}},
        trainer={"save_final": False, "engine": {"type": "simulated", "per_token_s": 0.0001,
                                                 "micro_batch_size": prompts * group}},
        sampling={"max_new_tokens": 8},
        reward={"function": "asyncflow.engines.simulated:simulated_reward"},
    )
    summary = run(config)
    assert summary["steps"] == steps and summary["failed_samples"] == 0
    trained = sorted(r["sample_id"] for r in read_records(config.run_dir))
    assert trained == list(range(steps * prompts * group))
    stopped = [json.loads(line) for line in (config.run_dir / "logs" / "trainer-0.jsonl").read_text().splitlines()
               if '"actor stopped"' in line]
    calls = stopped[-1]["counters"]["engine_calls"]
    # One call per step when every group is in before the trainer starts; a group that arrives
    # late costs a second call (without waiting for the others, steps took 3 calls each here).
    assert steps <= calls < 2 * steps, calls
