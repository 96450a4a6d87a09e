"""`asyncflow run CONFIG`: one run on this machine, top to bottom.

prepare inputs → broker → stores → topology → actors → wait → stop → summary.
The launcher only wires and sequences; every piece of RL logic lives in an actor.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import nats

from asyncflow.config import Config
from asyncflow.dataset import load_prompts
from asyncflow.errors import ConfigError, StoreError
from asyncflow.hooks import load_callable
from asyncflow.logs import get_logger, setup_logging
from asyncflow.monitor import ActorProcess, Monitor, summarize
from asyncflow.wire import Control
from broker import EmbeddedNatsServer, RunNames, connect, delete_topology, ensure_topology
from broker.names import KV_CONFIG, KV_POLICY_VERSION, KV_STORES
from broker.server import die_with_parent
from flight_store import StoreClient


def run(config: Config) -> dict[str, Any]:
    config = config.resolved()
    run_dir = config.run_dir
    clear_previous_run(run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir / "logs" / "launcher.jsonl")
    log = get_logger(run=config.run.name, actor="launcher")
    prepare_inputs(config)
    config_path = run_dir / "config.yaml"
    config_path.write_text(config.to_yaml())

    started = time.time()
    with ExitStack() as cleanup:
        nats_url = config.broker.url or start_broker(config, cleanup)
        stores = config.store.locations or start_stores(config, cleanup)
        asyncio.run(set_up_run(config, nats_url, stores))
        actors = start_actors(config, config_path, nats_url, cleanup)
        write_actors_file(run_dir, actors)
        log.info("run started", nats=nats_url, stores=stores, actors=[a.name for a in actors])
        try:
            rows = asyncio.run(Monitor(config, nats_url, actors, started).watch())
        finally:
            asyncio.run(request_stop(config, nats_url))
            stop_processes([a.process for a in actors], grace_s=20.0)
    wall_s = time.time() - started
    summary = summarize(rows, wall_s)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("run finished", **summary)
    return summary


def clear_previous_run(run_dir: Path) -> None:
    """A new run in an old run directory starts clean: no stale logs, records, broker state or model."""
    for name in ("logs", "nats", "stores", "trainer", "final"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "spans.jsonl", "summary.json", "actors.json", "config.yaml",
                 "report.png", "report.html", "report.json"):
        (run_dir / name).unlink(missing_ok=True)


def prepare_inputs(config: Config) -> None:
    """Build the model / dataset if the config says how, then fail fast on anything missing."""
    for what, settings in (("model", config.model), ("data", config.data)):
        if not settings.path.exists() and settings.create_with:
            load_callable(settings.create_with, f"{what}.create_with")(settings.path, config.run.seed)
        if not settings.path.exists():
            raise ConfigError(f"{what}.path {settings.path} does not exist (set {what}.create_with to build it)")
    if not (config.model.path / "config.json").is_file():
        raise ConfigError(f"model.path {config.model.path} is not an HF model folder (no config.json)")
    load_prompts(config.data.path, config.data.prompt_field)
    load_callable(config.reward.function, "reward.function")


def start_broker(config: Config, cleanup: ExitStack) -> str:
    server = EmbeddedNatsServer(
        config.run_dir / "nats", host=config.broker.host, port=config.broker.port,
        log_file=config.run_dir / "logs" / "nats-server.log",
    )
    url = server.start()
    cleanup.callback(server.stop)
    return url


def start_stores(config: Config, cleanup: ExitStack, timeout_s: float = 30.0) -> list[str]:
    store_dir = config.run_dir / "stores"
    store_dir.mkdir(exist_ok=True)
    processes, files = [], []
    for index in range(config.store.servers):
        location_file = store_dir / f"store-{index}.location"
        location_file.unlink(missing_ok=True)
        log = (config.run_dir / "logs" / f"store-{index}.log").open("ab")
        command = [sys.executable, "-m", "flight_store.server", "--host", config.store.host, "--port", "0",
                   "--capacity-bytes", str(config.store.capacity_bytes), "--location-file", str(location_file)]
        processes.append(subprocess.Popen(command, stdout=log, stderr=log, preexec_fn=die_with_parent))
        log.close()
        files.append(location_file)
    cleanup.callback(stop_processes, processes, 0.0)  # stores need no grace: SIGTERM stops them
    deadline = time.monotonic() + timeout_s
    while not all(f.is_file() for f in files):
        for index, process in enumerate(processes):
            if process.poll() is not None:
                raise StoreError(f"Flight store {index} exited with code {process.returncode} at start-up "
                                 f"(see {config.run_dir / 'logs' / f'store-{index}.log'})")
        if time.monotonic() > deadline:
            raise StoreError(f"Flight stores did not start within {timeout_s} s")
        time.sleep(0.05)
    return [f.read_text().strip() for f in files]


async def set_up_run(config: Config, nats_url: str, stores: list[str]) -> None:
    """Streams, consumers and the KV bucket, then the values every actor reads at start-up."""
    nc = await connect(nats_url, name="asyncflow-launcher-setup")
    try:
        js = nc.jetstream(timeout=config.broker.request_timeout_s)
        names = RunNames(config.run.name)
        await delete_topology(js, names)  # a run name reused on a shared broker starts from nothing
        with StoreClient(stores) as store:
            store.drop_prefix(f"{names.run}/")
        await ensure_topology(js, names, ack_wait_s=config.broker.ack_wait_s, max_deliver=config.broker.max_deliver)
        kv = await js.key_value(names.kv_bucket)
        await kv.put(KV_STORES, json.dumps(stores).encode())
        await kv.put(KV_CONFIG, config.model_dump_json().encode())
        await kv.put(KV_POLICY_VERSION, b"0")
    finally:
        await nc.close()


def start_actors(config: Config, config_path: Path, nats_url: str, cleanup: ExitStack) -> list[ActorProcess]:
    plan = [("scheduler", 0), ("param_sync", 0), ("reward", 0), ("trainer", 0)]
    plan += [("rollout", i) for i in range(config.rollout.instances)]
    actors = []
    # User hooks (reward functions, builders) load by dotted path relative to the working directory.
    python_path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=python_path)
    for role, instance in plan:
        console_log = config.run_dir / "logs" / f"{role}-{instance}.console.log"
        with console_log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "asyncflow", "actor", role, "--config", str(config_path),
                 "--nats", nats_url, "--instance", str(instance)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=die_with_parent,
            )
        actors.append(ActorProcess(role, instance, process, console_log))
    cleanup.callback(stop_processes, [a.process for a in actors], 5.0)
    return actors


def write_actors_file(run_dir: Path, actors: list[ActorProcess]) -> None:
    entries = [{"actor": a.name, "role": a.role, "instance": a.instance, "pid": a.process.pid,
                "host": socket.gethostname()} for a in actors]
    (run_dir / "actors.json").write_text(json.dumps(entries, indent=2) + "\n")


async def request_stop(config: Config, nats_url: str) -> None:
    try:
        nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0)
    except Exception:
        return  # broker gone: the processes get SIGTERM instead
    try:
        await nc.publish(RunNames(config.run.name).control, Control(command="stop", reason="run finished").encode())
        await nc.flush(timeout=2)
    finally:
        await nc.close()


def stop_processes(processes: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """Wait up to grace_s for processes told to stop, then SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in processes if p.poll() is None]
        for process in alive:
            process.send_signal(sig)
        for process in alive:
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5.0)
