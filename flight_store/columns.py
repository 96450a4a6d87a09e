"""Conversions between Python/numpy sequences and the Arrow list columns the store holds.

Token ids travel as list<int32>, log-probabilities as list<float32>. Arrays are built from one
flat numpy buffer plus offsets, not element by element, because rollouts carry many tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

_INT32_MAX = np.iinfo(np.int32).max


def _lists(seqs: Sequence[Sequence[Any]], dtype: type[np.generic], value_type: pa.DataType) -> pa.ListArray:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    if total > _INT32_MAX:
        # list<> has int32 offsets; a partition chunk this large should be split into more chunks.
        raise ValueError(f"{total} values exceed the int32 offsets of a list column; use smaller chunks")
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=total)
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(flat, type=value_type), type=pa.list_(value_type)
    )


def token_lists(seqs: Sequence[Sequence[int]]) -> pa.ListArray:
    """One list<int32> row per sequence of token ids (values outside int32 raise OverflowError)."""
    return _lists(seqs, np.int32, pa.int32())


def float_lists(seqs: Sequence[Sequence[float]]) -> pa.ListArray:
    """One list<float32> row per sequence of floats (e.g. per-token log-probabilities)."""
    return _lists(seqs, np.float32, pa.float32())


def _to_lists(arr: pa.Array | pa.ChunkedArray) -> list[list[Any]]:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_list(arr.type) and not pa.types.is_large_list(arr.type):
        raise TypeError(f"expected a list column, got {arr.type}")
    if arr.null_count or arr.values.null_count:
        return arr.to_pylist()  # rare: keep nulls as None rather than inventing values
    # Offsets of a sliced array index into the unsliced child `values`, so both are used as is.
    offsets = arr.offsets.to_numpy().tolist()
    flat = arr.values.to_numpy(zero_copy_only=False).tolist()
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


def to_int_lists(arr: pa.Array | pa.ChunkedArray) -> list[list[int]]:
    """A list<int> column back to Python lists of ints."""
    return _to_lists(arr)


def to_float_lists(arr: pa.Array | pa.ChunkedArray) -> list[list[float]]:
    """A list<float> column back to Python lists of floats."""
    return _to_lists(arr)
