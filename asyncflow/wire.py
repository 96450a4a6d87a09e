"""Every message that travels over NATS, as one typed schema each.

Messages are JSON (readable with `nats sub 'af.>'`) and small: they say *where* data is
(Flight keys and locations), never carry the data itself. `decode` turns any bad payload into
a `WireError` naming the subject, so a hostile or truncated message is rejected, not crashed on,
and counts it in `REJECTED` (per subject kind), which actors report in their stats and final log.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from asyncflow.errors import WireError

MAX_MESSAGE_BYTES = 256 * 1024
"""Control messages stay far below NATS' 1 MiB payload limit; bulk data goes through Flight."""


class Message(BaseModel):
    # No NaN / Infinity: a JSON NaN literal would otherwise parse, and pydantic writes non-finite
    # floats as null, which no reader could decode: refused when built, never half-sent.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def encode(self) -> bytes:
        payload = self.model_dump_json().encode()
        if len(payload) > MAX_MESSAGE_BYTES:
            raise WireError(type(self).__name__, f"{len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
        return payload


M = TypeVar("M", bound=Message)


REJECTED: Counter[str] = Counter()
"""Messages `decode` refused in this process, by `subject_kind`. Counted here, not by each consumer,
because every consumer of every subject decodes through `decode`: none can forget to count."""
_MAX_KINDS = 64  # distinct kinds kept; a flood of made-up subjects counts under "other"


def subject_kind(subject: str) -> str:
    """What a rejection is counted under: `af.<run>.work.rollout` → `work.rollout`, `af.<run>.weights`
    → `weights`, `af.<run>.metrics.<actor>` → `metrics`; other names → their first two tokens."""
    tokens = subject.split(".")
    if len(tokens) >= 3 and tokens[0] == "af":
        rest = tokens[2:]
        return rest[0] if rest[0] in ("metrics", "svc") else ".".join(rest[:2])
    return ".".join(tokens[:2])[:64]


def _rejected(subject: str, reason: str) -> WireError:
    kind = subject_kind(subject)
    if kind not in REJECTED and len(REJECTED) >= _MAX_KINDS:
        kind = "other"
    REJECTED[kind] += 1
    return WireError(subject, reason)


def decode(kind: type[M], payload: bytes, subject: str = "?") -> M:
    """Parse `payload` as `kind`; any malformed input raises WireError(subject, reason) and is
    counted in `REJECTED`."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise _rejected(subject, f"{len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return kind.model_validate_json(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise _rejected(subject, f"{kind.__name__}.{where}: {first['msg']}") from None


class ChunkRef(Message):
    """One column chunk in a Flight store: key `<run>/<partition>/<column>/<chunk>` at `location`,
    or a slice of it (`offset` set)."""

    column: str
    key: str
    location: str
    sample_ids: list[int]
    offset: int | None = Field(None, ge=0)
    """None: the whole chunk, whose rows are `sample_ids`. A number: only the chunk's rows offset ..
    offset + len(sample_ids), which are `sample_ids`; readers then fetch just those rows."""

    def rows(self, start: int, count: int) -> ChunkRef:
        """The slice of what this ref names from its row `start`, `count` rows long."""
        if start < 0 or count < 0 or start + count > len(self.sample_ids):
            raise ValueError(f"rows {start}..{start + count} of {self.key!r}, which names {len(self.sample_ids)} rows")
        return self.model_copy(update={"offset": (self.offset or 0) + start,
                                       "sample_ids": self.sample_ids[start:start + count]})


class WorkItem(Message):
    """A unit of work for one stage: some GRPO groups of one partition and where their inputs are."""

    stage: str
    item_id: str
    partition: int = Field(ge=0)
    groups: list[int]
    sample_ids: list[int]
    inputs: list[ChunkRef]
    min_version: int = 0
    """Rollout only: the oldest policy version allowed to generate these samples (I2)."""
    failed: dict[int, str] = Field(default_factory=dict)
    """Samples of these groups that failed upstream (sample id → reason); they are not trained."""


class DoneEvent(Message):
    """Stage `stage` wrote `columns` for `sample_ids` (in `chunks`); `failed` lists samples it could not do."""

    kind: Literal["done"] = "done"
    stage: str
    item_id: str
    actor: str
    partition: int = Field(ge=0)
    groups: list[int]
    sample_ids: list[int]
    chunks: list[ChunkRef]
    failed: dict[int, str] = Field(default_factory=dict)
    policy_version: int | None = None
    busy_s: float = 0.0


class LostEvent(Message):
    """Stage `stage` could not read the inputs `lost` of work item `item_id`: their chunks are gone
    from the store named in each ref (it died and came back empty). Published on
    `af.<run>.lost.<stage>` instead of retrying; the item is then dropped from the queue (term), and
    the scheduler re-issues `groups` from the earliest stage whose inputs survive (lineage recovery)."""

    kind: Literal["lost"] = "lost"
    stage: str
    item_id: str
    actor: str
    partition: int = Field(ge=0)
    groups: list[int]
    sample_ids: list[int]
    lost: list[ChunkRef]
    """The item's input refs whose keys the store no longer holds (each ref as the item named it)."""
    reason: str = ""


class StepEvent(Message):
    """The trainer finished optimizer step `step` on partition `step`; the policy is now `policy_version`."""

    kind: Literal["step"] = "step"
    actor: str
    step: int = Field(ge=0)
    policy_version: int
    sample_ids: list[int]
    sample_versions: list[int]
    failed_samples: int
    reward_mean: float | None
    loss: float
    grad_norm: float
    tokens: int
    weights: ChunkRef
    weights_nbytes: int
    final: bool = False
    """True on the last step, after the final model has been saved."""


class WeightsEvent(Message):
    """Policy version `version` is readable from `weights`: published by param-sync for each new
    version, and by the trainer again (`republished` > 0) after it re-put a version a store lost."""

    version: int = Field(ge=0)
    weights: ChunkRef
    nbytes: int
    republished: int = Field(0, ge=0)
    """0: the version's first announcement. n > 0: the trainer's n-th re-put of its weights after a
    `WeightsLostEvent`; readers take it over an earlier announcement of the same version, whose key
    was gone (announcements are ordered by (version, republished))."""

    @property
    def order(self) -> tuple[int, int]:
        """Which of two announcements is newer: the greater (version, republished)."""
        return self.version, self.republished


class WeightsLostEvent(Message):
    """Announced policy version `version` cannot be read: its key is gone from every store that should
    hold it (lost with a store that died and came back empty). Published on `af.<run>.weights.lost`
    (core NATS) by whoever finds it (a rollout instance's fetch or background prefetch), and again
    every few seconds while it waits. The trainer answers by re-putting its current weights (version
    ≥ `version`: the staleness bound accepts the newest) and announcing them again (`WeightsEvent`
    with `republished` > 0); reporters retry on that announcement."""

    kind: Literal["weights_lost"] = "weights_lost"
    version: int = Field(ge=0)
    republished: int = Field(0, ge=0)
    """The lost announcement's `republished`: the trainer ignores a report of an announcement older
    than its last re-put (the reporter has not seen the re-put yet)."""
    weights: ChunkRef
    """The ref the lost announcement named."""
    actor: str
    reason: str = ""

    @property
    def order(self) -> tuple[int, int]:
        """The lost announcement's (version, republished), comparable with `WeightsEvent.order`."""
        return self.version, self.republished


class DeadLetter(Message):
    """A work item that kept failing (or could not be parsed), moved out of the work queue."""

    stage: str
    subject: str
    deliveries: int
    reason: str
    payload: str
    """The original message (its first 8 KiB), decoded as UTF-8 with replacement (it may be garbage)."""
    item_id: str | None = None
    """The work item's id, partition and groups when the message was a readable WorkItem: what the
    scheduler needs to act on the letter, whatever the payload's cut left out."""
    partition: int | None = Field(None, ge=0)
    groups: list[int] = Field(default_factory=list)


class MetricsEvent(Message):
    """One busy span of an actor: it worked on `item_id` from `start` to `end` (unix seconds)."""

    actor: str
    stage: str
    item_id: str
    start: float
    end: float
    samples: int
    tokens: int = 0


class Heartbeat(Message):
    """An actor's entry in the run's KV bucket, rewritten every heartbeat period."""

    actor: str
    role: str
    host: str
    pid: int
    state: Literal["starting", "ready", "busy", "stopping"]
    policy_version: int | None = None
    time: float


class Control(Message):
    """Run-wide commands on `af.<run>.control`."""

    command: Literal["stop"]
    reason: str = ""
