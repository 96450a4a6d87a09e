"""`asyncflow status` and `asyncflow inspect` against a live run, and their errors.

One run on the simulated engines (real broker, Flight store and actor processes) is asked while it
trains; what the commands print is checked against what the run itself recorded (actors.json,
the EVENTS stream, the work consumers) rather than against itself.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from asyncflow.inspect_run import _preview, summarize_event
from asyncflow.status import redact_url
from broker import RunNames
from tests.test_micro import live_config, live_run

ROOT = Path(__file__).parent.parent
ACTORS = {"scheduler-0", "param_sync-0", "reward-0", "trainer-0", "rollout-0", "rollout-1"}


def _run_cli(*args: str) -> tuple[int, str, str]:
    """The command as a user runs it (a process of its own: the run's thread prints to this one's stdout)."""
    result = subprocess.run([sys.executable, "-m", "asyncflow", *args], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    return result.returncode, result.stdout, result.stderr


async def _truth(nats_url: str, name: str) -> dict:
    """What the broker says, asked directly: the last trained step and the stream's last sequence."""
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=10)
        names = RunNames(name)
        last = await js.get_last_msg(names.events_stream, names.done("trainer"))
        info = await js.stream_info(names.events_stream)
        return {"step": json.loads(last.data)["step"], "last_seq": info.state.last_seq}
    finally:
        await nc.close()


@pytest.mark.slow
def test_status_and_inspect_describe_a_live_run(tmp_path, tiny_model_dir, arith_dataset, nats_server):
    name = "status-live"
    url = nats_server.url
    config = live_config(tmp_path, tiny_model_dir, arith_dataset, url, name)
    with live_run(config, url, min_steps=3):
        before = asyncio.run(_truth(url, name))
        code, out, err = _run_cli("status", "--nats", url, "--run", name, "--json")
        assert code == 0, err
        status = json.loads(out)
        code, text, err = _run_cli("status", "--nats", url, "--run", name)
        assert code == 0, err
        code, out, err = _run_cli("inspect", "--nats", url, "--run", name, "--json", "--events", "40")
        assert code == 0, err
        report = json.loads(out)
        code, inspect_text, err = _run_cli("inspect", "--nats", url, "--run", name)
        assert code == 0, err
        after = asyncio.run(_truth(url, name))
        launched = {a["actor"]: a for a in json.loads((config.run_dir / "actors.json").read_text())}

    # Actors: every one, as the launcher started them, alive, answering as micro services.
    actors = {a["actor"]: a for a in status["actors"]}
    assert set(actors) == ACTORS
    for actor_id, actor in actors.items():
        assert actor["role"] == launched[actor_id]["role"] and actor["pid"] == launched[actor_id]["pid"]
        assert actor["host"] == socket.gethostname()
        assert actor["alive"] and actor["state"] in ("ready", "busy") and actor["heartbeat_age_s"] is not None
        assert actor["service"] is True and actor["error"] is None and actor["items_done"] >= 0
    assert actors["trainer-0"]["policy_version"] >= 2 and actors["trainer-0"]["items_done"] > 0
    assert all(actors[a]["policy_version"] is not None for a in ("rollout-0", "rollout-1", "param_sync-0"))
    assert actors["rollout-0"]["items_done"] + actors["rollout-1"]["items_done"] > 0

    # Queues: one per work stage, with the consumer's numbers.
    assert set(status["queues"]) == {"rollout", "reward", "trainer"}
    assert all(isinstance(q[k], int) and q[k] >= 0 for q in status["queues"].values()
               for k in ("queued", "in_progress", "redelivered", "waiting_pulls"))

    # Training: the step seen lies between what the broker said before and after; a rate and a reward.
    assert before["step"] + 1 <= status["steps_done"] <= after["step"] + 1
    assert status["last_step"]["step"] == status["steps_done"] - 1
    assert status["steps_total"] == config.run.steps and status["policy_version"] >= 2
    assert status["samples_per_s"] > 0 and status["rate_window_s"] > 0
    assert 0.0 <= status["last_step"]["reward_mean"] <= 1.0 and status["last_step"]["samples"] == 16
    assert status["dead_letters"] == {} and status["problems"] == []
    assert status["progress"]["step"] >= 0

    # The text form names the same things.
    assert text.startswith(f"run {name} at {url}\nstep ")
    assert "samples/s over the last" in text and "reward " in text
    for actor_id in ACTORS:
        assert f"\n{actor_id} " in text
    assert "STAGE" in text and "QUEUED" in text and "\nrollout " in text

    # Inspect: the two streams with their consumers, the KV keys, the services, the last events.
    names = RunNames(name)
    streams = {s["name"]: s for s in report["streams"]}
    assert set(streams) == {names.work_stream, names.events_stream}
    work = streams[names.work_stream]
    assert work["retention"] == "workqueue" and work["subjects"] == [f"af.{name}.work.>"]
    assert {c["name"] for c in work["consumers"] if c["durable"]} == {"rollout", "reward", "trainer"}
    events = streams[names.events_stream]
    assert f"af.{name}.done.trainer" in events["subject_counts"] and f"af.{name}.weights" in events["subject_counts"]
    assert any(not c["durable"] for c in events["consumers"])  # the actors' ordered consumers following EVENTS
    keys = {k["key"]: k for k in report["kv"]["keys"]}
    assert {"config", "stores", "policy_version", "progress"} | {f"actors.{a}" for a in ACTORS} <= set(keys)
    assert keys["config"]["preview"].startswith(f"resolved config (run {name}, {config.run.steps} steps")
    assert {s["metadata"]["actor"] for s in report["services"]} == ACTORS
    assert all({e["name"] for e in s["endpoints"]} == {"stats", "health"} for s in report["services"])
    recent = report["events"]
    assert len(recent) == 40 and [e["seq"] for e in recent] == sorted(e["seq"] for e in recent)
    assert before["last_seq"] <= recent[-1]["seq"] <= after["last_seq"]
    assert any(e["summary"].startswith("step ") for e in recent)
    assert any(e["subject"] == f"af.{name}.done.rollout" and "rollout item" in e["summary"] for e in recent)
    for section in (f"stream {names.work_stream}", f"stream {names.events_stream}", f"KV bucket {names.kv_bucket}",
                    "micro services (6)", "last 20 events", "CONSUMER", "asyncflow-rollout"):
        assert section in inspect_text, section


def test_status_and_inspect_name_a_missing_run_and_an_unreachable_broker(nats_server):
    for command in ("status", "inspect"):
        code, out, err = _run_cli(command, "--nats", nats_server.url, "--run", "nope")
        assert code == 2 and out == ""
        assert f"run 'nope' not found at {nats_server.url}: no KV bucket AF_NOPE" in err
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = _run_cli("status", "--nats", f"nats://user:hunter2@127.0.0.1:{port}", "--run", "x",
                              "--timeout-s", "2")
    assert code == 2 and f"cannot connect to NATS at nats://***@127.0.0.1:{port}" in err
    assert "hunter2" not in err + out


def test_previews_hide_credentials_and_summaries_tolerate_any_payload():
    assert redact_url("nats://u:p@h:4222,nats://h2:4222") == "nats://***@h:4222,nats://h2:4222"
    config = json.dumps({"run": {"name": "r", "steps": 3, "run_dir": "/x"},
                         "broker": {"url": "nats://admin:s3cret@broker:4222"}}).encode()
    assert "s3cret" not in _preview("config", config) and "run r, 3 steps" in _preview("config", config)
    assert summarize_event("af.r.done.rollout", b"\xff") == "(not JSON, 1 bytes)"
    assert summarize_event("af.r.weights", b'{"version": 3, "weights": {"location": "grpc://s:1", "key": "k"}, '
                                           b'"nbytes": 10}') == "policy v3 at grpc://s:1 key k (10 bytes)"
    assert summarize_event("af.r.dead.reward", b'{"stage": "reward", "deliveries": 5, "reason": "boom"}') == (
        "dead letter at reward after 5 deliveries: unreadable message: boom")
