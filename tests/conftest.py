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
def arith_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from examples.arith import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data") / "arith.jsonl", seed=0)
