"""metrics.jsonl: one row per step, whatever the step events replay (a restarted `asyncflow follow`
on a compacted EVENTS stream, a re-sent event after a broker restart)."""

from __future__ import annotations

import json
from pathlib import Path

from asyncflow.monitor import MetricsWriter
from asyncflow.wire import ChunkRef, StepEvent

WEIGHTS = ChunkRef(column="weights", key="r/weights/1", location="grpc://127.0.0.1:1", sample_ids=[])


def _step(step: int) -> StepEvent:
    return StepEvent(actor="trainer-0", step=step, policy_version=step + 1, sample_ids=[2 * step, 2 * step + 1],
                     sample_versions=[step, step], failed_samples=0, reward_mean=0.1 * step, loss=0.0,
                     grad_norm=1.0, tokens=4, weights=WEIGHTS, weights_nbytes=8)


def _steps_in(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_replayed_step_event_adds_no_row(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "metrics.jsonl", started=0.0)
    assert writer.add_step(_step(0)) is not None
    assert writer.add_step(_step(1)) is not None
    assert writer.add_step(_step(1)) is None and writer.add_step(_step(0)) is None
    assert _steps_in(tmp_path / "metrics.jsonl") == [0, 1]
    assert [row["step"] for row in writer.rows] == [0, 1]


def test_a_restarted_follower_keeps_its_rows_and_adds_only_newer_steps(tmp_path: Path) -> None:
    """The first follower wrote steps 0-2 (the last line torn by a kill); the stream, compacted, now
    replays only steps 2 and 3: the file ends with steps 0-3 once each, the old rows untouched."""
    path = tmp_path / "metrics.jsonl"
    first = MetricsWriter(path, started=0.0)
    for step in range(3):
        first.add_step(_step(step))
    old_rows = path.read_text().splitlines()
    path.write_text("\n".join(old_rows) + "\n" + old_rows[-1][:17])  # a torn line

    second = MetricsWriter(path, started=100.0)
    second.keep_existing()
    assert [row["step"] for row in second.rows] == [0, 1, 2]
    assert second.add_step(_step(2)) is None
    assert second.add_step(_step(3))["step"] == 3
    assert _steps_in(path) == [0, 1, 2, 3]
    assert path.read_text().splitlines()[:3] == old_rows


def test_keep_existing_without_a_file_starts_empty(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "metrics.jsonl", started=0.0)
    writer.keep_existing()
    assert writer.rows == [] and writer.last_step == -1
    writer.add_step(_step(0))
    assert _steps_in(tmp_path / "metrics.jsonl") == [0]
