"""Entry point of one actor process: `asyncflow actor <role> --config C --nats URL [--instance N]`.

Sets up logging (`<run_dir>/logs/<role>-<n>.jsonl`), torch threads and signal handling, then runs
the role's actor until it is told to stop (control subject or SIGTERM) or fails.

Start-up and shutdown are on every run's critical path (a run's actors start together and the
launcher waits for the last one to exit), so this module keeps both short: only the roles whose
engines run torch import it up front, and a process run by the CLI leaves, once its actor has
stopped cleanly, without tearing its interpreter down piece by piece (`exit_now`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from asyncflow.config import load_config
from asyncflow.errors import ConfigError
from asyncflow.logs import get_logger, setup_logging

ROLE_MODULES = {
    "scheduler": "actors.scheduler",
    "rollout": "actors.rollout",
    "reward": "actors.reward",
    "trainer": "actors.trainer",
    "param_sync": "actors.param_sync",
}
TORCH_ROLES = frozenset({"rollout", "trainer"})
"""Roles whose engines run torch. The others do not need it, and importing it (~2 s of CPU on a
small machine) would only compete with the rollout and trainer engines starting at the same time."""


def run_actor_process(role: str, config_path: Path, nats_url: str, instance: int = 0, console: bool = True,
                      tls_ca: Path | None = None, exit_when_stopped: bool = False) -> int:
    """Run the actor to its end; returns the process's exit code (1: the actor failed).

    `tls_ca` overrides security.tls_ca: the CA file's path on this host (docs/security.md).
    `exit_when_stopped` (the `asyncflow actor` command): end the process right there with that
    code, see `exit_now`; only for a process that exists to run this one actor."""
    if role not in ROLE_MODULES:
        raise ConfigError(f"unknown actor role {role!r}; known: {', '.join(ROLE_MODULES)}")
    config = load_config(config_path)
    if tls_ca is not None:
        config.security.tls_ca = tls_ca
    actor_id = f"{role}-{instance}"
    setup_logging(config.run_dir / "logs" / f"{actor_id}.jsonl", console=console)
    threads = torch_threads(config, role)
    if role in TORCH_ROLES:
        import torch  # after logging: importing torch takes seconds and the log should say we started

        torch.set_num_threads(threads)
    else:  # torch only if something imports it after all (a user's reward function): then as configured
        set_torch_threads_on_import(threads)
    module = importlib.import_module(ROLE_MODULES[role])
    log = get_logger(run=config.run.name, actor=actor_id)
    code = asyncio.run(_main(module, role, config, nats_url, instance, log))
    if exit_when_stopped:
        exit_now(code)
    return code


def torch_threads(config, role: str) -> int:  # type: ignore[no-untyped-def]
    """The role's own thread count where the config gives one, else the run's."""
    own = {"rollout": config.rollout.torch_threads, "trainer": config.trainer.torch_threads}.get(role)
    return own or config.run.torch_threads


def set_torch_threads_on_import(threads: int) -> None:
    """torch.set_num_threads(threads) now if torch is imported already, else when it is: torch takes
    its intra-op thread count from OMP_NUM_THREADS as it starts, so a role that never imports torch
    never pays for it."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def exit_now(code: int) -> None:
    """End the process with `code` once what a normal exit does for others is done, skipping the
    interpreter's teardown of its modules and objects: with torch (and an engine) loaded that alone
    takes 0.7-1.5 s of CPU per process, and a run's shutdown waits for its slowest actor.

    What must still happen happens here, in the order the interpreter's own exit does it: threading's
    exit hooks run (they stop idle thread-pool workers) and the non-daemon threads are joined, then
    the atexit handlers run (they close what engines leave open, e.g. the data-parallel trainer's
    worker ranks, vLLM's engine core, multiprocessing's children, and logging's handlers), then
    stdout and stderr are flushed. Files the actors write are written line by line (logs, trainer
    records) or closed by their writers, so none waits for a finalizer.
    """
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter calls first on exit
    if shutdown is not None:
        shutdown()
    else:  # not CPython: at least wait for the threads the interpreter would wait for
        current = threading.current_thread()
        for thread in threading.enumerate():
            if thread is not current and not thread.daemon:
                thread.join()
    try:
        atexit._run_exitfuncs()
    finally:
        logging.shutdown()  # idempotent; in case a handler above failed before logging's own ran
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed or broken stream has nothing left to lose
                stream.flush()
        os._exit(code)


async def _main(module, role, config, nats_url, instance, log) -> int:  # type: ignore[no-untyped-def]
    from actors.runtime import ActorRuntime

    async with ActorRuntime(role, config, nats_url, instance) as runtime:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.stop.set)
        try:
            await module.run(runtime)
        except Exception:
            log.exception("actor failed", pid=os.getpid())
            return 1
    return 0
