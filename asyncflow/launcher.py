"""`asyncflow run CONFIG`: one run on this machine, top to bottom (`resume`: `asyncflow run --resume RUN_DIR`).

prepare inputs → broker → stores → topology → actors → wait → stop → summary.
The launcher only wires and sequences; every piece of RL logic lives in an actor. Each child
process it starts comes with a way to start it again (same command; the broker and the stores on
the same port), which the monitor uses when one dies (`run.restart_actors`).
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

from asyncflow.checkpoint import (
    CheckpointError,
    initial_policy,
    latest_checkpoint,
    prepare_resume,
    read_checkpoint,
)
from asyncflow.config import Config, load_config
from asyncflow.dataset import load_data
from asyncflow.errors import ConfigError, RunError, StoreError, TrainerLostError
from asyncflow.hooks import load_callable
from asyncflow.logs import bind_process, get_logger, setup_logging
from asyncflow.metrics_sinks import check_sinks
from asyncflow.monitor import ActorProcess, Monitor, summarize
from asyncflow.security import (
    check_launch,
    child_env,
    nats_connect_options,
    store_client_options,
    store_server_args,
)
from asyncflow.wire import Control
from broker import EmbeddedNatsServer, RunNames, connect, delete_topology, ensure_topology
from broker.names import KV_CONFIG, KV_POLICY_VERSION, KV_STORES
from broker.server import die_with_parent
from flight_store import StoreClient


def run(config: Config) -> dict[str, Any]:
    """One run to its configured steps; returns summary.json. The trainer's weights and optimizer
    live only in its process, so when it dies (and `trainer.checkpoint_every` > 0) the whole run is
    restarted from the newest checkpoint, as `--resume` would, up to `run.max_restarts` times."""
    restarts = 0
    while True:
        try:
            return _run_part(config, restarts)
        except TrainerLostError as error:
            run_dir = config.resolved().run_dir
            if restarts >= config.run.max_restarts:
                raise RunError(f"{error}\nnot restarted from a checkpoint: it was {restarts} times already "
                               f"(run.max_restarts={config.run.max_restarts})") from error
            try:
                checkpoint = latest_checkpoint(run_dir)
            except CheckpointError as missing:
                raise RunError(f"{error}\nno checkpoint to restart the run from: {missing}") from error
            restarts += 1
            print(f"the trainer died; restarting the run from {checkpoint.path} "
                  f"({restarts}/{config.run.max_restarts})", flush=True)
            config = config.model_copy(deep=True)
            config.run.resume_from = checkpoint.path


def _run_part(config: Config, restarts_from_checkpoint: int = 0) -> dict[str, Any]:
    config = config.resolved()
    run_dir = config.run_dir
    if config.run.resume_from is None:
        clear_previous_run(run_dir)
    else:  # keep logs, checkpoints and the records of the steps the checkpoint covers
        kept = prepare_resume(run_dir, read_checkpoint(config.run.resume_from))
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir / "logs" / "launcher.jsonl")
    bind_process(run=config.run.name, actor="launcher", stage="launcher")
    log = get_logger(run=config.run.name, actor="launcher")
    if config.run.resume_from is not None:
        log.info("resuming run", checkpoint=str(config.run.resume_from), record_lines_kept=kept)
    prepare_inputs(config)
    # Secrets present and certificates readable before anything starts (docs/security.md).
    check_launch(config.security, starts_broker=config.broker.url is None, starts_stores=not config.store.locations)
    config_path = run_dir / "config.yaml"
    config_path.write_text(config.to_yaml())

    started = time.time()
    with ExitStack() as cleanup:
        services: list[ActorProcess] = []
        nats_url = config.broker.url or start_broker(config, cleanup, services)
        stores = config.store.locations or start_stores(config, cleanup, services)
        asyncio.run(set_up_run(config, nats_url, stores))
        actors = start_actors(config, config_path, nats_url, cleanup)
        write_actors_file(run_dir, actors, services)
        log.info("run started", nats=nats_url, stores=stores, actors=[a.name for a in actors])
        try:
            monitor = Monitor(config, nats_url, actors, started, services,
                              on_restart=lambda: write_actors_file(run_dir, actors, services))
            rows = asyncio.run(monitor.watch())
        except BaseException as error:
            log.error("run failed", error=f"{type(error).__name__}: {error}")
            raise
        finally:
            asyncio.run(request_stop(config, nats_url))
            stop_processes([a.process for a in actors], grace_s=20.0)
    wall_s = time.time() - started
    summary = summarize(rows, wall_s)
    if config.run.resume_from is not None:  # the summary covers the steps of this part of the run
        summary["resumed_from_step"] = read_checkpoint(config.run.resume_from).step
    if restarts_from_checkpoint:
        summary["restarts_from_checkpoint"] = restarts_from_checkpoint
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("run finished", **summary)
    return summary


def resume(run_dir: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`asyncflow run --resume RUN_DIR`: continue a killed or stopped run from its newest complete
    checkpoint to its configured steps, with the config it ran with (plus `overrides`) and a fresh
    broker and stores. The checkpoint's weights are policy version N; partition N trains next."""
    run_dir = Path(run_dir).resolve()
    config = load_config(run_dir / "config.yaml", {**(overrides or {}), "run.run_dir": str(run_dir)})
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint.step >= config.run.steps:
        raise ConfigError(f"{checkpoint.path} already holds all {config.run.steps} steps of the run: nothing "
                          "to resume (raise run.steps with --set to train on)")
    config.run.resume_from = checkpoint.path
    return run(config)


def clear_previous_run(run_dir: Path) -> None:
    """A new run in an old run directory starts clean: no stale logs, records, checkpoints, broker state or model."""
    for name in ("logs", "nats", "stores", "trainer", "final", "checkpoints", "tensorboard"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "spans.jsonl", "summary.json", "actors.json", "services.json", "config.yaml",
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
    load_data(config.data)
    load_callable(config.reward.function, "reward.function")
    check_sinks(config)  # wandb configured but not installed: fail before anything starts


def start_broker(config: Config, cleanup: ExitStack, services: list[ActorProcess]) -> str:
    """The embedded broker, its JetStream state under `<run_dir>/nats`; a restart keeps port and state."""
    log_file = config.run_dir / "logs" / "nats-server.log"
    server = EmbeddedNatsServer(config.run_dir / "nats", host=config.broker.host, port=config.broker.port,
                                log_file=log_file, security=config.security)
    url = server.start()
    cleanup.callback(server.stop)

    def restart() -> subprocess.Popen[bytes]:
        server.restart()
        assert server.process is not None
        return server.process

    assert server.process is not None
    services.append(ActorProcess("broker", 0, server.process, log_file, restart=restart, address=url))
    return url


def start_stores(config: Config, cleanup: ExitStack, services: list[ActorProcess],
                 timeout_s: float = 30.0) -> list[str]:
    """Launch `store.servers` Flight stores; a restarted store serves on its old port (and so at the
    location every ChunkRef names), empty: what it held is lost (lineage recovery re-creates it)."""
    store_dir = config.run_dir / "stores"
    store_dir.mkdir(exist_ok=True)
    started = [_start_store(config, index, "0") for index in range(config.store.servers)]
    cleanup.callback(lambda: stop_processes([s.process for s in started], 0.0))  # SIGTERM stops stores
    locations = [_wait_for_store(config, index, process, timeout_s) for index, process in enumerate(started)]
    for index, (process, location) in enumerate(zip(started, locations, strict=True)):
        port = location.rsplit(":", 1)[1]

        def restart(index: int = index, port: str = port) -> subprocess.Popen[bytes]:
            process = _start_store(config, index, port)
            _wait_for_store(config, index, process, timeout_s)
            return process

        started[index] = ActorProcess("store", index, process, config.run_dir / "logs" / f"store-{index}.log",
                                      restart=restart, address=location)
        services.append(started[index])
    return locations


def _start_store(config: Config, index: int, port: str) -> subprocess.Popen[bytes]:
    location_file = config.run_dir / "stores" / f"store-{index}.location"
    location_file.unlink(missing_ok=True)
    with (config.run_dir / "logs" / f"store-{index}.log").open("ab") as log:
        command = [sys.executable, "-m", "flight_store.server", "--host", config.store.host, "--port", port,
                   "--capacity-bytes", str(config.store.capacity_bytes), "--location-file", str(location_file)]
        command += store_server_args(config.security)  # paths and a variable's name; the token goes in env
        env = dict(os.environ, **child_env(config.security))
        return subprocess.Popen(command, stdout=log, stderr=log, preexec_fn=die_with_parent, env=env)


def _wait_for_store(config: Config, index: int, process: subprocess.Popen[bytes], timeout_s: float) -> str:
    """The store's location once it serves (it writes its location file then)."""
    location_file = config.run_dir / "stores" / f"store-{index}.location"
    deadline = time.monotonic() + timeout_s
    while not location_file.is_file():
        if process.poll() is not None:
            raise StoreError(f"Flight store {index} exited with code {process.returncode} at start-up "
                             f"(see {config.run_dir / 'logs' / f'store-{index}.log'})")
        if time.monotonic() > deadline:
            raise StoreError(f"Flight store {index} did not start within {timeout_s} s")
        time.sleep(0.05)
    return location_file.read_text().strip()


async def set_up_run(config: Config, nats_url: str, stores: list[str]) -> None:
    """Streams, consumers and the KV bucket, then the values every actor reads at start-up."""
    nc = await connect(nats_url, name="asyncflow-launcher-setup", security=config.security)
    try:
        js = nc.jetstream(timeout=config.broker.request_timeout_s)
        names = RunNames(config.run.name)
        await delete_topology(js, names)  # a run name reused on a shared broker starts from nothing
        with StoreClient(stores, **store_client_options(config.security)) as store:
            store.drop_prefix(f"{names.run}/")
        await ensure_topology(js, names, ack_wait_s=config.broker.ack_wait_s, max_deliver=config.broker.max_deliver,
                              replicas=config.broker.replicas)
        kv = await js.key_value(names.kv_bucket)
        await kv.put(KV_STORES, json.dumps(stores).encode())
        await kv.put(KV_CONFIG, config.model_dump_json().encode())
        await kv.put(KV_POLICY_VERSION, str(initial_policy(config)[1]).encode())
    finally:
        await nc.close()


def start_actors(config: Config, config_path: Path, nats_url: str, cleanup: ExitStack) -> list[ActorProcess]:
    plan = [("scheduler", 0), ("param_sync", 0), ("reward", 0), ("trainer", 0)]
    plan += [("rollout", i) for i in range(config.rollout.instances)]
    actors: list[ActorProcess] = []
    # User hooks (reward functions, builders) load by dotted path relative to the working directory.
    python_path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    # Secrets reach actors through the environment only, never their command line (docs/security.md).
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=python_path,
               **child_env(config.security))
    for role, instance in plan:
        console_log = config.run_dir / "logs" / f"{role}-{instance}.console.log"

        def spawn(role: str = role, instance: int = instance, console_log: Path = console_log) -> subprocess.Popen[bytes]:
            with console_log.open("ab") as out:
                return subprocess.Popen(
                    [sys.executable, "-m", "asyncflow", "actor", role, "--config", str(config_path),
                     "--nats", nats_url, "--instance", str(instance)],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    preexec_fn=die_with_parent,
                )

        actors.append(ActorProcess(role, instance, spawn(), console_log, restart=spawn))
    # A lambda: the processes to stop are the ones running at the end, restarted ones included.
    cleanup.callback(lambda: stop_processes([a.process for a in actors], 5.0))
    return actors


def write_actors_file(run_dir: Path, actors: list[ActorProcess], services: list[ActorProcess] = ()) -> None:
    """`actors.json` (role, instance, pid and host of every actor process) and `services.json` (the
    same of the embedded broker and launched stores); rewritten after every restart."""
    for name, children in (("actors.json", actors), ("services.json", services)):
        entries = [{"actor": a.name, "role": a.role, "instance": a.instance, "pid": a.process.pid,
                    "host": socket.gethostname(), "restarts": a.restarts, **({"address": a.address} if a.address else {})}
                   for a in children]
        tmp = run_dir / f"{name}.tmp"
        tmp.write_text(json.dumps(entries, indent=2) + "\n")
        tmp.replace(run_dir / name)  # atomic: a reader never sees half a file


async def request_stop(config: Config, nats_url: str, timeout_s: float = 5.0) -> None:
    """Tell every actor to stop (core NATS, best effort, at most `timeout_s`): with the broker gone
    the processes get SIGTERM instead. (nats-py retries a refused first connect without end unless
    bounded from outside.)"""
    try:
        nc = await asyncio.wait_for(nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0,
                                                 allow_reconnect=False, error_cb=_quiet,
                                                 **nats_connect_options(config.security)),
                                    timeout_s)
    except Exception:
        return
    try:
        await nc.publish(RunNames(config.run.name).control, Control(command="stop", reason="run finished").encode())
        await nc.flush(timeout=2)
    except Exception:
        pass  # best effort, as above
    finally:
        with suppress(Exception):
            await asyncio.wait_for(nc.close(), timeout_s)


async def _quiet(error: Exception) -> None:
    """nats-py's error callback: a stop request to a broker that is gone is not worth a traceback."""


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
