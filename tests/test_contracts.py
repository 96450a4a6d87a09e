"""Pure contracts: wire round trips, config validation, staleness admission, sample layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncflow.config import load_config, parse_config
from asyncflow.errors import ConfigError, StalenessError, WireError
from asyncflow.partitions import group_of, group_sample_ids, partition_of, prompt_index, sample_seed
from asyncflow.staleness import admissible_partitions, check_sample, min_version
from asyncflow.wire import (
    ChunkRef,
    Control,
    DeadLetter,
    DoneEvent,
    Heartbeat,
    MetricsEvent,
    StepEvent,
    WeightsEvent,
    WorkItem,
    decode,
)

REF = ChunkRef(column="response_ids", key="r/0/response_ids/g1", location="grpc://127.0.0.1:1", sample_ids=[8, 9])
MESSAGES = [
    REF,
    WorkItem(stage="reward", item_id="reward-p0-g1", partition=0, groups=[1], sample_ids=[8, 9], inputs=[REF],
             min_version=0, failed={10: "boom"}),
    DoneEvent(stage="rollout", item_id="x", actor="rollout-0", partition=0, groups=[1], sample_ids=[8, 9],
              chunks=[REF], failed={10: "oom"}, policy_version=3, busy_s=0.5),
    StepEvent(actor="trainer-0", step=2, policy_version=3, sample_ids=[1, 2], sample_versions=[2, 1],
              failed_samples=1, reward_mean=0.5, loss=0.1, grad_norm=1.0, tokens=12, weights=REF,
              weights_nbytes=100, final=True),
    WeightsEvent(version=3, weights=REF, nbytes=100),
    DeadLetter(stage="reward", subject="af.r.work.reward", deliveries=5, reason="x", payload="{}"),
    MetricsEvent(actor="a", stage="rollout", item_id="i", start=1.0, end=2.0, samples=8, tokens=9),
    Heartbeat(actor="a", role="rollout", host="h", pid=1, state="ready", policy_version=None, time=1.0),
    Control(command="stop", reason="done"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_wire_round_trip(message):
    assert decode(type(message), message.encode(), "subj") == message


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"[]", b'{"stage": 1}', b'{"stage":"r","item_id":"i","partition":-1,"groups":[],'
     b'"sample_ids":[],"inputs":[]}', b'{"stage":"r","item_id":"i","partition":0,"groups":[],"sample_ids":[],'
     b'"inputs":[],"unknown":1}', b"x" * 300_000],
)
def test_wire_rejects_bad_payloads_with_subject(payload):
    with pytest.raises(WireError, match="af.run.work.reward"):
        decode(WorkItem, payload, "af.run.work.reward")


def _minimal(**extra):
    data = {"model": {"path": "m"}, "data": {"path": "d.jsonl"}, "reward": {"function": "examples.arith:reward"}}
    data.update(extra)
    return data


def test_config_defaults_and_resolution(tmp_path: Path):
    config = parse_config(_minimal())
    assert config.run_dir == Path("runs/asyncflow")
    assert config.samples_per_step == config.algorithm.prompts_per_step * config.algorithm.samples_per_prompt
    resolved = config.resolved()
    assert resolved.model.path.is_absolute() and resolved.run_dir.is_absolute()


def test_config_error_names_the_field_path():
    with pytest.raises(ConfigError, match=r"algorithm\.max_staleness"):
        parse_config(_minimal(algorithm={"max_staleness": -1}))
    with pytest.raises(ConfigError, match=r"trainer\.engine\.(hf\.)?lr"):
        parse_config(_minimal(trainer={"engine": {"type": "hf", "lr": "fast"}}))
    with pytest.raises(ConfigError, match=r"sampling\.temprature"):
        parse_config(_minimal(sampling={"temprature": 1.0}))
    with pytest.raises(ConfigError, match=r"rollout\.engine"):
        parse_config(_minimal(rollout={"engine": {"type": "nope"}}))
    with pytest.raises(ConfigError, match=r"run\.name"):
        parse_config(_minimal(run={"name": "bad name!"}))
    with pytest.raises(ConfigError, match=r"broker.*replicas 3 needs a NATS cluster"):
        parse_config(_minimal(broker={"replicas": 3}))  # the embedded broker is one server
    assert parse_config(_minimal(broker={"replicas": 3, "url": "nats://nats-1:4222"})).broker.replicas == 3


def test_load_config_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_shipped_configs_parse():
    root = Path(__file__).parent.parent
    for path in [*root.glob("examples/*.yaml"), *root.glob("bench/configs/*.yaml")]:
        load_config(path)


def test_engine_section_without_type_is_the_default_engine():
    config = parse_config(_minimal(), overrides={"rollout.engine.device": "cuda", "trainer.engine.lr": 0.1})
    assert (config.rollout.engine.type, config.rollout.engine.device) == ("hf", "cuda")
    assert (config.trainer.engine.type, config.trainer.engine.lr) == ("hf", 0.1)


def test_staleness_admission_window():
    # k = 0: only the partition of the current version (synchronous).
    assert list(admissible_partitions(0, 0, 10)) == [0]
    assert list(admissible_partitions(3, 0, 10)) == [0, 1, 2, 3]
    # k = 2: rollout may run two versions ahead, never past the last step.
    assert list(admissible_partitions(0, 2, 10)) == [0, 1, 2]
    assert list(admissible_partitions(9, 2, 10)) == list(range(10))
    assert min_version(5, 2) == 3 and min_version(1, 3) == 0


def test_invariant_i1_check():
    assert check_sample(7, step=3, policy_version=2, max_staleness=1) == 1
    assert check_sample(7, step=3, policy_version=3, max_staleness=0) == 0
    with pytest.raises(StalenessError, match="staleness 2 > max_staleness 1"):
        check_sample(7, step=3, policy_version=1, max_staleness=1)


def test_sample_layout_is_dense_and_unique():
    seen = []
    for partition in range(3):
        for group in range(4):
            ids = group_sample_ids(partition, group, 4, 3)
            assert all(group_of(s, 4, 3) == group and partition_of(s, 4, 3) == partition for s in ids)
            seen += ids
    assert seen == list(range(36))
    orders = [[prompt_index(p, g, 4, 10, seed=1, shuffle=True) for p in range(5) for g in range(4)]]
    epoch0 = orders[0][:10]
    assert sorted(epoch0) == list(range(10))  # each epoch visits every prompt once
    assert sample_seed(0, 1) != sample_seed(0, 2) and sample_seed(0, 1) != sample_seed(1, 1)


def test_rollout_items_are_packed_by_token_budget():
    from asyncflow.partitions import pack_by_budget

    # Groups of 8 samples, prompts of different lengths, max_new_tokens 16: costs 8 × (prompt + 16).
    costs = [8 * (length + 16) for length in (4, 4, 60, 4, 4, 4, 200, 4)]
    runs = pack_by_budget(costs, budget=8 * 3 * 20)
    assert [i for run in runs for i in run] == list(range(8))  # every group once, in order
    assert all(sum(costs[i] for i in run) <= 8 * 3 * 20 or len(run) == 1 for run in runs)
    assert [len(run) for run in runs] == [2, 1, 3, 1, 1]  # long prompts get items of their own
    assert pack_by_budget([], 10) == [] and pack_by_budget([5, 5, 5], 100) == [[0, 1, 2]]
