"""Data-parallel training: one engine replica per process, gradients summed at the optimizer step.

`DataParallelTrainingEngine` is what `make_training_engine` returns when
`trainer.engine.data_parallel` is N > 1. The calling process (the trainer actor) is rank 0 and
holds a replica itself; ranks 1..N-1 are worker processes started with the "spawn" context, one
command `Pipe` each. Every rank builds its replica with `make_local_training_engine` (so any
engine type works: hf, megatron, custom) from the same folder and seed, *after* the ranks have
joined a torch.distributed group (gloo on CPU, NCCL when `device` is CUDA, rank r on GPU
`base + r`), so an engine that wants a process group (Megatron) finds one.

    forward_backward  the batch is cut into N contiguous shards of about equal token count
                      (prompt + response); each rank accumulates the gradient of its shard's
                      summed loss locally; the stats come back and combine like micro-batches
                      (sum, max for keys ending in `_max`).
    optimizer_step    every rank all-reduces (SUM) its accumulated `.grad`s in flat buckets,
                      then runs its replica's own `optimizer_step(grad_scale)`. All ranks then
                      hold the global gradient and identical optimizer state, so clipping sees
                      the global norm and the weights stay identical; rank 0's result is returned.
    compute_logprobs  sharded like forward_backward and gathered in order: the KL reference
                      pass is as large as the training pass, so it is worth splitting too.
    export_weights,   rank 0's replica (all replicas are equal).
    save_pretrained,
    training_state
    load_training_state  sent to every rank (a checkpoint's optimizer state, for a resumed run).

Why a manual all-reduce at the step and not DDP's backward hooks: the trainer accumulates
gradients as GRPO groups stream in and only learns that a step is complete once the last group
of the partition arrived, then calls `optimizer_step`. DDP syncs inside the backward of the
micro-batch it is told is the last one (`no_sync` on the others); here there is no such
micro-batch to point at, and the shards ranks get differ in count, so per-backward hooks would
either sync every group (N-fold traffic, and a hang when ranks run different numbers of
backwards) or never. The loss is a *sum* over samples and the trainer scales by 1/n once, so
one SUM all-reduce of the accumulated gradients right before the step gives exactly the
single-process update (up to float summation order).

Failure handling: every wait has a deadline, and while rank 0 waits it watches the workers, so
a worker that dies or raises turns into an `EngineError` naming its rank within about a second
rather than a hang. After a death or a timeout the engine is broken (the group cannot recover):
later calls raise at once and `close()` stops what is left. Workers exit when their command pipe
closes or their parent process changes, so they never outlive the trainer.

One default process group per process: the first data-parallel engine in a process creates it
(torch.distributed's "default" group, which Megatron reuses); a second one in the same process
(the trainer's frozen KL reference) gets a private group object of its own instead.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import functools
import os
import pickle
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from asyncflow.config import TrainingEngineSettings
from asyncflow.engines.base import LossFn, TrainBatch, TrainingEngine, accumulate_stats
from asyncflow.errors import EngineError

_BUCKET_ELEMENTS = 1 << 24
"""Gradient elements per all-reduce (64 MiB in float32): few collectives, bounded extra memory."""
_POLL_S = 0.05
"""How often rank 0 looks at the workers while it waits."""
_CLOSE_GRACE_S = 10.0
_PARENT_CHECK_S = 1.0


# ------------------------------------------------------------------------------------ sharding
def shard_bounds(sizes: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut `len(sizes)` items into `parts` contiguous [start, end) ranges of about equal total size.

    Each cut lands at the item boundary nearest to k/parts of the total, so shards may be empty
    (fewer items than parts). Contiguity keeps the order, which makes gathering trivial.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    n = len(sizes)
    cumulative = [0]
    for size in sizes:
        cumulative.append(cumulative[-1] + size)
    total = cumulative[-1]
    cuts = [0]
    for k in range(1, parts):
        target = total * k / parts
        i = bisect.bisect_left(cumulative, target, lo=cuts[-1])
        # bisect gives the first boundary at or past the target; the one before may be nearer.
        if i > cuts[-1] and (i > n or target - cumulative[i - 1] <= cumulative[i] - target):
            i -= 1
        cuts.append(min(i, n))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _sequence_sizes(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[int]:
    # At least 1: even an empty sample costs a row of work.
    return [max(1, len(p) + len(r)) for p, r in zip(prompt_ids, response_ids, strict=True)]


def _slice_batch(batch: TrainBatch, start: int, end: int) -> TrainBatch:
    return TrainBatch(
        prompt_ids=batch.prompt_ids[start:end],
        response_ids=batch.response_ids[start:end],
        behaviour_logprobs=batch.behaviour_logprobs[start:end],
        advantages=batch.advantages[start:end],
        ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs[start:end],
        sample_ids=batch.sample_ids[start:end],
    )


def combine_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Add stats across shards, as the engines do across micro-batches (`*_max` keys take the max)."""
    totals: dict[str, float] = {}
    for stats in parts:
        accumulate_stats(totals, stats)
    return totals


# ------------------------------------------------------------------------------- process group
def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _rank_device(device: str, rank: int) -> str:
    """Rank r trains on GPU base + r ("cuda" and "cuda:0" both mean base 0); CPU ranks share "cpu"."""
    if not device.startswith("cuda"):
        return device
    _, _, index = device.partition(":")
    return f"cuda:{(int(index) if index else 0) + rank}"


def _check_gpus(device: str, world: int) -> None:
    """Fail at once, naming the GPUs, when a CUDA rank would have no GPU of its own.

    NCCL refuses two ranks on one GPU, and a rank asking for a GPU past the last one only fails
    deep in its start-up; both are a configuration error, so say so before spawning anything.
    """
    if not device.startswith("cuda"):
        return
    base = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if base + world > count:
        raise EngineError(
            f"data_parallel={world} on device {device!r} needs one GPU per rank (cuda:{base}..cuda:{base + world - 1}), "
            f"but torch sees {count} GPU(s); lower trainer.engine.data_parallel or pick another device"
        )


def _ready_key(rank: int) -> str:
    return f"asyncflow-data-parallel/ready/{rank}"


def _ready_then_group(backend: str, store: dist.TCPStore, world: int, timeout: timedelta, use_default: bool) -> _Group:
    """Rank 0's side of the group, created once every worker is about to create its own.

    The group's connection handshake waits only `timeout` (the per-call timeout, seconds in
    tests) for the peers, while a worker's spawn and imports can take longer (a CUDA build of
    torch loads its libraries first); the store's own wait runs under the start-up timeout.
    """
    if world > 1:
        store.wait([_ready_key(rank) for rank in range(1, world)])
    return _Group(backend, store, 0, world, timeout, use_default)


def _group_count() -> int | None:
    return getattr(getattr(dist.distributed_c10d, "_world", None), "group_count", None)


def _set_group_count(count: int | None) -> None:
    """Make this process name its next default group as rank 0 will.

    torch names the default group after a per-process counter and prefixes the group's store
    keys with that name; a fresh worker counts from 0, but rank 0's counter stays raised after
    a failed init_process_group, and then the ranks would wait on different keys forever.
    """
    world = getattr(dist.distributed_c10d, "_world", None)
    if count is not None and world is not None and hasattr(world, "group_count"):
        world.group_count = count


class _Group:
    """The ranks' process group: torch's default group, or a private one when this process already
    has a default group (a second data-parallel engine in the same process)."""

    def __init__(self, backend: str, store: dist.Store, rank: int, world: int, timeout: timedelta,
                 use_default: bool) -> None:
        self.use_default = use_default
        self.pg: Any = None
        if use_default:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
            return
        prefixed = dist.PrefixStore("asyncflow-data-parallel", store)
        if backend == "nccl":
            from torch.distributed import ProcessGroupNCCL  # only in CUDA builds of torch

            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = ProcessGroupNCCL(prefixed, rank, world, options)
        else:
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world, timeout)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        if self.use_default:
            dist.all_reduce(tensor)
        else:
            self.pg.allreduce([tensor]).wait()

    def destroy(self) -> None:
        if self.use_default and dist.is_initialized():
            dist.destroy_process_group()
        elif self.pg is not None and hasattr(self.pg, "shutdown"):
            with contextlib.suppress(RuntimeError):  # broken by a dead peer: nothing to release
                self.pg.shutdown()
        self.pg = None


# --------------------------------------------------------------------------------- gradients
def trainable_parameters(engine: TrainingEngine) -> list[torch.nn.Parameter]:
    """The parameters whose gradients ranks must sum, in a rank-independent order.

    The TrainingEngine ABC does not expose parameters, so this takes `engine.parameters()` when
    the engine defines it, else the parameters of `engine.model` (a module or a list of them, as
    Megatron's model chunks are).
    """
    source = getattr(engine, "parameters", None)
    if callable(source):
        params = list(source())
    else:
        model = getattr(engine, "model", None)
        modules = list(model) if isinstance(model, list | tuple | torch.nn.ModuleList) else [model]
        if not modules or not all(isinstance(m, torch.nn.Module) for m in modules):
            raise EngineError(
                f"data_parallel needs {type(engine).__name__} to expose its torch modules as `.model` "
                "or a `parameters()` method, to sum gradients across ranks"
            )
        params = [p for m in modules for p in m.parameters()]
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:  # a tied weight is one tensor, summed once
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def all_reduce_gradients(params: Sequence[torch.nn.Parameter], group: _Group) -> None:
    """Sum every parameter's accumulated `.grad` over the ranks, in place.

    A rank whose shard never touched a parameter (an empty shard) has `grad` None; it takes part
    with zeros so that every rank runs the same collectives. A parameter no rank has a gradient
    for stays None everywhere, so the optimizer skips it exactly as a single process would.
    """
    if not params:
        return
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    group.all_reduce_sum(present)
    chosen = [p for p, flag in zip(params, present.tolist(), strict=True) if flag > 0]
    buckets: dict[tuple[torch.dtype, torch.device], list[list[torch.nn.Parameter]]] = {}
    for p in chosen:
        dtype = p.grad.dtype if p.grad is not None else p.dtype
        lists = buckets.setdefault((dtype, p.device), [[]])
        if lists[-1] and sum(q.numel() for q in lists[-1]) + p.numel() > _BUCKET_ELEMENTS:
            lists.append([])
        lists[-1].append(p)
    for (dtype, bucket_device), lists in buckets.items():
        # Sum half-precision gradients in float32: N-way bf16 additions would lose what one
        # process's accumulation keeps.
        reduce_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        for bucket in lists:
            flat = torch.zeros(sum(p.numel() for p in bucket), dtype=reduce_dtype, device=bucket_device)
            offset = 0
            for p in bucket:
                if p.grad is not None:
                    flat[offset : offset + p.numel()].copy_(p.grad.reshape(-1))
                offset += p.numel()
            group.all_reduce_sum(flat)
            offset = 0
            for p in bucket:
                piece = flat[offset : offset + p.numel()].view(p.shape)
                if p.grad is None:
                    p.grad = piece.to(dtype=dtype, copy=True)
                else:
                    p.grad.copy_(piece)
                offset += p.numel()


def _synced_step(
    replica: TrainingEngine, params: Sequence[torch.nn.Parameter], group: _Group, grad_scale: float
) -> dict[str, float]:
    all_reduce_gradients(params, group)
    return replica.optimizer_step(grad_scale)


# ------------------------------------------------------------------------------------ workers
@dataclass(frozen=True)
class _WorkerInit:
    settings: TrainingEngineSettings
    model_path: Path
    temperature: float
    dtype: str
    seed: int
    world: int
    store_port: int
    use_default_group: bool
    timeout_s: float
    parent_pid: int
    num_threads: int
    group_count: int | None


def _replica_settings(settings: TrainingEngineSettings, rank: int) -> TrainingEngineSettings:
    return settings.model_copy(update={"data_parallel": 1, "device": _rank_device(settings.device, rank)})


def _watch_parent(parent_pid: int) -> None:
    # A worker stuck in compute never reads its pipe's EOF; this makes it die with its parent anyway.
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_CHECK_S)
    os._exit(1)


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _worker_main(rank: int, init: _WorkerInit, conn: Connection) -> None:
    """A rank ≥ 1: join the group, build the replica, then serve commands until told to close."""
    threading.Thread(target=_watch_parent, args=(init.parent_pid,), daemon=True).start()
    torch.set_num_threads(init.num_threads)
    group: _Group | None = None
    try:
        settings = _replica_settings(init.settings, rank)
        if settings.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(settings.device))
        timeout = timedelta(seconds=init.timeout_s)
        store = dist.TCPStore("127.0.0.1", init.store_port, init.world, is_master=False, timeout=timeout)
        if init.use_default_group:
            _set_group_count(init.group_count)
        store.set(_ready_key(rank), "1")  # rank 0 creates its side of the group only once all are here
        group = _Group(_backend(settings.device), store, rank, init.world, timeout, init.use_default_group)
        replica = _make_replica(init, settings)
        params = trainable_parameters(replica)
        _send(conn, ("ok", 0, _signature(params)))
    except BaseException:
        _reply_error(conn, 0)
        return
    try:
        while True:
            try:
                command, seq, *args = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return  # rank 0 is gone
            if command == "close":
                _send(conn, ("ok", seq, None))
                return
            try:
                if command == "forward_backward":
                    result: Any = replica.forward_backward(*args)
                elif command == "optimizer_step":
                    result = _synced_step(replica, params, group, *args)
                elif command == "compute_logprobs":
                    result = replica.compute_logprobs(*args)
                elif command == "discard_gradients":
                    result = replica.discard_gradients()
                elif command == "load_training_state":
                    result = replica.load_training_state(*args)
                else:
                    raise EngineError(f"unknown data-parallel command {command!r}")
                _send(conn, ("ok", seq, result))
            except (EOFError, OSError):
                return
            except BaseException:
                _reply_error(conn, seq)
    finally:
        group.destroy()


def _reply_error(conn: Connection, seq: int) -> None:
    with contextlib.suppress(OSError, ValueError):  # rank 0 is gone: nobody to tell
        _send(conn, ("error", seq, traceback.format_exc()))


def _make_replica(init: _WorkerInit, settings: TrainingEngineSettings) -> TrainingEngine:
    from asyncflow.engines import make_local_training_engine  # the package imports this module lazily

    return make_local_training_engine(
        settings, init.model_path, temperature=init.temperature, dtype=init.dtype, seed=init.seed
    )


def _signature(params: Sequence[torch.nn.Parameter]) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in params]


@dataclass
class _Worker:
    rank: int
    process: Any  # torch.multiprocessing's SpawnProcess
    conn: Connection


# ------------------------------------------------------------------------------------- engine
class DataParallelTrainingEngine(TrainingEngine):
    """N replicas of the configured training engine, one per process; see the module docstring."""

    def __init__(
        self,
        settings: TrainingEngineSettings,
        model_path: Path,
        *,
        temperature: float = 1.0,
        dtype: str = "float32",
        seed: int = 0,
        init_timeout_s: float = 600.0,
        timeout_s: float = 1800.0,
    ) -> None:
        """Start ranks 1..N-1, join the group, build every replica; raises EngineError on failure.

        `init_timeout_s` bounds start-up (spawn, group, model load); `timeout_s` bounds each call
        and each collective. Both only matter for a live but stuck rank: a dead one is noticed
        within about `_POLL_S`.
        """
        _check_gpus(settings.device, settings.data_parallel)
        self.world = settings.data_parallel
        self.settings = settings
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._seq = 0
        self._workers: list[_Worker] = []
        self._group: _Group | None = None
        self._broken: str | None = None
        self._closed = False
        self._atexit = functools.partial(_close_weakly, weakref.ref(self))
        atexit.register(self._atexit)
        backend = _backend(settings.device)
        timeout = timedelta(seconds=timeout_s)
        # Rank 0 hosts the rendezvous store on a port the OS picks: no free-port race.
        self._store = dist.TCPStore(
            "127.0.0.1", 0, self.world, is_master=True, timeout=timedelta(seconds=init_timeout_s),
            wait_for_workers=False,
        )
        use_default = not dist.is_initialized()
        init = _WorkerInit(
            settings=settings, model_path=Path(model_path), temperature=temperature, dtype=dtype, seed=seed,
            world=self.world, store_port=self._store.port, use_default_group=use_default,
            timeout_s=timeout_s, parent_pid=os.getpid(), num_threads=torch.get_num_threads(),
            group_count=_group_count(),
        )
        try:
            context = mp.get_context("spawn")
            for rank in range(1, self.world):
                parent_end, child_end = context.Pipe()
                process = context.Process(
                    target=_worker_main, args=(rank, init, child_end), daemon=True,
                    name=f"asyncflow-dp-rank{rank}",
                )
                process.start()
                child_end.close()  # only the worker holds it now, so its death reads as EOF here
                self._workers.append(_Worker(rank, process, parent_end))
            deadline = time.monotonic() + init_timeout_s
            stash: dict[int, Any] = {}
            store = self._store
            self._group = self._watched(
                "start-up", lambda: _ready_then_group(backend, store, self.world, timeout, use_default),
                0, deadline, self._workers, stash,
            )
            self._replica = _make_replica(init, _replica_settings(settings, 0))
            self._params = trainable_parameters(self._replica)
            signatures = self._gather(0, "start-up", deadline, self._workers, stash)
        except BaseException:
            self._broken = "start-up failed"
            self.close()
            raise
        mine = _signature(self._params)
        for worker, theirs in zip(self._workers, signatures, strict=True):
            if [tuple(s) for s in theirs] != mine:
                self.close()
                raise EngineError(
                    f"data-parallel rank {worker.rank} built a model with different parameters than rank 0 "
                    f"({len(theirs)} vs {len(mine)} tensors); the replicas must be identical"
                )

    # ------------------------------------------------------------------------------ training
    def forward_backward(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        n = len(batch)
        for name in ("response_ids", "behaviour_logprobs", "advantages"):
            if len(getattr(batch, name)) != n:
                raise EngineError(f"TrainBatch.{name} has {len(getattr(batch, name))} entries, prompt_ids {n}")
        if batch.ref_logprobs is not None and len(batch.ref_logprobs) != n:
            raise EngineError(f"TrainBatch.ref_logprobs has {len(batch.ref_logprobs)} entries, prompt_ids {n}")
        try:
            pickle.dumps(loss_fn)
        except Exception as error:
            raise EngineError(
                f"data_parallel sends loss_fn to every rank, so it must be picklable (a module-level "
                f"function or functools.partial of one): {error}"
            ) from error
        bounds = shard_bounds(_sequence_sizes(batch.prompt_ids, batch.response_ids), self.world)
        shards = [_slice_batch(batch, start, end) for start, end in bounds]
        results = self._run(
            "forward_backward",
            [(shard, loss_fn) if len(shard) else None for shard in shards],
            lambda shard, fn: self._replica.forward_backward(shard, fn),
        )
        return combine_stats([r for r in results if r is not None])

    def optimizer_step(self, grad_scale: float) -> dict[str, float]:
        # Every rank must join the all-reduce, so every rank gets the command (no empty skip).
        results = self._run(
            "optimizer_step",
            [(grad_scale,)] * self.world,
            lambda scale: _synced_step(self._replica, self._params, self._group, scale),
            collective=True,
        )
        return results[0]

    def discard_gradients(self) -> None:
        self._run("discard_gradients", [()] * self.world, lambda: self._replica.discard_gradients())

    def training_state(self) -> dict[str, Any]:
        # Every rank stepped on the same summed gradient, so rank 0's optimizer state is everyone's.
        self._check_usable()
        return self._replica.training_state()

    def load_training_state(self, state: dict[str, Any]) -> None:
        self._run("load_training_state", [(state,)] * self.world, lambda s: self._replica.load_training_state(s))

    def compute_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        if len(prompt_ids) != len(response_ids):
            raise EngineError(f"compute_logprobs: {len(prompt_ids)} prompts but {len(response_ids)} responses")
        bounds = shard_bounds(_sequence_sizes(prompt_ids, response_ids), self.world)
        results = self._run(
            "compute_logprobs",
            [(prompt_ids[s:e], response_ids[s:e]) if e > s else None for s, e in bounds],
            lambda prompts, responses: self._replica.compute_logprobs(prompts, responses),
        )
        return [row for part in results if part is not None for row in part]

    # ------------------------------------------------------------------------------- weights
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._check_usable()
        yield from self._replica.export_weights()

    def save_pretrained(self, path: Path) -> None:
        self._check_usable()
        self._replica.save_pretrained(path)

    # ---------------------------------------------------------------------------- lifecycle
    @property
    def worker_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1 (for monitoring and tests)."""
        return [w.process.pid for w in self._workers]

    def close(self) -> None:
        """Stop the workers (politely, then by signal) and leave the process group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        if self._broken is None:
            self._seq += 1
            for worker in self._workers:
                with contextlib.suppress(OSError, ValueError):
                    _send(worker.conn, ("close", self._seq))
        # A broken group may hold a worker inside a collective: no point waiting for it.
        grace = _CLOSE_GRACE_S if self._broken is None else 0.0
        deadline = time.monotonic() + grace
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            if worker.process.is_alive() and self._broken is None:
                worker.process.terminate()
                worker.process.join(2.0)
            if worker.process.is_alive():  # SIGKILL also ends a stopped (SIGSTOP) process
                worker.process.kill()
                worker.process.join(2.0)
            worker.conn.close()
        if self._group is not None:
            self._group.destroy()
            self._group = None
        self._store = None

    def __enter__(self) -> DataParallelTrainingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):  # closed, or __init__ failed before any state existed
            return
        # Not contextlib.suppress: at interpreter shutdown module globals may already be None.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------ plumbing
    def _check_usable(self) -> None:
        if self._closed:
            raise EngineError("data-parallel engine is closed")
        if self._broken is not None:
            raise EngineError(f"data-parallel engine is broken ({self._broken}); restart the trainer")

    def _break(self, reason: str) -> EngineError:
        self._broken = reason
        return EngineError(reason)

    def _run(
        self,
        command: str,
        shard_args: list[tuple[Any, ...] | None],
        local: Callable[..., Any],
        *,
        collective: bool = False,
    ) -> list[Any]:
        """Send each worker its args, run rank 0's share here, return the results in rank order.

        A None entry means an empty shard: that rank is skipped. A collective runs on a watched
        thread so that a worker dying mid-collective is reported instead of waited out.
        """
        with self._lock:
            self._check_usable()
            self._check_alive(command)
            self._seq += 1
            seq = self._seq
            deadline = time.monotonic() + self.timeout_s
            sent: list[_Worker] = []
            for worker, args in zip(self._workers, shard_args[1:], strict=True):
                if args is None:
                    continue
                try:
                    _send(worker.conn, (command, seq, *args))
                except (OSError, ValueError) as error:
                    raise self._break(self._death_message(worker, command, f"its pipe failed: {error}")) from None
                sent.append(worker)
            stash: dict[int, Any] = {}
            mine: Any = None
            local_error: Exception | None = None
            if shard_args[0] is not None:
                args0 = shard_args[0]
                if collective:
                    mine = self._watched(command, lambda: local(*args0), seq, deadline, sent, stash)
                else:
                    try:
                        mine = local(*args0)
                    except Exception as error:
                        local_error = error
            # Always drain the workers' replies, even after a local error: a reply left in a pipe
            # would be read as the answer to the next command.
            replies = self._gather(seq, command, deadline, sent, stash)
            if local_error is not None:
                raise local_error
            by_rank = {w.rank: r for w, r in zip(sent, replies, strict=True)}
            return [mine] + [by_rank.get(w.rank) for w in self._workers]

    def _watched(
        self,
        what: str,
        fn: Callable[[], Any],
        seq: int,
        deadline: float,
        workers: Sequence[_Worker],
        stash: dict[int, Any],
    ) -> Any:
        """Run fn (a collective) on a daemon thread while watching the workers; raise as soon as
        one fails. Any failure breaks the engine: the peers may be left inside the collective."""
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as error:
                outcome["error"] = error

        thread = threading.Thread(target=target, daemon=True, name=f"asyncflow-dp-{what}")
        thread.start()
        while True:
            thread.join(_POLL_S)
            if not thread.is_alive():
                break
            self._poll(seq, what, workers, stash)
            if time.monotonic() > deadline:
                raise self._break(f"data-parallel rank 0 timed out {what}{self._silent(workers, stash)}")
        if "error" in outcome:
            # A collective fails on rank 0 when a peer dies (gloo: "connection closed"); give the
            # peer a moment to show up as dead so the error can name it.
            settle = time.monotonic() + 2.0
            while time.monotonic() < settle:
                self._poll(seq, what, workers, stash)
                time.sleep(_POLL_S)
            error = outcome["error"]
            raise self._break(
                f"data-parallel rank 0 failed {what}{self._silent(workers, stash)}: {type(error).__name__}: {error}"
            ) from error
        return outcome.get("value")

    @staticmethod
    def _silent(workers: Sequence[_Worker], stash: dict[int, Any]) -> str:
        """Which ranks have not answered yet: the suspects when a collective stalls or fails."""
        waiting = [w.rank for w in workers if w.rank not in stash]
        return f" (no answer yet from rank(s) {waiting})" if waiting else ""

    def _poll(self, seq: int, what: str, workers: Sequence[_Worker], stash: dict[int, Any]) -> None:
        """Move any reply that has arrived into `stash`; raise if a worker died, or failed in a way
        that leaves the group unusable (start-up, a collective)."""
        for worker in workers:
            if worker.rank in stash:
                continue
            try:
                if worker.conn.poll():
                    status, reply_seq, value = pickle.loads(worker.conn.recv_bytes())
                    if reply_seq != seq:
                        raise self._break(
                            f"data-parallel rank {worker.rank} answered request {reply_seq} during {what} "
                            f"(expected {seq}); the ranks are out of step"
                        )
                    if status == "error":
                        message = f"data-parallel rank {worker.rank} failed {what}:\n{value}"
                        if seq == 0 or what == "optimizer_step":
                            raise self._break(message)
                        stash[worker.rank] = EngineError(message)
                    else:
                        stash[worker.rank] = ("ok", value)
                    continue
            except (EOFError, OSError):
                raise self._break(self._death_message(worker, what, "its pipe closed")) from None
            if not worker.process.is_alive():
                raise self._break(self._death_message(worker, what, "it exited"))

    def _gather(
        self, seq: int, what: str, deadline: float, workers: Sequence[_Worker], stash: dict[int, Any]
    ) -> list[Any]:
        """Wait for the reply of every worker in `workers`; return the values in their order."""
        while True:
            self._poll(seq, what, workers, stash)
            if all(w.rank in stash for w in workers):
                break
            if time.monotonic() > deadline:
                waiting = [w.rank for w in workers if w.rank not in stash]
                raise self._break(f"data-parallel rank(s) {waiting} did not answer {what} in time")
            time.sleep(_POLL_S / 5)
        out = []
        for worker in workers:
            reply = stash[worker.rank]
            if isinstance(reply, EngineError):
                raise reply
            out.append(reply[1])
        return out

    def _check_alive(self, what: str) -> None:
        for worker in self._workers:
            if not worker.process.is_alive():
                raise self._break(self._death_message(worker, what, "it exited"))

    @staticmethod
    def _death_message(worker: _Worker, what: str, how: str) -> str:
        worker.process.join(0.5)  # let the exit code settle
        return (
            f"data-parallel rank {worker.rank} (pid {worker.process.pid}) died during {what}: {how} "
            f"(exit code {worker.process.exitcode}); see its output in the trainer's log"
        )


def _close_weakly(ref: weakref.ref[DataParallelTrainingEngine]) -> None:
    engine = ref()
    if engine is not None:
        engine.close()
