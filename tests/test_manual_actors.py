"""Actors started one by one with `asyncflow actor <role> --config C --nats URL`, as on separate hosts.

No launcher: a bare broker and a bare store, and five kinds of process that find each other
only through NATS subjects, the run's KV bucket and Flight keys.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.trainer import read_records
from asyncflow.launcher import request_stop, stop_processes
from broker import RunNames, connect
from tests.conftest import make_tiny_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


def test_actors_started_by_hand_finish_a_run(tmp_path, tiny_model_dir, arith_dataset, nats_server,
                                             flight_store_server):
    config = make_tiny_config(tmp_path, tiny_model_dir, arith_dataset, 1, "manual", steps=2,
                              store={"locations": [flight_store_server.location]},
                              broker={"url": nats_server.url}, rollout={"instances": 2})
    config.run_dir.mkdir(parents=True)
    config_path = config.run_dir / "config.yaml"
    config_path.write_text(config.to_yaml())
    roles = [("scheduler", 0), ("param_sync", 0), ("reward", 0), ("trainer", 0), ("rollout", 0), ("rollout", 1)]
    (config.run_dir / "logs").mkdir()
    consoles = [config.run_dir / "logs" / f"{role}-{instance}.console.log" for role, instance in roles]
    processes = [
        subprocess.Popen([sys.executable, "-m", "asyncflow", "actor", role, "--config", str(config_path),
                          "--nats", nats_server.url, "--instance", str(instance)],
                         cwd=ROOT, stdout=console.open("wb"), stderr=subprocess.STDOUT)
        for (role, instance), console in zip(roles, consoles, strict=True)
    ]

    def outputs() -> str:
        return "\n".join(f"--- {c.name}\n{c.read_text()[-1500:]}" for c in consoles)

    try:
        final = config.run_dir / "final" / "model.safetensors"
        deadline = time.monotonic() + 180
        while not final.exists():
            assert time.monotonic() < deadline, "the hand-started run did not finish in 180 s"
            assert all(p.poll() is None for p in processes), f"an actor exited early:\n{outputs()}"
            time.sleep(0.5)
        # Every actor registered itself (a slow starter may join after the others finished the run).
        expected = {f"{role}-{instance}" for role, instance in roles}
        while not expected <= (seen := asyncio.run(_heartbeats(nats_server.url, "manual"))):
            assert time.monotonic() < deadline, f"missing heartbeats: {expected - seen}"
            time.sleep(0.5)
    finally:
        asyncio.run(request_stop(config, nats_server.url))
        stop_processes(processes, grace_s=20)
    codes = [p.returncode for p in processes]
    assert codes == [0] * len(processes), f"actors must exit cleanly on stop: {codes}\n{outputs()}"
    trained = [r["sample_id"] for r in read_records(config.run_dir)]
    assert sorted(trained) == list(range(2 * 4 * 4))


async def _heartbeats(url: str, run: str) -> set[str]:
    nc = await connect(url, "test")
    try:
        kv = await nc.jetstream().key_value(RunNames(run).kv_bucket)
        keys = await kv.keys()
        return {key.removeprefix("actors.") for key in keys if key.startswith("actors.")}
    finally:
        await nc.close()
