"""Every actor as a NATS micro service: `asyncflow-<role>` with `stats` and `health` endpoints.

So `nats micro ls` lists every actor of every run on a broker, `nats micro stats asyncflow-rollout`
shows what each rollout instance has done, and `nats req af.<run>.svc.<actor>.health ''` asks one
actor whether it is well. The service metadata (run, actor, role, instance, host, pid) tells apart
the instances and the runs that share a broker. `ActorRuntime` starts one per actor and stops it
before it closes its connection, so a stopped actor drops out of discovery at once.

The counters live in `ActorStats`; the runtime updates them where work is done (busy spans,
failures, dead letters), so every role reports the same facts without code of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

import asyncflow
from broker import RunNames

SERVICE_PREFIX = "asyncflow-"
"""Micro service name of a role: `asyncflow-<role>` (`asyncflow-rollout`, `asyncflow-param_sync`)."""
ENDPOINTS = ("stats", "health")


def service_name(role: str) -> str:
    return f"{SERVICE_PREFIX}{role}"


def endpoint_subject(names: RunNames, actor_id: str, endpoint: str) -> str:
    """`af.<run>.svc.<actor>.<endpoint>`: one subject per actor, so a request reaches that actor
    (a shared per-role subject would answer from a random instance)."""
    return f"{names.prefix}.svc.{actor_id}.{endpoint}"


@dataclass
class ActorStats:
    """What an actor has done since it started; served by the `stats` endpoint."""

    started: float = field(default_factory=time.time)
    items_done: int = 0
    """Work items (or trainer items) finished, counted from the busy spans the actor publishes."""
    samples_done: int = 0
    busy_s: float = 0.0
    """Sum of busy span lengths; above the uptime when items run concurrently."""
    items_failed: int = 0
    """Items whose handler raised (each is retried, then dead-lettered)."""
    dead_lettered: int = 0
    last_item_at: float | None = None

    def span(self, start: float, end: float, samples: int) -> None:
        self.items_done += 1
        self.samples_done += samples
        self.busy_s += max(0.0, end - start)
        self.last_item_at = end


class ActorService:
    """Owns one actor's micro service; `start` registers it, `stop` removes it (bounded waits)."""

    def __init__(self, nc: NATS, names: RunNames, role: str, actor_id: str, instance: int,
                 snapshot: Callable[[], dict[str, Any]], timeout_s: float) -> None:
        self.nc = nc
        self.names = names
        self.role = role
        self.actor_id = actor_id
        self.instance = instance
        self.snapshot = snapshot
        self.timeout_s = timeout_s
        self.service: Service | None = None

    async def start(self) -> None:
        metadata = {"run": self.names.run, "actor": self.actor_id, "role": self.role,
                    "instance": str(self.instance), "host": socket.gethostname(), "pid": str(os.getpid())}
        self.service = await asyncio.wait_for(add_service(
            self.nc, name=service_name(self.role), version=asyncflow.__version__,
            description=f"AsyncFlow {self.role} actor {self.actor_id} of run {self.names.run}",
            metadata=metadata, stats_handler=self._endpoint_data,
        ), self.timeout_s)
        for endpoint, handler in (("stats", self._stats), ("health", self._health)):
            await self.service.add_endpoint(
                name=endpoint, handler=handler, subject=endpoint_subject(self.names, self.actor_id, endpoint),
                metadata={"actor": self.actor_id},
            )
        await self.nc.flush(timeout=self.timeout_s)  # registered before anyone is told we started

    async def stop(self) -> None:
        """Unsubscribe every service subject; the caller closes the connection afterwards."""
        if self.service is None:
            return
        service, self.service = self.service, None
        await asyncio.wait_for(service.stop(), self.timeout_s)

    def health(self) -> dict[str, Any]:
        snapshot = self.snapshot()
        ok = snapshot["error"] is None and snapshot["state"] != "stopping" and self.nc.is_connected
        return {"ok": ok, "state": snapshot["state"], "actor": self.actor_id, "run": self.names.run,
                "error": snapshot["error"]}

    async def _stats(self, request: Request) -> None:
        await request.respond(json.dumps(self.snapshot()).encode())

    async def _health(self, request: Request) -> None:
        await request.respond(json.dumps(self.health()).encode())

    def _endpoint_data(self, endpoint: EndpointStats) -> dict[str, Any] | None:
        # `nats micro stats` (and $SRV.STATS) shows this as the `stats` endpoint's data.
        return self.snapshot() if endpoint.name == "stats" else None
