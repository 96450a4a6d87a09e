"""The column store: an Arrow Flight server holding named Arrow tables in memory, up to a byte capacity.

Producers `do_put` a table under a key (the path of a PATH descriptor), consumers `do_get` it by
the same key as ticket; the trainer frees whole partitions with the `drop_prefix` action. A put
that would exceed the capacity is refused with a "back-pressure:" error instead of growing memory,
so producers slow down rather than the store OOMs. Data moves as Arrow IPC only (no pickling).

Run standalone: `python -m flight_store.server --port 0 --location-file F` writes its location
(grpc://host:port) to F and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from flight_store.protocol import ACTIONS, BACK_PRESSURE, BAD_TICKET, UNKNOWN_KEY, decode_ticket

DEFAULT_CAPACITY_BYTES = 2 * 1024**3


def table_bytes(data: pa.Table | pa.RecordBatch) -> int:
    """The memory a table or batch holds (its buffers), the one size measure the store accounts in."""
    return data.get_total_buffer_size()


class ColumnStoreServer(flight.FlightServerBase):
    """In-memory key → Arrow table store with a byte capacity. Thread-safe (gRPC calls run in parallel)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        **kwargs: Any,
    ) -> None:
        # kwargs go straight to FlightServerBase: the place for tls_certificates, auth_handler, middleware.
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        super().__init__(f"grpc://{host}:{port}", **kwargs)
        self.host = host
        self.location = f"grpc://{host}:{self.port}"
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._tables: dict[str, pa.Table] = {}
        self._sizes: dict[str, int] = {}
        self._used = 0
        # Bytes of puts still streaming in: counted against the capacity so that many concurrent
        # producers cannot together overshoot it before any of them commits.
        self._reserved = 0
        self._counters = {"puts": 0, "gets": 0, "refused": 0, "bytes_in": 0, "bytes_out": 0}

    # -- data plane ---------------------------------------------------------------------------

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        key = self._descriptor_key(descriptor)
        batches: list[pa.RecordBatch] = []
        received = 0
        try:
            while True:
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    break
                if chunk.data is None:
                    continue  # metadata-only message
                size = table_bytes(chunk.data)
                self._reserve(key, received, size)
                received += size
                batches.append(chunk.data)
            table = pa.Table.from_batches(batches, schema=reader.schema)
            with self._lock:
                # Re-put replaces: the old table's bytes are freed before the new ones are counted.
                self._used -= self._sizes.pop(key, 0)
                self._tables.pop(key, None)
                self._tables[key] = table
                self._sizes[key] = received
                self._used += received
                self._counters["puts"] += 1
                self._counters["bytes_in"] += received
        finally:
            with self._lock:
                self._reserved -= received

    def _reserve(self, key: str, received: int, size: int) -> None:
        """Count `size` more bytes of an in-flight put of `key`, or refuse the put (back-pressure)."""
        with self._lock:
            # `used` is everything but this put: its own earlier batches and the table it replaces.
            used = self._used + self._reserved - received - self._sizes.get(key, 0)
            if used + received + size > self.capacity_bytes:
                self._counters["refused"] += 1
                # Numbers come before the key so the client can parse them whatever the key holds.
                raise flight.FlightServerError(
                    f"{BACK_PRESSURE} size={received + size} used={used} capacity={self.capacity_bytes} "
                    f"key={key!r}: put refused, store full"
                )
            self._reserved += size

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.RecordBatchStream:
        try:
            key, offset, length = decode_ticket(ticket.ticket)
        except ValueError as error:
            raise flight.FlightServerError(f"{BAD_TICKET} {error}") from None
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                raise flight.FlightServerError(f"{UNKNOWN_KEY} {key!r} is not in this store")
            if offset is not None:
                if offset + length > table.num_rows:
                    raise flight.FlightServerError(
                        f"{BAD_TICKET} rows {offset}..{offset + length} of {key!r}, which has {table.num_rows} rows")
                table = table.slice(offset, length)  # zero-copy: a view on the stored buffers
            self._counters["gets"] += 1
            self._counters["bytes_out"] += self._sizes[key] if offset is None else table.nbytes
        # The stream holds its own reference: a concurrent drop cannot pull the data from under it.
        return flight.RecordBatchStream(table)

    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Iterator[flight.FlightInfo]:
        prefix = criteria.decode("utf-8", errors="replace") if criteria else ""
        with self._lock:
            items = [(k, t, self._sizes[k]) for k, t in self._tables.items() if k.startswith(prefix)]
        for key, table, size in items:
            yield self._info(key, table, size)

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        key = self._descriptor_key(descriptor)
        with self._lock:
            table = self._tables.get(key)
            size = self._sizes.get(key, 0)
        if table is None:
            raise flight.FlightServerError(f"{UNKNOWN_KEY} {key!r} is not in this store")
        return self._info(key, table, size)

    def _info(self, key: str, table: pa.Table, size: int) -> flight.FlightInfo:
        endpoint = flight.FlightEndpoint(key.encode(), [self.location])
        return flight.FlightInfo(
            table.schema, flight.FlightDescriptor.for_path(key), [endpoint], table.num_rows, size
        )

    @staticmethod
    def _descriptor_key(descriptor: flight.FlightDescriptor) -> str:
        if descriptor.descriptor_type != flight.DescriptorType.PATH or len(descriptor.path or []) != 1:
            raise flight.FlightServerError(
                "bad descriptor: expected a PATH descriptor with exactly one element (the key), "
                f"got {descriptor!r}"
            )
        part = descriptor.path[0]
        return part.decode("utf-8") if isinstance(part, bytes) else str(part)

    # -- control ------------------------------------------------------------------------------

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return list(ACTIONS.items())

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterator[bytes]:
        body = action.body.to_pybytes() if action.body is not None else b""
        if action.type == "drop_prefix":
            result = self.drop_prefix(body.decode("utf-8"))
            return iter([json.dumps(result).encode()])
        if action.type == "stats":
            return iter([json.dumps(self.stats()).encode()])
        if action.type == "health":
            return iter([b"ok"])
        raise flight.FlightServerError(
            f"unknown action {action.type!r}; known actions: {', '.join(sorted(ACTIONS))}"
        )

    def drop_prefix(self, prefix: str) -> dict[str, int]:
        """Remove every key starting with `prefix`; an empty prefix would drop everything, so refuse it."""
        if not prefix:
            raise flight.FlightServerError("drop_prefix needs a non-empty prefix (refusing to drop every key)")
        with self._lock:
            doomed = [k for k in self._tables if k.startswith(prefix)]
            freed = 0
            for key in doomed:
                del self._tables[key]
                freed += self._sizes.pop(key)
            self._used -= freed
        return {"dropped": len(doomed), "bytes_freed": freed}

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "keys": len(self._tables),
                "bytes_used": self._used,
                "capacity_bytes": self.capacity_bytes,
                **self._counters,
            }


# -- standalone process -----------------------------------------------------------------------


def write_location(path: Path, location: str) -> None:
    """Write `location` to `path` atomically: a launcher polling the file never reads half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(location + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
    location_file: Path | None = None,
) -> None:
    """Run a store until SIGTERM or SIGINT, then shut it down (finishing requests in flight)."""
    server = ColumnStoreServer(host, port, capacity_bytes)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        # Only flag here: shutdown() blocks until requests finish, which a signal handler must not do.
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if location_file is not None:
            write_location(location_file, server.location)
        print(server.location, flush=True)
        # Wait in short slices so the main thread keeps running Python signal handlers.
        while not stop.wait(0.2):
            pass
    finally:
        server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flight_store.server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--capacity-bytes", type=int, default=DEFAULT_CAPACITY_BYTES)
    parser.add_argument("--location-file", type=Path, default=None, help="write grpc://host:port here")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.capacity_bytes, args.location_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
