"""Engine adapters behind the `InferenceEngine` / `TrainingEngine` contracts, chosen by `type`.

The factories import an adapter's module only when it is asked for, so a process that runs
the HF engines never needs vLLM or Megatron-core installed (and vice versa).
"""

from __future__ import annotations

from pathlib import Path

from asyncflow.config import InferenceEngineSettings, TrainingEngineSettings
from asyncflow.engines.base import (
    Generation,
    InferenceEngine,
    LossFn,
    SamplingParams,
    TrainBatch,
    TrainingEngine,
)
from asyncflow.errors import EngineError

__all__ = [
    "Generation",
    "InferenceEngine",
    "LossFn",
    "SamplingParams",
    "TrainBatch",
    "TrainingEngine",
    "make_inference_engine",
    "make_training_engine",
]


def make_inference_engine(
    settings: InferenceEngineSettings, model_path: Path, dtype: str = "float32"
) -> InferenceEngine:
    """The inference engine that `settings.type` names, loaded from the HF folder `model_path`."""
    match settings.type:
        case "hf":
            from asyncflow.engines.hf import HFInferenceEngine

            return HFInferenceEngine(model_path, settings, dtype=dtype)
        case other:
            raise EngineError(f"unknown inference engine type {other!r}; available: 'hf'")


def make_training_engine(
    settings: TrainingEngineSettings,
    model_path: Path,
    *,
    temperature: float = 1.0,
    dtype: str = "float32",
    seed: int = 0,
) -> TrainingEngine:
    """The training engine that `settings.type` names, loaded from the HF folder `model_path`."""
    match settings.type:
        case "hf":
            from asyncflow.engines.hf import HFTrainingEngine

            return HFTrainingEngine(model_path, settings, temperature=temperature, dtype=dtype, seed=seed)
        case other:
            raise EngineError(f"unknown training engine type {other!r}; available: 'hf'")
