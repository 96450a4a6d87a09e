"""The Flight column store: real servers on free loopback ports, real clients, no mocks."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

from asyncflow.errors import BackPressureError, StoreError
from asyncflow.wire import ChunkRef
from flight_store import (
    ColumnStoreServer,
    StoreClient,
    column_key,
    drop_weights,
    float_lists,
    get_weights,
    partition_prefix,
    put_weights,
    to_float_lists,
    to_int_lists,
    token_lists,
    weights_key,
    weights_table_batches,
)

REPO = Path(__file__).resolve().parents[1]
CAPACITY = 1 << 20


@pytest.fixture
def servers() -> Iterator[list[ColumnStoreServer]]:
    started = [ColumnStoreServer(capacity_bytes=CAPACITY) for _ in range(2)]
    try:
        yield started
    finally:
        for server in started:
            server.shutdown()


@pytest.fixture
def client(servers: list[ColumnStoreServer]) -> Iterator[StoreClient]:
    with StoreClient([servers[0].location]) as store_client:
        yield store_client


@pytest.fixture
def client2(servers: list[ColumnStoreServer]) -> Iterator[StoreClient]:
    with StoreClient([s.location for s in servers]) as store_client:
        yield store_client


def test_keys_layout_and_validation():
    assert column_key("r1", 3, "tokens", "c0") == "r1/3/tokens/c0"
    assert partition_prefix("r1", 3) == "r1/3/"
    assert weights_key("r1", 7, 0) == "r1/weights/7/0"
    with pytest.raises(ValueError, match="column"):
        column_key("r1", 3, "a/b", "c0")
    with pytest.raises(ValueError, match="chunk"):
        column_key("r1", 3, "tokens", "")
    with pytest.raises(ValueError, match="partition"):
        partition_prefix("r1", -1)


def test_token_and_float_columns_round_trip(client: StoreClient):
    tokens = [[1, 2, 3], [], [2**31 - 1, 0]]
    logprobs = [[-0.5, -1.25], [0.0], []]
    ref = client.put_column("r", 0, "tokens", "c0", [10, 11, 12], token_lists(tokens))
    assert ref == ChunkRef(column="tokens", key="r/0/tokens/c0", location=client.locations[0], sample_ids=[10, 11, 12])
    table = client.get_column(ref)
    assert table.schema.field("tokens").type == pa.list_(pa.int32())
    assert table.column("sample_id").type == pa.int64()
    assert to_int_lists(table.column("tokens")) == tokens

    ref = client.put_column("r", 0, "logprobs", "c0", [10, 11, 12], float_lists(logprobs))
    table = client.get_column(ref)
    assert table.schema.field("logprobs").type == pa.list_(pa.float32())
    assert to_float_lists(table.column("logprobs")) == logprobs
    # Sliced arrays keep absolute offsets into their child values.
    assert to_int_lists(token_lists(tokens).slice(1)) == tokens[1:]

    ref = client.put_column("r", 0, "reward", "c0", [10, 11, 12], pa.array([1.0, 0.0, 0.5]))
    assert client.get_column(ref).column("reward").to_pylist() == [1.0, 0.0, 0.5]


def test_reput_replaces_without_double_counting(client: StoreClient):
    location = client.locations[0]
    first = client.put_column("r", 0, "tokens", "c0", [1], token_lists([[1] * 100]))
    used = client.stats()[location]["bytes_used"]
    second = client.put_column("r", 0, "tokens", "c0", [2], token_lists([[2] * 100]))
    stats = client.stats()[location]
    assert stats["bytes_used"] == used and stats["keys"] == 1 and stats["puts"] == 2
    assert to_int_lists(client.get_column(second).column("tokens")) == [[2] * 100]
    # The old ref now points at other samples: get_column notices instead of returning wrong data.
    with pytest.raises(StoreError, match="r/0/tokens/c0"):
        client.get_column(first)


def test_capacity_refusal_then_fits_after_drop(client: StoreClient):
    location = client.locations[0]
    big = token_lists([[7] * 100_000])  # ~400 KB
    client.put_column("r", 0, "tokens", "c0", [0], big)
    client.put_column("r", 0, "tokens", "c1", [1], big)
    used = client.stats()[location]["bytes_used"]
    with pytest.raises(BackPressureError) as refused:
        client.put_column("r", 1, "tokens", "c0", [2], big)
    error = refused.value
    assert error.key == "r/1/tokens/c0" and error.capacity == CAPACITY and error.used == used
    assert error.size >= 400_000 and error.used + error.size > error.capacity
    stats = client.stats()[location]
    assert stats["refused"] == 1 and stats["bytes_used"] == used  # a refused put leaves nothing behind

    assert client.drop_partition("r", 0) == 2
    assert client.stats()[location]["bytes_used"] == 0
    client.put_column("r", 1, "tokens", "c0", [2], big)


def test_refusal_mid_stream_of_many_batches(client: StoreClient):
    location = client.locations[0]
    column = pa.array(range(20_000), pa.int64())
    batch = pa.record_batch({"sample_id": column, "a": column})  # 320 KB each
    table = pa.Table.from_batches([batch] * 10)
    # Bigger than the whole store: a clear error at once, not back-pressure to wait out.
    with pytest.raises(StoreError, match=rf"'r/0/a/big' at {location}: put of \d+ bytes exceeds .* capacity of "
                                         rf"{CAPACITY} bytes and can never fit") as refused:
        client.put_table("r/0/a/big", table, location)
    assert not isinstance(refused.value, BackPressureError)
    assert client.stats()[location]["bytes_used"] == 0
    client.put_table("r/0/a/small", pa.Table.from_batches([batch] * 2), location)  # reservation released


def test_unknown_key_action_and_location(client: StoreClient):
    location = client.locations[0]
    with pytest.raises(StoreError, match="r/9/tokens/nope") as missing:
        client.get_table("r/9/tokens/nope", location)
    assert location in str(missing.value)
    with pytest.raises(StoreError, match="unknown action 'bogus'.*drop_prefix, health, stats"):
        client._action(location, "bogus")
    dead = "grpc://127.0.0.1:1"
    assert not client.health(dead)
    with pytest.raises(StoreError, match="127.0.0.1:1"):
        client.get_table("k", dead)


def test_stats_count_traffic(client: StoreClient):
    location = client.locations[0]
    assert client.health(location)
    ref = client.put_column("r", 0, "tokens", "c0", [1, 2], token_lists([[1, 2], [3]]))
    client.get_column(ref)
    client.get_column(ref)
    stats = client.stats()[location]
    assert stats["keys"] == 1 and stats["puts"] == 1 and stats["gets"] == 2 and stats["refused"] == 0
    assert stats["bytes_in"] == stats["bytes_used"] > 0 and stats["bytes_out"] == 2 * stats["bytes_used"]
    assert stats["capacity_bytes"] == CAPACITY


def test_placement_spreads_and_is_stable(client2: StoreClient, servers: list[ColumnStoreServer]):
    placed = {client2.place(0, f"c{i}") for i in range(32)}
    assert placed == {s.location for s in servers}
    with StoreClient(client2.locations) as other:
        assert [other.place(p, f"c{i}") for p in range(3) for i in range(8)] == [
            client2.place(p, f"c{i}") for p in range(3) for i in range(8)
        ]
    tokens = client2.put_column("r", 0, "tokens", "c5", [1], token_lists([[1]]))
    rewards = client2.put_column("r", 0, "reward", "c5", [1], pa.array([1.0]))
    assert tokens.location == rewards.location  # all columns of a chunk on one server
    refs = [client2.put_column("r", 0, "tokens", f"c{i}", [i], token_lists([[i]])) for i in range(8)]
    assert client2.drop_partition("r", 0) == 1 + 8  # c5 tokens re-put, plus its reward
    assert all(s["keys"] == 0 for s in client2.stats().values())
    with pytest.raises(StoreError):
        client2.get_column(refs[0])


def test_get_column_checks_sample_ids_and_columns(client: StoreClient):
    ref = client.put_column("r", 0, "tokens", "c0", [1, 2], token_lists([[1], [2]]))
    with pytest.raises(StoreError, match="r/0/tokens/c0"):
        client.get_column(ref.model_copy(update={"sample_ids": [2, 1]}))
    with pytest.raises(StoreError, match="missing column"):
        client.get_column(ref.model_copy(update={"column": "logprobs"}))
    with pytest.raises(ValueError, match="2 values for 3 sample ids"):
        client.put_column("r", 0, "tokens", "c1", [1, 2, 3], token_lists([[1], [2]]))


def test_slice_refs_read_only_their_rows(client: StoreClient):
    ref = client.put_column("r", 0, "tokens", "prompts", [10, 11, 12, 13], token_lists([[0], [1, 1], [2], [3]]))
    middle = ref.rows(1, 2)
    assert (middle.offset, middle.sample_ids) == (1, [11, 12])
    assert client.get_column(middle).column("tokens").to_pylist() == [[1, 1], [2]]
    assert middle.rows(1, 1).offset == 2  # a slice of a slice counts from the chunk's first row
    assert client.get_column(ref).num_rows == 4  # the whole chunk as before
    with pytest.raises(ValueError, match="rows 3..5"):
        ref.rows(3, 2)
    beyond = middle.model_copy(update={"offset": 3})  # e.g. a ref to a chunk re-put shorter
    with pytest.raises(StoreError, match=r"rows 3..5 of 'r/0/tokens/prompts', which has 4 rows"):
        client.get_column(beyond)
    with pytest.raises(flight.FlightServerError, match="bad ticket"):
        client._client(ref.location).do_get(flight.Ticket(b'{"key": 1}')).read_all()


def test_weights_round_trip_is_bit_exact(client: StoreClient):
    generator = torch.Generator().manual_seed(0)
    model = {
        "embed.weight": torch.randn(64, 16, generator=generator),
        "layer.0.weight": torch.randn(16, 16, generator=generator).to(torch.bfloat16),
        "layer.0.bias": torch.randn(16, generator=generator).to(torch.bfloat16),
        "lm_head.weight": torch.randn(16, 64, generator=generator).t(),  # non-contiguous
        "norm.eps": torch.tensor(1e-6),  # 0-d
        "step": torch.tensor([3], dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    _, batches = weights_table_batches(model.items(), max_batch_bytes=1024)
    assert len(batches) > 2 and batches[0].num_rows == 1  # embed (4 KB) alone, over the limit
    assert all(b.num_rows == 1 or b.column("data").nbytes <= 1024 + 64 for b in batches)

    ref = put_weights(client, "r", 3, model.items())
    assert ref.key == "r/weights/3/0" and ref.column == "weights" and ref.sample_ids == []
    loaded = get_weights(client, ref)
    assert list(loaded) == list(model)
    for name, tensor in model.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.view(-1).view(torch.uint8), tensor.contiguous().view(-1).view(torch.uint8)), name
    loaded["embed.weight"].add_(1.0)  # fresh, writable memory

    assert drop_weights(client, "r", 3) == 1
    with pytest.raises(StoreError, match="r/weights/3/0"):
        get_weights(client, ref)


def test_weights_in_small_batches_through_the_store(client: StoreClient):
    model = {f"w{i}": torch.full((100,), float(i), dtype=torch.bfloat16) for i in range(10)}
    model["big"] = torch.arange(1000, dtype=torch.float32)
    ref = put_weights(client, "r", 0, model.items(), max_batch_bytes=512)
    loaded = get_weights(client, ref)
    assert all(torch.equal(loaded[k], v) for k, v in model.items())


def test_server_process_writes_location_and_stops_on_sigterm(tmp_path: Path):
    location_file = tmp_path / "store" / "location"
    process = subprocess.Popen(
        [sys.executable, "-m", "flight_store.server", "--port", "0", "--capacity-bytes", "4096",
         "--location-file", str(location_file)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while not location_file.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "server wrote no location file"
            time.sleep(0.05)
        location = location_file.read_text().strip()
        assert location.startswith("grpc://127.0.0.1:")
        with StoreClient([location], timeout_s=5) as store_client:
            assert store_client.health(location)
            assert store_client.stats()[location]["capacity_bytes"] == 4096
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=5)
        assert process.returncode == 0
        assert stdout.decode().strip() == location
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
