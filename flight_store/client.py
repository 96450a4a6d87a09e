"""The store client: puts and gets Arrow tables and column chunks on one or more column stores.

Chunks are placed by a stable hash of (partition, chunk) so every column of a chunk lands on the
same server and any actor can compute where a chunk lives. Flight errors become AsyncFlow errors:
a refused put raises BackPressureError (retry later), everything else StoreError naming the key
and location.
"""

from __future__ import annotations

import json
import re
import threading
import zlib
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from asyncflow.errors import BackPressureError, StoreError
from asyncflow.wire import ChunkRef
from flight_store.keys import column_key, partition_prefix
from flight_store.protocol import BACK_PRESSURE, UNKNOWN_KEY, encode_ticket

SAMPLE_ID = "sample_id"

_NUMBERS = re.compile(r"size=(\d+)\s+used=(\d+)\s+capacity=(\d+)")


class StoreClient:
    """Flight client over the locations of a run's column stores; use as a context manager."""

    def __init__(self, locations: Sequence[str], timeout_s: float = 30.0) -> None:
        if isinstance(locations, str):
            locations = [locations]  # a lone string would otherwise be split into characters
        if not locations:
            raise ValueError("StoreClient needs at least one store location")
        self.locations: list[str] = list(locations)
        self.timeout_s = timeout_s
        self._options = flight.FlightCallOptions(timeout=timeout_s)
        self._clients: dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()

    # -- connections --------------------------------------------------------------------------

    def _client(self, location: str) -> flight.FlightClient:
        with self._lock:
            client = self._clients.get(location)
            if client is None:
                # Connecting is lazy in gRPC: an unreachable location fails on the first call instead.
                client = self._clients[location] = flight.FlightClient(location)
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _error(self, error: flight.FlightError, location: str, key: str | None = None) -> StoreError:
        """Map a Flight error to the AsyncFlow error a caller can act on."""
        text = str(error)
        what = f"key {key!r} at {location}" if key is not None else location
        if BACK_PRESSURE in text:
            match = _NUMBERS.search(text)
            if match:
                size, used, capacity = (int(g) for g in match.groups())
                return BackPressureError(key or "?", size, used, capacity)
            # A message we cannot parse is still back-pressure: the caller must retry, not fail.
            return BackPressureError(key or "?", -1, -1, -1)
        if UNKNOWN_KEY in text:
            return StoreError(f"{what}: no such key (dropped, never written, or wrong location)")
        if isinstance(error, flight.FlightUnavailableError):
            return StoreError(f"store at {location} is unreachable ({_first_line(text)})")
        if isinstance(error, flight.FlightTimedOutError):
            return StoreError(f"{what}: timed out after {self.timeout_s} s")
        return StoreError(f"{what}: {_first_line(text)}")

    # -- tables -------------------------------------------------------------------------------

    def put_table(self, key: str, table: pa.Table, location: str) -> None:
        """Store `table` under `key` at `location`, replacing any table already there."""
        client = self._client(location)
        try:
            writer, _ = client.do_put(flight.FlightDescriptor.for_path(key), table.schema, self._options)
            try:
                writer.write_table(table)
            except (flight.FlightError, pa.ArrowException) as write_error:
                # When the server refuses mid-stream the write only sees a closed stream; the
                # server's real reason (e.g. back-pressure) arrives on close.
                try:
                    writer.close()
                except flight.FlightError as close_error:
                    raise close_error from write_error
                raise
            writer.close()
        except flight.FlightError as error:
            raise self._error(error, location, key) from error
        except pa.ArrowException as error:
            raise StoreError(f"put of key {key!r} at {location} failed: {_first_line(str(error))}") from error

    def get_table(self, key: str, location: str, offset: int | None = None, length: int | None = None) -> pa.Table:
        """Read the table stored under `key` at `location`, or only its rows offset .. offset + length."""
        ticket = flight.Ticket(encode_ticket(key, offset, length))
        try:
            return self._client(location).do_get(ticket, self._options).read_all()
        except flight.FlightError as error:
            raise self._error(error, location, key) from error
        except pa.ArrowException as error:
            raise StoreError(f"get of key {key!r} at {location} failed: {_first_line(str(error))}") from error

    def _action(self, location: str, kind: str, body: bytes = b"") -> list[bytes]:
        try:
            results = self._client(location).do_action(flight.Action(kind, body), self._options)
            return [result.body.to_pybytes() for result in results]
        except flight.FlightError as error:
            raise self._error(error, location) from error

    # -- column chunks ------------------------------------------------------------------------

    def place(self, partition: int, chunk: str) -> str:
        """The location of chunk `chunk` of `partition`: stable across processes (crc32, not hash())."""
        return self.locations[zlib.crc32(f"{partition}/{chunk}".encode()) % len(self.locations)]

    def put_column(
        self,
        run: str,
        partition: int,
        column: str,
        chunk: str,
        sample_ids: Sequence[int],
        values: pa.Array | pa.ChunkedArray,
    ) -> ChunkRef:
        """Store one column of one chunk as a (sample_id int64, <column>) table; returns where it is."""
        if column == SAMPLE_ID:
            raise ValueError(f"column name {SAMPLE_ID!r} is reserved for the sample ids")
        if len(values) != len(sample_ids):
            raise ValueError(f"column {column!r}: {len(values)} values for {len(sample_ids)} sample ids")
        key = column_key(run, partition, column, chunk)
        location = self.place(partition, chunk)
        table = pa.table({SAMPLE_ID: pa.array(sample_ids, type=pa.int64()), column: values})
        self.put_table(key, table, location)
        return ChunkRef(column=column, key=key, location=location, sample_ids=list(sample_ids))

    def get_column(self, ref: ChunkRef) -> pa.Table:
        """Read a chunk written by put_column (or the slice of it the ref names), checking it holds
        the samples the ref says."""
        table = self.get_table(ref.key, ref.location, ref.offset, None if ref.offset is None else len(ref.sample_ids))
        missing = [name for name in (SAMPLE_ID, ref.column) if name not in table.column_names]
        if missing:
            raise StoreError(f"key {ref.key!r} at {ref.location}: missing column(s) {missing}")
        ids = table.column(SAMPLE_ID).to_pylist()
        if ids != ref.sample_ids:
            raise StoreError(
                f"key {ref.key!r} at {ref.location}: sample ids {_short(ids)} do not match the ref's "
                f"{_short(ref.sample_ids)} (overwritten by another put?)"
            )
        return table

    # -- control ------------------------------------------------------------------------------

    def drop_prefix(self, prefix: str) -> int:
        """Drop every key starting with `prefix` on every location; returns how many keys went."""
        dropped = 0
        for location in self.locations:
            (reply,) = self._action(location, "drop_prefix", prefix.encode())
            dropped += int(json.loads(reply)["dropped"])
        return dropped

    def drop_partition(self, run: str, partition: int) -> int:
        """Free every column chunk of a partition (the trainer calls this once it consumed it)."""
        return self.drop_prefix(partition_prefix(run, partition))

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each location's counters (see ColumnStoreServer.stats)."""
        return {location: json.loads(self._action(location, "stats")[0]) for location in self.locations}

    def health(self, location: str) -> bool:
        """True if the store at `location` answers its health action."""
        try:
            return self._action(location, "health") == [b"ok"]
        except StoreError:
            return False


def _first_line(text: str) -> str:
    # Flight appends ". Detail: <status>" and gRPC debug context; the first sentence is the reason.
    text = text.split(". Detail:")[0].strip()
    return text.splitlines()[0] if text else "no detail"


def _short(ids: Sequence[int], limit: int = 8) -> str:
    return str(list(ids)) if len(ids) <= limit else f"{list(ids[:limit])} + {len(ids) - limit} more"
