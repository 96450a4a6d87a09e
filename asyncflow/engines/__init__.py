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
from asyncflow.hooks import load_callable

__all__ = [
    "Generation",
    "InferenceEngine",
    "LossFn",
    "SamplingParams",
    "TrainBatch",
    "TrainingEngine",
    "make_inference_engine",
    "make_local_training_engine",
    "make_training_engine",
]


def make_inference_engine(
    settings: InferenceEngineSettings, model_path: Path, dtype: str = "float32", instance: int = 0
) -> InferenceEngine:
    """The inference engine that `settings.type` names, loaded from the HF folder `model_path`.
    `instance` is the rollout instance's index (only the simulated engine uses it)."""
    match settings.type:
        case "hf":
            from asyncflow.engines.hf import HFInferenceEngine

            return HFInferenceEngine(model_path, settings, dtype=dtype)
        case "vllm":
            from asyncflow.engines.vllm_engine import VLLMInferenceEngine

            return VLLMInferenceEngine(model_path, settings, dtype=dtype)
        case "simulated":
            from asyncflow.engines.simulated import SimulatedInferenceEngine

            return SimulatedInferenceEngine(model_path, settings, instance)
        case "custom":
            factory = load_callable(settings.factory, "rollout.engine.factory")
            return _checked(factory(model_path, dtype, **settings.kwargs), InferenceEngine, settings.factory)
        case other:
            raise EngineError(f"unknown inference engine type {other!r}; available: 'hf', 'vllm', 'simulated', 'custom'")


def make_training_engine(
    settings: TrainingEngineSettings,
    model_path: Path,
    *,
    temperature: float = 1.0,
    dtype: str = "float32",
    seed: int = 0,
) -> TrainingEngine:
    """The training engine that `settings.type` names, loaded from the HF folder `model_path`.

    With `settings.data_parallel` > 1 the engine is replicated over that many processes, each
    training on its share of every batch (see `asyncflow.engines.data_parallel`).
    """
    if settings.data_parallel > 1:
        from asyncflow.engines.data_parallel import DataParallelTrainingEngine

        return DataParallelTrainingEngine(settings, model_path, temperature=temperature, dtype=dtype, seed=seed)
    return make_local_training_engine(settings, model_path, temperature=temperature, dtype=dtype, seed=seed)


def make_local_training_engine(
    settings: TrainingEngineSettings,
    model_path: Path,
    *,
    temperature: float = 1.0,
    dtype: str = "float32",
    seed: int = 0,
) -> TrainingEngine:
    """One replica of the training engine in this process (what each data-parallel rank builds)."""
    match settings.type:
        case "hf":
            from asyncflow.engines.hf import HFTrainingEngine

            return HFTrainingEngine(model_path, settings, temperature=temperature, dtype=dtype, seed=seed)
        case "megatron":
            from asyncflow.engines.megatron_engine import MegatronTrainingEngine

            return MegatronTrainingEngine(model_path, settings, temperature=temperature, dtype=dtype, seed=seed)
        case "simulated":
            from asyncflow.engines.simulated import SimulatedTrainingEngine

            return SimulatedTrainingEngine(settings)
        case "custom":
            factory = load_callable(settings.factory, "trainer.engine.factory")
            engine = factory(model_path, settings, temperature=temperature, dtype=dtype, seed=seed, **settings.kwargs)
            return _checked(engine, TrainingEngine, settings.factory)
        case other:
            raise EngineError(f"unknown training engine type {other!r}; available: 'hf', 'megatron', 'simulated', 'custom'")


def _checked(engine: object, kind: type, factory: str):  # type: ignore[no-untyped-def]
    if not isinstance(engine, kind):
        raise EngineError(f"engine factory {factory!r} returned {type(engine).__name__}, not a {kind.__name__}")
    return engine
