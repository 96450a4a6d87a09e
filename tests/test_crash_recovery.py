"""Crash recovery: real processes SIGKILLed in the middle of real runs (simulated engines, real
broker, stores and actors), and actors that go silent.

After every kill the run must finish with the configured number of optimizer steps, every sample
id trained exactly once (the trainer's record), invariant I1 holding, and no wait unbounded (each
run has `run.timeout_s`; each wait here has its own deadline). Reproduce one case with
`.venv/bin/pytest -q tests/test_crash_recovery.py -k rollout`.

A killed trainer is different: its weights and optimizer state die with it, so the launcher never
restarts its process alone (`asyncflow.monitor.NOT_RESTARTED`). Without checkpoints the run fails
naming it; with `trainer.checkpoint_every` > 0 the whole run restarts from the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from actors.runtime import lost_inputs, read_columns
from actors.scheduler import GroupState, Scheduler
from actors.trainer import read_records
from asyncflow.errors import MissingChunkError, RunError, StoreError, StoreUnavailableError
from asyncflow.graph import GRPO_GRAPH, PROMPT
from asyncflow.launcher import run
from asyncflow.wire import LostEvent, WorkItem, decode
from broker.names import RunNames
from flight_store import ColumnStoreServer, StoreClient
from flight_store.weights import drop_weights, get_weights, put_weights
from tests.conftest import make_tiny_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
STEPS, PROMPTS, GROUP, K = 8, 4, 4, 1


def _config(tmp_path: Path, model: Path, dataset: Path, name: str, **sections: dict):
    """A run of STEPS short steps on the simulated engines, tuned to recover fast: work of a killed
    actor is redelivered after 3 s (ack_wait) and heartbeats are checked every 0.5 s."""
    values: dict = {
        "run": {"stall_timeout_s": 90, "timeout_s": 240, "missing_stage_timeout_s": 60},
        "broker": {"ack_wait_s": 3, "heartbeat_s": 0.5, "heartbeat_timeout_s": 5},
        "rollout": {"instances": 2, "concurrent_items": 2,
                    "engine": {"type": "simulated", "slots": 8, "per_token_s": 0.02, "mean_tokens": 6}},
        "trainer": {"save_final": False, "engine": {"type": "simulated", "per_token_s": 0.001, "step_s": 0.2}},
        "sampling": {"max_new_tokens": 24},
        "reward": {"function": "asyncflow.engines.simulated:simulated_reward"},
    }
    for section, update in sections.items():
        values.setdefault(section, {}).update(update)
    return make_tiny_config(tmp_path, model, dataset, K, name, steps=STEPS, prompts=PROMPTS, group=GROUP, **values)


def _steps_done(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _process(run_dir: Path, name: str) -> dict:
    """The actors.json / services.json entry of process `name` (e.g. rollout-1, broker-0, store-1)."""
    for file in ("actors.json", "services.json"):
        try:
            entries = json.loads((run_dir / file).read_text())
        except (OSError, ValueError):
            continue
        for entry in entries:
            if entry["actor"] == name:
                return entry
    raise LookupError(name)


class Fault(threading.Thread):
    """Waits until the run has done `after_steps` steps, then sends `sig` to process `name`."""

    def __init__(self, run_dir: Path, name: str, after_steps: int, sig: int = signal.SIGKILL,
                 timeout_s: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.name, self.after_steps, self.sig, self.timeout_s = run_dir, name, after_steps, sig, timeout_s
        self.pid: int | None = None
        self.steps_at_fault: int | None = None
        self.error: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while _steps_done(self.run_dir) < self.after_steps:
            if time.monotonic() > deadline:
                self.error = f"the run did not reach step {self.after_steps} within {self.timeout_s} s"
                return
            time.sleep(0.02)
        try:
            self.pid = _process(self.run_dir, self.name)["pid"]
            os.kill(self.pid, self.sig)
        except (LookupError, OSError) as error:
            self.error = f"could not signal {self.name}: {error!r}"
            return
        self.steps_at_fault = _steps_done(self.run_dir)

    def check(self) -> None:
        self.join(timeout=5)
        assert self.error is None, self.error
        assert self.pid is not None, f"{self.name} was never signalled"
        assert self.steps_at_fault is not None and self.steps_at_fault < STEPS, \
            f"{self.name} was killed after the last step ({self.steps_at_fault}): not mid-run"


def _assert_trained_exactly_once_within_bound(run_dir: Path) -> None:
    trained = read_records(run_dir)
    ids = sorted(r["sample_id"] for r in trained)
    assert ids == list(range(STEPS * PROMPTS * GROUP)), "every sample id must be trained exactly once"
    assert all(0 <= r["step"] - r["policy_version"] <= K for r in trained), "invariant I1"


KILLED = ["rollout-1", "reward-0", "scheduler-0", "param_sync-0", "broker-0"]


@pytest.mark.parametrize("name", KILLED)
def test_a_process_killed_mid_run_is_restarted_and_the_run_completes_exactly_once(
        tmp_path, tiny_model_dir, arith_dataset, name):
    config = _config(tmp_path, tiny_model_dir, arith_dataset, f"kill-{name}".replace("_", "-"))
    fault = Fault(config.run_dir, name, after_steps=2)
    fault.start()
    summary = run(config)
    fault.check()
    assert summary["steps"] == STEPS
    assert summary["failed_samples"] == 0
    assert summary["restarts"] == {name: 1}, summary["restarts"]
    assert _process(config.run_dir, name)["pid"] != fault.pid, "actors.json must name the restarted process"
    _assert_trained_exactly_once_within_bound(config.run_dir)


def test_a_killed_actor_is_not_restarted_when_restarts_are_off(tmp_path, tiny_model_dir, arith_dataset):
    config = _config(tmp_path, tiny_model_dir, arith_dataset, "kill-no-restart", run={"restart_actors": False})
    fault = Fault(config.run_dir, "reward-0", after_steps=1)
    fault.start()
    with pytest.raises(RunError, match=r"reward-0 \(pid \d+\) exited with code -9; not restarted: run.restart_actors"):
        run(config)
    fault.check()


def test_the_trainer_is_not_restarted_without_checkpoints(tmp_path, tiny_model_dir, arith_dataset):
    config = _config(tmp_path, tiny_model_dir, arith_dataset, "kill-trainer")
    fault = Fault(config.run_dir, "trainer-0", after_steps=1)
    fault.start()
    with pytest.raises(RunError, match=r"trainer-0 .* not restarted: .*trainer.checkpoint_every > 0"):
        run(config)
    fault.check()


def test_a_killed_trainer_restarts_the_run_from_its_newest_checkpoint(tmp_path, tiny_model_dir, arith_dataset):
    """With checkpoints on, the launcher answers a dead trainer by restarting the whole run from
    the newest checkpoint (fresh broker state and stores; rollout and trainer load its weights as
    that policy version): the run still ends with every step, each sample trained exactly once."""
    config = _config(tmp_path, tiny_model_dir, arith_dataset, "kill-trainer-ckpt",
                     trainer={"checkpoint_every": 1})
    fault = Fault(config.run_dir, "trainer-0", after_steps=3)
    fault.start()
    summary = run(config)
    fault.check()
    assert summary["restarts_from_checkpoint"] == 1
    resumed = summary["resumed_from_step"]
    assert 1 <= resumed <= fault.steps_at_fault, (resumed, fault.steps_at_fault)
    assert summary["steps"] == STEPS - resumed  # this part's steps; the records hold them all
    _assert_trained_exactly_once_within_bound(config.run_dir)
    metrics = [json.loads(line)["step"] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(STEPS))


def test_a_stage_with_no_live_actor_stops_the_run_with_an_error_naming_it(tmp_path, tiny_model_dir, arith_dataset):
    """SIGSTOP freezes the reward actor: its process is alive, so only its silent heartbeat shows
    it. The monitor reports it dead, naming role, host and pid, and stops the run naming the stage."""
    config = _config(tmp_path, tiny_model_dir, arith_dataset, "frozen-reward",
                     run={"missing_stage_timeout_s": 4}, broker={"heartbeat_timeout_s": 2})
    fault = Fault(config.run_dir, "reward-0", after_steps=1, sig=signal.SIGSTOP)
    fault.start()
    thaw = threading.Thread(target=_thaw_when_failed, args=(config.run_dir, fault), daemon=True)
    thaw.start()
    with pytest.raises(RunError, match=r"stage 'reward' has had no live actor .* last seen: reward-0 \(host"):
        run(config)
    fault.check()
    log = [json.loads(line) for line in (config.run_dir / "logs" / "launcher.jsonl").read_text().splitlines()]
    dead = [e for e in log if e.get("event") == "actor presumed dead"]
    assert [(e["actor"], e["role"], e["pid"]) for e in dead] == [("reward-0", "reward", fault.pid)]
    assert _steps_done(config.run_dir) < STEPS


def _thaw_when_failed(run_dir: Path, fault: Fault) -> None:
    """Let the frozen actor go once the run has failed, so that it stops at once instead of
    waiting out the launcher's SIGTERM grace and SIGKILL."""
    deadline = time.monotonic() + 180
    log = run_dir / "logs" / "launcher.jsonl"
    while time.monotonic() < deadline:
        if fault.pid is not None and log.is_file() and '"run failed"' in log.read_text():
            os.kill(fault.pid, signal.SIGCONT)
            return
        time.sleep(0.1)


def test_an_actor_started_by_hand_joins_a_live_run_and_its_death_is_seen_by_heartbeat(
        tmp_path, tiny_model_dir, arith_dataset):
    """A rollout instance the launcher knows nothing about (as if on another host) joins with
    `asyncflow actor rollout --nats URL` while the launched one is frozen (SIGSTOP), takes work,
    is SIGKILLed: the monitor has no process handle for it and sees its death only through its
    heartbeat (the frozen one's silence too); the launched one is let go, the work of both is
    redelivered and the run completes exactly once."""
    config = _config(tmp_path, tiny_model_dir, arith_dataset, "hand-started", rollout={"instances": 1},
                     broker={"heartbeat_timeout_s": 2})
    joined: dict = {}

    def join() -> None:
        deadline = time.monotonic() + 150
        while _steps_done(config.run_dir) < 1:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        # Freeze the launched instance first: the run can then only go on through the hand-started
        # one (which also gets the frozen one's items, redelivered after ack_wait), and cannot end
        # before the monitor has seen the hand-started one die.
        launched = _process(config.run_dir, "rollout-0")["pid"]
        os.kill(launched, signal.SIGSTOP)
        try:
            url = _process(config.run_dir, "broker-0")["address"]
            console = (config.run_dir / "logs" / "rollout-7.console.log").open("wb")
            process = subprocess.Popen(
                [sys.executable, "-m", "asyncflow", "actor", "rollout", "--config",
                 str(config.run_dir / "config.yaml"), "--nats", url, "--instance", "7"],
                cwd=ROOT, stdout=console, stderr=subprocess.STDOUT)
            joined["process"] = process
            spans = config.run_dir / "spans.jsonl"
            while '"actor":"rollout-7","stage":"rollout"' not in spans.read_text():  # it took work
                if time.monotonic() > deadline or process.poll() is not None:
                    return
                time.sleep(0.05)
            joined["steps_at_kill"] = _steps_done(config.run_dir)
            process.kill()
            log = config.run_dir / "logs" / "launcher.jsonl"
            while not any(line for line in log.read_text().splitlines()
                          if '"actor presumed dead"' in line and '"rollout-7"' in line):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            joined["seen_dead"] = True
        finally:
            os.kill(launched, signal.SIGCONT)

    joiner = threading.Thread(target=join, daemon=True)
    joiner.start()
    try:
        summary = run(config)
    finally:
        joiner.join(timeout=5)
        if "process" in joined and joined["process"].poll() is None:
            joined["process"].kill()
    assert "steps_at_kill" in joined, "the hand-started rollout never took work"
    assert joined["steps_at_kill"] < STEPS
    assert summary["steps"] == STEPS and summary["failed_samples"] == 0
    assert joined.get("seen_dead"), "the monitor never reported the killed hand-started actor"
    assert summary["dead_actors"].get("rollout-7") == 1
    assert summary["dead_actors"].get("rollout-0") == 1  # frozen, silent: seen too, and not restarted
    assert summary["restarts"] == {}  # the launcher has no process handle for it: nothing to restart
    _assert_trained_exactly_once_within_bound(config.run_dir)


def _log(run_dir: Path, actor: str) -> list[dict]:
    """The JSON log lines of one actor process (all of its incarnations)."""
    path = run_dir / "logs" / f"{actor}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("store", ["store-0", "store-1"])
def test_a_killed_store_restarts_empty_and_the_lost_samples_are_reissued_and_trained_exactly_once(
        tmp_path, tiny_model_dir, arith_dataset, store):
    """Lineage recovery. Two stores; one is SIGKILLed mid-run and the launcher restarts it on its
    port, empty: the prompt chunks, responses, rewards and policy versions it held are gone. Stages
    that find their inputs gone report them (`af.<run>.lost.<stage>`) instead of retrying; the
    scheduler re-issues those groups from the earliest stage whose inputs survive (prompts are
    written again). The run must finish every step with no sample failed or dead-lettered, each
    sample id trained exactly once within the staleness bound.

    Chunks are placed by crc32 of (partition, chunk): with two stores partitions 2 and 4 live wholly
    on store-1, partitions 3 and 5 on store-0, and every policy version on store-0 with a replica on
    store-1. So killing store-1 once step 1 is done takes partition 2's prompts, responses and
    rewards while the (slowed) trainer reads them: the trainer reports them and they are generated
    again from re-written prompts. Killing store-0 takes partition 3's and 5's prompts and the
    newest policy versions: rollout reports the prompts, and instances read versions from store-1."""
    config = _config(tmp_path, tiny_model_dir, arith_dataset, f"kill-{store}", store={"servers": 2},
                     trainer={"save_final": False,
                              "engine": {"type": "simulated", "per_token_s": 0.005, "step_s": 0.2}})
    fault = Fault(config.run_dir, store, after_steps=2)
    fault.start()
    summary = run(config)
    fault.check()
    assert summary["steps"] == STEPS
    assert summary["restarts"] == {store: 1}, summary["restarts"]
    assert summary["failed_samples"] == 0, read_records(config.run_dir, "failed_samples")[:5]
    assert summary["dead_letters"] == {}, summary["dead_letters"]
    _assert_trained_exactly_once_within_bound(config.run_dir)

    # The loss was real and recovered by re-issue, not by luck: stages reported lost inputs and the
    # scheduler re-issued groups (its log and its final counters agree).
    assert sum(summary["lost_inputs"].values()) >= 1, summary["lost_inputs"]
    log = _log(config.run_dir, "scheduler-0")
    reissues = [e for e in log if e.get("event") == "groups re-issued after a store loss"]
    reissued_groups = sum(len(e["groups"]) for e in reissues)
    assert reissued_groups >= 1
    assert all(e["partition"] >= fault.steps_at_fault for e in reissues), "trained partitions are never re-issued"
    stopped = [e for e in log if e.get("event") == "actor stopped"]
    assert stopped and stopped[-1]["counters"]["reissued_groups"] == reissued_groups
    # Every report the scheduler acted on is one the monitor counted (it also counts reports of
    # already-trained partitions, which the scheduler ignores).
    assert 1 <= stopped[-1]["counters"]["lost_reports"] <= sum(summary["lost_inputs"].values())
    # Work re-issued under new item ids (`-r<n>`) was done: the busy spans name it.
    spans = [json.loads(line) for line in (config.run_dir / "spans.jsonl").read_text().splitlines()]
    assert any(re.search(r"-r\d+$", s["item_id"]) for s in spans if s["stage"] in ("rollout", "reward", "trainer"))
    if store == "store-1":  # generated columns were lost: regenerated from rollout on, back to the prompts
        regenerated = [e for e in reissues if e["reported_by"] in ("reward", "trainer")]
        assert regenerated and all(e["stages"][0] == "rollout" for e in regenerated), reissues
        assert any(e["prompts_rewritten"] for e in reissues)


# -- lineage recovery, piece by piece (fast: real Flight stores in this process, no run) -------------


def test_a_missing_chunk_is_told_apart_from_other_store_errors_and_reported_whole():
    stores = [ColumnStoreServer(capacity_bytes=64 * 1024**2) for _ in range(2)]
    try:
        with StoreClient([s.location for s in stores]) as client:
            refs = [client.put_column("lin", 3, column, f"g{group}", [4 * group, 4 * group + 1], pa.array([1.0, 2.0]))
                    for group in (0, 1) for column in ("reward", "advantage")]
            kept = client.put_column("lin", 4, "reward", "g0", [16], pa.array([0.5]))
            assert read_columns(client, refs, ("reward",))["reward"] == {0: 1.0, 1: 2.0, 4: 1.0, 5: 2.0}
            client.drop_partition("lin", 3)  # as if the stores holding partition 3 died and came back empty
            with pytest.raises(MissingChunkError, match=r"key 'lin/3/reward/g0' at .*: no such key") as error:
                client.get_column(refs[0])
            assert isinstance(error.value, StoreError) and error.value.missing == [(refs[0].key, refs[0].location)]
            # read_columns looks for every input before it raises: the item's loss is reported whole.
            with pytest.raises(MissingChunkError, match=r"and 1 more key") as error:
                read_columns(client, [*refs, kept], ("reward",))
            reward_refs = [ref for ref in refs if ref.column == "reward"]
            assert error.value.keys == {ref.key for ref in reward_refs}
            item = WorkItem(stage="trainer", item_id="trainer-p3-g0_1", partition=3, groups=[0, 1],
                            sample_ids=[0, 1, 4, 5], inputs=[*reward_refs, kept])
            assert lost_inputs(item, error.value) == reward_refs
            # A missing key that is not an input (a policy version's weights) is not a lost input;
            # nor is any other error.
            assert lost_inputs(item, MissingChunkError([("lin/weights/3/0", stores[0].location)])) == []
            assert lost_inputs(item, StoreError("boom")) == []
            event = LostEvent(stage="trainer", item_id=item.item_id, actor="trainer-0", partition=3, groups=[0, 1],
                              sample_ids=item.sample_ids, lost=lost_inputs(item, error.value), reason=str(error.value))
            assert decode(LostEvent, event.encode(), RunNames("lin").lost("trainer")) == event
            assert RunNames("lin").lost("trainer") == "af.lin.lost.trainer"
    finally:
        for store in stores:
            store.shutdown()


def test_policy_weights_are_replicated_and_read_from_the_surviving_store():
    stores = [ColumnStoreServer(capacity_bytes=64 * 1024**2) for _ in range(2)]
    try:
        with StoreClient([s.location for s in stores]) as client, \
                StoreClient([stores[0].location]) as first_only:
            tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
            ref = put_weights(client, "lin", 3, tensors.items())
            assert ref.location == stores[0].location
            assert all(s.stats()["keys"] == 1 for s in stores), "a replica on each of the two stores"
            drop_weights(first_only, "lin", 3)  # the store the announcement names lost it
            loaded = get_weights(client, ref)
            assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
            drop_weights(client, "lin", 3)  # and now the replica too: an error naming both places
            with pytest.raises(MissingChunkError, match=r"lin/weights/3/0.*and 1 more") as error:
                get_weights(client, ref)
            assert {location for _, location in error.value.missing} == {s.location for s in stores}
    finally:
        for store in stores:
            store.shutdown()


def test_a_store_that_is_restarting_is_waited_for_within_a_bound():
    store = ColumnStoreServer(capacity_bytes=64 * 1024**2)
    port = int(store.location.rsplit(":", 1)[1])
    ref = None
    with StoreClient([store.location], timeout_s=5.0, unavailable_wait_s=30.0) as client:
        ref = client.put_column("lin", 0, "reward", "g0", [0], pa.array([1.0]))
        store.shutdown()
        restarted: list[ColumnStoreServer] = []

        def restart() -> None:
            time.sleep(1.0)
            restarted.append(ColumnStoreServer(port=port, capacity_bytes=64 * 1024**2))

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        try:
            # Waited for (not a StoreError at once), and then the restarted store is empty.
            with pytest.raises(MissingChunkError):
                client.get_column(ref)
            assert client.unavailable_waits == 1
            client.put_column("lin", 0, "reward", "g0", [0], pa.array([2.0]))
            assert read_columns(client, [ref], ("reward",))["reward"] == {0: 2.0}
        finally:
            thread.join(timeout=10)
            for server in restarted:
                server.shutdown()
    with StoreClient([store.location], timeout_s=5.0) as client, pytest.raises(StoreUnavailableError):
        client.get_column(ref)  # no wait configured: unreachable is raised at once, as its own error


def _group(columns: tuple[str, ...]) -> GroupState:
    state = GroupState(partition=3, group=0, sample_ids=[12, 13])
    for column in columns:
        state.refs[column] = None  # type: ignore[assignment]  # only presence matters here
    return state


ALL = tuple(column for stage in GRPO_GRAPH for column in stage.outputs)
ROLLOUT_OUT = GRPO_GRAPH[1].outputs


@pytest.mark.parametrize(("present", "reporter", "lost", "redo"), [
    # rollout finds its prompts gone: rollout again (after they are re-written), and what follows
    (PROMPT.outputs, "rollout", {"prompt_ids"}, {"rollout", "reward", "trainer"}),
    # reward finds the response gone: it is generated again, so the reward follows, then training
    ((*PROMPT.outputs, *ROLLOUT_OUT), "reward", {"response_ids"}, {"rollout", "reward", "trainer"}),
    # the trainer finds a whole group chunk gone (same store): back to rollout
    (ALL, "trainer", {*ROLLOUT_OUT, "reward"}, {"rollout", "reward", "trainer"}),
    # the trainer finds only the prompts gone: they come back identical, nothing else is stale
    (ALL, "trainer", {"prompt_ids"}, {"trainer"}),
    # the trainer finds only the reward gone: score again, keep the response
    (ALL, "trainer", {"reward"}, {"reward", "trainer"}),
    # a stale report of a stage whose outputs are all there and none lost: nothing to redo
    (ALL, "reward", set(), set()),
])
def test_lineage_redoes_the_earliest_stage_whose_inputs_survive_and_what_it_makes_stale(
        present, reporter, lost, redo):
    assert Scheduler._stages_to_redo(_group(present), reporter, lost) == redo
