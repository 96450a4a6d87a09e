"""Policy weights through the store as an Arrow table of raw tensor bytes: no pickling, bit-exact.

One row per tensor: name (string), dtype (torch dtype name, e.g. "bfloat16"), shape (list<int64>),
data (large_binary: the contiguous CPU tensor's little-endian bytes). Rows are grouped into record
batches of about `max_batch_bytes` so no single Flight message is huge; a tensor larger than that
travels as a batch of its own.

A version is written to `WEIGHT_REPLICAS` stores when the client has that many: the announced
ref names the first, and `get_weights` falls back to the others when the key is gone there (a
store that died and came back empty), so losing one store never loses a policy version. When every
copy is gone (a single store) `get_weights` raises `MissingChunkError` naming the key and where it
was looked for; the reader reports it and the trainer puts its current weights again
(`actors/weight_prefetch.py`, `actors/trainer.py`; docs/reliability.md).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import torch

from asyncflow.errors import MissingChunkError, StoreError, StoreUnavailableError
from asyncflow.wire import ChunkRef
from flight_store.client import StoreClient
from flight_store.keys import weights_key, weights_prefix

DEFAULT_MAX_BATCH_BYTES = 64 * 1024**2
WEIGHT_REPLICAS = 2
"""Stores each policy version is written to (fewer when the client has fewer locations)."""

WEIGHTS_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("data", pa.large_binary()),
    ]
)

# Names are spelled out (not getattr(torch, name)) so a stored table cannot name arbitrary attributes.
_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}

if sys.byteorder != "little":  # raw bytes are defined as little-endian; refuse rather than corrupt
    raise ImportError("flight_store.weights assumes a little-endian host")


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (a view where the tensor already is contiguous on CPU)."""
    t = tensor.detach().to("cpu").contiguous()
    # Viewing as uint8 sidesteps numpy's lack of bfloat16; reshape(-1) first so 0-d tensors work.
    return t.reshape(-1).view(torch.uint8).numpy()


def _batch(rows: list[tuple[str, str, list[int], np.ndarray]]) -> pa.RecordBatch:
    # One concatenation into a single data buffer: the only copy of the weights on the way out.
    lengths = np.array([len(data) for *_, data in rows], dtype=np.int64)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.concatenate([data for *_, data in rows]) if rows else np.zeros(0, np.uint8)
    data = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(rows), [None, pa.py_buffer(offsets), pa.py_buffer(blob)]
    )
    return pa.record_batch(
        [
            pa.array([name for name, *_ in rows], pa.string()),
            pa.array([dtype for _, dtype, *_ in rows], pa.string()),
            pa.array([shape for _, _, shape, _ in rows], pa.list_(pa.int64())),
            data,
        ],
        schema=WEIGHTS_SCHEMA,
    )


def weights_table_batches(
    named_tensors: Iterable[tuple[str, torch.Tensor]], max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """Encode (name, tensor) pairs as record batches of at most ~max_batch_bytes of tensor data each."""
    batches: list[pa.RecordBatch] = []
    rows: list[tuple[str, str, list[int], np.ndarray]] = []
    pending = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice")
        seen.add(name)
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} is not supported (supported: {sorted(_DTYPES)})")
        data = _tensor_bytes(tensor)
        if rows and pending + len(data) > max_batch_bytes:
            batches.append(_batch(rows))
            rows, pending = [], 0
        rows.append((name, dtype, list(tensor.shape), data))
        pending += len(data)
    if rows:
        batches.append(_batch(rows))
    return WEIGHTS_SCHEMA, batches


def put_weights(
    client: StoreClient,
    run: str,
    version: int,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    location: str | None = None,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> ChunkRef:
    """Store policy `version` as shard 0 at `location`, or by default at the client's first
    `WEIGHT_REPLICAS` locations; the returned ref names the first."""
    key = weights_key(run, version, 0)
    locations = [location] if location else client.locations[:WEIGHT_REPLICAS]
    schema, batches = weights_table_batches(named_tensors, max_batch_bytes)
    table = pa.Table.from_batches(batches, schema=schema)
    for replica in locations:
        client.put_table(key, table, replica)
    return ChunkRef(column="weights", key=key, location=locations[0], sample_ids=[])


def get_weights(client: StoreClient, ref: ChunkRef) -> dict[str, torch.Tensor]:
    """Read weights written by put_weights; tensors are fresh, writable CPU copies. A key missing
    (or a store unreachable) at `ref.location` is looked for at the client's other locations, where
    put_weights keeps replicas; MissingChunkError lists every place it was not."""
    candidates = [ref.location, *(location for location in client.locations if location != ref.location)]
    not_found: list[tuple[str, str]] = []
    table: pa.Table | None = None
    for location in candidates:
        try:
            table = client.get_table(ref.key, location)
            break
        except MissingChunkError as error:
            not_found += error.missing
        except StoreUnavailableError:
            if len(candidates) == 1:
                raise
            not_found.append((ref.key, location))  # gone past the client's wait: try a replica
    if table is None:
        raise MissingChunkError(not_found)
    missing = [name for name in WEIGHTS_SCHEMA.names if name not in table.column_names]
    if missing:
        raise StoreError(f"key {ref.key!r} at {ref.location} is not a weights table: missing {missing}")
    tensors: dict[str, torch.Tensor] = {}
    for batch in table.to_batches():
        names = batch.column("name").to_pylist()
        dtypes = batch.column("dtype").to_pylist()
        shapes = batch.column("shape").to_pylist()
        data = batch.column("data")
        for i, (name, dtype_name, shape) in enumerate(zip(names, dtypes, shapes, strict=True)):
            dtype = _DTYPES.get(dtype_name)
            if dtype is None:
                raise StoreError(f"key {ref.key!r}: tensor {name!r} has unsupported dtype {dtype_name!r}")
            if name in tensors:
                raise StoreError(f"key {ref.key!r}: tensor {name!r} appears twice")
            buffer = data[i].as_buffer()
            raw = np.frombuffer(buffer, dtype=np.uint8) if buffer is not None else np.zeros(0, np.uint8)
            expected = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            if raw.size != expected:
                raise StoreError(
                    f"key {ref.key!r}: tensor {name!r} has {raw.size} bytes, "
                    f"expected {expected} for {dtype_name}{shape}"
                )
            if expected == 0:  # numpy gives empty arrays stride 0, which torch cannot reinterpret
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            # copy(): the Arrow buffer is read-only and dies with the table; the tensor must own its memory.
            tensors[name] = torch.from_numpy(raw.copy()).view(dtype).reshape(shape)
    return tensors


def drop_weights(client: StoreClient, run: str, version: int) -> int:
    """Free policy `version` on every location; returns how many shards were dropped."""
    return client.drop_prefix(weights_prefix(run, version))
