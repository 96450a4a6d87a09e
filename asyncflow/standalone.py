"""Runs whose processes are started one by one (docker-compose, several hosts): set-up, follow, health.

`asyncflow run` does all three itself. When the broker, stores and actors are started separately
(`deploy/docker-compose.yml`, docs/deploy.md), these are the pieces of the launcher that remain:

- `asyncflow setup CONFIG --nats URL`: build the model / dataset if the config says how, write the
  resolved config to `<run_dir>/config.yaml`, create the run's streams, consumers and KV bucket,
  and register the config's Flight stores in KV. A run already on the broker is resumed (nothing
  is deleted) unless `--fresh` is given.
- `asyncflow follow CONFIG --nats URL`: what the launcher waits on. Replays the run's step events,
  prints progress, writes `metrics.jsonl`, `spans.jsonl` and `summary.json`, and tells every actor
  to stop once the final step is trained (or the run stalls or times out).
- `asyncflow health ...`: exit 0 when a broker, a store or one actor is healthy, else 1 with the
  reason; what docker-compose's healthchecks run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from asyncflow.config import Config, SecuritySettings
from asyncflow.errors import ConfigError, WireError
from asyncflow.logs import get_logger
from asyncflow.security import nats_connect_options, store_client_options
from asyncflow.wire import Heartbeat, decode
from broker import RunNames, connect, ensure_topology
from broker.names import KV_CONFIG, KV_POLICY_VERSION, KV_STORES


def setup(config: Config, nats_url: str, fresh: bool = False) -> None:
    """Prepare the inputs and the run's topology on the broker at `nats_url` (idempotent)."""
    from asyncflow.launcher import prepare_inputs, set_up_run

    if not config.store.locations:
        raise ConfigError("store.locations is empty: a run set up with `asyncflow setup` uses stores started "
                          "by `asyncflow store`; list them (grpc://host:port) in the config")
    log = get_logger(run=config.run.name, actor="setup")
    prepare_inputs(config)
    (config.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    # As the launcher does: the run directory describes its run (`asyncflow report`, resume).
    (config.run_dir / "config.yaml").write_text(config.to_yaml())
    if fresh:
        asyncio.run(set_up_run(config, nats_url, list(config.store.locations)))
    else:
        asyncio.run(_set_up_keeping_state(config, nats_url))
    log.info("run set up", nats=nats_url, stores=config.store.locations, fresh=fresh)


async def _set_up_keeping_state(config: Config, nats_url: str) -> None:
    """Like the launcher's set-up, but a run already on the broker keeps its streams and version."""
    nc = await connect(nats_url, name="asyncflow-setup", security=config.security)
    try:
        js = nc.jetstream(timeout=config.broker.request_timeout_s)
        names = RunNames(config.run.name)
        await ensure_topology(js, names, ack_wait_s=config.broker.ack_wait_s, max_deliver=config.broker.max_deliver,
                              replicas=config.broker.replicas)
        kv = await js.key_value(names.kv_bucket)
        await kv.put(KV_STORES, json.dumps(list(config.store.locations)).encode())
        await kv.put(KV_CONFIG, config.model_dump_json().encode())
        # A resumed run keeps the policy version it announced.
        with contextlib.suppress(KeyWrongLastSequenceError):
            await kv.create(KV_POLICY_VERSION, b"0")
    finally:
        await nc.close()


def follow(config: Config, nats_url: str) -> dict[str, Any]:
    """Wait for the run's final step (raises RunError on a stall or timeout), write the summary,
    then tell every actor to stop; returns summary.json as a dict."""
    from asyncflow.launcher import request_stop
    from asyncflow.monitor import Monitor, summarize

    log = get_logger(run=config.run.name, actor="follow")
    config.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        # No processes to watch: actors here are someone else's (compose restarts them). A crashed
        # one shows up through its heartbeats (presumed dead; a stage left with no live actor
        # fails the run) or as a stall naming the stage with pending work.
        # A restarted follow keeps the rows it wrote: the compacted EVENTS stream no longer holds
        # the step events of trained partitions, and the replayed ones it still has are skipped.
        rows = asyncio.run(Monitor(config, nats_url, [], started, keep_metrics=True).watch())
    finally:
        # Bounded: with the broker gone there is nobody to tell, and nats-py may retry forever.
        with contextlib.suppress(TimeoutError):
            asyncio.run(asyncio.wait_for(request_stop(config, nats_url), timeout=15))
    summary = summarize(rows, time.time() - started)
    (config.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("run finished", **summary)
    return summary


def check_broker(nats_url: str, security: SecuritySettings | None = None, timeout_s: float = 5.0) -> str:
    """'' when the broker at `nats_url` answers with JetStream enabled, else why not."""

    async def check() -> str:
        try:
            nc = await _connect_once(nats_url, security, timeout_s)
        except Exception as error:  # nats raises several unrelated types on connect failures
            return f"cannot connect to NATS at {nats_url}: {type(error).__name__}: {error}"
        try:
            await nc.jetstream(timeout=timeout_s).account_info()
            return ""
        except Exception as error:  # any failure here means "not healthy"; the message says which
            return f"NATS at {nats_url} has no working JetStream: {type(error).__name__}: {error}"
        finally:
            await nc.close()

    return _bounded(check(), f"NATS at {nats_url}", timeout_s)


def _only(security: SecuritySettings | None, plane: str) -> SecuritySettings | None:
    """`security` with the other plane's authentication off: a check of one server needs only that
    server's secret, so a container holds just the secrets of what it talks to."""
    if security is None:
        return None
    return security.model_copy(update={"store_auth": "none"} if plane == "nats" else {"nats_auth": "none"})


async def _connect_once(nats_url: str, security: SecuritySettings | None, timeout_s: float) -> NATS:
    """One connection attempt, no reconnects: a healthcheck reports, it does not wait for recovery."""
    async def quiet(error: Exception) -> None:
        pass  # the check's own message says what failed; nats-py would print a traceback per attempt

    # max_reconnect_attempts=1: nats-py treats 0 as "no limit" when picking a server to connect to.
    return await nats.connect(nats_url, name="asyncflow-health", connect_timeout=timeout_s,
                              allow_reconnect=False, max_reconnect_attempts=1, error_cb=quiet,
                              **nats_connect_options(_only(security, "nats")))


def _bounded(check: Any, what: str, timeout_s: float) -> str:
    """Run a check coroutine with an overall limit, so a healthcheck never hangs."""
    try:
        return asyncio.run(asyncio.wait_for(check, timeout=2 * timeout_s + 1))
    except TimeoutError:
        return f"{what} did not answer within {2 * timeout_s + 1:.0f} s"


def check_store(location: str, security: SecuritySettings | None = None, timeout_s: float = 5.0) -> str:
    """'' when the Flight store at `location` answers its health action, else why not."""
    from flight_store import StoreClient

    with StoreClient([location], timeout_s=timeout_s, **store_client_options(_only(security, "store"))) as client:
        return "" if client.health(location) else f"Flight store at {location} does not answer its health action"


def check_actor(config: Config, nats_url: str, actor: str, max_age_s: float | None = None,
                timeout_s: float = 5.0) -> str:
    """'' when `actor` (e.g. rollout-0) has a fresh heartbeat in the run's KV bucket, else why not.

    The heartbeat is written from the actor's event loop, so a fresh one also says the loop is
    not blocked for long. Default max age: `broker.heartbeat_timeout_s`, the bound past which the
    monitor presumes an actor dead (generous: loading a model may hold the loop for a while).
    """
    max_age = max_age_s if max_age_s is not None else config.broker.heartbeat_timeout_s
    names = RunNames(config.run.name)

    async def check() -> str:
        try:
            nc = await _connect_once(nats_url, config.security, timeout_s)
        except Exception as error:  # nats raises several unrelated types on connect failures
            return f"cannot connect to NATS at {nats_url}: {type(error).__name__}: {error}"
        try:
            kv = await nc.jetstream(timeout=timeout_s).key_value(names.kv_bucket)
            entry = await kv.get(f"actors.{actor}")
        except KeyNotFoundError:
            return f"actor {actor} has no heartbeat in KV bucket {names.kv_bucket} (not started yet?)"
        except Exception as error:
            return f"cannot read KV bucket {names.kv_bucket} at {nats_url}: {type(error).__name__}: {error}"
        finally:
            await nc.close()
        try:
            beat = decode(Heartbeat, entry.value or b"", f"KV {names.kv_bucket} actors.{actor}")
        except WireError as error:
            return str(error)
        age = time.time() - beat.time
        if beat.state == "stopping":
            return f"actor {actor} (pid {beat.pid} on {beat.host}) is stopping"
        if age > max_age:
            return (f"actor {actor} (pid {beat.pid} on {beat.host}) last beat {age:.1f} s ago, "
                    f"more than {max_age:.1f} s")
        return ""

    return _bounded(check(), f"actor {actor}'s heartbeat at {nats_url}", timeout_s)
