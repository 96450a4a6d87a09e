"""Every actor is a NATS micro service, and a run's streams, consumers and KV are what docs/inspect.md says.

The NATS CLI is not installable here, so these tests ask the same questions it asks, through
nats-py: `nats micro ls` is a request on `$SRV.PING` answered by every service, `nats micro info`
/ `stats` are `$SRV.INFO.<name>` / `$SRV.STATS.<name>`, `nats stream ls` / `nats consumer info` /
`nats kv get` are JetStream API requests. One live run (real broker, real Flight store, real actor
processes on the simulated engines) is queried while it trains; an in-process ActorRuntime shows
the service goes away when the actor stops.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats
import pytest

from actors.micro import endpoint_subject, service_name
from actors.runtime import ActorRuntime
from asyncflow.config import Config, RunSettings
from asyncflow.launcher import run
from asyncflow.status import gather_replies
from asyncflow.wire import Control, StepEvent, decode
from broker import RunNames
from broker.names import KV_CONFIG, KV_POLICY_VERSION, KV_STORES
from tests.conftest import make_tiny_config

ROLES = {"scheduler", "param_sync", "reward", "trainer", "rollout"}
WAIT_S = 180.0  # actor start-up imports torch; the 2-core test machines are shared


def live_config(tmp_path: Path, model: Path, dataset: Path, nats_url: str, name: str) -> Config:
    """A simulated-engine run long enough to still be training when the test is done asking: the
    test stops it (control `stop`) once it has seen what it wants."""
    run_section: dict[str, Any] = {}
    if "restart_actors" in RunSettings.model_fields:  # the stop must end the run, not restart actors
        run_section["restart_actors"] = False
    return make_tiny_config(
        tmp_path, model, dataset, 1, name, steps=100_000, prompts=4, group=4,
        run=run_section, broker={"url": nats_url},
        rollout={"instances": 2, "engine": {"type": "simulated", "slots": 8, "per_token_s": 0.005, "mean_tokens": 6}},
        trainer={"save_final": False, "engine": {"type": "simulated", "per_token_s": 0.001, "weights_bytes": 4096}},
        sampling={"max_new_tokens": 8},
        reward={"function": "asyncflow.engines.simulated:simulated_reward"},
    )


async def _send_stop(nats_url: str, name: str) -> None:
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        await nc.publish(RunNames(name).control, Control(command="stop", reason="test done").encode())
        await nc.flush(timeout=5)
    finally:
        await nc.close()


async def _steps_done(nats_url: str, name: str) -> int:
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=5)
        names = RunNames(name)
        try:
            last = await js.get_last_msg(names.events_stream, names.done("trainer"))
        except Exception:  # no stream or no step yet
            return 0
        return decode(StepEvent, last.data or b"", last.subject or "?").step + 1
    finally:
        await nc.close()


@contextmanager
def live_run(config: Config, nats_url: str, min_steps: int = 2) -> Iterator[dict[str, Any]]:
    """Run `config` in a thread until it has trained `min_steps` steps, yield, then stop it and
    check it ended because its actors were told to stop (and not for any other reason)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = run(config)
        except BaseException as error:  # reported to the test below
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"run-{config.run.name}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while asyncio.run(_steps_done(nats_url, config.run.name)) < min_steps:
            assert thread.is_alive(), f"run ended before {min_steps} steps: {outcome}"
            assert time.monotonic() < deadline, f"no {min_steps} steps within {WAIT_S} s; logs in {config.run_dir}"
            time.sleep(0.5)
        yield outcome
    finally:
        asyncio.run(_send_stop(nats_url, config.run.name))
        thread.join(timeout=WAIT_S)
    assert not thread.is_alive(), "the run did not end after the stop command"
    # Stopped actors exit 0; the launcher counts that as a failed run (it did not reach its steps).
    assert "exited with code 0" in str(outcome.get("error")), outcome


async def _micro_facts(nats_url: str, name: str, expected_actors: set[str]) -> dict[str, Any]:
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        def ours(replies: list[dict[str, Any]]) -> set[str]:
            return {r["metadata"]["actor"] for r in replies if r.get("metadata", {}).get("run") == name}

        facts: dict[str, Any] = {}
        facts["ping"] = await gather_replies(nc, "$SRV.PING", 10.0, lambda rs: ours(rs) >= expected_actors)
        facts["info_rollout"] = await gather_replies(nc, f"$SRV.INFO.{service_name('rollout')}", 10.0,
                                                     lambda rs: len(ours(rs)) >= 2)
        facts["stats_rollout"] = await gather_replies(nc, f"$SRV.STATS.{service_name('rollout')}", 10.0,
                                                      lambda rs: len(ours(rs)) >= 2)
        names = RunNames(name)
        health = await nc.request(endpoint_subject(names, "rollout-0", "health"), b"", timeout=10)
        facts["health"] = json.loads(health.data)
        stats = await nc.request(endpoint_subject(names, "trainer-0", "stats"), b"", timeout=10)
        facts["trainer_stats"] = json.loads(stats.data)

        js = nc.jetstream(timeout=10)
        facts["streams"] = {s.config.name: s for s in await js.streams_info()}
        facts["work_consumers"] = {c.name: c for c in await js.consumers_info(names.work_stream)}
        kv = await js.key_value(names.kv_bucket)
        facts["kv_keys"] = set(await kv.keys())
        facts["kv_stores"] = json.loads((await kv.get(KV_STORES)).value or b"null")
        facts["kv_policy_version"] = int((await kv.get(KV_POLICY_VERSION)).value or b"-1")
        facts["kv_config"] = json.loads((await kv.get(KV_CONFIG)).value or b"{}")
        facts["kv_beat"] = json.loads((await kv.get("actors.rollout-1")).value or b"{}")

        # `nats sub 'af.>'`: the run's traffic, JSON all of it.
        seen: list[Any] = []
        got_some = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            seen.append(msg)
            if {"work", "done", "metrics"} <= {m.subject.split(".")[2] for m in seen}:
                got_some.set()  # the kinds every live run sends (weights may come first, or not at all)

        sub = await nc.subscribe(f"af.{name}.>", cb=on_msg)
        await asyncio.wait_for(got_some.wait(), timeout=60)
        await sub.unsubscribe()
        facts["sub"] = seen
        return facts
    finally:
        await nc.close()


@pytest.mark.slow
def test_a_live_run_shows_its_actors_as_micro_services_and_its_state_in_jetstream(
        tmp_path, tiny_model_dir, arith_dataset, nats_server):
    name = "micro-live"
    config = live_config(tmp_path, tiny_model_dir, arith_dataset, nats_server.url, name)
    actors = {"scheduler-0", "param_sync-0", "reward-0", "trainer-0", "rollout-0", "rollout-1"}
    with live_run(config, nats_server.url):
        facts = asyncio.run(_micro_facts(nats_server.url, name, actors))
        pids = {entry["actor"]: entry["pid"] for entry in json.loads((config.run_dir / "actors.json").read_text())}

    # nats micro ls: one service per actor, named asyncflow-<role>, telling instances apart by metadata.
    ours = [r for r in facts["ping"] if r.get("metadata", {}).get("run") == name]
    assert {r["metadata"]["actor"] for r in ours} == actors
    assert {r["name"] for r in ours} == {service_name(role) for role in ROLES}
    assert all(r["type"] == "io.nats.micro.v1.ping_response" and r["version"] == "0.1.0" for r in ours)
    assert {r["metadata"]["actor"]: int(r["metadata"]["pid"]) for r in ours} == {a: pids[a] for a in actors}

    # nats micro info asyncflow-rollout: both instances, each with its stats and health endpoints.
    infos = [r for r in facts["info_rollout"] if r["metadata"].get("run") == name]
    assert sorted(r["metadata"]["actor"] for r in infos) == ["rollout-0", "rollout-1"]
    for info in infos:
        actor = info["metadata"]["actor"]
        assert {(e["name"], e["subject"]) for e in info["endpoints"]} == {
            ("stats", f"af.{name}.svc.{actor}.stats"), ("health", f"af.{name}.svc.{actor}.health")}

    # nats micro stats asyncflow-rollout: the stats endpoint's data is the actor's counters.
    stats = {r["metadata"]["actor"]: r for r in facts["stats_rollout"] if r["metadata"].get("run") == name}
    assert set(stats) == {"rollout-0", "rollout-1"}
    data = [next(e["data"] for e in s["endpoints"] if e["name"] == "stats") for s in stats.values()]
    assert all(d["role"] == "rollout" and d["state"] in ("ready", "busy") and d["error"] is None for d in data)
    assert sum(d["items_done"] for d in data) > 0 and sum(d["samples_done"] for d in data) > 0
    assert all(d["items_failed"] == 0 and d["busy_s"] >= 0 for d in data)

    # The endpoints themselves.
    assert facts["health"]["ok"] is True and facts["health"]["actor"] == "rollout-0"
    trainer = facts["trainer_stats"]
    assert trainer["actor"] == "trainer-0" and trainer["items_done"] > 0 and trainer["policy_version"] >= 2

    # nats stream ls / consumer info: the two streams, one durable pull consumer per stage.
    names = RunNames(name)
    work, events = facts["streams"][names.work_stream], facts["streams"][names.events_stream]
    assert work.config.subjects == [f"af.{name}.work.>"] and work.config.retention == "workqueue"
    assert set(events.config.subjects) == {f"af.{name}.done.>", f"af.{name}.weights", f"af.{name}.dead.>",
                                           f"af.{name}.lost.>"}
    assert events.state.messages > 0
    durable = {n: c for n, c in facts["work_consumers"].items() if c.config.durable_name}
    assert set(durable) == {"rollout", "reward", "trainer"}
    assert all(c.config.filter_subject == f"af.{name}.work.{n}" for n, c in durable.items())
    assert durable["rollout"].delivered.stream_seq > 0

    # nats kv ls / get: the run's state.
    assert {"config", "stores", "policy_version", "progress"} <= facts["kv_keys"]
    assert {f"actors.{a}" for a in actors} <= facts["kv_keys"]
    assert facts["kv_stores"] and all(s.startswith("grpc://") for s in facts["kv_stores"])
    assert facts["kv_policy_version"] >= 1 and facts["kv_config"]["run"]["name"] == name
    assert facts["kv_beat"]["role"] == "rollout" and facts["kv_beat"]["pid"] == pids["rollout-1"]

    # nats sub 'af.>': JSON messages on work, done and metrics subjects (at least).
    kinds = {m.subject.split(".")[2] for m in facts["sub"]}
    assert {"work", "done", "metrics"} <= kinds, kinds
    assert all(isinstance(json.loads(m.data), dict) for m in facts["sub"])


def test_the_service_registers_on_start_and_is_gone_when_the_actor_stops(
        tmp_path, tiny_model_dir, arith_dataset, nats_server, flight_store_server):
    """In-process: an ActorRuntime is discoverable while it lives, answers health, and its
    service (and nothing else) is gone once it has stopped."""
    config = make_tiny_config(tmp_path, tiny_model_dir, arith_dataset, 1, "micro-unit",
                              store={"locations": [flight_store_server.location]})

    async def scenario() -> dict[str, Any]:
        probe = await nats.connect(nats_server.url, connect_timeout=5)
        try:
            def mine(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return [r for r in replies if r.get("metadata", {}).get("run") == "micro-unit"]

            async with ActorRuntime("reward", config, nats_server.url, instance=3) as runtime:
                runtime.state = "ready"
                now = time.time()
                await runtime.publish_metrics("item-1", "reward", now - 0.5, samples=4, end=now)
                during = mine(await gather_replies(probe, "$SRV.PING", 10.0, lambda rs: bool(mine(rs))))
                health = json.loads((await probe.request(
                    endpoint_subject(runtime.names, "reward-3", "health"), b"", timeout=10)).data)
                stats = mine(await gather_replies(probe, "$SRV.STATS.asyncflow-reward", 10.0,
                                                  lambda rs: bool(mine(rs))))
            # The runtime has closed its connection; a short wait for replies that should not come.
            after = mine(await gather_replies(probe, "$SRV.PING", 1.0))
            return {"during": during, "health": health, "stats": stats, "after": after,
                    "closed": runtime.nc.is_closed, "service": runtime.service.service}
        finally:
            await probe.close()

    result = asyncio.run(scenario())
    assert [(r["name"], r["metadata"]["actor"], r["metadata"]["instance"]) for r in result["during"]] == [
        ("asyncflow-reward", "reward-3", "3")]
    assert result["health"] == {"ok": True, "state": "ready", "actor": "reward-3", "run": "micro-unit", "error": None}
    (stats,) = result["stats"]
    data = next(e["data"] for e in stats["endpoints"] if e["name"] == "stats")
    assert data["items_done"] == 1 and data["samples_done"] == 4 and data["busy_s"] == 0.5
    assert result["after"] == [] and result["closed"] and result["service"] is None
