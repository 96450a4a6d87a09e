"""Data-plane benchmark: bytes/s of moving rollout sample columns through three paths, side by side.

Paths (each puts every chunk, then gets every chunk back; the same tables, the same chunking):

- ``flight_store``: a real in-process `ColumnStoreServer` driven through `StoreClient.put_column` /
  `get_column`, the way actors move columns.
- ``raw_flight``: a minimal `pyarrow.flight` server that keeps tables in a dict, driven by a bare
  `FlightClient.do_put` / `do_get`: the floor `flight_store` is compared with.
- ``nats_inline``: a real embedded nats-server; each table is serialized to Arrow IPC stream bytes and
  sent with core NATS request/reply to an in-process responder that stores it, then requested back.
  A payload over the server's max_payload (1 MiB by default) is split into pieces of at most
  max_payload - 1 KiB, one request/reply per piece, and joined again before decoding.

The unit moved is what `put_column` stores: one (sample_id int64, <column>) table per column per
chunk, for `response_ids` list<int32> and `behaviour_logprobs` list<float32>. Response lengths are
log-normal (long-tailed) around the requested mean, from a fixed seed. Each path runs with
work-item-sized chunks (`--chunk` samples) and with the whole partition as one chunk. Throughput is
the Arrow buffer bytes of the tables moved / the median wall time of a pass (put all, or get all) over
`--repeats` repetitions (short passes are timed several times per repetition). All three paths run in
one process and take turns call by call, the first one rotating, so load from elsewhere on a shared
machine hits them alike; ratios compare figures of this same run. Every table read back is checked
to equal the one put (a mismatch raises RoundTripError).

Run: ``python -m bench.data_plane [--samples 4096 --response-len 256 --chunk 64 --repeats 7 --json OUT]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from broker import EmbeddedNatsServer, connect
from flight_store.client import SAMPLE_ID, StoreClient
from flight_store.server import ColumnStoreServer

RUN = "bench"
PARTITION = 0
VOCAB = 151_936
"""Token ids are drawn below this (a Qwen-sized vocabulary)."""
LENGTH_SIGMA = 1.0
"""Sigma of the log-normal response lengths: a long tail (~3% of responses over 4x the mean)."""
RAW = "raw_flight"
PATHS = ("flight_store", RAW, "nats_inline")
NATS_SUBJECT = "bench.dataplane"
NATS_HEADROOM = 1024
"""Bytes kept free below max_payload for NATS headers (the server counts them in the payload limit)."""
NATS_TIMEOUT_S = 30.0
PASS_TARGET_S = 0.2
"""After warm-up, each repeat times a chunking's passes (put all + get all) until about this long."""
MAX_PASSES = 16


class RoundTripError(AssertionError):
    """A table read back differs from the table put."""


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One transfer: one column of one chunk, as the (sample_id, <column>) table put_column stores."""

    chunk: str
    column: str
    sample_ids: list[int]
    values: pa.Array
    table: pa.Table

    @property
    def key(self) -> str:
        return f"{self.chunk}-{self.column}"

    @property
    def nbytes(self) -> int:
        return self.table.get_total_buffer_size()


def response_lengths(samples: int, mean_len: int, seed: int) -> np.ndarray:
    """`samples` log-normal lengths with mean ~`mean_len`, clipped to [1, 16 * mean_len]."""
    rng = np.random.default_rng(seed)
    mu = np.log(mean_len) - LENGTH_SIGMA**2 / 2  # so that the log-normal's mean is mean_len
    lengths = np.rint(rng.lognormal(mu, LENGTH_SIGMA, samples))
    return np.clip(lengths, 1, 16 * mean_len).astype(np.int64)


def make_units(samples: int, mean_len: int, chunk_samples: int, seed: int) -> list[Unit]:
    """The partition's columns cut into chunks of `chunk_samples` samples; each chunk owns its buffers."""
    lengths = response_lengths(samples, mean_len, seed)
    rng = np.random.default_rng(seed + 1)
    total = int(lengths.sum())
    flats = {
        "response_ids": (rng.integers(0, VOCAB, total, dtype=np.int32), pa.int32()),
        "behaviour_logprobs": (-rng.exponential(1.0, total).astype(np.float32), pa.float32()),
    }
    offsets = np.zeros(samples + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    units = []
    for index, start in enumerate(range(0, samples, chunk_samples)):
        stop = min(start + chunk_samples, samples)
        lo, hi = int(offsets[start]), int(offsets[stop])
        chunk_offsets = pa.array((offsets[start : stop + 1] - lo).astype(np.int32))
        sample_ids = pa.array(np.arange(start, stop, dtype=np.int64))
        for column, (flat, value_type) in flats.items():
            values = pa.ListArray.from_arrays(
                chunk_offsets, pa.array(flat[lo:hi].copy(), type=value_type), type=pa.list_(value_type)
            )
            table = pa.table({SAMPLE_ID: sample_ids, column: values})
            units.append(Unit(f"c{index}", column, list(range(start, stop)), values, table))
    return units


def check_round_trip(path: str, units: Sequence[Unit], tables: Sequence[pa.Table]) -> None:
    """Raise RoundTripError unless every table read back equals the one put."""
    if len(tables) != len(units):
        raise RoundTripError(f"{path}: {len(tables)} tables read back for {len(units)} put")
    for unit, table in zip(units, tables, strict=True):
        if not table.equals(unit.table):
            raise RoundTripError(f"{path}: {unit.key} read back differs from what was put")


# -- paths --------------------------------------------------------------------------------------


class Transport(Protocol):
    """One path, driven one table at a time (calls of the Flight paths block; they need no loop)."""

    name: str
    round_trips: int
    """Request/reply round trips of puts so far (a NATS put of a big table takes several)."""

    async def put(self, unit: Unit) -> Any: ...

    async def get(self, handle: Any) -> pa.Table: ...

    def clear(self) -> None: ...

    async def close(self) -> None: ...


class FlightStoreTransport:
    """The project's store: ColumnStoreServer + StoreClient.put_column / get_column."""

    name = "flight_store"

    def __init__(self) -> None:
        self.server = ColumnStoreServer("127.0.0.1", 0)
        self.client = StoreClient([self.server.location])
        self.round_trips = 0

    async def put(self, unit: Unit) -> Any:
        self.round_trips += 1
        return self.client.put_column(RUN, PARTITION, unit.column, unit.chunk, unit.sample_ids, unit.values)

    async def get(self, handle: Any) -> pa.Table:
        return self.client.get_column(handle)

    def clear(self) -> None:
        self.client.drop_partition(RUN, PARTITION)

    async def close(self) -> None:
        self.client.close()
        self.server.shutdown()


class DictFlightServer(flight.FlightServerBase):
    """The least a Flight store can do: key -> table in a dict, nothing checked or counted."""

    def __init__(self) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.tables: dict[bytes, pa.Table] = {}

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        self.tables[descriptor.path[0]] = reader.read_all()

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.RecordBatchStream:
        return flight.RecordBatchStream(self.tables[ticket.ticket])


class RawFlightTransport:
    """A bare pyarrow FlightClient against DictFlightServer."""

    name = RAW

    def __init__(self) -> None:
        self.server = DictFlightServer()
        self.client = flight.FlightClient(f"grpc://127.0.0.1:{self.server.port}")
        self.round_trips = 0

    async def put(self, unit: Unit) -> Any:
        self.round_trips += 1
        key = unit.key.encode()
        writer, _ = self.client.do_put(flight.FlightDescriptor.for_path(key), unit.table.schema)
        writer.write_table(unit.table)
        writer.close()
        return key

    async def get(self, handle: Any) -> pa.Table:
        return self.client.do_get(flight.Ticket(handle)).read_all()

    def clear(self) -> None:
        self.server.tables.clear()

    async def close(self) -> None:
        self.client.close()
        self.server.shutdown()


class NatsInlineTransport:
    """Arrow IPC bytes inline in core NATS request/reply, to a responder holding them in a dict.

    Put: `<subject>.put.<key>.<part>.<parts>` with one piece as payload, acknowledged by an empty reply.
    Get: `<subject>.get.<key>.<part>`; the reply carries the piece and a `Parts` header, so the reader
    learns from piece 0 how many more to request. Requests go one at a time, like the Flight calls.
    Create with `await NatsInlineTransport.open()`.
    """

    name = "nats_inline"

    def __init__(self, workdir: Path, server: EmbeddedNatsServer) -> None:
        self._dir = workdir
        self.server = server
        self.client: Any = None
        self.responder: Any = None
        self.stored: dict[str, list[bytes]] = {}
        self.round_trips = 0
        self.piece_bytes = 0

    @classmethod
    async def open(cls) -> NatsInlineTransport:
        workdir = Path(tempfile.mkdtemp(prefix="bench-data-plane-"))
        self = cls(workdir, EmbeddedNatsServer(workdir / "nats"))
        try:
            url = self.server.start()
            self.client = await connect(url, "bench-data-plane-client")
            self.responder = await connect(url, "bench-data-plane-responder")
            await self.responder.subscribe(f"{NATS_SUBJECT}.>", cb=self._respond)
            await self.responder.flush()  # subscribed at the server before the first request
        except BaseException:
            await self.close()
            raise
        self.piece_bytes = self.client.max_payload - NATS_HEADROOM
        return self

    async def _respond(self, msg: Any) -> None:
        _, _, op, key, *numbers = msg.subject.split(".")
        part = int(numbers[0])
        if op == "put":
            parts = int(numbers[1])
            if part == 0:
                self.stored[key] = []
            pieces = self.stored.get(key, [])
            if len(pieces) != part or part >= parts:
                await self.responder.publish(
                    msg.reply, b"", headers={"Error": f"piece {part} of {key} out of order"}
                )
                return
            pieces.append(msg.data)
            await self.responder.publish(msg.reply, b"")
            return
        pieces = self.stored.get(key, [])
        if part >= len(pieces):
            await self.responder.publish(msg.reply, b"", headers={"Error": f"no piece {part} of {key}"})
        else:
            await self.responder.publish(msg.reply, pieces[part], headers={"Parts": str(len(pieces))})

    async def put(self, unit: Unit) -> Any:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, unit.table.schema) as writer:
            writer.write_table(unit.table)
        data = memoryview(sink.getvalue())
        size = self.piece_bytes
        parts = max(1, -(-len(data) // size))
        for part in range(parts):
            reply = await self.client.request(
                f"{NATS_SUBJECT}.put.{unit.key}.{part}.{parts}",
                data[part * size : (part + 1) * size],
                timeout=NATS_TIMEOUT_S,
            )
            if reply.headers and "Error" in reply.headers:
                raise RoundTripError(f"nats_inline: put of {unit.key}: {reply.headers['Error']}")
        self.round_trips += parts
        return unit.key

    async def _request_piece(self, key: str, part: int) -> Any:
        reply = await self.client.request(f"{NATS_SUBJECT}.get.{key}.{part}", b"", timeout=NATS_TIMEOUT_S)
        if not reply.headers or "Parts" not in reply.headers:
            raise RoundTripError(
                f"nats_inline: get of {key}: {(reply.headers or {}).get('Error', 'no reply')}"
            )
        return reply

    async def get(self, handle: Any) -> pa.Table:
        first = await self._request_piece(handle, 0)
        pieces = [first.data]
        for part in range(1, int(first.headers["Parts"])):
            pieces.append((await self._request_piece(handle, part)).data)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()

    def clear(self) -> None:
        self.stored.clear()

    async def close(self) -> None:
        for connection in (self.client, self.responder):
            if connection is not None and not connection.is_closed:
                await connection.close()
        self.server.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


async def open_transport(path: str) -> Transport:
    if path == "flight_store":
        return FlightStoreTransport()
    if path == RAW:
        return RawFlightTransport()
    if path == "nats_inline":
        return await NatsInlineTransport.open()
    raise ValueError(f"unknown path {path!r}; known: {', '.join(PATHS)}")


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Row:
    """One path at one chunking: the wall time of every timed pass and the median-based figures."""

    path: str
    chunking: str
    chunk_samples: int
    tables: int
    round_trips: int
    bytes: int
    put_s: list[float] = field(default_factory=list)
    get_s: list[float] = field(default_factory=list)
    put_mb_s: float = 0.0
    get_mb_s: float = 0.0
    put_vs_raw: float = 0.0
    get_vs_raw: float = 0.0
    verified: bool = False


@dataclass
class Report:
    config: dict[str, Any]
    machine: dict[str, Any]
    rows: list[Row]
    elapsed_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "machine": self.machine,
            "elapsed_s": self.elapsed_s,
            "rows": [asdict(row) for row in self.rows],
        }


def _turn(paths: Sequence[str], shift: int) -> list[str]:
    shift %= len(paths)
    return [*paths[shift:], *paths[:shift]]


async def interleaved_pass(
    transports: dict[str, Transport], units: Sequence[Unit], shift: int
) -> dict[str, tuple[float, float, int]]:
    """Every path puts all units, then gets them all back, taking turns call by call.

    Taking turns per call (the first path rotating) makes a burst of load from elsewhere on the
    machine hit every path alike. Returns path -> (put seconds, get seconds, put round trips),
    after checking every table read back equals the one put.
    """
    paths = list(transports)
    put_s, get_s = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0.0)
    trips = {path: transports[path].round_trips for path in paths}
    handles: dict[str, list[Any]] = {path: [] for path in paths}
    tables: dict[str, list[pa.Table]] = {path: [] for path in paths}
    gc.collect()
    for index, unit in enumerate(units):
        for path in _turn(paths, shift + index):
            start = time.perf_counter()
            handles[path].append(await transports[path].put(unit))
            put_s[path] += time.perf_counter() - start
    for index in range(len(units)):
        for path in _turn(paths, shift + index):
            start = time.perf_counter()
            tables[path].append(await transports[path].get(handles[path][index]))
            get_s[path] += time.perf_counter() - start
    for path in paths:
        check_round_trip(path, units, tables[path])
        transports[path].clear()
    return {path: (put_s[path], get_s[path], transports[path].round_trips - trips[path]) for path in paths}


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "numpy": np.__version__,
    }


def run_benchmark(
    samples: int = 4096,
    response_len: int = 256,
    chunk: int = 64,
    repeats: int = 7,
    warmup: int = 1,
    seed: int = 0,
) -> Report:
    """Measure every path at `chunk`-sample chunks and as one whole-partition chunk, side by side."""
    if samples < 1 or response_len < 1 or chunk < 1 or repeats < 1 or warmup < 0:
        raise ValueError("samples, response_len, chunk and repeats must be positive, warmup non-negative")
    return asyncio.run(_run(samples, response_len, chunk, repeats, warmup, seed))


async def _run(samples: int, response_len: int, chunk: int, repeats: int, warmup: int, seed: int) -> Report:
    began = time.perf_counter()
    chunkings = {f"{chunk}/chunk": min(chunk, samples)}
    if chunk < samples:
        chunkings["whole"] = samples
    units = {name: make_units(samples, response_len, size, seed) for name, size in chunkings.items()}
    rows = {
        (path, name): Row(
            path, name, chunkings[name], len(units[name]), 0, sum(u.nbytes for u in units[name])
        )
        for name in chunkings
        for path in PATHS
    }
    passes = dict.fromkeys(chunkings, 1)
    transports: dict[str, Transport] = {}
    try:
        for path in PATHS:
            transports[path] = await open_transport(path)
        for rep in range(warmup + repeats):
            for name in chunkings:
                for index in range(1 if rep < warmup else passes[name]):
                    started = time.perf_counter()
                    results = await interleaved_pass(transports, units[name], shift=rep + index)
                    for path, (put_s, get_s, round_trips) in results.items():
                        row = rows[path, name]
                        row.round_trips, row.verified = round_trips, True
                        if rep >= warmup:
                            row.put_s.append(put_s)
                            row.get_s.append(get_s)
                    if rep == warmup - 1:
                        # Quick passes (big chunks) are timed several times per repeat, for as many
                        # calls behind their median as behind a slow pass's.
                        took = (time.perf_counter() - started) / len(PATHS)
                        passes[name] = max(1, min(MAX_PASSES, round(PASS_TARGET_S / took)))
    finally:
        for transport in transports.values():
            await transport.close()
    for row in rows.values():
        row.put_mb_s = row.bytes / statistics.median(row.put_s) / 1e6
        row.get_mb_s = row.bytes / statistics.median(row.get_s) / 1e6
    for row in rows.values():
        raw = rows[RAW, row.chunking]
        row.put_vs_raw = row.put_mb_s / raw.put_mb_s
        row.get_vs_raw = row.get_mb_s / raw.get_mb_s
    lengths = response_lengths(samples, response_len, seed)
    config = {
        "samples": samples,
        "response_len": response_len,
        "chunk": chunk,
        "repeats": repeats,
        "warmup": warmup,
        "passes_per_repeat": passes,
        "seed": seed,
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
        "tokens": int(lengths.sum()),
    }
    return Report(config, machine_info(), list(rows.values()), time.perf_counter() - began)


def format_report(report: Report) -> str:
    c, m = report.config, report.machine
    nbytes = report.rows[0].bytes
    lines = [
        f"data plane: {c['samples']} samples, response length mean {c['mean_length']:.1f} max {c['max_length']} "
        f"(log-normal, seed {c['seed']}), {nbytes / 1e6:.2f} MB of Arrow buffers per pass",
        f"median of n timed passes ({c['repeats']} repeats x passes per repeat, after {c['warmup']} warm-up), "
        f"{report.elapsed_s:.1f} s in all; "
        f"{m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, pyarrow {m['pyarrow']}",
        "",
        f"{'path':<13} {'chunking':<9} {'tables':>6} {'round trips':>11} {'n':>3} {'put MB/s':>9} {'get MB/s':>9} "
        f"{'put vs raw':>10} {'get vs raw':>10}",
    ]
    for row in sorted(report.rows, key=lambda r: (r.chunk_samples, PATHS.index(r.path))):
        lines.append(
            f"{row.path:<13} {row.chunking:<9} {row.tables:>6} {row.round_trips:>11} {len(row.put_s):>3} {row.put_mb_s:>9.1f} "
            f"{row.get_mb_s:>9.1f} {row.put_vs_raw:>9.0%} {row.get_vs_raw:>10.0%}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data_plane", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096, help="samples in the partition")
    parser.add_argument("--response-len", type=int, default=256, help="mean response length (tokens)")
    parser.add_argument("--chunk", type=int, default=64, help="samples per chunk (a work item's worth)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every timing here as JSON")
    args = parser.parse_args(argv)
    report = run_benchmark(args.samples, args.response_len, args.chunk, args.repeats, args.warmup, args.seed)
    print(format_report(report), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
