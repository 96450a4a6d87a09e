"""The data-plane benchmark at toy sizes: every path moves the data, reads it back intact, and is reported.

No wall-clock thresholds: the figures only have to exist, be positive and be consistent with each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.data_plane import (
    PATHS,
    RAW,
    RoundTripError,
    check_round_trip,
    main,
    make_units,
    run_benchmark,
)


def test_main_prints_and_writes_figures_for_every_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "data_plane.json"
    argv = ["--samples", "64", "--response-len", "32", "--chunk", "16", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    rows = {(row["path"], row["chunking"]): row for row in report["rows"]}
    assert set(rows) == {(path, chunking) for path in PATHS for chunking in ("16/chunk", "whole")}
    for (path, chunking), row in rows.items():
        assert row["verified"], f"{path} {chunking}: round trip not checked"
        assert row["put_mb_s"] > 0 and row["get_mb_s"] > 0
        assert row["bytes"] > 0 and len(row["put_s"]) >= 1 and len(row["get_s"]) == len(row["put_s"])
        assert row["tables"] == (8 if chunking == "16/chunk" else 2)  # 2 columns per chunk
        raw = rows[RAW, chunking]
        assert row["bytes"] == raw["bytes"]  # every path moved the same data
        assert row["put_vs_raw"] == pytest.approx(row["put_mb_s"] / raw["put_mb_s"])
        assert row["get_vs_raw"] == pytest.approx(row["get_mb_s"] / raw["get_mb_s"])
        line = next(line for line in printed.splitlines() if line.split()[:2] == [path, chunking])
        assert f"{row['put_mb_s']:.1f}" in line and f"{row['get_mb_s']:.1f}" in line
    assert rows[RAW, "whole"]["put_vs_raw"] == pytest.approx(1.0)


def test_nats_path_splits_tables_over_max_payload():
    # 128 samples x ~4096 tokens x 4 bytes is ~2 MiB per column: over NATS' 1 MiB default max_payload.
    report = run_benchmark(samples=128, response_len=4096, chunk=128, repeats=1, warmup=0)
    rows = {row.path: row for row in report.rows}
    assert set(rows) == set(PATHS)
    assert all(row.verified and row.put_mb_s > 0 and row.get_mb_s > 0 for row in rows.values())
    assert rows["nats_inline"].round_trips > rows["nats_inline"].tables
    assert rows[RAW].round_trips == rows[RAW].tables


def test_round_trip_check_rejects_different_data():
    units = make_units(samples=8, mean_len=16, chunk_samples=4, seed=0)
    check_round_trip("same", units, [unit.table for unit in units])
    with pytest.raises(RoundTripError, match="differs"):
        check_round_trip("swapped", units, [units[1].table, units[0].table, *(u.table for u in units[2:])])
    with pytest.raises(RoundTripError, match="read back"):
        check_round_trip("short", units, [unit.table for unit in units[:-1]])
