"""Trainer checkpoints and what `asyncflow run --resume RUN_DIR` needs to continue from one.

A checkpoint is `<run_dir>/checkpoints/step-<N>/`, written by the trainer after optimizer step
N − 1 (N steps done, so its weights are policy version N and partition N trains next):

    config.json, model.safetensors, tokenizer files   the model as an HF folder (the engine's
                                                      `save_pretrained`): transformers and vLLM load it
    trainer_state.pt   {"format", "training": the engine's `training_state()` (optimizer moments
                       and step counts), "rng": torch / numpy / python RNG states}; plain tensors,
                       lists and numbers only, so it loads with `torch.load(weights_only=True)`
    checkpoint.json    step, policy_version, next_partition, consumed sample ids (as [start, end)
                       runs, `asyncflow.id_runs`) and their count, run name and seed, when it was
                       written

It is written under `checkpoints/.tmp-step-<N>-<pid>/`, fsynced and renamed into place, and
`checkpoint.json` is written last: a kill at any moment leaves either no `step-<N>` or a complete
one. Old checkpoints are renamed to `.trash-…` before they are deleted, for the same reason.

Resuming (the launcher) keeps the run's records of steps below N, drops those of later steps
(they will be trained again), and starts every actor from the checkpoint: `initial_policy`
tells rollout, trainer, scheduler and param-sync where the starting weights are and which policy
version they are.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncflow.config import Config
from asyncflow.errors import AsyncFlowError
from asyncflow.id_runs import IdRuns

if TYPE_CHECKING:
    from asyncflow.engines.base import TrainingEngine

# torch is imported inside the functions that need it: the launcher reads checkpoints to resume
# and should not pay torch's seconds of import time for that.

FORMAT = 1
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
META_FILE = "checkpoint.json"
RECORDS = ("trainer/trained_samples.jsonl", "trainer/failed_samples.jsonl", "metrics.jsonl")
"""Run-directory files with one JSON line per sample or step, each with a "step" field: on resume
the lines of steps at or past the checkpoint are dropped (those steps are trained again)."""
# Files that describe the model but not its weights. An engine that saves no tokenizer or config
# (the simulated engine, a custom one) still leaves a folder rollout engines can start from.
_MODEL_METADATA = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


class CheckpointError(AsyncFlowError):
    """A checkpoint is missing, incomplete or cannot be written or read."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk."""

    path: Path
    step: int
    """Optimizer steps done: the policy version of its weights and the partition trained next."""
    meta: dict[str, Any]

    @property
    def consumed_sample_ids(self) -> IdRuns:
        """The sample ids trained by then, as the runs they are stored as (never one int per id)."""
        return IdRuns.from_runs(self.meta["consumed_sample_ids"])

    def load_state(self) -> dict[str, Any]:
        """trainer_state.pt: {"format", "training", "rng"}."""
        import torch

        try:
            return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(self.path / STATE_FILE, f"cannot be read: {type(error).__name__}: {error}") from error


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at `path`, checked for completeness."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(path, f"no readable {META_FILE}, so not a complete checkpoint ({error})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, f"checkpoint format {meta.get('format')!r}; this version reads {FORMAT}")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(path, f"{STATE_FILE} is missing")
    return Checkpoint(path, int(meta["step"]), meta)


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first (temporary and half-deleted folders are skipped)."""
    found = []
    root = checkpoints_dir(run_dir)
    for path in root.glob("step-*") if root.is_dir() else []:
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError:
            continue
        if path.name == f"step-{checkpoint.step}":
            found.append(checkpoint)
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> Checkpoint:
    """The newest complete checkpoint of a run; CheckpointError naming the folder if there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(checkpoints_dir(run_dir), "no complete checkpoint to resume from "
                              "(checkpoints are written only with trainer.checkpoint_every > 0)")
    return found[-1]


def initial_policy(config: Config) -> tuple[Path, int]:
    """Where engines load the starting weights from, and which policy version those are:
    (model.path, 0) for a new run, (the checkpoint folder, N) for a run resumed from step-N."""
    if config.run.resume_from is None:
        return config.model.path, 0
    return config.run.resume_from, read_checkpoint(config.run.resume_from).step


def resume_checkpoint(config: Config) -> Checkpoint | None:
    """The checkpoint this run continues from, or None for a new run."""
    return None if config.run.resume_from is None else read_checkpoint(config.run.resume_from)


# ------------------------------------------------------------------------------------- writing
def rng_state() -> dict[str, Any]:
    """The process's torch, CUDA, numpy and python RNG states, as tensors and plain lists."""
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what `rng_state` captured."""
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(config: Config, step: int, engine: TrainingEngine, consumed: AbstractSet[int]) -> Checkpoint:
    """Write `checkpoints/step-<step>` atomically (blocking) and delete checkpoints past
    `trainer.keep_checkpoints`, never the one this run resumed from. `step` = optimizer steps done;
    `consumed` = the sample ids trained so far (an `IdRuns`, or any set of ints)."""
    import torch

    # Stored as [start, end) runs: consumed ids are dense, so there are about as many as failed samples.
    runs = consumed if isinstance(consumed, IdRuns) else IdRuns(sorted(consumed))

    root = checkpoints_dir(config.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        engine.save_pretrained(tmp)
        for name in _MODEL_METADATA:
            source = config.model.path / name
            if source.is_file() and not (tmp / name).exists():
                shutil.copy2(source, tmp / name)
        torch.save({"format": FORMAT, "training": engine.training_state(), "rng": rng_state()}, tmp / STATE_FILE)
        meta = {
            "format": FORMAT, "step": step, "policy_version": step, "next_partition": step,
            "run": config.run.name, "seed": config.run.seed, "steps": config.run.steps,
            "consumed_sample_ids": runs.runs(), "consumed_samples": len(runs), "written_at": time.time(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta) + "\n")  # last: its presence marks completeness
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        _fsync(tmp)
        if final.exists():  # the same step written again after a resume from an older checkpoint
            _discard(final)
        os.rename(tmp, final)
        _fsync(root)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, AsyncFlowError | OSError | RuntimeError):
            raise CheckpointError(final, f"writing the checkpoint failed: {type(error).__name__}: {error}") from error
        raise
    _rotate(config)
    return read_checkpoint(final)


def _discard(path: Path) -> None:
    """Rename first, then delete: a kill mid-delete never leaves a damaged folder that looks complete."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _rotate(config: Config) -> None:
    keep = config.trainer.keep_checkpoints
    if keep == 0:
        return
    protected = config.run.resume_from.resolve() if config.run.resume_from else None
    old = [c for c in list_checkpoints(config.run_dir)[:-keep] if c.path.resolve() != protected]
    for checkpoint in old:
        _discard(checkpoint.path)


# ------------------------------------------------------------------------------------ resuming
def prepare_resume(run_dir: Path, checkpoint: Checkpoint) -> dict[str, int]:
    """Make a run directory ready to continue from `checkpoint`: drop leftovers of the killed run
    (broker state, store addresses, the final model, half-written checkpoints) and the record lines
    of steps ≥ checkpoint.step. Returns how many record lines each file kept."""
    run_dir = Path(run_dir)
    for name in ("nats", "stores", "final"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("summary.json", "actors.json", "services.json", "report.png", "report.html", "report.json"):
        (run_dir / name).unlink(missing_ok=True)
    for leftover in [*checkpoints_dir(run_dir).glob(".tmp-*"), *checkpoints_dir(run_dir).glob(".trash-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return {name: truncate_records(run_dir / name, checkpoint.step) for name in RECORDS}


def truncate_records(path: Path, step: int) -> int:
    """Keep the JSON lines of `path` whose "step" is below `step` (atomically); a torn last line
    from a kill mid-write is dropped. Returns the lines kept."""
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] < step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(kept)
