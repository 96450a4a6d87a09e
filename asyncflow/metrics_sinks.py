"""Where the launcher's per-step metrics go besides `metrics.jsonl`: TensorBoard and Weights & Biases.

The monitor hands every metrics.jsonl row to `MetricsSinks.write`. Each numeric field becomes a
scalar at the row's optimizer step under the row's own key (`reward_mean`, `loss`, `samples_per_s`,
`staleness_max`, ...); a nested mapping is flattened with `/` (`busy_s/rollout`). None (a step
without rewards) and non-numbers are left out.

- TensorBoard (`run.tensorboard`, on by default): event files in `<run_dir>/tensorboard/`, written
  with `torch.utils.tensorboard.SummaryWriter` and flushed every step, so a failed run keeps them.
  A resumed run purges the killed part's events from its checkpoint's step on, so no step shows twice.
- Weights & Biases (`wandb.enabled`, off by default): `wandb` is not a dependency; `check_sinks`
  raises ConfigError when it is enabled but not importable, before the run starts anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import numbers
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from asyncflow.checkpoint import read_checkpoint
from asyncflow.config import Config
from asyncflow.errors import ConfigError
from asyncflow.logs import get_logger

TENSORBOARD_DIR = "tensorboard"
"""Sub-folder of the run directory holding the TensorBoard event files."""


def scalars(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric fields of a metrics row, nested mappings flattened as `key/sub`; the step
    itself, None values, booleans and strings are left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, prefix=f"{name}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and name != "step":
            out[name] = float(value)
    return out


def check_sinks(config: Config) -> None:
    """Fail fast on a sink that is configured but cannot work: wandb enabled and not installed."""
    if config.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb.enabled is true but the `wandb` package is not installed: `pip install wandb`, "
                          "or set wandb.enabled: false (metrics still go to metrics.jsonl and TensorBoard)")


def resumed_step(config: Config) -> int | None:
    """The step a resumed run starts at (its checkpoint's), None for a run from the start."""
    if config.run.resume_from is None:
        return None
    return read_checkpoint(config.run.resume_from).step


class MetricsSinks:
    """TensorBoard and wandb writers of one run; a context manager that closes (flushes) them."""

    def __init__(self, config: Config) -> None:
        check_sinks(config)
        self.run_dir = config.run_dir
        self.log = get_logger(run=config.run.name, actor="launcher", stage="metrics")
        self.tensorboard: Any = None
        self.wandb_run: Any = None
        if config.run.tensorboard:
            # Imported here: torch's import costs seconds, and a run with TensorBoard off never pays it.
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run writes the steps from its checkpoint on again: purge_step tells TensorBoard
            # to drop what the killed part wrote at those steps, so each step shows once.
            self.tensorboard = SummaryWriter(log_dir=str(self.tensorboard_dir), flush_secs=30,
                                             purge_step=resumed_step(config))
        if config.wandb.enabled:
            wandb = importlib.import_module("wandb")
            settings = config.wandb
            # The JSON dump carries no secret: SecretStr fields serialize to null (config.py).
            self.wandb_run = wandb.init(
                project=settings.project, entity=settings.entity, mode=settings.mode,
                name=settings.run_name or config.run.name, tags=list(settings.tags),
                dir=str(config.run_dir), config=config.model_dump(mode="json"),
            )

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / TENSORBOARD_DIR

    def write(self, row: Mapping[str, Any]) -> None:
        """One metrics.jsonl row: every scalar at the row's step.

        A sink that fails (disk full, wandb's service gone) is logged and switched off for the rest
        of the run: metrics.jsonl, which the monitor wrote first, stays the record, and the run goes on.
        """
        step = int(row["step"])
        values = scalars(row)
        if self.tensorboard is not None:
            try:
                for name, value in values.items():
                    self.tensorboard.add_scalar(name, value, global_step=step)
                self.tensorboard.flush()  # a step is seconds apart at least: flushing each costs nothing
            except Exception as error:
                self._drop("tensorboard", error, step)
                self.tensorboard = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(values, step=step)
            except Exception as error:
                self._drop("wandb", error, step)
                self.wandb_run = None

    def _drop(self, sink: str, error: Exception, step: int) -> None:
        self.log.error("metrics sink failed; not written to for the rest of the run", sink=sink, step=step,
                       where=str(self.tensorboard_dir) if sink == "tensorboard" else "wandb",
                       error=f"{type(error).__name__}: {error}")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> MetricsSinks:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
