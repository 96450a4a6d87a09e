"""The column store: an Arrow Flight server holding named Arrow tables in memory, up to a byte capacity.

Producers `do_put` a table under a key (the path of a PATH descriptor), consumers `do_get` it by
the same key as ticket; the trainer frees whole partitions with the `drop_prefix` action. A put
that would exceed the capacity is refused with a "back-pressure:" error instead of growing memory,
so producers slow down rather than the store OOMs. Data moves as Arrow IPC only (no pickling).
A put under a column key (`<run>/<partition>/<column>/<chunk>`) must have the schema
(sample_id int64, <column>) with the column's type unchanged from earlier puts of it in the run:
anything else is refused with a "bad schema:" error before any data is read.

Security (docs/security.md): with a certificate and key the store serves TLS only, at a
`grpc+tls://` location; with a token every call must carry `authorization: Bearer <token>`
(`TokenAuthMiddlewareFactory`), anything else is refused as unauthenticated.

Run standalone: `python -m flight_store.server --port 0 --location-file F` writes its location
(grpc://host:port) to F and serves until SIGTERM/SIGINT. `--tls-cert C --tls-key K` turns TLS on;
`--token-env VAR` requires the token held in environment variable VAR (never on the command line).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
from pydantic import SecretStr

from asyncflow.errors import ConfigError
from flight_store.protocol import ACTIONS, BACK_PRESSURE, BAD_TICKET, UNKNOWN_KEY, decode_ticket

DEFAULT_CAPACITY_BYTES = 2 * 1024**3
SAMPLE_ID = "sample_id"
_COLUMN_KEY = re.compile(r"^(?P<run>[^/]+)/\d+/(?P<column>[^/]+)/[^/]+$")


def table_bytes(data: pa.Table | pa.RecordBatch) -> int:
    """The memory a table or batch holds (its buffers), the one size measure the store accounts in."""
    return data.get_total_buffer_size()


class TokenAuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Refuses every call whose `authorization` header is not `Bearer <token>` (constant-time compare)."""

    def __init__(self, token: SecretStr | str) -> None:
        super().__init__()
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        if not secret:
            raise ValueError("the store token must not be empty")
        self._expected = f"Bearer {secret}".encode()

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> None:
        given = headers.get("authorization", [])
        if len(given) != 1 or not hmac.compare_digest(given[0].encode(), self._expected):
            # Says what is wrong, never what was expected or received.
            raise flight.FlightUnauthenticatedError(
                "store token missing or wrong: send 'authorization: Bearer <token>' (security.store_auth)")
        return None


class ColumnStoreServer(flight.FlightServerBase):
    """In-memory key → Arrow table store with a byte capacity. Thread-safe (gRPC calls run in parallel)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        token: SecretStr | str | None = None,
        **kwargs: Any,
    ) -> None:
        # kwargs go straight to FlightServerBase: the place for tls_certificates, auth_handler, middleware.
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        scheme = "grpc"
        if tls_cert is not None or tls_key is not None:
            if tls_cert is None or tls_key is None:
                raise ValueError("a TLS store needs both tls_cert and tls_key")
            kwargs["tls_certificates"] = [flight.CertKeyPair(Path(tls_cert).read_bytes(), Path(tls_key).read_bytes())]
            scheme = "grpc+tls"
        if token is not None:
            kwargs["middleware"] = {**kwargs.get("middleware", {}), "auth": TokenAuthMiddlewareFactory(token)}
        super().__init__(f"{scheme}://{host}:{port}", **kwargs)
        self.host = host
        self.location = f"{scheme}://{host}:{self.port}"
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._tables: dict[str, pa.Table] = {}
        self._sizes: dict[str, int] = {}
        self._used = 0
        # Bytes of puts still streaming in: counted against the capacity so that many concurrent
        # producers cannot together overshoot it before any of them commits.
        self._reserved = 0
        self._counters = {"puts": 0, "gets": 0, "refused": 0, "bytes_in": 0, "bytes_out": 0, "bad_schema": 0}
        # (run, column) -> the column's type, fixed by its first put: a later put of another type is
        # a producer bug (or a hostile client) that readers would only trip over much later.
        self._column_types: dict[tuple[str, str], pa.DataType] = {}

    # -- data plane ---------------------------------------------------------------------------

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        key = self._descriptor_key(descriptor)
        column = self._check_schema(key, reader.schema)
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
                if column is not None:
                    self._column_types.setdefault(column, reader.schema.field(column[1]).type)
        finally:
            with self._lock:
                self._reserved -= received

    def _check_schema(self, key: str, schema: pa.Schema) -> tuple[str, str] | None:
        """Refuse a put under a column key whose schema is not (sample_id int64, <column> T), T the
        column's type so far; returns (run, column) of a column key, None for other keys (weights)."""
        match = _COLUMN_KEY.match(key)
        if match is None:
            return None
        run, column = match["run"], match["column"]
        problem = None
        if schema.names != [SAMPLE_ID, column]:
            problem = f"expected the columns ['{SAMPLE_ID}', '{column}'], got {schema.names}"
        elif schema.field(SAMPLE_ID).type != pa.int64():
            problem = f"'{SAMPLE_ID}' must be int64, got {schema.field(SAMPLE_ID).type}"
        else:
            with self._lock:
                known = self._column_types.get((run, column))
            if known is not None and schema.field(column).type != known:
                problem = f"column '{column}' of run '{run}' holds {known}, got {schema.field(column).type}"
        if problem is None:
            return run, column
        with self._lock:
            self._counters["bad_schema"] += 1
        raise flight.FlightServerError(f"bad schema: put of key {key!r} to {self.location} refused: {problem}")

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
        try:
            key = part.decode("utf-8") if isinstance(part, bytes) else str(part)
        except UnicodeDecodeError:
            raise flight.FlightServerError(f"bad descriptor: the key must be UTF-8, got {part[:64]!r}") from None
        if not key:
            raise flight.FlightServerError("bad descriptor: empty key")
        return key

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
            # A whole run dropped: its column types go with it (a new run may use other types).
            for run_column in [rc for rc in self._column_types if f"{rc[0]}/".startswith(prefix)]:
                del self._column_types[run_column]
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
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    token_env: str | None = None,
) -> None:
    """Run a store until SIGTERM or SIGINT, then shut it down (finishing requests in flight).

    `token_env` names the environment variable holding the token every call must carry."""
    token = None
    if token_env:
        token = SecretStr(os.environ.get(token_env, ""))
        if not token.get_secret_value():
            raise ConfigError(f"--token-env {token_env}: that environment variable is not set or empty")
    elif host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: store listens on {host} without a token (see docs/security.md)", file=sys.stderr, flush=True)
    server = ColumnStoreServer(host, port, capacity_bytes, tls_cert=tls_cert, tls_key=tls_key, token=token)
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
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate: serve TLS only (grpc+tls://)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--token-env", default=None, metavar="VAR",
                        help="require the token held in environment variable VAR on every call")
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port, args.capacity_bytes, args.location_file,
              tls_cert=args.tls_cert, tls_key=args.tls_key, token_env=args.token_env)
    except (ValueError, OSError, ConfigError) as error:
        print(f"flight_store.server: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
