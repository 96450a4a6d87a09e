"""Recovering a policy version lost with a Flight store (docs/reliability.md, "weights recovery").

Weights live in the stores like sample columns; a store that dies and comes back empty takes the
versions it held. Lineage recovery re-creates sample columns, but only the trainer can re-create a
version: whoever finds an announced version gone reports it (`af.<run>.weights.lost`), waits
(bounded) for it to come back or a newer one to be announced, and the trainer re-puts its current
weights (the newest version, which the staleness bound always accepts) and announces them again.

Live: a run with a single store (no replica) loses the store after two steps, and must still train
every sample exactly once with nothing failed. Unit: the prefetcher against a real Flight store.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from actors.trainer import read_records
from actors.weight_prefetch import WeightPrefetcher
from asyncflow.errors import EngineError, MissingChunkError, WireError
from asyncflow.launcher import run
from asyncflow.wire import ChunkRef, WeightsEvent, WeightsLostEvent, decode
from flight_store import StoreClient
from flight_store.weights import drop_weights, put_weights
from tests.conftest import make_tiny_config
from tests.test_crash_recovery import _process, _steps_done

STEPS, PROMPTS, GROUP, K = 8, 4, 4, 1
_REF = ChunkRef(column="weights", key="r/weights/3/0", location="grpc://127.0.0.1:1", sample_ids=[])


# -- live: a single store SIGKILLed mid-run ---------------------------------------------------------


def _log(run_dir: Path, actor: str) -> list[dict]:
    path = run_dir / "logs" / f"{actor}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last_counters(run_dir: Path, actor: str) -> dict:
    stopped = [e for e in _log(run_dir, actor) if e.get("event") == "actor stopped"]
    assert stopped, f"{actor} logged no 'actor stopped' line"
    return stopped[-1]["counters"]


@pytest.mark.slow
def test_a_single_store_killed_mid_run_loses_no_sample_to_lost_weights(tmp_path, tiny_model_dir, arith_dataset):
    """One store, SIGKILLed once two policy versions are announced, restarted empty by the launcher.

    Rollout is the slow stage and does not prefetch, so when version 2 is announced both instances
    are still generating partition 2 with version 1 and fetch version 2 only when partition 3 needs
    it: after the store came back without it. The instance that finds it gone reports it, the trainer
    re-puts its current weights and announces them again, and the instance goes on. Lost prompts are
    re-issued by lineage recovery meanwhile. Every step must be trained, every sample exactly once
    within the staleness bound, and nothing failed or dead-lettered."""
    name = "wrec-single"
    config = make_tiny_config(
        tmp_path, tiny_model_dir, arith_dataset, K, name, steps=STEPS, prompts=PROMPTS, group=GROUP,
        run={"stall_timeout_s": 90, "timeout_s": 240, "missing_stage_timeout_s": 60},
        broker={"ack_wait_s": 3, "heartbeat_s": 0.5, "heartbeat_timeout_s": 5},
        store={"servers": 1},
        rollout={"instances": 2, "concurrent_items": 1, "prefetch_weights": False, "weights_timeout_s": 60,
                 "engine": {"type": "simulated", "slots": 8, "per_token_s": 0.08, "mean_tokens": 6}},
        trainer={"save_final": False, "engine": {"type": "simulated", "per_token_s": 0.001, "step_s": 0.1}},
        sampling={"max_new_tokens": 24},
        reward={"function": "asyncflow.engines.simulated:simulated_reward"},
    )
    killed: dict[str, object] = {}

    def kill_the_store() -> None:
        deadline = time.monotonic() + 120
        while _steps_done(config.run_dir) < 2:
            if time.monotonic() > deadline:
                killed["error"] = "the run did not reach step 2 within 120 s"
                return
            time.sleep(0.01)
        try:
            pid = int(_process(config.run_dir, "store-0")["pid"])
            os.kill(pid, signal.SIGKILL)
        except (LookupError, OSError, ValueError) as error:
            killed["error"] = f"could not kill store-0: {error!r}"
            return
        killed["pid"], killed["steps"] = pid, _steps_done(config.run_dir)

    fault = threading.Thread(target=kill_the_store, daemon=True)
    fault.start()
    summary = run(config)
    fault.join(timeout=5)
    assert "error" not in killed, killed["error"]
    assert killed["steps"] < STEPS, "the store must die mid-run"

    assert summary["steps"] == STEPS
    assert summary["restarts"] == {"store-0": 1}, summary["restarts"]
    assert summary["failed_samples"] == 0, read_records(config.run_dir, "failed_samples")[:5]
    assert summary["dead_letters"] == {}, summary["dead_letters"]
    trained = read_records(config.run_dir)
    ids = sorted(r["sample_id"] for r in trained)
    assert ids == list(range(STEPS * PROMPTS * GROUP)), "every sample id must be trained exactly once"
    assert all(0 <= r["step"] - r["policy_version"] <= K for r in trained), "invariant I1"

    # The loss was real and recovered by re-put, not by luck: a rollout instance reported a version
    # gone, the trainer re-put and re-announced its weights, and an instance recovered its swap.
    rollout = [_last_counters(config.run_dir, f"rollout-{i}") for i in range(2)]
    assert sum(c.get("weights_lost_reports", 0) for c in rollout) >= 1, rollout
    assert sum(c.get("weights_recovered", 0) for c in rollout) >= 1, rollout
    trainer = _last_counters(config.run_dir, "trainer-0")
    assert trainer.get("weights_reput", 0) >= 1, trainer
    reputs = [e for e in _log(config.run_dir, "trainer-0") if e.get("event") == "weights re-put after a store loss"]
    assert reputs and all(e["version"] >= e["lost_version"] for e in reputs), reputs
    assert len(reputs) == trainer["weights_reput"]


# -- the prefetcher on its own, against a real Flight store -----------------------------------------


def _weights(version: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((1000,), float(version)), "b": torch.arange(3, dtype=torch.float32) + version}


def test_a_lost_version_is_reported_and_waited_for_until_it_is_re_put(flight_store_server):
    """The announced version is gone (as after a store restart): `wait_for` reports it once per
    announcement, retries when a re-put is announced again, and returns the re-put weights."""
    async def scenario() -> None:
        with StoreClient([flight_store_server.location]) as client:
            reports: list[WeightsLostEvent] = []

            async def report(event: WeightsLostEvent) -> None:
                reports.append(decode(WeightsLostEvent, event.encode()))  # it travels as JSON

            prefetcher = WeightPrefetcher(client, prefetch=True, label="rollout-3", report=report,
                                          report_every_s=0.2)
            ref = put_weights(client, "wrec", 2, _weights(2).items())
            drop_weights(client, "wrec", 2)  # gone before anyone read it
            prefetcher.announce(WeightsEvent(version=2, weights=ref, nbytes=0))
            waiter = asyncio.create_task(prefetcher.wait_for(2, timeout_s=20))
            for _ in range(200):
                if reports:
                    break
                await asyncio.sleep(0.01)
            assert reports and reports[0].version == 2 and reports[0].weights.key == ref.key
            assert reports[0].actor == "rollout-3" and "no such key" in reports[0].reason
            assert not waiter.done()

            # The trainer re-puts its current weights (version 3 here) and announces them again.
            new_ref = put_weights(client, "wrec", 3, _weights(3).items())
            prefetcher.announce(WeightsEvent(version=3, weights=new_ref, nbytes=0, republished=1))
            fetched = await asyncio.wait_for(waiter, timeout=20)
            assert fetched.version == 3 and float(fetched.tensors["w"][0]) == 3.0
            assert prefetcher.recovered == 1
            prefetcher.close()

    asyncio.run(scenario())


def test_the_same_version_announced_again_replaces_the_lost_announcement(flight_store_server):
    """A re-put of the very version that was lost (`republished` > 0) is taken, a plain replay of the
    old announcement is not, and a background prefetch that finds the version gone reports it."""
    async def scenario() -> None:
        with StoreClient([flight_store_server.location]) as client:
            reports: list[WeightsLostEvent] = []

            async def report(event: WeightsLostEvent) -> None:
                reports.append(event)

            prefetcher = WeightPrefetcher(client, prefetch=True, report=report, report_every_s=30)
            ref = put_weights(client, "wrec", 4, _weights(4).items())
            drop_weights(client, "wrec", 4)
            prefetcher.announce(WeightsEvent(version=4, weights=ref, nbytes=0))
            for _ in range(200):  # nobody waits yet: the background prefetch reports it
                if reports:
                    break
                await asyncio.sleep(0.01)
            assert [r.version for r in reports] == [4] and reports[0].republished == 0

            put_weights(client, "wrec", 4, _weights(4).items())
            prefetcher.announce(WeightsEvent(version=4, weights=ref, nbytes=0, republished=2))
            prefetcher.announce(WeightsEvent(version=4, weights=ref, nbytes=0))  # a late replay: ignored
            assert prefetcher.announced.republished == 2
            fetched = await prefetcher.wait_for(4, timeout_s=20)
            assert fetched.version == 4 and float(fetched.tensors["w"][0]) == 4.0
            assert len(reports) == 1, "one report per lost announcement"
            prefetcher.close()

    asyncio.run(scenario())


def test_a_lost_version_nobody_re_puts_fails_within_the_bound_naming_it(flight_store_server):
    async def scenario() -> None:
        with StoreClient([flight_store_server.location]) as client:
            reports: list[WeightsLostEvent] = []

            async def report(event: WeightsLostEvent) -> None:
                reports.append(event)

            prefetcher = WeightPrefetcher(client, prefetch=False, label="rollout-1", report=report,
                                          report_every_s=0.2)
            ref = put_weights(client, "wrec", 5, _weights(5).items())
            drop_weights(client, "wrec", 5)
            prefetcher.announce(WeightsEvent(version=5, weights=ref, nbytes=0))
            started = time.monotonic()
            with pytest.raises(EngineError) as error:
                await prefetcher.wait_for(5, timeout_s=1.0)
            assert time.monotonic() - started < 5
            message = str(error.value)
            assert "rollout-1" in message and "policy version 5" in message and ref.key in message
            assert flight_store_server.location in message and "trainer" in message
            assert isinstance(error.value.__cause__, MissingChunkError)
            assert len(reports) >= 2, "reported again while it waited"
            prefetcher.close()

    asyncio.run(scenario())


def test_the_report_and_the_re_announcement_travel_as_json_and_reject_garbage():
    ref = WeightsEvent(version=3, weights=_REF, nbytes=10, republished=2)
    assert decode(WeightsEvent, ref.encode(), "af.r.weights") == ref and ref.order == (3, 2)
    assert decode(WeightsEvent, b'{"version":3,"weights":' + _REF.encode() + b',"nbytes":1}').republished == 0
    report = WeightsLostEvent(version=3, republished=1, weights=_REF, actor="rollout-0", reason="gone")
    assert decode(WeightsLostEvent, report.encode(), "af.r.weights.lost") == report
    assert report.order < ref.order < WeightsEvent(version=4, weights=_REF, nbytes=10).order
    for bad in (b"", b"{}", ref.encode(), report.encode()[:-1], report.encode().replace(b'"version":3', b'"version":-1')):
        with pytest.raises(WireError, match="af.r.weights.lost"):
            decode(WeightsLostEvent, bad, "af.r.weights.lost")
    with pytest.raises(WireError):  # a report is not an announcement
        decode(WeightsEvent, report.encode(), "af.r.weights")
