"""Creates (idempotently) the run's JetStream streams, durable work consumers and KV bucket."""

from __future__ import annotations

import contextlib

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError

from asyncflow.graph import WORK_STAGES
from broker.names import RunNames

MAX_ACK_PENDING = 1_000_000
MAX_WAITING_PULLS = 65_536


async def ensure_topology(
    js: JetStreamContext,
    names: RunNames,
    *,
    stages: tuple[str, ...] = WORK_STAGES,
    ack_wait_s: float = 300.0,
    max_deliver: int = 5,
    replicas: int = 1,
) -> None:
    """`replicas`: copies of each stream and of the KV bucket on a cluster (consumers follow their
    stream's); an existing stream is updated to it where the server allows."""
    work = StreamConfig(
        name=names.work_stream,
        subjects=[f"{names.prefix}.work.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
        description=f"AsyncFlow work items of run {names.run}",
    )
    events = StreamConfig(
        name=names.events_stream,
        subjects=list(names.events_subjects),
        # No limits: the scheduler compacts the stream as partitions are trained, purging only what no
        # restart needs any more (a limit would drop the oldest events whether needed or not).
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        description=f"AsyncFlow stage outputs, weight versions, dead letters and lost inputs of run {names.run}",
    )
    for config in (work, events):
        await _add_or_update_stream(js, config)
    for stage in stages:
        consumer = ConsumerConfig(
            durable_name=names.consumer(stage),
            name=names.consumer(stage),
            filter_subject=names.work(stage),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_deliver=max_deliver,
            # The trainer holds items of later partitions un-acked until their step (up to
            # (k + 1) partitions' groups), and many instances may each keep a pull request waiting:
            # the server defaults (1000 and 512) would stall big runs.
            max_ack_pending=MAX_ACK_PENDING,
            max_waiting=MAX_WAITING_PULLS,
            description=f"{stage} work, shared by all {stage} instances",
        )
        await js.add_consumer(names.work_stream, config=consumer)
    await js.create_key_value(
        KeyValueConfig(bucket=names.kv_bucket, history=1, storage=StorageType.FILE, replicas=replicas,
                       description=f"AsyncFlow run state of {names.run}")
    )


async def _add_or_update_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        return
    # An existing stream whose settings cannot be changed in place is kept as it is.
    with contextlib.suppress(BadRequestError):
        await js.update_stream(config)


async def delete_topology(js: JetStreamContext, names: RunNames) -> None:
    """Remove the run's streams (with their consumers) and KV bucket, if they exist."""
    for stream in (names.work_stream, names.events_stream):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(stream)
    with contextlib.suppress(NotFoundError, BucketNotFoundError):
        await js.delete_key_value(names.kv_bucket)
