"""The store client: puts and gets Arrow tables and column chunks on one or more column stores.

Chunks are placed by a stable hash of (partition, chunk) so every column of a chunk lands on the
same server and any actor can compute where a chunk lives. Flight errors become AsyncFlow errors:
a refused put raises BackPressureError (retry later), everything else StoreError naming the key
and location. With `backpressure_wait_s` a put to a full store waits and retries (bounded) instead;
a chunk larger than the store's whole capacity is a StoreError at once (it can never fit).
Security (docs/security.md): `tls_root_certs` verifies `grpc+tls://` stores, `token` is sent as
`authorization: Bearer <token>` on every call, and `require_tls` refuses plain `grpc://` locations.
"""

from __future__ import annotations

import json
import re
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight
from pydantic import SecretStr

from asyncflow.errors import BackPressureError, MissingChunkError, StoreError, StoreUnavailableError
from asyncflow.wire import ChunkRef
from flight_store.keys import column_key, partition_prefix
from flight_store.protocol import BACK_PRESSURE, UNKNOWN_KEY, encode_ticket

SAMPLE_ID = "sample_id"
_T = TypeVar("_T")

_NUMBERS = re.compile(r"size=(\d+)\s+used=(\d+)\s+capacity=(\d+)")


class StoreClient:
    """Flight client over the locations of a run's column stores; use as a context manager."""

    def __init__(self, locations: Sequence[str], timeout_s: float = 30.0, backpressure_wait_s: float = 0.0, *,
                 tls_root_certs: bytes | None = None, token: SecretStr | str | None = None,
                 require_tls: bool = False, unavailable_wait_s: float = 0.0) -> None:
        """`timeout_s` bounds every Flight call; `backpressure_wait_s` is how long a put refused by a
        full store is retried (with back-off) before its error is raised (0: raised at once).
        `tls_root_certs` (PEM) verifies TLS stores (None: the system's roots); `token` goes with every
        call; `require_tls` refuses plain `grpc://` locations (the token would travel in clear).
        `asyncflow.security.store_client_options(settings)` gives all three from the run config.
        `unavailable_wait_s` is how long a put or get to an unreachable store is retried (0: raised
        at once): a launched store that dies is restarted on its port within seconds."""
        if isinstance(locations, str):
            locations = [locations]  # a lone string would otherwise be split into characters
        if not locations:
            raise ValueError("StoreClient needs at least one store location")
        self.locations: list[str] = list(locations)
        self.timeout_s = timeout_s
        self.backpressure_wait_s = backpressure_wait_s
        self.backpressure_waits = 0
        self.unavailable_wait_s = unavailable_wait_s
        self.unavailable_waits = 0
        """Puts and gets that found a store unreachable and waited for it (each counted once)."""
        """Puts that found a store full and waited for room (each counted once, however many retries)."""
        self._tls_root_certs = tls_root_certs
        self.require_tls = require_tls
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        # The header lives only inside the (opaque) call options: no attribute or repr shows it.
        headers = [(b"authorization", f"Bearer {secret}".encode())] if secret else []
        self._options = flight.FlightCallOptions(timeout=timeout_s, headers=headers)
        self._clients: dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()

    # -- connections --------------------------------------------------------------------------

    def _client(self, location: str) -> flight.FlightClient:
        with self._lock:
            client = self._clients.get(location)
            if client is None:
                tls = location.startswith("grpc+tls://")
                if self.require_tls and not tls:
                    raise StoreError(f"store at {location}: refusing a plain-text connection because "
                                     "security.store_tls is on (a TLS store's location starts with grpc+tls://)")
                # Connecting is lazy in gRPC: an unreachable location fails on the first call instead.
                client = self._clients[location] = flight.FlightClient(
                    location, tls_root_certs=self._tls_root_certs if tls else None)
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
                if size > capacity:  # even an empty store would refuse it: waiting cannot help
                    return _oversized(key or "?", location, size, capacity)
                return BackPressureError(key or "?", size, used, capacity, location)
            # A message we cannot parse is still back-pressure: the caller must retry, not fail.
            return BackPressureError(key or "?", -1, -1, -1, location)
        if UNKNOWN_KEY in text:
            return MissingChunkError([(key if key is not None else "?", location)])
        if isinstance(error, flight.FlightUnauthenticatedError):
            return StoreError(f"store at {location} refused the call as unauthenticated: {_first_line(text)} "
                              "(check security.store_auth and the token's environment variable)")
        if isinstance(error, flight.FlightUnavailableError):
            hint = ""
            lowered = text.lower()
            # "Stream removed": a call that was under way lost its server (it died, and may come back).
            misconfigured = "ssl" in lowered or "handshake" in lowered or (
                "socket closed" in lowered and "stream removed" not in lowered)
            if misconfigured:
                hint = ("; a TLS store needs a grpc+tls:// location and a CA that signed its certificate "
                        "(security.store_tls, security.tls_ca)")
            if hint:  # a misconfiguration: waiting for the store to come back cannot help
                return StoreError(f"store at {location} is unreachable ({_first_line(text)}){hint}")
            return StoreUnavailableError(f"store at {location} is unreachable ({_first_line(text)})", location)
        if isinstance(error, flight.FlightTimedOutError):
            return StoreError(f"{what}: timed out after {self.timeout_s} s")
        return StoreError(f"{what}: {_first_line(text)}")

    # -- tables -------------------------------------------------------------------------------

    def put_table(self, key: str, table: pa.Table, location: str) -> None:
        """Store `table` under `key` at `location`, replacing any table already there.

        A full store (BackPressureError) is retried for up to `backpressure_wait_s`, backing off from
        50 ms to 1 s, since the trainer frees space as it consumes partitions; past that a StoreError
        says how long the store stayed full. A table bigger than the store's capacity fails at once."""
        deadline = time.monotonic() + self.backpressure_wait_s
        delay = 0.05
        waited = False
        while True:
            try:
                return self._until_reachable(lambda: self._put_once(key, table, location), location)
            except BackPressureError as error:
                if 0 <= error.capacity < table.nbytes:
                    raise _oversized(key, location, table.nbytes, error.capacity) from error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if not waited:
                        raise
                    raise StoreError(
                        f"{error}; still full after {self.backpressure_wait_s:.0f} s of retries: raise "
                        "store.capacity_bytes or check that the trainer consumes partitions") from error
                if not waited:
                    waited = True
                    self.backpressure_waits += 1
                time.sleep(min(delay, remaining))
                delay = min(2 * delay, 1.0)

    def _put_once(self, key: str, table: pa.Table, location: str) -> None:
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

        def get_once() -> pa.Table:
            try:
                return self._client(location).do_get(ticket, self._options).read_all()
            except flight.FlightError as error:
                raise self._error(error, location, key) from error
            except pa.ArrowException as error:
                raise StoreError(f"get of key {key!r} at {location} failed: {_first_line(str(error))}") from error

        return self._until_reachable(get_once, location)

    def _until_reachable(self, call: Callable[[], _T], location: str) -> _T:
        """`call()`, retried while the store at `location` is unreachable, for up to
        `unavailable_wait_s` (back-off 0.1 s to 1 s) with a fresh connection each time: gRPC's own
        reconnect back-off of a broken channel could otherwise keep failing calls for longer than
        a restarting store takes to come back. What the restarted store lacks then raises
        MissingChunkError (lineage recovery takes it from there)."""
        deadline = time.monotonic() + self.unavailable_wait_s
        delay = 0.1
        waited = False
        while True:
            try:
                return call()
            except StoreUnavailableError as error:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if not waited:
                        raise
                    raise StoreUnavailableError(f"{error}; still unreachable after {self.unavailable_wait_s:.0f} s "
                                                "of retries", location) from error
                if not waited:
                    waited = True
                    self.unavailable_waits += 1
                with self._lock:  # not closed: another thread may be in a call on it (it fails and retries)
                    self._clients.pop(location, None)
                time.sleep(min(delay, remaining))
                delay = min(2 * delay, 1.0)

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


def _oversized(key: str, location: str, size: int, capacity: int) -> StoreError:
    return StoreError(f"key {key!r} at {location}: put of {size} bytes exceeds the store's whole capacity of "
                      f"{capacity} bytes and can never fit: write smaller chunks or raise store.capacity_bytes")


def _first_line(text: str) -> str:
    # Flight appends ". Detail: <status>" and gRPC debug context; the first sentence is the reason.
    text = text.split(". Detail:")[0].strip()
    return text.splitlines()[0] if text else "no detail"


def _short(ids: Sequence[int], limit: int = 8) -> str:
    return str(list(ids)) if len(ids) <= limit else f"{list(ids[:limit])} + {len(ids) - limit} more"
