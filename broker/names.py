"""Subject, stream, consumer and bucket names of a run: an interface users inspect with the NATS CLI.

| name                      | what                                                        |
|---------------------------|-------------------------------------------------------------|
| af.<run>.work.<stage>     | work items, stream AF_<RUN>_WORK (work-queue retention)     |
| af.<run>.done.<stage>     | stage outputs, stream AF_<RUN>_EVENTS (replayable)          |
| af.<run>.weights          | policy versions, stream AF_<RUN>_EVENTS                     |
| af.<run>.weights.lost     | announced versions found gone from the stores (core NATS)   |
| af.<run>.dead.<stage>     | dead-lettered work items, stream AF_<RUN>_EVENTS            |
| af.<run>.lost.<stage>     | items whose input chunks a store lost, AF_<RUN>_EVENTS      |
| af.<run>.metrics.<actor>  | busy spans (core NATS)                                      |
| af.<run>.control          | run-wide commands such as stop (core NATS)                  |
| af.<run>.svc.<actor>.*    | the actor's micro service endpoints `stats`, `health`       |
| asyncflow-<role>          | micro service name of every actor (`nats micro ls`)         |
| AF_<RUN>                  | KV bucket: config, stores, policy version, actors, progress |

AF_<RUN>_EVENTS is compacted as partitions are trained (actors/scheduler.py): it holds about the
events of the partitions in flight, not the run's whole history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Keys of the run's KV bucket.
KV_STORES = "stores"
"""JSON list of the Flight store locations actors should use."""
KV_CONFIG = "config"
"""The resolved run config (JSON)."""
KV_POLICY_VERSION = "policy_version"
"""Newest announced policy version."""
KV_PROGRESS = "progress"
"""Last trained step, as JSON (`{"step": S, "trained": N}`): the scheduler writes it once the step's
partition is dropped, and before compaction purges any event of it, so it is what a restarted
scheduler knows of the steps whose events are gone."""
KV_EVENTS_COMPACTION = "events_compaction"
"""Where the EVENTS stream was last compacted, as JSON (`purged_below_seq`: every event below it but
dead letters is purged; `dead_letters_purged_below_seq`; `through_step`: the newest step recorded then)."""

_RUN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class RunNames:
    run: str

    def __post_init__(self) -> None:
        if not _RUN.match(self.run):
            raise ValueError(f"run name {self.run!r} must match {_RUN.pattern} (it becomes a subject token)")

    @property
    def prefix(self) -> str:
        return f"af.{self.run}"

    def work(self, stage: str) -> str:
        return f"{self.prefix}.work.{stage}"

    def done(self, stage: str) -> str:
        return f"{self.prefix}.done.{stage}"

    def dead(self, stage: str) -> str:
        return f"{self.prefix}.dead.{stage}"

    def lost(self, stage: str) -> str:
        """Work items of `stage` whose input chunks were lost with a store (wire.LostEvent)."""
        return f"{self.prefix}.lost.{stage}"

    @property
    def weights(self) -> str:
        return f"{self.prefix}.weights"

    @property
    def weights_lost(self) -> str:
        """Reports of an announced policy version gone from the stores (wire.WeightsLostEvent), to the
        trainer, which re-puts it. Core NATS: a reporter sends again while it waits."""
        return f"{self.prefix}.weights.lost"

    def metrics(self, actor: str) -> str:
        return f"{self.prefix}.metrics.{actor}"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    @property
    def work_stream(self) -> str:
        return f"AF_{self.run.upper()}_WORK"

    @property
    def events_stream(self) -> str:
        return f"AF_{self.run.upper()}_EVENTS"

    @property
    def events_subjects(self) -> tuple[str, ...]:
        """The subjects stream AF_<RUN>_EVENTS stores."""
        return (self.done(">"), self.weights, self.dead(">"), self.lost(">"))

    @property
    def kv_bucket(self) -> str:
        return f"AF_{self.run.upper()}"

    @staticmethod
    def consumer(stage: str) -> str:
        """Durable pull consumer shared by every instance of a stage."""
        return stage
