"""Megatron-core training engine: a GPTModel built from an HF folder, trained with torch AdamW.

Semantics are HFTrainingEngine's, token for token: a response token's logprob is
log_softmax(logits / T)[token] in float32, taken at response positions only, a chunk of
positions at a time; batches split into micro-batches whose gradients add up; the loss is
`loss_fn(logprobs, behaviour_logprobs, advantages, mask, ref_logprobs)` over [B, T] tensors;
stats add across micro-batches (keys ending in `_max` combine by max). Weights cross the
boundary under HF names through `megatron_convert`.

Parallelism: tensor and pipeline parallel sizes are 1. Data parallelism belongs to the caller:
if torch.distributed is already initialised (a data-parallel wrapper started N ranks), the
engine builds its Megatron groups inside that world and leaves gradients alone, since the
wrapper all-reduces plain `.grad` tensors; otherwise it starts a world of one on gloo.

CPU: Megatron-core assumes CUDA in three places that a forward/backward reaches:
`torch.cuda.current_device()` (RoPE frequencies, the attention score buffer), the CUDA RNG
state tracker (the attention-dropout fork) and the default causal mask (built on "cuda"). The
engine always passes its own causal mask; on a CPU device it answers `current_device()` with
the CPU and swaps in a CPU RNG tracker for the duration of its own forward/backward calls
(where CUDA is absent that tracker is also installed for good). Where CUDA is present it also
swaps in a scratch-buffer pool of its own: Megatron caches the attention score buffer in a
process-wide pool keyed by dtype alone, so CPU and CUDA engines in one process would otherwise
be handed each other's buffers. On a CUDA device Megatron runs unmodified.

Half precision: the model is cast to the engine's dtype as a whole, as Megatron's Float16Module
does; the local spec's RMSNorm would otherwise keep float32 weights in a bf16 model.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoConfig

from asyncflow.config import MegatronTrainingSettings
from asyncflow.engines.torch_training import TorchTrainingEngine
from asyncflow.errors import EngineError

try:
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as megatron_tp
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.utils import GlobalMemoryBuffer
except ImportError as error:  # pragma: no cover - exercised only without the extra installed
    raise EngineError(
        f"the Megatron training engine needs megatron-core (install the `megatron` extra): {error}"
    ) from error

from asyncflow.engines.megatron_convert import (  # noqa: E402  (after the megatron import check)
    gpt_model_kwargs_from_hf,
    hf_to_megatron,
    megatron_to_hf,
    transformer_config_from_hf,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Files of an HF folder that describe the tokenizer / generation defaults, copied by save_pretrained.
_TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "generation_config.json",
)


# ------------------------------------------------------------------------------------ CPU shims
class _CPURNGTracker:
    """Megatron's CudaRNGStatesTracker API over the CPU generator.

    `fork(name)` runs its body on the named CPU RNG state and restores the global CPU state
    afterwards (torch.random.fork_rng with no devices), the same contract the CUDA tracker
    keeps for the CUDA generator. Megatron only forks it around attention dropout.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
        self.seeds_.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise EngineError(f"CPU RNG state {name!r} was never added")
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()


_cpu_rng_tracker: _CPURNGTracker | None = None
"""The CPU tracker CPU engines fork from (swapped in during their calls on a CUDA machine)."""


def _install_cpu_rng_tracker(seed: int) -> None:
    """Seed the CPU RNG tracker like `model_parallel_cuda_manual_seed` (TP rank 0, EP rank 0).

    Without CUDA it also replaces Megatron's process-wide CUDA tracker for good. With CUDA the
    process-wide tracker stays CUDA's (a CUDA engine in this process needs it) and
    `_cpu_as_current_device` swaps the CPU one in only while a CPU engine runs: Megatron's CUDA
    tracker asks `torch.cuda.current_device()` for a GPU index, which that context answers
    with the CPU.
    """
    global _cpu_rng_tracker
    tracker = _CPURNGTracker()
    tracker.add(megatron_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718)
    tracker.add(megatron_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
    _cpu_rng_tracker = tracker
    if not torch.cuda.is_available():
        megatron_random._CUDA_RNG_STATE_TRACKER = tracker
        megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


_device_lock = threading.Lock()
_device_depth = 0
_saved_current_device: Callable[[], Any] | None = None
_saved_rng_tracker: tuple[Any, bool] | None = None
_saved_memory_buffer: tuple[Any] | None = None
_cpu_memory_buffer: Any = None


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


@contextlib.contextmanager
def _cpu_as_current_device() -> Iterator[None]:
    """Make `torch.cuda.current_device()` answer the CPU, and Megatron's RNG tracker be the CPU
    one, while the body runs.

    Megatron allocates its attention score buffer and RoPE frequencies on that device, so a CPU
    engine needs the answer to be the CPU. Without CUDA the real call would raise, so nothing
    that works is changed, and the tracker is the CPU one already. Reference-counted: nested or
    concurrent engine calls restore the originals exactly once (other threads see the CPU
    answers meanwhile, so a CUDA engine must not run concurrently with a CPU one).
    Where CUDA is present, Megatron's global scratch-buffer pool is swapped for a CPU one too.
    """
    global _device_depth, _saved_current_device, _saved_rng_tracker, _saved_memory_buffer, _cpu_memory_buffer
    with _device_lock:
        if _device_depth == 0:
            _saved_current_device = torch.cuda.current_device
            torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]
            _saved_rng_tracker = (
                megatron_random._CUDA_RNG_STATE_TRACKER,
                megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED,
            )
            if _cpu_rng_tracker is not None:
                megatron_random._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker
                megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
            if torch.cuda.is_available():
                if _cpu_memory_buffer is None:
                    _cpu_memory_buffer = GlobalMemoryBuffer()
                _saved_memory_buffer = (parallel_state._GLOBAL_MEMORY_BUFFER,)
                parallel_state._GLOBAL_MEMORY_BUFFER = _cpu_memory_buffer
        _device_depth += 1
    try:
        yield
    finally:
        with _device_lock:
            _device_depth -= 1
            if _device_depth == 0 and _saved_current_device is not None:
                torch.cuda.current_device = _saved_current_device  # type: ignore[assignment]
                _saved_current_device = None
            if _device_depth == 0 and _saved_rng_tracker is not None:
                (
                    megatron_random._CUDA_RNG_STATE_TRACKER,
                    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED,
                ) = _saved_rng_tracker
                _saved_rng_tracker = None
            if _device_depth == 0 and _saved_memory_buffer is not None:
                (parallel_state._GLOBAL_MEMORY_BUFFER,) = _saved_memory_buffer
                _saved_memory_buffer = None


# ------------------------------------------------------------------------- distributed set-up
_megatron_world: Any = None
"""The default process group Megatron's groups were built in by this module (None: not by us)."""


def _ensure_parallel_state(device: torch.device) -> None:
    """A torch.distributed world (ours of size 1 unless a caller made one) and Megatron's groups.

    A world of one is started with a file store in a fresh temporary folder, so concurrent
    processes never race for a TCP port. Megatron's groups (TP = PP = 1, so DP = world size)
    are created once per world; every rank of an existing world builds its engine, so the
    collective group creation lines up. Groups we built in a world that has since been
    destroyed (a finished data-parallel run) are rebuilt in the current one.
    """
    global _megatron_world
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store_file = Path(tempfile.mkdtemp(prefix="asyncflow-megatron-")) / "store"
        dist.init_process_group(backend=backend, init_method=f"file://{store_file}", rank=0, world_size=1)
    world = dist.group.WORLD
    if parallel_state.model_parallel_is_initialized():
        if _megatron_world is None or _megatron_world is world:
            return  # ours and current, or made by the caller: use as is
        parallel_state.destroy_model_parallel()
    # The default group is already gloo on CPU; extra gloo copies of every group are not needed.
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, create_gloo_process_groups=False
    )
    _megatron_world = world


class MegatronTrainingEngine(TorchTrainingEngine):
    """A Megatron-core GPTModel (local layer spec, TP = PP = 1) trained with AdamW."""

    def __init__(
        self,
        model_path: Path,
        settings: MegatronTrainingSettings,
        *,
        temperature: float = 1.0,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        if temperature <= 0:
            raise EngineError(f"temperature must be > 0, got {temperature}")
        if dtype not in _DTYPES:
            raise EngineError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        self.model_path = Path(model_path)
        self.settings = settings
        self.temperature = temperature
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(settings.device)
        self._on_cpu = self.device.type == "cpu"
        if not self._on_cpu and not torch.cuda.is_available():
            raise EngineError(f"training device {settings.device!r} asked for, but torch sees no CUDA device")
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # Megatron allocates on the *current* CUDA device

        try:
            self.hf_config = AutoConfig.from_pretrained(self.model_path)
        except (OSError, ValueError) as error:
            raise EngineError(f"cannot read an HF config from {self.model_path}: {error}") from error
        hf_weights = self._read_hf_weights()

        _ensure_parallel_state(self.device)
        torch.manual_seed(seed)
        if self._on_cpu:
            _install_cpu_rng_tracker(seed)
        else:
            megatron_tp.model_parallel_cuda_manual_seed(seed)

        overrides: dict[str, Any] = {
            "params_dtype": self.dtype,
            "bf16": self.dtype == torch.bfloat16,
            "fp16": self.dtype == torch.float16,
            # Weights come from the HF checkpoint: skip Megatron's random init. On CPU build
            # there directly; on CUDA allocate on the device.
            "use_cpu_initialization": self._on_cpu,
            "perform_initialization": False,
            **settings.megatron_kwargs,
        }
        try:
            self.config = transformer_config_from_hf(self.hf_config, **overrides)
        except TypeError as error:
            raise EngineError(f"invalid megatron_kwargs for TransformerConfig: {error}") from error
        self.model = GPTModel(
            config=self.config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            pre_process=True,
            post_process=True,
            **gpt_model_kwargs_from_hf(self.hf_config),
        ).to(device=self.device, dtype=self.dtype)  # a no-op cast in float32
        self._load_hf_weights(hf_weights)
        self.model.train()

        pad = getattr(self.hf_config, "pad_token_id", None)
        # Right padding is masked out and never predicted from, so any valid id will do.
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )

    # ------------------------------------------------------------------------------- weights in
    def _read_hf_weights(self) -> dict[str, torch.Tensor]:
        import json

        from safetensors.torch import load_file

        # The index names a sharded checkpoint's files; without one, model.safetensors alone
        # (other *.safetensors in the folder, adapters say, are not the model's weights).
        index = self.model_path / "model.safetensors.index.json"
        if index.exists():
            files = sorted({self.model_path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = [f for f in [self.model_path / "model.safetensors"] if f.exists()]
        if files:
            weights: dict[str, torch.Tensor] = {}
            for file in files:
                weights.update(load_file(file))
            return weights
        # Older folders hold pytorch_model*.bin; let transformers read those.
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise EngineError(f"cannot load HF weights from {self.model_path}: {error}") from error
        return dict(model.state_dict())

    @torch.no_grad()
    def _load_hf_weights(self, hf_weights: dict[str, torch.Tensor]) -> None:
        converted = hf_to_megatron(hf_weights, self.hf_config)
        targets = {n: t for n, t in self.model.state_dict().items() if not n.endswith("_extra_state")}
        missing = sorted(set(targets) - set(converted))
        unknown = sorted(set(converted) - set(targets))
        if missing or unknown:
            raise EngineError(
                f"HF weights from {self.model_path} do not fill the Megatron model: missing {missing}, unknown {unknown}"
            )
        for name, tensor in converted.items():
            if tuple(targets[name].shape) != tuple(tensor.shape):
                raise EngineError(
                    f"{name}: HF weights give shape {tuple(tensor.shape)}, the Megatron model has {tuple(targets[name].shape)}"
                )
            targets[name].copy_(tensor)

    # ---------------------------------------------------------------------------------- helpers
    def _context(self) -> contextlib.AbstractContextManager[None]:
        # Keyed on the engine's device, not on CUDA being absent: a CPU engine on a CUDA machine
        # would otherwise get its attention buffer and RoPE frequencies on the GPU.
        return _cpu_as_current_device() if self._on_cpu else contextlib.nullcontext()

    def _hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final (normed) hidden states [B, S, H] for right-padded `input_ids` [B, S].

        Megatron works in [S, B, H]. RoPE phases are 0..S-1 per row, the same as HF's for
        right padding; a causal mask alone suffices since real tokens never see later padding.
        The mask is passed explicitly because Megatron's default causal mask is built on CUDA.
        """
        batch, seq = input_ids.shape
        position_ids = torch.arange(seq, device=self.device).unsqueeze(0).expand(batch, seq)
        embeddings = self.model.embedding(input_ids=input_ids, position_ids=position_ids)  # [S, B, H]
        rotary = self.model.rotary_pos_emb(seq)
        causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=self.device), diagonal=1)
        hidden = self.model.decoder(
            hidden_states=embeddings, attention_mask=causal[None, None], rotary_pos_emb=rotary
        )
        return hidden.transpose(0, 1)

    def _token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log_softmax(output_layer(hidden) / T)[target] for rows of `hidden` [N, H], `targets` [N]."""
        weight = (
            self.model.shared_embedding_or_output_weight()
            if self.model.share_embeddings_and_output_weights
            else None
        )
        # The output layer takes Megatron's [S, B, H]: the N positions as a sequence of batch 1.
        logits, _ = self.model.output_layer(hidden.unsqueeze(1), weight=weight)
        logits = logits.squeeze(1).float() / self.temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Right padding under a causal mask never reaches a real position: the mask is not needed.
        return self._hidden(input_ids)

    def _chunk_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._token_logprobs(hidden, targets)

    # ------------------------------------------------------------------------------ weights out
    def _hf_state_dict(self) -> dict[str, torch.Tensor]:
        # `_extra_state` entries are serialisation metadata (None here), not weights.
        state = {n: t.detach() for n, t in self.model.state_dict().items() if isinstance(t, torch.Tensor)}
        return megatron_to_hf(state, self.hf_config)

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named CPU tensors, each its own copy so later optimizer steps do not show through
        (split QKV / gate-up pieces are fresh already, renamed tensors would be views)."""
        for name, tensor in self._hf_state_dict().items():
            yield name, tensor.clone() if tensor.device.type == "cpu" else tensor.cpu()

    def save_pretrained(self, path: Path) -> None:
        """An HF folder: config.json, model.safetensors (sharded with an index when large) and
        the tokenizer / generation files copied from the model folder."""
        from huggingface_hub import save_torch_state_dict

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # Own storage per tensor: split QKV / gate-up pieces are views into one fused tensor,
        # which safetensors refuses to write as separate entries.
        weights = {n: t.to("cpu", copy=True).contiguous() for n, t in self._hf_state_dict().items()}
        if getattr(self.hf_config, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)  # HF re-ties it from the embedding on load
        config = AutoConfig.from_pretrained(self.model_path)
        config.dtype = self.dtype
        config.save_pretrained(path)
        save_torch_state_dict(weights, path, metadata={"format": "pt"})
        for pattern in _TOKENIZER_FILES:
            for source in self.model_path.glob(pattern):
                if source.is_file() and source.resolve() != (path / source.name).resolve():
                    shutil.copy2(source, path / source.name)

