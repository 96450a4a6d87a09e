"""A set of non-negative integers stored as sorted, disjoint [start, end) runs.

Sample ids and partition numbers are dense over a run: ids 0..N-1 are one run, however large N
is. The trainer's consumed sample ids and the scheduler's trained partitions are kept this way
so that their memory grows with the gaps (failed samples, partitions trained out of order), not
with the run's length. Membership is a binary search over the runs; adding an id next to a run
extends it, and runs that come to touch merge.

It is a `collections.abc.MutableSet`: `in`, `len`, iteration (lazy, id by id), `add`, `discard`,
comparisons with a plain `set` all behave as on a set of the same ids.
"""

from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, MutableSet


class IdRuns(MutableSet[int]):
    """Integers as sorted, disjoint, non-touching [start, end) runs."""

    __slots__ = ("_count", "_ends", "_starts")

    def __init__(self, ids: Iterable[int] = ()) -> None:
        # Two parallel sorted lists rather than a list of pairs: bisect works on them directly.
        # Invariant: starts[i] < ends[i] < starts[i + 1] (a gap of at least one between runs).
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._count = 0
        self.update(ids)

    @classmethod
    def from_runs(cls, runs: Iterable[Iterable[int]]) -> IdRuns:
        """From [start, end) pairs (any order; overlapping or touching ones merge)."""
        out = cls()
        for start, end in runs:
            out.add_range(int(start), int(end))
        return out

    def runs(self) -> list[list[int]]:
        """The [start, end) runs, ascending (the checkpoint's JSON form)."""
        return [[start, end] for start, end in zip(self._starts, self._ends, strict=True)]

    def copy(self) -> IdRuns:
        out = IdRuns()
        out._starts, out._ends, out._count = list(self._starts), list(self._ends), self._count
        return out

    # -- the set protocol ----------------------------------------------------------------------

    def __contains__(self, value: object) -> bool:
        try:
            value = operator.index(value)  # ints, and numpy's integers
        except TypeError:
            return False
        i = bisect_right(self._starts, value) - 1
        return i >= 0 and value < self._ends[i]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for start, end in zip(self._starts, self._ends, strict=True):
            yield from range(start, end)

    def __repr__(self) -> str:
        return f"IdRuns.from_runs({self.runs()!r})"

    def add(self, value: int) -> None:
        self.add_range(value, value + 1)

    def discard(self, value: int) -> None:
        self.discard_range(value, value + 1)

    def update(self, ids: Iterable[int]) -> None:
        """Add every id (a `range` is added as one run, whatever its length)."""
        if isinstance(ids, range) and ids.step == 1:
            self.add_range(ids.start, ids.stop)
            return
        for sid in ids:
            self.add(sid)

    def difference_update(self, ids: Iterable[int]) -> None:
        for sid in ids:
            self.discard(sid)

    # -- runs ------------------------------------------------------------------------------------

    def add_range(self, start: int, end: int) -> None:
        """Add every id in [start, end)."""
        if start < 0:
            raise ValueError(f"ids are non-negative, got {start}")
        if start >= end:
            return
        # Runs i..j-1 overlap or touch [start, end): those ending at or after `start` and starting
        # at or before `end`. They and the new ids become one run.
        i = bisect_left(self._ends, start)
        j = bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
            self._count -= sum(e - s for s, e in zip(self._starts[i:j], self._ends[i:j], strict=True))
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]
        self._count += end - start

    def discard_range(self, start: int, end: int) -> None:
        """Remove every id in [start, end) that is present."""
        if start >= end:
            return
        # Runs i..j-1 overlap [start, end): those ending after `start` and starting before `end`.
        i = bisect_right(self._ends, start)
        j = bisect_left(self._starts, end)
        if i >= j:
            return
        starts: list[int] = []
        ends: list[int] = []
        if self._starts[i] < start:  # the first run keeps its part below `start`
            starts.append(self._starts[i])
            ends.append(start)
        if self._ends[j - 1] > end:  # the last run keeps its part from `end` on
            starts.append(end)
            ends.append(self._ends[j - 1])
        removed = sum(e - s for s, e in zip(self._starts[i:j], self._ends[i:j], strict=True))
        self._count -= removed - sum(e - s for s, e in zip(starts, ends, strict=True))
        self._starts[i:j] = starts
        self._ends[i:j] = ends
