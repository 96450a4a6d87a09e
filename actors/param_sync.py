"""Param-sync actor: turns the trainer's new weights into announced policy versions.

For every finished step it publishes `af.<run>.weights` (version v is at Flight key K), records
the version in the run's KV bucket, and drops weight versions no rollout can need any more:
rollout instances only ever load the newest announced version, and one still loading the
previous one must find it, so the two newest are kept.

A restarted param-sync takes the newest announced version from KV (`policy_version`, written after
each announcement) and replays the step events still in the EVENTS stream, announcing the versions
newer than that one. Compaction (actors/scheduler.py) keeps every step event whose version is not
announced yet, so none is missed; older ones may be gone, and are not needed.
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from actors.runtime import ActorRuntime
from asyncflow.checkpoint import initial_policy
from asyncflow.errors import WireError
from asyncflow.graph import TRAINER
from asyncflow.wire import StepEvent, WeightsEvent, decode
from broker.names import KV_POLICY_VERSION
from flight_store.keys import weights_prefix

KEEP_VERSIONS = 2


class ParamSync:
    def __init__(self, runtime: ActorRuntime) -> None:
        self.rt = runtime
        # The starting version (0, or N after a resume from checkpoint step-N) lives on disk, not in the store.
        _, self.latest = initial_policy(runtime.config)
        self.dropped_below = self.latest + 1

    async def run(self) -> None:
        await self._restore()
        await self.rt.subscribe_events(self.rt.names.done(TRAINER.name), self.on_step)
        self.rt.state = "ready"
        await self.rt.wait_stopped()

    async def _restore(self) -> None:
        """After a restart: the newest version announced before it (KV), so that the replay announces
        only newer ones, and weight versions are dropped from where the last run of this actor was."""
        try:
            entry = await self.rt.kv.get(KV_POLICY_VERSION)
        except KeyNotFoundError:
            return
        try:
            announced = int(entry.value or b"")
        except ValueError:
            self.rt.counters["bad_kv_values"] += 1
            self.rt.log.error("unreadable policy version in KV ignored", key=KV_POLICY_VERSION,
                              value=(entry.value or b"")[:200].decode(errors="replace"))
            return
        if announced > self.latest:
            self.latest = announced
            self.rt.policy_version = announced
            # Versions up to announced - KEEP_VERSIONS were dropped, but for the last one if the
            # process died between the KV write and the drop: dropping it again is harmless.
            self.dropped_below = max(self.dropped_below, announced - KEEP_VERSIONS)
            self.rt.log.info("announced version restored from KV", version=announced)

    async def on_step(self, msg: Msg) -> None:
        try:
            event = decode(StepEvent, msg.data, msg.subject)
        except WireError as error:
            self.rt.log.error("bad step event ignored", error=str(error))
            return
        try:
            await self.announce(event)
        except Exception as error:
            self.rt.fail(error, f"announcing version {event.policy_version}")

    async def announce(self, event: StepEvent) -> None:
        version = event.policy_version
        if version <= self.latest:
            return  # replayed after a restart: already announced (and de-duplicated by msg id)
        announcement = WeightsEvent(version=version, weights=event.weights, nbytes=event.weights_nbytes)
        await self.rt.publish(self.rt.names.weights, announcement, msg_id=f"weights-{version}")
        await self.rt.kv.put(KV_POLICY_VERSION, str(version).encode())
        self.latest = version
        self.rt.policy_version = version
        self.rt.log.info("policy version announced", version=version, nbytes=event.weights_nbytes)
        while self.dropped_below <= version - KEEP_VERSIONS:
            # flight_store.weights.drop_weights, without importing that module: it needs torch (~2 s
            # at start-up, on the cores the rollout and trainer engines start on), dropping does not.
            prefix = weights_prefix(self.rt.config.run.name, self.dropped_below)
            await asyncio.to_thread(self.rt.store.drop_prefix, prefix)
            self.dropped_below += 1


async def run(runtime: ActorRuntime) -> None:
    await ParamSync(runtime).run()
