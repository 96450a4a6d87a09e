"""`asyncflow report` and what it reads: busy spans and peak memory recorded by a real run, busy
fractions computed exactly, the picture and the tables written, clear errors for missing input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asyncflow.errors import ReportError
from asyncflow.launcher import run
from asyncflow.monitor import peak_rss_mb
from asyncflow.report import load_run, load_spans, plot_timelines, report_figure, utilisation, write_report
from asyncflow.wire import MetricsEvent
from tests.conftest import make_tiny_config

ROOT = Path(__file__).parent.parent
WORKING_ROLES = {"scheduler", "rollout", "reward", "trainer"}
"""Roles that publish busy spans; param-sync only forwards events."""


def asyncflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncflow", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, arith_dataset: Path) -> Path:
    """One small real run (3 steps, two rollout instances) shared by the tests that read a run dir."""
    config = make_tiny_config(tmp_path_factory.mktemp("report"), tiny_model_dir, arith_dataset, 1, "report-run",
                              steps=3, rollout={"instances": 2})
    run(config)
    return config.run_dir


def actor_roles(run_dir: Path) -> dict[str, str]:
    return {a["actor"]: a["role"] for a in json.loads((run_dir / "actors.json").read_text())}


@pytest.mark.slow
def test_run_records_a_span_for_every_working_role(finished_run: Path):
    spans = load_spans(finished_run)
    roles = actor_roles(finished_run)
    assert {roles[s.actor] for s in spans} >= WORKING_ROLES
    assert {s.stage for s in spans} >= {"prompt", "rollout", "reward", "trainer"}
    assert all(s.start < s.end for s in spans)
    assert sum(s.samples for s in spans if s.stage == "trainer") == 3 * 4 * 4


@pytest.mark.slow
def test_summary_has_peak_memory_per_actor_and_busy_fraction_per_stage(finished_run: Path):
    summary = json.loads((finished_run / "summary.json").read_text())
    roles = actor_roles(finished_run)
    assert set(summary["peak_rss_mb"]) == set(roles)
    assert all(mb > 0 for mb in summary["peak_rss_mb"].values())
    fractions = summary["busy_fraction"]
    assert set(fractions) >= {"prompt", "rollout", "reward", "trainer"}
    assert all(0 <= f <= 1 for f in fractions.values())
    assert fractions["trainer"] > 0
    # The same figures follow from the spans on disk and the run's window (which summary.json keeps
    # to the millisecond: the last digit of a fraction may differ).
    started = summary["started_at"]
    used = utilisation(load_spans(finished_run), started, started + summary["wall_s"], roles)
    assert fractions.keys() == used.stage_fraction.keys()
    assert all(abs(fractions[stage] - f) <= 2e-4 for stage, f in used.stage_fraction.items()), \
        (fractions, used.stage_fraction)


@pytest.mark.slow
def test_report_command_writes_png_html_and_json(finished_run: Path, tmp_path: Path):
    import matplotlib.image

    result = asyncflow("report", str(finished_run))
    assert result.returncode == 0, result.stderr
    png, page, data = (finished_run / f"report.{suffix}" for suffix in ("png", "html", "json"))
    height, width, channels = matplotlib.image.imread(png).shape
    assert width >= 1000 and height >= 600 and channels in (3, 4)
    html = page.read_text()
    assert "data:image/png;base64," in html and "Busy time per stage" in html and "peak RSS MB" in html
    report = json.loads(data.read_text())
    assert set(report["actors"]) == set(actor_roles(finished_run))
    assert set(report["stages"]) >= {"prompt", "rollout", "reward", "trainer"}
    for entry in [*report["actors"].values(), *report["stages"].values()]:
        assert 0 <= entry["busy_fraction"] <= 1 and entry["busy_fraction"] + entry["idle_fraction"] == pytest.approx(1)
        assert 0 <= entry["busy_fraction_working"] <= 1

    # --out puts all three elsewhere; several runs stack into one comparison picture.
    files = write_report(finished_run, tmp_path / "elsewhere" / "run.png")
    assert files.html == tmp_path / "elsewhere" / "run.html" and files.json.is_file()
    stacked = plot_timelines({"first": finished_run, "again": finished_run}, tmp_path / "both.png")
    assert matplotlib.image.imread(stacked).shape[0] > 300


def span(actor: str, stage: str, start: float, end: float) -> MetricsEvent:
    return MetricsEvent(actor=actor, stage=stage, item_id=f"{stage}-{start}", start=start, end=end, samples=1)


def test_utilisation_counts_overlapping_spans_of_one_actor_once():
    spans = [
        span("rollout-0", "rollout", 100, 104),
        span("rollout-0", "rollout", 102, 106),  # overlaps the one before: 100–106 is 6 s, not 8
        span("rollout-0", "weight_swap", 104, 105),  # inside rollout-0's busy time: no extra actor time
        span("rollout-0", "rollout", 109, 112),  # runs past the window: 1 s inside
        span("rollout-1", "rollout", 101, 103),
        span("trainer-0", "trainer", 90, 95),  # before the window
        span("trainer-0", "trainer", 105, 107.5),
    ]
    roles = {"rollout-0": "rollout", "rollout-1": "rollout", "trainer-0": "trainer", "param_sync-0": "param_sync"}
    used = utilisation(spans, 100, 110, roles)
    assert used.window_s == 10
    assert used.actor_busy_s == {"param_sync-0": 0.0, "rollout-0": 7.0, "rollout-1": 2.0, "trainer-0": 2.5}
    assert used.actor_fraction == {"param_sync-0": 0.0, "rollout-0": 0.7, "rollout-1": 0.2, "trainer-0": 0.25}
    assert used.stage_instances == {"rollout": 2, "trainer": 1, "weight_swap": 2}
    assert used.stage_busy_s == {"rollout": 9.0, "trainer": 2.5, "weight_swap": 1.0}
    assert used.stage_fraction == {"rollout": 9 / 20, "trainer": 0.25, "weight_swap": 1 / 20}

    # An idle second rollout instance still halves the rollout stage's utilisation.
    alone = utilisation([span("rollout-0", "rollout", 0, 5)], 0, 10, {"rollout-0": "rollout", "rollout-1": "rollout"})
    assert alone.stage_fraction == {"rollout": 0.25} and alone.actor_fraction["rollout-1"] == 0.0
    # Without roles the actors are the ones in the spans.
    assert utilisation([span("reward-0", "reward", 0, 5)], 0, 10).stage_fraction == {"reward": 0.5}


def test_report_of_a_missing_run_dir_is_one_clear_line(tmp_path: Path):
    missing = tmp_path / "no-such-run"
    result = asyncflow("report", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr and "no such run directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_names_the_missing_or_broken_file(tmp_path: Path):
    with pytest.raises(ReportError, match="spans.jsonl: not found"):
        write_report(tmp_path)
    (tmp_path / "spans.jsonl").write_text(span("trainer-0", "trainer", 1, 2).model_dump_json() + "\n{oops\n")
    with pytest.raises(ReportError, match=r"spans.jsonl:2: "):
        load_spans(tmp_path)


def test_peak_rss_reads_this_process_and_tolerates_a_gone_one():
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak RSS comes from /proc (Linux)")
    assert peak_rss_mb(os.getpid()) > 1.0
    assert peak_rss_mb(2**22 + 1) is None  # above Linux's pid_max: never a live process


def synthetic_run(run_dir: Path) -> Path:
    """A run directory written by hand: 3 steps, 4 actors, known rewards and staleness."""
    start = 1_000_000.0
    run_dir.mkdir(parents=True)
    spans = [span("scheduler-0", "prompt", start + 1, start + 1.2), span("rollout-0", "rollout", start + 1.2, start + 3),
             span("reward-0", "reward", start + 3, start + 3.5), span("trainer-0", "trainer", start + 3.5, start + 5),
             span("rollout-0", "rollout", start + 3, start + 6), span("trainer-0", "trainer", start + 6, start + 7)]
    (run_dir / "spans.jsonl").write_text("".join(s.model_dump_json() + "\n" for s in spans))
    rows = [{"step": i, "time_s": 5.0 + i, "samples": 8, "reward_mean": r, "staleness_max": i % 2}
            for i, r in enumerate([0.25, 0.5, 0.75])]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps({"steps": 3, "samples": 24, "wall_s": 9.0, "samples_per_s": 2.667,
                                                      "started_at": start, "reward_last": 0.75}))
    (run_dir / "actors.json").write_text(json.dumps([{"actor": a, "role": a[:-2]} for a in
                                                     ("scheduler-0", "rollout-0", "reward-0", "trainer-0")]))
    (run_dir / "trainer").mkdir()
    staleness = [0] * 10 + [1] * 14  # 24 samples: 10 on-policy, 14 one version behind
    (run_dir / "trainer" / "trained_samples.jsonl").write_text(
        "".join(json.dumps({"step": 1 + s, "policy_version": 1}) + "\n" for s in staleness))
    (run_dir / "config.yaml").write_text("run: {name: synthetic}\nalgorithm: {max_staleness: 1}\n")
    return run_dir


def test_report_picture_has_reward_curve_throughput_staleness_histogram_and_timeline(tmp_path: Path):
    import matplotlib.pyplot as plt

    run = load_run(synthetic_run(tmp_path / "run"))
    fig = report_figure(run)
    try:
        axes = {ax.get_title(): ax for ax in fig.axes}
        timeline = next(ax for title, ax in axes.items() if title.startswith("busy spans per actor"))
        assert [t.get_text().split()[0] for t in timeline.get_yticklabels()] == [
            "scheduler-0", "rollout-0", "reward-0", "trainer-0"]
        assert len(timeline.collections) == 4  # one bar series per (actor, stage)
        reward = axes["mean reward per step"]
        assert list(reward.lines[0].get_xdata()) == [0, 1, 2]
        assert list(reward.lines[0].get_ydata()) == [0.25, 0.5, 0.75]
        histogram = axes["staleness"]
        assert [p.get_height() for p in histogram.patches] == [10, 14]  # a histogram of per-sample staleness
        throughput = next(ax for ax in fig.axes if ax.get_ylabel() == "samples / s")
        assert len(throughput.patches) >= 2  # generated and trained rate curves
    finally:
        plt.close(fig)
    files = write_report(run.run_dir)
    page = files.html.read_text()
    assert "data:image/png;base64," in page and "<h2>Summary</h2>" in page
    assert "samples_per_s" in page and "2.667" in page and "synthetic" in page
