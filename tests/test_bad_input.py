"""Bad input everywhere: hostile messages on every subject, bad Flight puts and gets, broken reward functions.

Two levels. Fast: `decode` of every message type, fuzzed with hypothesis (arbitrary bytes, truncated,
huge, unknown fields, wrong types, another message's JSON), only ever raises WireError and counts
the rejection; the Flight store refuses wrong schemas, unknown tickets, oversized chunks and puts
to a full store with errors naming the key and the location; the reward caller's timeout keeps a
bounded number of threads. Live (real broker, store and actors on the simulated engines): garbage
on every subject the run consumes, a store that fills up mid-run, and a reward function that
raises, hangs and returns non-numbers; each run still finishes with every sample trained exactly
once or failed and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncflow import wire
from asyncflow.errors import WireError
from asyncflow.wire import (
    MAX_MESSAGE_BYTES,
    ChunkRef,
    Control,
    DeadLetter,
    DoneEvent,
    Heartbeat,
    LostEvent,
    Message,
    MetricsEvent,
    StepEvent,
    WeightsEvent,
    WeightsLostEvent,
    WorkItem,
    decode,
)

REF = ChunkRef(column="response_ids", key="r/0/response_ids/g1", location="grpc://127.0.0.1:1", sample_ids=[8, 9])
VALID: dict[type[Message], Message] = {
    ChunkRef: REF,
    WorkItem: WorkItem(stage="reward", item_id="reward-p0-g1", partition=0, groups=[1], sample_ids=[8, 9],
                       inputs=[REF], failed={10: "boom"}),
    DoneEvent: DoneEvent(stage="rollout", item_id="x", actor="rollout-0", partition=0, groups=[1],
                         sample_ids=[8, 9], chunks=[REF], policy_version=3, busy_s=0.5),
    StepEvent: StepEvent(actor="trainer-0", step=2, policy_version=3, sample_ids=[1, 2], sample_versions=[2, 1],
                         failed_samples=1, reward_mean=0.5, loss=0.1, grad_norm=1.0, tokens=12, weights=REF,
                         weights_nbytes=100),
    WeightsEvent: WeightsEvent(version=3, weights=REF, nbytes=100),
    DeadLetter: DeadLetter(stage="reward", subject="af.r.work.reward", deliveries=5, reason="x", payload="{}"),
    MetricsEvent: MetricsEvent(actor="a", stage="rollout", item_id="i", start=1.0, end=2.0, samples=8),
    Heartbeat: Heartbeat(actor="a", role="rollout", host="h", pid=1, state="ready", time=1.0),
    Control: Control(command="stop", reason="done"),
    LostEvent: LostEvent(stage="reward", item_id="reward-p0-g1", actor="reward-0", partition=0, groups=[1],
                         sample_ids=[8, 9], lost=[REF]),
    WeightsLostEvent: WeightsLostEvent(version=3, republished=1, weights=REF, actor="rollout-0", reason="gone"),
}
KINDS = list(VALID)
SUBJECT = "af.fuzz.work.rollout"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _decode_counted(kind: type[Message], payload: bytes) -> Message | None:
    """decode, asserting the contract: a message of `kind`, or WireError naming the subject and counted once."""
    before = wire.REJECTED["work.rollout"]
    try:
        message = decode(kind, payload, SUBJECT)
    except WireError as error:  # anything else escapes and fails the test
        assert error.subject == SUBJECT and SUBJECT in str(error)
        assert wire.REJECTED["work.rollout"] == before + 1
        return None
    assert isinstance(message, kind) and wire.REJECTED["work.rollout"] == before
    return message


fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(kind=st.sampled_from(KINDS), payload=st.binary(max_size=2000))
def test_decode_of_arbitrary_bytes_only_raises_wire_error(kind, payload):
    _decode_counted(kind, payload)


@fuzz
@given(kind=st.sampled_from(KINDS), value=json_values)
def test_decode_of_arbitrary_json_only_raises_wire_error(kind, value):
    _decode_counted(kind, json.dumps(value).encode())  # NaN / Infinity literals included


@fuzz
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_truncated_messages_are_rejected(kind, data):
    payload = VALID[kind].encode()
    cut = data.draw(st.integers(0, len(payload) - 1))
    assert _decode_counted(kind, payload[:cut]) is None


@fuzz
@given(kind=st.sampled_from(KINDS), name=st.text(min_size=1, max_size=12), value=json_values)
def test_unknown_fields_are_rejected(kind, name, value):
    fields = json.loads(VALID[kind].encode())
    if name in fields:
        return
    assert _decode_counted(kind, json.dumps({**fields, name: value}).encode()) is None


@fuzz
@given(kind=st.sampled_from(KINDS), data=st.data(), value=json_values)
def test_fields_of_the_wrong_type_or_missing_never_crash(kind, data, value):
    fields = json.loads(VALID[kind].encode())
    name = data.draw(st.sampled_from(sorted(fields)))
    _decode_counted(kind, json.dumps({**fields, name: value}).encode())  # may happen to be valid
    fields.pop(name)
    _decode_counted(kind, json.dumps(fields).encode())  # a field with a default may go


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_another_message_kind_is_rejected(kind):
    for other, message in VALID.items():
        if other is not kind:
            assert _decode_counted(kind, message.encode()) is None, f"{other.__name__} read as {kind.__name__}"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_huge_and_non_finite_messages_are_rejected(kind):
    padded = VALID[kind].encode()[:-1] + b" " * MAX_MESSAGE_BYTES + b"}"  # valid JSON, too big
    assert _decode_counted(kind, padded) is None
    assert _decode_counted(kind, b"[" * 10_000) is None  # nesting past the parser's recursion limit
    fields = json.loads(VALID[kind].encode())
    for name in (name for name, field in kind.model_fields.items() if field.annotation is float):
        assert _decode_counted(kind, json.dumps({**fields, name: 0.25}).encode()) is not None
        for value in (math.nan, math.inf, -math.inf):  # json.dumps writes NaN / Infinity literals
            assert _decode_counted(kind, json.dumps({**fields, name: value}).encode()) is None


def test_non_finite_numbers_are_refused_when_a_message_is_built():
    with pytest.raises(ValueError, match="finite"):
        MetricsEvent(actor="a", stage="s", item_id="i", start=math.nan, end=1.0, samples=1)


def test_rejections_are_counted_per_subject_kind():
    before = Counter(wire.REJECTED)
    for subject in ("af.r.work.reward", "af.r.done.trainer", "af.r.weights", "af.r.metrics.rollout-7",
                    "af.r.control", "AF_R.actors.rollout-0"):
        with pytest.raises(WireError):
            decode(Control, b"{", subject)
    gained = Counter(wire.REJECTED) - before
    assert gained == Counter({"work.reward": 1, "done.trainer": 1, "weights": 1, "metrics": 1, "control": 1,
                              "AF_R.actors": 1})


# -- Flight: wrong schemas, unknown tickets, oversized chunks, a full store ----------------------

STORE_CAPACITY = 64 * 1024


@pytest.fixture
def small_store():
    from flight_store import ColumnStoreServer

    server = ColumnStoreServer(capacity_bytes=STORE_CAPACITY)
    try:
        yield server
    finally:
        server.shutdown()


def test_puts_with_the_wrong_schema_are_refused_naming_key_and_location(small_store):
    from asyncflow.errors import StoreError
    from flight_store import StoreClient

    where = small_store.location
    with StoreClient([where]) as store:
        store.put_column("r", 0, "reward", "g0", [0, 1], pa.array([1.0, 0.0]))
        cases = {
            "holds double, got string": lambda: store.put_column("r", 1, "reward", "g0", [4], pa.array(["high"])),
            r"expected the columns \['sample_id', 'reward'\], got \['reward'\]":
                lambda: store.put_table("r/1/reward/g1", pa.table({"reward": [1.0]}), where),
            r"got \['sample_id', 'reward', 'extra'\]":
                lambda: store.put_table("r/1/reward/g2", pa.table({"sample_id": [1], "reward": [1.0],
                                                                   "extra": [2]}), where),
            "'sample_id' must be int64, got string":
                lambda: store.put_table("r/1/reward/g3", pa.table({"sample_id": ["a"], "reward": [1.0]}), where),
        }
        for reason, put in cases.items():
            with pytest.raises(StoreError, match=rf"r/\d/reward/g\d.* at {where}.*bad schema.*{reason}"):
                put()
        stats = store.stats()[where]
        assert stats["bad_schema"] == len(cases) and stats["keys"] == 1  # nothing of theirs was stored
        assert store.get_column(store.put_column("r", 1, "reward", "g0", [4], pa.array([0.5]))).num_rows == 1
        assert store.drop_prefix("r/") == 2  # a new run under the name may use other types
        store.put_column("r", 0, "reward", "g0", [0], pa.array(["fine now"]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ticket=st.binary(max_size=200))  # the store stays empty throughout: sharing it is safe
def test_unknown_or_garbage_tickets_get_clear_errors(small_store, ticket):
    from asyncflow.errors import StoreError
    from flight_store import StoreClient

    with StoreClient([small_store.location]) as store:
        with pytest.raises(flight.FlightServerError, match="unknown key|bad ticket"):
            store._client(small_store.location).do_get(flight.Ticket(ticket)).read_all()
        key = ticket.decode("utf-8", errors="replace")
        if key.startswith("{"):
            return
        with pytest.raises(StoreError, match=f"at {small_store.location}: no such key") as error:
            store.get_table(key, small_store.location)
        assert repr(key) in str(error.value)
        assert store.health(small_store.location)  # and the server serves on


def test_bad_descriptors_are_refused(small_store):
    client = flight.FlightClient(small_store.location)
    table = pa.table({"sample_id": pa.array([1], pa.int64()), "x": [1]})
    # A non-UTF-8 path is refused by gRPC itself (the descriptor's path is a protobuf string).
    for descriptor, reason in ((flight.FlightDescriptor.for_path(b"\xff\xfe"), None),
                               (flight.FlightDescriptor.for_path(b""), "empty key"),
                               (flight.FlightDescriptor.for_path("a", "b"), "exactly one element"),
                               (flight.FlightDescriptor.for_command(b"x"), "PATH descriptor")):
        with pytest.raises(flight.FlightError, match=reason):
            writer, _ = client.do_put(descriptor, table.schema)
            writer.write_table(table)
            writer.close()
    client.close()
    from flight_store import StoreClient

    with StoreClient([small_store.location]) as store:
        assert store.health(small_store.location) and store.stats()[small_store.location]["keys"] == 0


def test_a_chunk_bigger_than_the_store_fails_at_once_without_waiting(small_store):
    from asyncflow.errors import BackPressureError, StoreError
    from flight_store import StoreClient, token_lists

    with StoreClient([small_store.location], backpressure_wait_s=60) as store:
        with pytest.raises(StoreError, match=rf"'r/0/response_ids/g0' at {small_store.location}: put of \d+ bytes "
                                             rf"exceeds the store's whole capacity of {STORE_CAPACITY}") as error:
            store.put_column("r", 0, "response_ids", "g0", [0], token_lists([[1] * STORE_CAPACITY]))
        assert not isinstance(error.value, BackPressureError)
        assert store.backpressure_waits == 0  # refused outright: no retries
        assert store.stats()[small_store.location]["bytes_used"] == 0


def _fill(store, location: str, capacity: int = STORE_CAPACITY) -> None:
    """Fill the store to the last byte with ballast tables (not column keys: any schema), topping up
    when a running producer took some of the room between our look and our put."""
    from asyncflow.errors import BackPressureError
    from flight_store.server import table_bytes

    overhead = table_bytes(pa.table({"b": pa.array([b""], pa.binary())}))
    for attempt in range(100):
        free = capacity - store.stats()[location]["bytes_used"]
        if free <= overhead:  # no producer's put is that small
            return
        with contextlib.suppress(BackPressureError):
            ballast = pa.table({"b": pa.array([b"x" * (free - overhead)], pa.binary())})
            store.put_table(f"ballast-{attempt}", ballast, location)
    raise AssertionError(f"could not fill the store at {location}: {store.stats()[location]}")


def test_a_full_store_refuses_then_a_waiting_put_lands_once_there_is_room(small_store):
    from asyncflow.errors import BackPressureError, StoreError
    from flight_store import StoreClient

    where = small_store.location
    values = pa.array([1.0, 0.0])
    with StoreClient([where]) as store:
        _fill(store, where)
        with pytest.raises(BackPressureError) as refused:  # no waiting: the typed error at once
            store.put_column("r", 0, "reward", "g0", [0, 1], values)
        error = refused.value
        assert error.key == "r/0/reward/g0" and error.location == where and error.capacity == STORE_CAPACITY
        assert where in str(error) and "r/0/reward/g0" in str(error)

        with StoreClient([where], backpressure_wait_s=0.3) as impatient:
            with pytest.raises(StoreError, match=rf"store at {where} full.*'r/0/reward/g0'.*still full after"):
                impatient.put_column("r", 0, "reward", "g0", [0, 1], values)
            assert impatient.backpressure_waits == 1

        with StoreClient([where], backpressure_wait_s=60) as patient:
            refused_before = store.stats()[where]["refused"]
            freed = threading.Event()

            def free_when_refused() -> None:
                deadline = time.monotonic() + 30
                while store.stats()[where]["refused"] == refused_before and time.monotonic() < deadline:
                    time.sleep(0.02)
                store.drop_prefix("ballast")
                freed.set()

            helper = threading.Thread(target=free_when_refused)
            helper.start()
            ref = patient.put_column("r", 0, "reward", "g0", [0, 1], values)  # waits for the drop
            helper.join(timeout=30)
            assert freed.is_set() and patient.backpressure_waits == 1
            assert store.get_column(ref).column("reward").to_pylist() == [1.0, 0.0]


# -- reward functions: raise, hang, return non-numbers -------------------------------------------


def test_check_reward_refuses_non_numbers():
    import numpy as np

    from asyncflow.rewards import check_reward

    assert check_reward(1) == 1.0 and check_reward(np.float32(0.5)) == 0.5 and check_reward(np.int64(2)) == 2.0
    for bad, reason in ((None, "NoneType None"), ("high", "str 'high'"), (True, "bool True"),
                        (math.nan, "non-finite nan"), (math.inf, "non-finite inf"), ([1.0], "list"),
                        (10**400, "not a float")):
        with pytest.raises((TypeError, ValueError), match=reason):
            check_reward(bad)


def test_reward_caller_fails_samples_with_reasons_and_bounds_hung_threads():
    from asyncflow.rewards import RewardCaller, RewardFailure

    release = threading.Event()

    def reward(prompt: str, response: str, **fields: Any) -> Any:
        behaviour = fields["behaviour"]
        if behaviour == "hang":
            release.wait(60)
            return 1.0
        if behaviour == "raise":
            raise KeyError("no answer")
        if behaviour == "exit":
            raise SystemExit(3)
        return {"none": None, "nan": math.nan, "text": "high", "ok": 0.75}[behaviour]

    async def scenario() -> None:
        caller = RewardCaller(reward, "tests:reward", timeout_s=0.2, max_hung=2)
        assert await caller("p", "r", {"behaviour": "ok"}) == 0.75
        reasons = {}
        for behaviour in ("raise", "exit", "none", "nan", "text"):
            with pytest.raises(RewardFailure) as failure:
                await caller("p", "r", {"behaviour": behaviour})
            reasons[behaviour] = str(failure.value)
        assert "raised KeyError: 'no answer'" in reasons["raise"] and "SystemExit: 3" in reasons["exit"]
        assert "returned NoneType None" in reasons["none"] and "non-finite nan" in reasons["nan"]
        assert "returned str 'high', expected a number" in reasons["text"]
        with pytest.raises(RewardFailure, match="got an unexpected keyword argument|multiple values"):
            await caller("p", "r", {"behaviour": "ok", "prompt": "clash"})

        for _ in range(2):  # two calls hang past the timeout: each keeps its thread
            with pytest.raises(RewardFailure, match="timed out after 0.2 s"):
                await caller("p", "r", {"behaviour": "hang"})
        assert caller.hung == 2
        for behaviour in ("ok", "hang", "ok"):  # at the bound nothing more is called, however many samples
            with pytest.raises(RewardFailure, match="not called: 2 earlier calls are still running"):
                await caller("p", "r", {"behaviour": behaviour})
        assert caller.threads <= 3 and caller.not_called == 3 and caller.timeouts == 2
        release.set()  # the hung calls return: their threads serve new calls
        deadline = time.monotonic() + 30
        while caller.hung and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert caller.hung == 0
        assert await caller("p", "r", {"behaviour": "ok"}) == 0.75
        assert caller.threads <= 3

    asyncio.run(scenario())


# -- live runs -------------------------------------------------------------------------------

SIMULATED = {
    "rollout": {"engine": {"type": "simulated", "slots": 8, "per_token_s": 0.01, "mean_tokens": 4}},
    "trainer": {"save_final": False, "engine": {"type": "simulated", "per_token_s": 0.0005, "weights_bytes": 4096}},
    "sampling": {"max_new_tokens": 8},
}


def _stopped_lines(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each actor's last "actor stopped" log event (with its rejected_messages and counters)."""
    out = {}
    for log in (run_dir / "logs").glob("*-*.jsonl"):
        events = [json.loads(line) for line in log.read_text().splitlines() if '"actor stopped"' in line]
        if events:
            out[log.stem] = events[-1]
    return out


def _garbage(right: Message) -> list[bytes]:
    """Payloads that must all be rejected where `right`'s kind is expected."""
    import random

    fields = json.loads(right.encode())
    wrong_type = {**fields, next(iter(fields)): {"nested": [1, 2]}}
    other = VALID[WorkItem] if not isinstance(right, WorkItem) else VALID[DoneEvent]
    rng = random.Random(5)
    return [
        b"",
        b"{",
        right.encode()[:-7],  # truncated
        json.dumps(wrong_type).encode(),  # a field of the wrong type
        json.dumps({**fields, "sneaky": True}).encode(),  # an unknown field
        other.encode(),  # valid JSON of another message kind
        right.encode()[:-1] + b" " * MAX_MESSAGE_BYTES + b"}",  # huge (NATS still carries it: < 1 MiB)
        bytes(rng.randrange(256) for _ in range(300)),  # noise, not UTF-8
    ]


async def _inject_garbage(nats_url: str, run: str, timeout_s: float = 120.0) -> dict[str, int]:
    """Once the run's first rollout is done, publish garbage on every subject the run consumes;
    returns payloads sent per subject kind."""
    from broker import RunNames, connect

    names = RunNames(run)
    nc = await connect(nats_url, name="garbage")
    try:
        js = nc.jetstream(timeout=10)
        deadline = time.monotonic() + timeout_s
        while True:  # mid-run: after the first rollout item is done
            try:
                await js.get_last_msg(names.events_stream, names.done("rollout"))
                break
            except Exception:
                assert time.monotonic() < deadline, "no rollout finished: the run never got going"
                await asyncio.sleep(0.1)
        targets: list[tuple[str, str, Message, bool]] = [
            ("work.rollout", names.work("rollout"), VALID[WorkItem], True),
            ("work.reward", names.work("reward"), VALID[WorkItem], True),
            ("work.trainer", names.work("trainer"), VALID[WorkItem], True),
            ("done.rollout", names.done("rollout"), VALID[DoneEvent], True),
            ("done.reward", names.done("reward"), VALID[DoneEvent], True),
            ("done.trainer", names.done("trainer"), VALID[StepEvent], True),
            ("weights", names.weights, VALID[WeightsEvent], True),
            ("dead.rollout", names.dead("rollout"), VALID[DeadLetter], True),
            ("control", names.control, Control(command="stop", reason="garbage"), False),
            ("metrics", names.metrics("rollout-0"), VALID[MetricsEvent], False),
            ("weights.lost", names.weights_lost, VALID[WeightsLostEvent], False),
        ]
        sent = {}
        for kind, subject, right, durable in targets:
            payloads = _garbage(right)
            for payload in payloads:
                if durable:
                    await js.publish(subject, payload, timeout=10)  # stored in its stream (acked)
                else:
                    await nc.publish(subject, payload)
            sent[kind] = len(payloads)
        kv = await js.key_value(names.kv_bucket)
        await kv.put("actors.garbage-0", b'{"actor": "garbage-0", "pid": "not a pid"')  # a fake heartbeat
        await nc.flush(timeout=10)
        return sent
    finally:
        await nc.close()


def _start_run(config) -> tuple[threading.Thread, dict[str, Any]]:
    from asyncflow.launcher import run

    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = run(config)
        except BaseException as error:  # reported by the test, not lost in the thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="launcher")
    thread.start()
    return thread, outcome


def _finish_run(thread: threading.Thread, outcome: dict[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
    thread.join(timeout_s)
    assert not thread.is_alive(), f"the run did not finish within {timeout_s} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["summary"]


@pytest.mark.slow
def test_garbage_on_every_subject_and_a_full_store_mid_run(tmp_path, tiny_model_dir, arith_dataset, nats_server):
    """Mid-run, garbage on every subject the run consumes (work, done, weights, dead letters,
    control, metrics, lost-weights reports, a heartbeat) and a store filled to its last byte for a while. The run
    finishes with every sample trained exactly once; work garbage is dead-lettered (summary), every
    other piece is rejected and counted by each actor that reads the subject; producers that met
    the full store waited instead of failing their work."""
    from actors.trainer import read_records
    from flight_store import ColumnStoreServer, StoreClient
    from tests.conftest import make_tiny_config

    capacity = 8 * 1024**2
    store_server = ColumnStoreServer(capacity_bytes=capacity)
    steps, prompts, group = 6, 4, 4
    # Steps of at least 1 s: the run must still be producing (rollout columns, the trainer's weight
    # versions) when the store is filled, or no producer ever meets the full store.
    sections = {**SIMULATED, "trainer": {**SIMULATED["trainer"],
                                         "engine": {**SIMULATED["trainer"]["engine"], "step_s": 1.0}}}
    config = make_tiny_config(
        tmp_path, tiny_model_dir, arith_dataset, 1, "badrun", steps=steps, prompts=prompts, group=group,
        broker={"url": nats_server.url}, store={"locations": [store_server.location]},
        reward={"function": "asyncflow.engines.simulated:simulated_reward"}, **sections,
    )
    rejected_before = Counter(wire.REJECTED)  # the launcher's monitor runs in this process
    thread, outcome = _start_run(config)
    try:
        sent = asyncio.run(_inject_garbage(nats_server.url, config.run.name))
        with StoreClient([store_server.location]) as store:
            _fill(store, store_server.location, capacity)
            # Counted after the fill: its own top-up attempts can be refused too, and must not
            # pass for a producer's.
            refused_before = store.stats()[store_server.location]["refused"]
            deadline = time.monotonic() + 60
            while store.stats()[store_server.location]["refused"] < refused_before + 3:
                assert time.monotonic() < deadline, "nobody tried to write to the full store"
                time.sleep(0.05)
            store.drop_prefix("ballast")
    finally:
        summary = _finish_run(thread, outcome)
        store_server.shutdown()
    monitor_rejected = Counter(wire.REJECTED) - rejected_before

    assert summary["steps"] == steps and summary["failed_samples"] == 0
    trained = [r["sample_id"] for r in read_records(config.run_dir)]
    assert sorted(trained) == list(range(steps * prompts * group)), "a sample was lost or trained twice"
    n = len(_garbage(VALID[WorkItem]))
    assert set(sent.values()) == {n}
    assert summary["dead_letters"] == {"rollout": n, "reward": n, "trainer": n}

    stopped = _stopped_lines(config.run_dir)
    assert set(stopped) == {"scheduler-0", "param_sync-0", "reward-0", "trainer-0", "rollout-0"}
    expected = {
        "scheduler-0": ("control", "done.rollout", "done.reward", "done.trainer", "weights", "dead.rollout"),
        "param_sync-0": ("control", "done.trainer"),
        "reward-0": ("control", "work.reward"),
        "trainer-0": ("control", "work.trainer", "weights.lost"),
        "rollout-0": ("control", "work.rollout", "weights"),
    }
    for actor, kinds in expected.items():
        assert stopped[actor]["rejected_messages"] == dict.fromkeys(kinds, n), actor
    assert stopped["scheduler-0"]["counters"]["bad_events"] == 5 * n
    for kind in ("metrics", "done.trainer", "dead.rollout"):
        assert monitor_rejected[kind] == n, kind
    assert monitor_rejected["AF_BADRUN.actors"] >= 1  # the fake heartbeat, at every heartbeat check
    waits = sum(line["counters"].get("store_backpressure_waits", 0) for line in stopped.values())
    assert waits >= 1, "no producer waited on the full store"


@pytest.mark.slow
def test_reward_functions_that_raise_hang_or_return_non_numbers_fail_their_samples(
        tmp_path, tiny_model_dir):
    """A reward function that, by dataset row, scores, raises, hangs past the timeout, calls
    sys.exit, or returns None / NaN / inf / a string: those samples fail with the reason, are
    counted, and never trained; the others train exactly once, and the run completes."""
    from actors.trainer import read_records
    from asyncflow.partitions import group_sample_ids, prompt_index
    from tests.conftest import make_tiny_config

    behaviours = ["ok", "raise", "hang", "none", "nan", "inf", "text", "exit", "ok"]
    dataset = tmp_path / "behaviours.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "behaviour": b}) + "\n"
                               for i, b in enumerate(behaviours)))
    steps, prompts, group = 4, 4, 4
    config = make_tiny_config(
        tmp_path, tiny_model_dir, dataset, 1, "badreward", steps=steps, prompts=prompts, group=group,
        reward={"function": "tests.faulty_rewards:misbehaves_by_row", "timeout_s": 0.2}, **SIMULATED,
    )
    summary = _finish_run(*_start_run(config))

    behaviour_of = {}
    for partition in range(steps):
        for g in range(prompts):
            row = prompt_index(partition, g, prompts, len(behaviours), config.run.seed, config.data.shuffle)
            for sid in group_sample_ids(partition, g, prompts, group):
                behaviour_of[sid] = behaviours[row]
    reasons = {"raise": "raised ValueError: cannot score", "hang": "timed out after 0.2 s",
               "exit": "raised UserCodeError: SystemExit: reward function exits", "none": "returned NoneType None",
               "nan": "returned non-finite nan", "inf": "returned non-finite inf",
               "text": "returned str 'high', expected a number"}
    failed = {r["sample_id"]: r["reason"] for r in read_records(config.run_dir, "failed_samples")}
    trained = read_records(config.run_dir)
    assert sorted(failed) == sorted(sid for sid, b in behaviour_of.items() if b != "ok")
    for sid, reason in failed.items():
        assert reasons[behaviour_of[sid]] in reason and "tests.faulty_rewards:misbehaves_by_row" in reason, reason
    assert sorted(r["sample_id"] for r in trained) == sorted(sid for sid, b in behaviour_of.items() if b == "ok")
    assert {r["reward"] for r in trained} == {0.75}
    assert summary["steps"] == steps and summary["failed_samples"] == len(failed)

    counters = _stopped_lines(config.run_dir)["reward-0"]["counters"]
    hangs = sum(b == "hang" for b in behaviour_of.values())
    assert counters["reward_failed"] == len(failed) and counters["reward_timeouts"] == hangs > 0
    assert counters["reward_not_called"] == 0 and counters["reward_threads"] <= 1 + 4
