"""Entry point of one actor process: `asyncflow actor <role> --config C --nats URL [--instance N]`.

Sets up logging (`<run_dir>/logs/<role>-<n>.jsonl`), torch threads and signal handling, then runs
the role's actor until it is told to stop (control subject or SIGTERM) or fails.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
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


def run_actor_process(role: str, config_path: Path, nats_url: str, instance: int = 0, console: bool = True,
                      tls_ca: Path | None = None) -> int:
    """`tls_ca` overrides security.tls_ca: the CA file's path on this host (docs/security.md)."""
    if role not in ROLE_MODULES:
        raise ConfigError(f"unknown actor role {role!r}; known: {', '.join(ROLE_MODULES)}")
    config = load_config(config_path)
    if tls_ca is not None:
        config.security.tls_ca = tls_ca
    actor_id = f"{role}-{instance}"
    setup_logging(config.run_dir / "logs" / f"{actor_id}.jsonl", console=console)
    import torch  # after logging: importing torch takes seconds and the log should say we started

    torch.set_num_threads(torch_threads(config, role))
    module = importlib.import_module(ROLE_MODULES[role])
    log = get_logger(run=config.run.name, actor=actor_id)
    return asyncio.run(_main(module, role, config, nats_url, instance, log))


def torch_threads(config, role: str) -> int:  # type: ignore[no-untyped-def]
    """The role's own thread count where the config gives one, else the run's."""
    own = {"rollout": config.rollout.torch_threads, "trainer": config.trainer.torch_threads}.get(role)
    return own or config.run.torch_threads


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
