"""The scheduler-scale harness in short runs: the real scheduler process against simulated stages.

What the scheduler dispatched must be right whatever its speed: every item a valid WorkItem naming
its stage's input columns, every sample of every trained partition sent to each stage exactly once,
every rollout instance fed, no partition's rollout before its admission version (I2), and in the
phase-barrier baseline no trainer item before the partition's last reward. No timing thresholds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from asyncflow.graph import REWARD, ROLLOUT, TRAINER
from asyncflow.partitions import group_sample_ids
from bench.scheduler_scale import STAGES, Records, run_scale

pytestmark = pytest.mark.slow

PROMPTS, GROUP = 16, 4
INPUTS = {stage.name: sorted(stage.inputs) for stage in (ROLLOUT, REWARD, TRAINER)}


def run(tmp_path: Path, instances: int, k: int, phase_barrier: bool = False) -> Records:
    result, records = run_scale(instances, seconds=2.0, warmup_s=0.5, rate=None, capacity=True, reward_workers=4,
                                prompts=PROMPTS, group=GROUP, max_staleness=k, phase_barrier=phase_barrier,
                                workdir=tmp_path)
    assert result.capacity is not None and result.capacity.samples > 0
    assert len(records.trained) >= 3, "too few steps to check anything"
    return records


def check_dispatch(records: Records, k: int, instances: int) -> None:
    assert records.invalid == []
    for r in records.received:
        assert r.input_columns == INPUTS[r.stage], r
        ids = {sid for g in r.groups for sid in group_sample_ids(r.partition, g, PROMPTS, GROUP)}
        assert set(r.sample_ids) == ids, r  # no failures here: every sample of its groups
        # Each input names exactly the item's samples: the prompts as slices of the partition's chunk.
        assert all(named == r.sample_ids for named in r.input_sample_ids.values()), r
        assert r.item_id.startswith(f"{r.stage}-p{r.partition}-")
    # Exactly once per stage, for every partition the (simulated) trainer finished.
    for stage in STAGES:
        counts = Counter(sid for r in records.received if r.stage == stage and r.partition in records.trained
                         for sid in r.sample_ids)
        expected = Counter(sid for p in records.trained for g in range(PROMPTS)
                           for sid in group_sample_ids(p, g, PROMPTS, GROUP))
        assert counts == expected, stage
    # I2: partition p's rollout only once version p - k was announced, and the item says so.
    rollout = [r for r in records.received if r.stage == ROLLOUT.name]
    for r in rollout:
        assert r.min_version == max(0, r.partition - k)
        assert r.announced >= r.partition - k, r
    assert any(r.partition > k for r in rollout), "admission after a step was never exercised"
    # Nobody starved: with more work than instances, each rollout instance got items.
    per_instance = Counter(r.worker for r in rollout)
    assert set(per_instance) == set(range(instances)), f"instances without work: {instances - len(per_instance)}"


def test_streaming_dispatch_is_complete_exactly_once_and_admitted_under_the_bound(tmp_path):
    records = run(tmp_path, instances=32, k=2)
    check_dispatch(records, k=2, instances=32)
    # Streaming: one item per group and stage (groups_per_item 1), none held back for its partition.
    assert all(len(r.groups) == 1 for r in records.received)


def test_phase_barrier_holds_trainer_items_until_the_partition_is_rewarded(tmp_path):
    records = run(tmp_path, instances=16, k=0, phase_barrier=True)
    check_dispatch(records, k=0, instances=16)
    for r in records.received:
        if r.stage == TRAINER.name:
            # The harness records a reward event before publishing it, so the scheduler cannot have
            # seen the partition's last reward before this time.
            last_reward = max(records.reward_done_ns[(r.partition, g)] for g in range(PROMPTS))
            assert r.received_ns > last_reward, r
