"""Progress and metrics of `asyncflow run`: the live panel and its plain fallback, queue depth read from
a real broker, TensorBoard events equal to metrics.jsonl, the wandb guard, and per-actor JSON logs
that carry run / actor / stage."""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import io
import json
import os
import sys
import types
from pathlib import Path

import pytest
from rich.console import Console

from asyncflow.config import parse_config
from asyncflow.errors import ConfigError
from asyncflow.metrics_sinks import TENSORBOARD_DIR, MetricsSinks, check_sinks, scalars
from asyncflow.progress import (
    Progress,
    ProgressView,
    QueueDepth,
    RichProgress,
    make_progress,
    plain_line,
    queue_depth,
)

ROW = {
    "step": 2, "policy_version": 2, "time_s": 12.5, "samples": 16, "failed_samples": 1, "reward_mean": 0.4375,
    "loss": -0.0123, "grad_norm": 0.75, "tokens": 480, "samples_per_s": 7.123, "staleness_max": 1,
    "staleness_mean": 0.5, "busy_s": {"prompt": 0.01, "reward": 0.2, "rollout": 3.5, "trainer": 1.25},
}
OLD_LINE = ("step 3/20  reward 0.438  samples/s 7.123  staleness<=1  failed 1  "
            "busy[prompt 0.0s reward 0.2s rollout 3.5s trainer 1.2s]")
"""The line `asyncflow run` printed per step before the live display existed (its exact format)."""


def config_of(tmp_path: Path, **sections: dict):
    raw = {"run": {"name": "prog", "steps": 20, "run_dir": str(tmp_path / "run")}, "model": {"path": "m"},
           "data": {"path": "d.jsonl"}, "reward": {"function": "examples.arith:reward"},
           "algorithm": {"max_staleness": 2}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_config(raw)


class Counters:
    def __init__(self) -> None:
        self.dead_letters = {"reward": 2}
        self.restarts = {"rollout-1": 1}
        self.dead_actors: dict[str, int] = {}


def test_the_panel_renders_step_rate_reward_staleness_queues_and_trouble():
    view = ProgressView("prog", 20, 2, started=1000.0, row=ROW, counters=Counters(),
                        queues={"rollout": QueueDepth(5, 2), "reward": QueueDepth(0, 1), "trainer": None})
    console = Console(record=True, force_terminal=True, width=110)
    console.print(view.render(now=1042.0))
    text = console.export_text()
    assert "asyncflow run prog" in text
    assert "3/20" in text and "42 s elapsed" in text
    assert "7.12" in text  # samples/s
    assert "0.438" in text and "loss -0.0123" in text and "grad norm 0.750" in text
    assert "max 1, mean 0.50  (bound 2)" in text
    cells = [line.replace("│", " ").split() for line in text.splitlines() if line.count("│") >= 4]  # table rows
    lines = {row[0]: row[1:] for row in cells if row and row[0] in ("rollout", "reward", "trainer")}
    assert lines["rollout"][:3] == ["5", "2", "3.5"]
    assert lines["reward"][:3] == ["0", "1", "0.2"]
    assert lines["trainer"][:3] == ["?", "?", "1.2"]  # unreadable consumer: unknown, not zero
    assert "reward 2" in text and "rollout-1 1" in text  # dead letters, restarts
    # Before the first step: nothing is made up.
    console = Console(record=True, force_terminal=True, width=110)
    console.print(ProgressView("prog", 20, 2, started=1000.0).render(now=1001.0))
    empty = console.export_text()
    assert "0/20" in empty and "n/a" in empty and "dead letters" in empty


def test_plain_mode_off_a_terminal_prints_the_old_line_format(tmp_path: Path):
    assert plain_line(ROW, 20) == OLD_LINE
    out = io.StringIO()  # not a terminal, like CI logs and pipes
    progress = make_progress(config_of(tmp_path), stream=out)
    assert type(progress) is Progress
    with progress:
        progress.step(ROW)
        asyncio.run(progress.poll(None))  # plain mode never touches the broker
    assert out.getvalue() == OLD_LINE + "\n"


def test_auto_mode_picks_rich_on_a_terminal_and_the_switch_overrides_it(tmp_path: Path):
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        assert terminal.isatty()
        assert isinstance(make_progress(config_of(tmp_path), stream=terminal), RichProgress)
        assert type(make_progress(config_of(tmp_path, run={"progress": "plain"}), stream=terminal)) is Progress
    os.close(leader)
    assert isinstance(make_progress(config_of(tmp_path, run={"progress": "rich"}), stream=io.StringIO()),
                      RichProgress)
    with pytest.raises(ConfigError, match="run.progress"):
        config_of(tmp_path, run={"progress": "fancy"})


def test_rich_progress_prints_step_lines_above_a_live_panel(tmp_path: Path):
    out = io.StringIO()
    progress = RichProgress(config_of(tmp_path), Counters(), stream=out, started=0.0)
    with progress:
        progress.step(ROW)
        print("dead letter at reward ...")  # the monitor's own prints go above the panel too
    text = out.getvalue()
    assert OLD_LINE in text and "dead letter at reward" in text
    assert "asyncflow run prog" in text and "\x1b[" in text  # a drawn, coloured panel
    assert text.rindex("asyncflow run prog") > text.index(OLD_LINE)  # the panel stays last


def test_queue_depth_reads_each_work_consumer_from_the_broker(nats_server):
    from broker import RunNames, connect, ensure_topology

    async def scenario() -> dict:
        nc = await connect(nats_server.url, "test-progress")
        try:
            js = nc.jetstream(timeout=5)
            names = RunNames("qdepth")
            await ensure_topology(js, names)
            for index in range(3):
                await js.publish(names.work("reward"), f"item {index}".encode())
            sub = await js.pull_subscribe_bind(RunNames.consumer("reward"), stream=names.work_stream)
            (held,) = await sub.fetch(1, timeout=5)  # delivered, not acked: in progress
            depth = await queue_depth(js, names, timeout_s=5)
            await held.ack()
            missing = await queue_depth(js, RunNames("no-such-run"), timeout_s=5)
            return {"depth": depth, "missing": missing}
        finally:
            await nc.close()

    got = asyncio.run(scenario())
    assert got["depth"]["reward"] == QueueDepth(queued=2, in_progress=1)
    assert got["depth"]["rollout"] == QueueDepth(0, 0) and got["depth"]["trainer"] == QueueDepth(0, 0)
    assert set(got["missing"].values()) == {None}


def test_scalars_are_the_numeric_fields_flattened():
    values = scalars(ROW)
    assert values["reward_mean"] == 0.4375 and values["busy_s/rollout"] == 3.5 and values["tokens"] == 480.0
    assert "step" not in values
    assert "reward_mean" not in scalars({**ROW, "reward_mean": None})


def test_wandb_configured_but_not_installed_is_a_config_error(tmp_path: Path, tiny_model_dir: Path,
                                                              arith_dataset: Path):
    if "wandb" in sys.modules or importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: the guard has nothing to refuse")
    config = config_of(tmp_path, wandb={"enabled": True, "project": "p"})
    with pytest.raises(ConfigError, match=r"wandb.enabled is true but the `wandb` package is not installed"):
        check_sinks(config)
    check_sinks(config_of(tmp_path))  # off by default: nothing to check
    # `asyncflow run` refuses before it starts a broker, a store or an actor.
    from asyncflow.launcher import run
    from tests.conftest import make_tiny_config

    tiny = make_tiny_config(tmp_path, tiny_model_dir, arith_dataset, 1, "wandb-missing", wandb={"enabled": True})
    with pytest.raises(ConfigError, match="wandb"):
        run(tiny)
    assert not (tiny.run_dir / "actors.json").exists() and not (tiny.run_dir / "nats").exists()


def test_wandb_gets_every_row_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """wandb is not installed here: a stand-in module records what the sink hands to wandb's API."""
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class FakeRun:
        def log(self, values: dict, step: int) -> None:
            calls["log"].append((step, values))

        def finish(self) -> None:
            calls["finish"].append(True)

    stand_in = types.ModuleType("wandb")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    stand_in.init = lambda **kwargs: calls["init"].append(kwargs) or FakeRun()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    config = config_of(tmp_path, run={"tensorboard": False},
                       wandb={"enabled": True, "project": "proj", "mode": "offline", "tags": ["t"]},
                       security={"nats_auth": "token", "nats_token": "hunter2"})
    with MetricsSinks(config) as sinks:
        assert sinks.tensorboard is None
        sinks.write(ROW)
    (init,) = calls["init"]
    assert init["project"] == "proj" and init["mode"] == "offline" and init["name"] == "prog"
    assert init["tags"] == ["t"] and init["config"]["run"]["steps"] == 20
    assert "hunter2" not in json.dumps(init["config"])  # secrets never leave the process
    assert calls["log"] == [(2, scalars(ROW))] and calls["finish"] == [True]


@pytest.mark.slow
def test_a_run_writes_tensorboard_equal_to_metrics_and_actor_logs_carry_run_actor_stage(
        tmp_path: Path, tiny_model_dir: Path, arith_dataset: Path, capsys: pytest.CaptureFixture[str]):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from asyncflow.launcher import run
    from tests.conftest import make_tiny_config

    steps = 3
    config = make_tiny_config(
        tmp_path, tiny_model_dir, arith_dataset, 1, "progress-run", steps=steps, prompts=4, group=2,
        rollout={"engine": {"type": "simulated", "per_token_s": 0.001, "prefill_s": 0.0, "mean_tokens": 3}},
        trainer={"save_final": False, "engine": {"type": "simulated", "per_token_s": 0.0}},
        reward={"function": "asyncflow.engines.simulated:simulated_reward"},
    )
    assert config.run.progress == "auto" and config.run.tensorboard  # the defaults
    summary = run(config)
    assert summary["steps"] == steps

    # stdout is captured (not a terminal): the plain per-step lines, nothing else of the panel.
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    printed = capsys.readouterr().out
    for row in rows:
        assert plain_line(row, steps) in printed
    assert "asyncflow run progress-run" not in printed and "\x1b[" not in printed

    # TensorBoard: every scalar of every row, at its step, equal to metrics.jsonl (float32 in the file).
    events = EventAccumulator(str(config.run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    expected = {}
    for row in rows:
        for name, value in scalars(row).items():
            expected.setdefault(name, {})[row["step"]] = value
    assert {"reward_mean", "loss", "grad_norm", "samples_per_s", "staleness_max", "busy_s/rollout",
            "busy_s/trainer"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, by_step in expected.items():
        written = {event.step: event.value for event in events.Scalars(name)}
        assert written == pytest.approx(by_step, rel=1e-6, abs=1e-6), name

    # JSON logs: one file per actor, every line bound with run, actor and stage.
    actors = [a["actor"] for a in json.loads((config.run_dir / "actors.json").read_text())]
    assert len(actors) == 5
    for actor in actors:
        lines = [json.loads(line) for line in (config.run_dir / "logs" / f"{actor}.jsonl").read_text().splitlines()]
        assert lines, actor
        role = actor.rpartition("-")[0]
        for line in lines:
            assert line["run"] == "progress-run" and line["actor"] == actor and line.get("stage"), (actor, line)
        assert {line["stage"] for line in lines} >= {role}
    launcher = (config.run_dir / "logs" / "launcher.jsonl").read_text().splitlines()
    assert all({"run", "actor", "stage"} <= set(json.loads(line)) for line in launcher)


def test_process_binding_reaches_loggers_of_shared_code_and_threads(tmp_path: Path):
    """Lines from loggers the actor did not bind (the NATS connection's, a worker thread's) carry
    the process's run / actor / stage too; a key a logger binds itself wins. In a child process:
    logging set-up is process-wide."""
    import subprocess

    path = tmp_path / "actor.jsonl"
    script = f"""
import threading
from pathlib import Path
from asyncflow.logs import bind_process, get_logger, setup_logging
setup_logging(Path({str(path)!r}), console=False)
bind_process(run="r1", actor="rollout-0", stage="rollout")
get_logger(component="nats", connection="c").warning("nats error")
thread = threading.Thread(target=lambda: get_logger().info("from a thread"))
thread.start(); thread.join()
get_logger(stage="weight_swap").info("own stage")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    lines = {line["event"]: line for line in map(json.loads, path.read_text().splitlines())}
    assert set(lines) == {"nats error", "from a thread", "own stage"}
    for line in lines.values():
        assert line["run"] == "r1" and line["actor"] == "rollout-0"
    assert lines["nats error"]["stage"] == "rollout" and lines["nats error"]["component"] == "nats"
    assert lines["from a thread"]["stage"] == "rollout"
    assert lines["own stage"]["stage"] == "weight_swap"
