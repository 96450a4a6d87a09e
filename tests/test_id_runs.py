"""`IdRuns`: a set of ints kept as [start, end) runs, checked against a plain `set` of the same ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncflow.id_runs import IdRuns


def test_dense_ids_added_in_any_order_are_one_run() -> None:
    ids = list(range(10_000))
    np.random.default_rng(0).shuffle(ids)
    runs = IdRuns()
    for sid in ids:
        runs.add(sid)
    assert runs.runs() == [[0, 10_000]]
    assert len(runs) == 10_000
    assert 0 in runs and 9_999 in runs and 10_000 not in runs and -1 not in runs


def test_gaps_are_the_only_thing_that_makes_runs() -> None:
    runs = IdRuns(i for i in range(100) if i not in (7, 50, 51))
    assert runs.runs() == [[0, 7], [8, 50], [52, 100]]
    assert len(runs) == 97
    runs.add(7)
    assert runs.runs() == [[0, 50], [52, 100]]


def test_discard_splits_and_trims_runs() -> None:
    runs = IdRuns(range(20))
    runs.discard(5)
    runs.discard(0)
    runs.discard(19)
    runs.discard(42)  # absent: no change
    assert runs.runs() == [[1, 5], [6, 19]]
    assert len(runs) == 17
    runs.difference_update([1, 2, 3, 4])
    assert runs.runs() == [[6, 19]]
    runs.discard_range(0, 100)
    assert runs.runs() == [] and len(runs) == 0


def test_a_range_is_added_as_one_run_without_iterating_it() -> None:
    runs = IdRuns(range(10**12))  # a set of these ids would not fit in memory
    assert len(runs) == 10**12 and runs.runs() == [[0, 10**12]]
    runs.update(range(10**12, 2 * 10**12))
    assert runs.runs() == [[0, 2 * 10**12]]


def test_from_runs_merges_overlapping_and_touching_runs() -> None:
    runs = IdRuns.from_runs([[10, 20], [0, 5], [5, 8], [15, 30], [40, 41]])
    assert runs.runs() == [[0, 8], [10, 30], [40, 41]]
    assert len(runs) == 29


def test_compares_and_behaves_like_a_set() -> None:
    runs = IdRuns([3, 1, 2, 9])
    assert runs == {1, 2, 3, 9} and {1, 2, 3, 9} == runs
    assert runs != {1, 2, 3}
    assert sorted(runs) == [1, 2, 3, 9]
    assert np.int64(9) in runs and "9" not in runs and 2.5 not in runs
    copy = runs.copy()
    copy.add(4)
    assert 4 not in runs and copy.runs() == [[1, 5], [9, 10]]


def test_negative_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        IdRuns([-1])


_ops = st.lists(st.tuples(st.sampled_from(["add", "discard", "add_range", "discard_range"]),
                          st.integers(0, 60), st.integers(0, 12)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_any_sequence_of_operations_matches_a_plain_set(ops: list[tuple[str, int, int]]) -> None:
    runs, model = IdRuns(), set()
    for op, sid, width in ops:
        if op == "add":
            runs.add(sid)
            model.add(sid)
        elif op == "discard":
            runs.discard(sid)
            model.discard(sid)
        elif op == "add_range":
            runs.add_range(sid, sid + width)
            model.update(range(sid, sid + width))
        else:
            runs.discard_range(sid, sid + width)
            model.difference_update(range(sid, sid + width))
        assert len(runs) == len(model)
    assert list(runs) == sorted(model)
    assert all((sid in runs) == (sid in model) for sid in range(-1, 80))
    flat = [bound for run in runs.runs() for bound in run]
    # Sorted, disjoint and never touching: as few runs as the ids allow.
    assert all(a < b for a, b in zip(flat, flat[1:], strict=False))
    assert len(runs.runs()) == sum(1 for sid in model if sid - 1 not in model)
    assert IdRuns.from_runs(runs.runs()) == model
