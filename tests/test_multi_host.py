"""Across hosts: real separate network hosts (Linux network namespaces joined by veth pairs and a
bridge), each actor started by hand with `asyncflow actor … --nats nats://<address>`.

Host "broker" runs nats-server, a Flight store, the scheduler, reward and param-sync; host
"rollout" runs the rollout instance; host "trainer" the trainer. They reach each other only
through their own addresses on the bridge, as machines on a LAN would. Mid-run the rollout host's
link is cut for several seconds; the run must ride it out and finish, every sample trained once.

Needs root and iproute2; everything it creates is named after this process and removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors.trainer import read_records
from asyncflow.launcher import request_stop, stop_processes
from tests.conftest import make_tiny_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
LINK_CUT_S = 6.0


@dataclass
class Host:
    name: str
    """The network namespace."""
    address: str
    link: str
    """The host's veth end on the bridge side: setting it down cuts the host off."""

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[dict[str, Host]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = str(os.getpid() % 100_000)
    subnet = f"10.231.{os.getpid() % 250}"
    bridge = f"afbr{tag}"  # interface names are at most 15 characters
    try:
        _ip("link", "add", bridge, "type", "bridge")
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot create a bridge here: {error.stderr.strip()}")
    made: list[Host] = []
    try:
        _ip("addr", "add", f"{subnet}.254/24", "dev", bridge)  # the test itself talks to the broker
        _ip("link", "set", bridge, "up")
        for index, role in enumerate(("broker", "rollout", "trainer")):
            host = Host(name=f"af{tag}{role}", address=f"{subnet}.{index + 1}", link=f"afv{tag}{index}")
            peer = f"afp{tag}{index}"
            _ip("netns", "add", host.name)
            made.append(host)
            _ip("link", "add", host.link, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", host.name)
            _ip("link", "set", host.link, "master", bridge)
            _ip("link", "set", host.link, "up")
            _ip("netns", "exec", host.name, "ip", "addr", "add", f"{host.address}/24", "dev", peer)
            _ip("netns", "exec", host.name, "ip", "link", "set", peer, "up")
            _ip("netns", "exec", host.name, "ip", "link", "set", "lo", "up")
        yield {host.name.removeprefix(f"af{tag}"): host for host in made}
    finally:
        for host in made:  # deleting a namespace deletes its veth pair too
            subprocess.run(["ip", "netns", "delete", host.name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True, timeout=30)


def test_actors_on_three_hosts_finish_a_run_through_a_link_cut(tmp_path, tiny_model_dir, arith_dataset,
                                                               hosts: dict[str, Host]):
    broker_host, rollout_host, trainer_host = hosts["broker"], hosts["rollout"], hosts["trainer"]
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    consoles: list[Path] = []

    def start(host: Host, name: str, *argv: str) -> subprocess.Popen[bytes]:
        console = logs / f"{name}.console.log"
        consoles.append(console)
        process = subprocess.Popen(host.command(sys.executable, "-m", "asyncflow", *argv), cwd=ROOT,
                                   stdout=console.open("wb"), stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    def outputs() -> str:
        return "\n".join(f"--- {c.name}\n{c.read_text(errors='replace')[-1500:]}" for c in consoles)

    def wait_for(what: str, done, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s\n{outputs()}"
            assert all(p.poll() is None for p in processes), f"a process exited early:\n{outputs()}"
            time.sleep(0.5)

    nats_url = f"nats://{broker_host.address}:4222"
    location_file = tmp_path / "store.location"
    try:
        start(broker_host, "broker", "broker", "--host", broker_host.address, "--port", "4222",
              "--store-dir", str(tmp_path / "nats"))
        start(broker_host, "store", "store", "--host", broker_host.address, "--port", "0",
              "--location-file", str(location_file))
        wait_for("the store wrote its location", lambda: location_file.exists() and location_file.read_text(), 60)
        location = location_file.read_text().strip()
        assert location == f"grpc://{broker_host.address}:{location.rsplit(':', 1)[1]}"

        steps, prompts, group = 10, 4, 4
        # A short ack_wait: an item whose ack was lost in the cut is redelivered in seconds, not minutes.
        config = make_tiny_config(tmp_path, tiny_model_dir, arith_dataset, 1, "hosts", steps=steps,
                                  prompts=prompts, group=group, store={"locations": [location]},
                                  broker={"url": nats_url, "ack_wait_s": 15.0})
        config.run_dir.mkdir(parents=True)
        config_path = config.run_dir / "config.yaml"
        config_path.write_text(config.to_yaml())
        for host, role in ((broker_host, "scheduler"), (broker_host, "reward"), (broker_host, "param_sync"),
                           (trainer_host, "trainer"), (rollout_host, "rollout")):
            start(host, role, "actor", role, "--config", str(config_path), "--nats", nats_url)

        records = config.run_dir / "trainer" / "trained_samples.jsonl"

        def steps_done() -> int:
            if not records.exists():
                return 0
            return len({json.loads(line)["step"] for line in records.read_text().splitlines() if line.strip()})

        wait_for("the first optimizer step", lambda: steps_done() >= 1, 240)
        _ip("link", "set", rollout_host.link, "down")  # the rollout host drops off the network
        steps_at_cut = steps_done()
        time.sleep(LINK_CUT_S)
        _ip("link", "set", rollout_host.link, "up")
        final = config.run_dir / "final" / "model.safetensors"
        wait_for("the run finished after the link came back", final.exists, 300)
    finally:
        # Actors first (told over NATS, then signalled), broker and store last.
        if len(processes) > 2:
            with contextlib.suppress(Exception):
                asyncio.run(request_stop(config, nats_url))
        stop_processes(processes[2:], grace_s=20)
        stop_processes(processes[:2], grace_s=0)

    trained = read_records(config.run_dir)
    assert sorted(r["sample_id"] for r in trained) == list(range(steps * prompts * group))  # each once
    assert all(0 <= r["step"] - r["policy_version"] <= 1 for r in trained)  # I1
    # The rollout generated with weights it could only have fetched after the link came back: with
    # k = 1 it could not run ahead past the versions the trainer had made when the cut began.
    assert max(r["policy_version"] for r in trained) > steps_at_cut + 2, (steps_at_cut, outputs())
