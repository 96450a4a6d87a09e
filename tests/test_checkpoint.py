"""Trainer checkpoints and `asyncflow run --resume`: a real run killed mid-way and resumed.

The pipeline test starts `asyncflow run CONFIG` as a subprocess (tiny HF model, checkpoint every
step), waits for a checkpoint, SIGKILLs the launcher's whole process group (launcher, broker,
store, every actor), then `asyncflow run --resume RUN_DIR` finishes the run. Across both parts
every sample is trained exactly once, I1 holds, the resumed rollouts generate from the
checkpoint's weights at its version, and the checkpoint and the final model load in transformers
and vLLM. The engine-level tests check that a resumed engine takes the same next step as an
uninterrupted one (optimizer moments, step counts and RNG restored), single-process and
data-parallel; the rest check atomicity, rotation and the record truncation on their own.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.trainer import read_records
from asyncflow.algorithms.grpo import grpo_loss
from asyncflow.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    prepare_resume,
    read_checkpoint,
    restore_rng,
    truncate_records,
    write_checkpoint,
)
from asyncflow.config import (
    Config,
    HFTrainingSettings,
    MegatronTrainingSettings,
    SimulatedInferenceSettings,
    SimulatedTrainingSettings,
)
from asyncflow.engines import TrainBatch, make_inference_engine, make_local_training_engine
from asyncflow.engines.hf import HFTrainingEngine
from asyncflow.engines.simulated import SimulatedTrainingEngine
from asyncflow.id_runs import IdRuns
from asyncflow.metrics_sinks import TENSORBOARD_DIR
from tests.conftest import make_tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS, PROMPTS, GROUP, K = 8, 4, 4, 1
KILL_AT = 2  # SIGKILL once checkpoint step-2 is complete: 6 of 8 steps still to go


# ------------------------------------------------------------------------ killed and resumed run
def _asyncflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "asyncflow", *args]


def _wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            pytest.fail(f"the launcher exited ({process.returncode}) while waiting for {what}:\n{tail}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def _json_lines(path: Path) -> list[dict]:
    """A log's JSON lines; the kill may have cut one in half (the resumed process appends after it)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _pids(run_dir: Path) -> list[int]:
    pids = []
    for name in ("actors.json", "services.json"):
        path = run_dir / name
        if path.is_file():
            pids += [entry["pid"] for entry in json.loads(path.read_text())]
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (reaped by nobody yet) is dead for our purpose: it holds no port, file or lock.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, arith_dataset: Path) -> dict:
    tmp = tmp_path_factory.mktemp("resume")
    config = make_tiny_config(tmp, tiny_model_dir, arith_dataset, K, "ckpt-run", steps=STEPS, prompts=PROMPTS,
                              group=GROUP, trainer={"checkpoint_every": 1, "keep_checkpoints": 2})
    config_file = tmp / "run.yaml"
    config_file.write_text(config.to_yaml())
    run_dir = config.run_dir
    log = tmp / "first-part.log"
    with log.open("wb") as out:
        # Its own session: the kill below takes the launcher's whole process group, as a node failure would.
        launcher = subprocess.Popen(_asyncflow("run", str(config_file)), cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: any(c.step >= KILL_AT for c in list_checkpoints(run_dir)), 240,
                  f"checkpoint step-{KILL_AT}", launcher, log)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
    pids = _pids(run_dir)
    _wait_for(lambda: not any(_alive(p) for p in pids), 30, "every process of the killed run to be gone")

    before = {
        "final_exists": (run_dir / "final").exists(),
        "summary_exists": (run_dir / "summary.json").exists(),
        "checkpoint": latest_checkpoint(run_dir).step,
        "records": read_records(run_dir),
        "metrics": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line],
    }
    # What a kill a moment later leaves, whatever the timing was this time: records and a metrics row
    # of the step after the checkpoint (it is trained again after the resume, so they must go), and
    # half a line from a kill mid-write.
    start = before["checkpoint"]
    with (run_dir / "trainer" / "trained_samples.jsonl").open("a") as records:
        records.write(json.dumps({"step": start, "sample_id": start * PROMPTS * GROUP, "policy_version": start,
                                  "reward": 0.0}) + "\n")
        records.write('{"step": 1, "sample_id": 12')
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"step": start, "samples": PROMPTS * GROUP}) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR)) as writer:  # ... and its TensorBoard scalar
        writer.add_scalar("reward_mean", 123.0, global_step=start)

    result = subprocess.run(_asyncflow("run", "--resume", str(run_dir)), cwd=ROOT, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, f"resume failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return {"config": config, "run_dir": run_dir, "before": before,
            "summary": json.loads((run_dir / "summary.json").read_text())}


@pytest.mark.slow
def test_killed_run_resumes_to_the_configured_steps_and_trains_every_sample_exactly_once(killed_and_resumed):
    run_dir, before, summary = killed_and_resumed["run_dir"], killed_and_resumed["before"], killed_and_resumed["summary"]
    start = before["checkpoint"]
    assert not before["final_exists"] and not before["summary_exists"], "the kill must land mid-run"
    assert KILL_AT <= start < STEPS

    records = read_records(run_dir)
    counts = Counter(r["sample_id"] for r in records)
    assert [sid for sid, n in counts.items() if n > 1] == [], "a sample was trained twice"
    failed = {r["sample_id"] for r in read_records(run_dir, "failed_samples")}
    assert set(counts) | failed == set(range(STEPS * PROMPTS * GROUP)), "a sample was never trained"
    assert sorted({r["step"] for r in records}) == list(range(STEPS))
    # The pre-kill records of the steps the checkpoint covers are kept as they were; those of later
    # steps (trained again after the resume) and the torn line are gone.
    kept = [r for r in before["records"] if r["step"] < start]
    assert [r for r in records if r["step"] < start] == kept
    assert len(kept) == start * PROMPTS * GROUP - len({f for f in failed if f < start * PROMPTS * GROUP})

    # I1 across the resume, and the resumed rollouts started from the checkpoint at version `start`:
    # a sample of a step ≥ start from any older version would mean they started from model.path.
    for r in records:
        assert 0 <= r["step"] - r["policy_version"] <= K, r
        if r["step"] >= start:
            assert r["policy_version"] >= start, r
    assert {r["policy_version"] for r in records if r["step"] == start} == {start}

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert [row["step"] for row in metrics] == list(range(STEPS)), "metrics.jsonl must continue, not restart"
    # TensorBoard shows each step once, the resumed part's value where both parts wrote one.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    written = [(e.step, e.value) for e in events.Scalars("reward_mean")]
    assert [step for step, _ in written] == list(range(STEPS)), "a step shows twice (or not at all) in TensorBoard"
    assert dict(written) == pytest.approx({row["step"]: row["reward_mean"] for row in metrics}, rel=1e-6, abs=1e-6)

    # The resumed scheduler (its log continues the killed one's) admitted from partition `start` on,
    # each once; none of the partitions the checkpoint covers.
    events = _json_lines(run_dir / "logs" / "scheduler-0.jsonl")
    last_start = max(i for i, e in enumerate(events) if e.get("event") == "actor started")
    admitted = [e["partition"] for e in events[last_start:] if e.get("event") == "partition admitted"]
    assert admitted == list(range(start, STEPS))
    assert summary["resumed_from_step"] == start
    assert summary["steps"] == STEPS - start and summary["max_staleness_seen"] <= K
    assert (run_dir / "final" / "config.json").is_file()

    # keep_checkpoints=2 rotates, but never deletes the checkpoint the run resumed from.
    steps_on_disk = [c.step for c in list_checkpoints(run_dir)]
    assert start in steps_on_disk and steps_on_disk[-2:] == [STEPS - 2, STEPS - 1]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_checkpoint_and_final_model_load_in_transformers_and_vllm(killed_and_resumed):
    from transformers import AutoModelForCausalLM

    run_dir = killed_and_resumed["run_dir"]
    checkpoint, final = latest_checkpoint(run_dir).path, run_dir / "final"
    loaded = {path: AutoModelForCausalLM.from_pretrained(path) for path in (checkpoint, final)}
    # Training moved the weights: the two folders are different policies.
    a, b = (dict(m.named_parameters()) for m in loaded.values())
    assert any(not torch.equal(a[name], b[name]) for name in a)

    try:
        import vllm  # noqa: F401
    except Exception as error:  # ImportError, or a broken build
        pytest.skip(f"vllm is not importable ({type(error).__name__}: {error})")
    from asyncflow.config import VLLMInferenceSettings
    from asyncflow.engines import SamplingParams
    from asyncflow.engines.vllm_engine import VLLMInferenceEngine

    threads = torch.get_num_threads()
    prompts = [[7, 14, 8, 15], [5, 6, 14, 7, 15]]
    for path in (checkpoint, final):
        engine = VLLMInferenceEngine(path, VLLMInferenceSettings(device="cpu", cpu_kv_cache_gib=0.25,
                                                                 vllm_kwargs={"enforce_eager": True}))
        try:
            out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=4), [1, 2])
        finally:
            engine.close()
            torch.set_num_threads(threads)
        # vLLM's sampled-token logprobs are those of this folder's weights, as transformers sees them.
        want = HFTrainingEngine(path, HFTrainingSettings()).compute_logprobs(prompts, [g.token_ids for g in out])
        diff = max(abs(x - y) for g, w in zip(out, want, strict=True) for x, y in zip(g.logprobs, w, strict=True))
        assert diff < 1e-4, path


# ----------------------------------------------------------------------------- engine level
def _batch(seed: int, n: int = 6) -> TrainBatch:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 16) for _ in range(rng.randrange(2, 6))] for _ in range(n)]
    responses = [[rng.randrange(3, 16) for _ in range(rng.randrange(1, 5))] for _ in range(n)]
    return TrainBatch(prompt_ids=prompts, response_ids=responses,
                      behaviour_logprobs=[[-2.5] * len(r) for r in responses],
                      advantages=[rng.uniform(-1, 1) for _ in range(n)], sample_ids=list(range(n)))


LOSS = functools.partial(grpo_loss, clip_low=0.2, clip_high=0.2, kl_coef=0.0)


def _step(engine, batch: TrainBatch) -> None:
    engine.forward_backward(batch, LOSS)
    engine.optimizer_step(1.0 / len(batch))


def _config(tmp_path: Path, model: Path, dataset: Path, **trainer) -> Config:
    return make_tiny_config(tmp_path, model, dataset, 1, "engine-ckpt", trainer=trainer)


def _engine_settings(kind: str):
    if kind == "megatron":
        pytest.importorskip("megatron.core", reason="the Megatron engine needs megatron-core (extra `megatron`)")
        return MegatronTrainingSettings(lr=0.003, micro_batch_size=8)
    return HFTrainingSettings(lr=0.003, micro_batch_size=8)


@pytest.mark.parametrize("kind", ["hf", "megatron"])
def test_a_resumed_engine_takes_the_same_step_as_an_uninterrupted_one(kind, tmp_path, tiny_model_dir, arith_dataset):
    config = _config(tmp_path, tiny_model_dir, arith_dataset)
    settings = _engine_settings(kind)
    engine = make_local_training_engine(settings, tiny_model_dir, seed=3)
    _step(engine, _batch(1))
    checkpoint = write_checkpoint(config, 1, engine, consumed={0, 1, 2, 3, 7})
    # What the uninterrupted process draws next, and its next step.
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    _step(engine, _batch(2))
    uninterrupted = dict(engine.export_weights())

    assert checkpoint.step == 1 and checkpoint.consumed_sample_ids == {0, 1, 2, 3, 7}
    resumed = make_local_training_engine(settings, checkpoint.path, seed=3)
    state = checkpoint.load_state()
    resumed.load_training_state(state["training"])
    restore_rng(state["rng"])
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert [random.random() for _ in range(3)] == draws[2]
    steps = {int(s["step"]) for s in resumed.optimizer.state_dict()["state"].values()}
    assert steps == {1}, "AdamW's step count must come back with its moments"
    _step(resumed, _batch(2))
    for name, tensor in resumed.export_weights():
        assert torch.equal(tensor, uninterrupted[name]), name

    # Without the optimizer state the same step lands elsewhere: the comparison above can fail.
    cold = make_local_training_engine(settings, checkpoint.path, seed=3)
    _step(cold, _batch(2))
    assert any(not torch.equal(t, uninterrupted[n]) for n, t in cold.export_weights())


@pytest.mark.slow
def test_data_parallel_engine_checkpoints_and_resumes(tmp_path, tiny_model_dir, arith_dataset):
    from asyncflow.engines.data_parallel import DataParallelTrainingEngine

    config = _config(tmp_path, tiny_model_dir, arith_dataset)
    settings = config.trainer.engine.model_copy(update={"data_parallel": 2})
    with DataParallelTrainingEngine(settings, tiny_model_dir, seed=3, init_timeout_s=120, timeout_s=120) as dp:
        _step(dp, _batch(1))
        checkpoint = write_checkpoint(config, 1, dp, consumed=set())
        _step(dp, _batch(2))
        uninterrupted = dict(dp.export_weights())
    probe = _batch(3, n=8)
    with DataParallelTrainingEngine(settings, checkpoint.path, seed=3, init_timeout_s=120, timeout_s=120) as dp:
        dp.load_training_state(checkpoint.load_state()["training"])
        _step(dp, _batch(2))
        got = dict(dp.export_weights())
        # Sharded: rank 1 scores the second half with its own replica's weights.
        sharded = dp.compute_logprobs(probe.prompt_ids, probe.response_ids)
    for name, tensor in got.items():
        assert torch.equal(tensor, uninterrupted[name]), name
    # Rank 1 got the optimizer state too: its replica took the same step as rank 0's.
    single = HFTrainingEngine(checkpoint.path, config.trainer.engine)
    single.model.load_state_dict(got)
    want = single.compute_logprobs(probe.prompt_ids, probe.response_ids)
    diff = max(abs(x - y) for a, b in zip(sharded, want, strict=True) for x, y in zip(a, b, strict=True))
    assert diff < 1e-5


def test_simulated_engine_checkpoint_is_a_folder_rollout_can_start_from(tmp_path, tiny_model_dir, arith_dataset):
    config = _config(tmp_path, tiny_model_dir, arith_dataset)
    engine = SimulatedTrainingEngine(SimulatedTrainingSettings(weights_bytes=64))
    for _ in range(3):
        engine.optimizer_step(1.0)
    checkpoint = write_checkpoint(config, 3, engine, consumed=set(range(48)))
    resumed = SimulatedTrainingEngine(SimulatedTrainingSettings(weights_bytes=64))
    resumed.load_training_state(checkpoint.load_state()["training"])
    assert resumed.steps == 3 and torch.equal(dict(resumed.export_weights())["simulated.weight"],
                                              dict(engine.export_weights())["simulated.weight"])
    # config.json and the tokenizer come from model.path: rollout engines start from the folder.
    make_inference_engine(SimulatedInferenceSettings(), checkpoint.path)
    assert checkpoint.meta["consumed_sample_ids"] == [[0, 48]]


def test_consumed_ids_round_trip_as_runs_without_one_int_per_id(tmp_path, tiny_model_dir, arith_dataset):
    """The trainer's `IdRuns` goes to checkpoint.json as runs and comes back as runs: a run of 10⁹
    samples (failed ones make the gaps) is three runs on disk and in memory, never a set of ints."""
    config = _config(tmp_path, tiny_model_dir, arith_dataset)
    consumed = IdRuns(range(10**9))
    consumed.difference_update([5, 700_000_000])
    checkpoint = write_checkpoint(config, 2, SimulatedTrainingEngine(SimulatedTrainingSettings(weights_bytes=64)),
                                  consumed=consumed)
    meta = json.loads((checkpoint.path / "checkpoint.json").read_text())
    assert meta["consumed_sample_ids"] == [[0, 5], [6, 700_000_000], [700_000_001, 10**9]]
    assert meta["consumed_samples"] == 10**9 - 2
    restored = read_checkpoint(checkpoint.path).consumed_sample_ids
    assert isinstance(restored, IdRuns) and restored.runs() == consumed.runs() and len(restored) == 10**9 - 2
    assert 5 not in restored and 6 in restored and 700_000_000 not in restored


# ---------------------------------------------------------------------- atomicity and rotation
class _DiesWhileSaving(SimulatedTrainingEngine):
    def save_pretrained(self, path: Path) -> None:
        super().save_pretrained(path)
        raise OSError("disk full (injected)")


def test_a_failed_or_killed_write_never_looks_like_a_checkpoint(tmp_path, tiny_model_dir, arith_dataset):
    config = _config(tmp_path, tiny_model_dir, arith_dataset, keep_checkpoints=0)
    good = write_checkpoint(config, 1, SimulatedTrainingEngine(SimulatedTrainingSettings()), set())
    with pytest.raises(CheckpointError, match="step-2.*disk full"):
        write_checkpoint(config, 2, _DiesWhileSaving(SimulatedTrainingSettings()), set())
    root = config.run_dir / "checkpoints"
    assert not (root / "step-2").exists() and not list(root.glob(".tmp-*"))
    # What a SIGKILL leaves: a temporary folder mid-write, and a step folder without checkpoint.json.
    (root / ".tmp-step-3-999").mkdir()
    (root / ".tmp-step-3-999" / "model.safetensors").write_bytes(b"half")
    (root / "step-4").mkdir()
    (root / "step-4" / "config.json").write_text("{}")
    assert latest_checkpoint(config.run_dir) == good
    with pytest.raises(CheckpointError, match="no readable checkpoint.json"):
        read_checkpoint(root / "step-4")
    prepare_resume(config.run_dir, good)
    assert not (root / ".tmp-step-3-999").exists()


def test_rotation_keeps_the_newest_and_the_one_resumed_from(tmp_path, tiny_model_dir, arith_dataset):
    config = _config(tmp_path, tiny_model_dir, arith_dataset, keep_checkpoints=2)
    engine = SimulatedTrainingEngine(SimulatedTrainingSettings())
    for step in (1, 2, 3):
        write_checkpoint(config, step, engine, set())
    assert [c.step for c in list_checkpoints(config.run_dir)] == [2, 3]
    config.run.resume_from = config.run_dir / "checkpoints" / "step-2"
    for step in (4, 5):
        write_checkpoint(config, step, engine, set())
    assert [c.step for c in list_checkpoints(config.run_dir)] == [2, 4, 5]


def test_truncate_records_keeps_earlier_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "records.jsonl"
    lines = [json.dumps({"step": s, "sample_id": i}) for s, i in ((0, 0), (1, 1), (2, 2), (1, 3))]
    path.write_text("\n".join(lines) + '\n{"step": 2, "samp')
    assert truncate_records(path, 2) == 3
    assert [json.loads(line)["sample_id"] for line in path.read_text().splitlines()] == [0, 1, 3]
    assert truncate_records(tmp_path / "missing.jsonl", 2) == 0


def test_resume_without_a_checkpoint_fails_clearly(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: {path: m}\ndata: {path: d}\nreward: {function: 'a:b'}\n")
    result = subprocess.run(_asyncflow("run", "--resume", str(run_dir)), cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "no complete checkpoint" in result.stderr and "checkpoint_every" in result.stderr
    both = subprocess.run(_asyncflow("run", str(run_dir / "config.yaml"), "--resume", str(run_dir)), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "either CONFIG or --resume" in both.stderr
