"""HF transformers + torch engines: hand-written KV-cache generation and an AdamW trainer.

Both sides compute a token's logprob the same way, log_softmax(logits / T)[token] in float32,
so the importance ratio exp(logp_train - logp_behaviour) is exactly 1 on identical weights up
to float noise. That agreement is what off-policy correction rests on; the tests check it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from asyncflow.config import HFInferenceSettings, HFTrainingSettings
from asyncflow.engines.base import Generation, InferenceEngine, SamplingParams, check_generate_args
from asyncflow.engines.torch_training import TorchTrainingEngine
from asyncflow.errors import EngineError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _torch_dtype(dtype: str) -> torch.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise EngineError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def _load_model(model_path: Path, dtype: str, device: str) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_torch_dtype(dtype))
    except (OSError, ValueError) as error:
        raise EngineError(f"cannot load an HF causal LM from {model_path}: {error}") from error
    return model.to(device)


def _load_tokenizer(model_path: Path) -> Any | None:
    # A weights-only folder is still usable: special ids then come from the model config.
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


def _as_id_set(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _token_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, temperature: float
) -> torch.Tensor:
    """log_softmax(lm_head(hidden) / T)[target] for rows of `hidden` [N, H] and `targets` [N].

    The output layer runs outside any autocast, in the model's dtype: logits near 20 in bfloat16
    would be off by ~0.1, far more than the logprob agreement importance ratios rest on."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = lm_head(hidden.to(lm_head.weight.dtype)).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class HFInferenceEngine(InferenceEngine):
    """Batched sampling with a KV cache over an HF causal LM, one seeded generator per row."""

    def __init__(self, model_path: Path, settings: HFInferenceSettings, dtype: str = "float32") -> None:
        self.settings = settings
        self.device = torch.device(settings.device)
        self.model = _load_model(Path(model_path), dtype, settings.device).eval()
        self.tokenizer = _load_tokenizer(Path(model_path))
        config = self.model.config
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        self.eos_ids = _as_id_set(eos) or _as_id_set(self.model.generation_config.eos_token_id)
        self.eos_ids |= _as_id_set(getattr(config, "eos_token_id", None))
        if not self.eos_ids:
            raise EngineError(
                f"model at {model_path} defines no EOS token (tokenizer or config eos_token_id)"
            )
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        if pad is None:
            pad = getattr(config, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids)
        # transformers v5 renamed `past_key_values` to `cache`; use whichever the model takes.
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in parameters

    # ----------------------------------------------------------------------------------- generate
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> list[Generation]:
        check_generate_args(prompts, seeds)
        # Batch similar lengths together (less padding); rows are independent, so order is free.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        size = self.settings.max_batch_size
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            generations = self._generate_batch(
                [list(prompts[i]) for i in chunk], params, [seeds[i] for i in chunk]
            )
            for i, generation in zip(chunk, generations, strict=True):
                results[i] = generation
        return [g for g in results if g is not None]

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {self._cache_kwarg: cache}
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = 1  # only the last position's logits are needed
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **kwargs,
        )
        return out.logits[:, -1, :]

    def _new_cache(self) -> DynamicCache:
        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56 takes no config
            return DynamicCache()

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[Generation]:
        batch = len(prompts)
        steps = params.max_new_tokens
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        # Left padding: every row's next token lands in the same (last) column.
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long, device=self.device)
        attention_mask = torch.zeros((batch, width), dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        # Positions count real tokens only, so a padded row sees the same RoPE phases as alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # All of a row's uniforms come from its own seed, drawn on the CPU so the draws do not
        # depend on the device or on the rows around it.
        uniforms = torch.stack(
            [
                torch.rand(steps, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
                for seed in seeds
            ]
        ).to(self.device)
        eos = torch.tensor(sorted(self.eos_ids), device=self.device)

        cache = self._new_cache()
        tokens = torch.empty((batch, steps), dtype=torch.long, device=self.device)
        logprobs = torch.empty((batch, steps), dtype=torch.float32, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        produced = torch.zeros(batch, dtype=torch.long, device=self.device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=self.device)

        logits = self._forward(input_ids, attention_mask, position_ids, cache)
        for step in range(steps):
            token, logprob = self._sample(logits, params, uniforms[:, step])
            tokens[:, step] = token
            logprobs[:, step] = logprob
            produced += (~done).long()
            hit_eos = torch.isin(token, eos) & ~done
            stopped |= hit_eos
            done |= hit_eos
            if step == steps - 1 or bool(done.all()):
                break
            # Finished rows keep decoding (their output is ignored): the cache stays one batch.
            attention_mask = torch.cat(
                [attention_mask, torch.ones((batch, 1), dtype=torch.long, device=self.device)], dim=1
            )
            position_ids = (lengths + step).unsqueeze(-1)
            logits = self._forward(token.unsqueeze(-1), attention_mask, position_ids, cache)

        tokens_cpu, logprobs_cpu = tokens.cpu(), logprobs.cpu()
        out: list[Generation] = []
        for row in range(batch):
            n = int(produced[row])
            out.append(
                Generation(
                    token_ids=tokens_cpu[row, :n].tolist(),
                    logprobs=logprobs_cpu[row, :n].tolist(),
                    finish_reason="stop" if bool(stopped[row]) else "length",
                )
            )
        return out

    @staticmethod
    def _sample(
        logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one token per row by inverse CDF with the row's uniform; return it and its logprob.

        The recorded logprob is log_softmax(logits / T)[token] *before* the top-p filter, the
        same quantity the trainer computes (it never applies top-p). With top_p < 1 this is not
        the exact sampling distribution; that mismatch is the usual, accepted one.
        """
        logp = torch.log_softmax(logits.float() / params.temperature, dim=-1)
        probs = logp.exp()
        if params.top_p < 1.0:
            # Keep the smallest prefix of the sorted distribution whose mass reaches top_p;
            # the most likely token always stays. A stable sort keeps ties deterministic.
            sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
            before = sorted_probs.cumsum(-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        else:
            sorted_probs, sorted_ids = probs, None
        cdf = sorted_probs.cumsum(-1)
        target = (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
        # right=True skips zero-probability entries; the clamp guards u·total rounding up to total.
        index = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)
        token = index if sorted_ids is None else sorted_ids.gather(-1, index)
        token = token.squeeze(-1)
        return token, logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)

    # ------------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a full HF state dict into the model in place (names must match exactly).

        Tensors are copied as they stream in, so on an error the model may be partly updated;
        callers treat that as fatal for this engine.
        """
        targets = self.model.state_dict()
        seen: set[str] = set()
        unknown: list[str] = []
        for name, tensor in named_tensors:
            target = targets.get(name)
            if target is None:
                unknown.append(name)
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                raise EngineError(
                    f"load_weights: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(tensor)
            seen.add(name)
        # A name left out because it shares its storage with a loaded one (tied embeddings) is loaded.
        loaded = {targets[name].data_ptr() for name in seen}
        missing = sorted(name for name in set(targets) - seen if targets[name].data_ptr() not in loaded)
        if unknown or missing:
            raise EngineError(
                f"load_weights: state dict does not match the model; unknown names {sorted(unknown)}, "
                f"missing names {missing}"
            )


class HFTrainingEngine(TorchTrainingEngine):
    """An HF causal LM trained with AdamW; gradients accumulate over micro-batches."""

    def __init__(
        self,
        model_path: Path,
        settings: HFTrainingSettings,
        *,
        temperature: float = 1.0,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        if temperature <= 0:
            raise EngineError(f"temperature must be > 0, got {temperature}")
        # Nothing here draws random numbers today; the seed pins any that a model adds (dropout).
        torch.manual_seed(seed)
        self.settings = settings
        self.temperature = temperature
        self.device = torch.device(settings.device)
        self.model = _load_model(Path(model_path), dtype, settings.device).train()
        self.tokenizer = _load_tokenizer(Path(model_path))
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        if self.lm_head is None:
            raise EngineError(f"model at {model_path} has no output embeddings (lm_head)")
        pad = getattr(self.model.config, "pad_token_id", None)
        # Right padding is masked out and never predicted from, so any valid id will do.
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )

    def _context(self) -> contextlib.AbstractContextManager[None]:
        if self.settings.autocast == "none":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # ---------------------------------------------------------------------------------- logprobs
    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _chunk_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _token_logprobs(hidden, targets, self.lm_head, self.temperature)

    def _response_hidden(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        distinct = {tuple(p) for p in prompt_ids}
        # Sharing pays when prompts repeat; a one-token prompt leaves no prefix to cache.
        if (not self.settings.share_prompt_prefix or len(distinct) == len(prompt_ids)
                or min(len(p) for p in prompt_ids) < 2):
            return super()._response_hidden(prompt_ids, response_ids)
        return self._shared_prefix_hidden(prompt_ids, response_ids)

    def _shared_prefix_hidden(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        """`_response_hidden` with each distinct prompt's forward run once.

        Pass 1 runs every distinct prompt but its last token, left-padded (as generation does),
        into a KV cache. The cache is then indexed out to one row per sample (a gather, so the
        gradients of all samples of a prompt flow back into its one forward). Pass 2 runs each
        sample's last prompt token followed by its response but the last token, at positions
        len(prompt) - 1 onward, so the hidden state at step j predicts response[j]: the same
        values as the whole sequence in one row, up to float rounding.
        """
        device = self.device
        order: dict[tuple[int, ...], int] = {}
        owner = [order.setdefault(tuple(p), len(order)) for p in prompt_ids]
        prefixes = [list(p[:-1]) for p in order]
        width = max(len(p) for p in prefixes)
        prefix_ids = torch.full((len(prefixes), width), self.pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            prefix_ids[row, width - len(prefix) :] = torch.tensor(prefix, dtype=torch.long)
            prefix_mask[row, width - len(prefix) :] = 1
        prefix_mask = prefix_mask.to(device)
        # Positions count real tokens only, so a padded prompt sees the same RoPE phases as alone.
        prefix_positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self.decoder(input_ids=prefix_ids.to(device), attention_mask=prefix_mask,
                     position_ids=prefix_positions, past_key_values=cache, use_cache=True)
        owners = torch.tensor(owner, device=device)
        cache.batch_select_indices(owners)

        steps = max(len(r) for r in response_ids)  # last prompt token + all but the last response token
        tail_ids = torch.full((len(prompt_ids), steps), self.pad_id, dtype=torch.long)
        tail_mask = torch.zeros((len(prompt_ids), steps), dtype=torch.long)
        tail_positions = torch.zeros((len(prompt_ids), steps), dtype=torch.long)
        rows: list[int] = []
        cols: list[int] = []
        for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            tail = [prompt[-1], *response[:-1]][: max(len(response), 1)]
            tail_ids[row, : len(tail)] = torch.tensor(tail, dtype=torch.long)
            tail_mask[row, : len(tail)] = 1
            # Right padding after the tail is never attended to by its real tokens (causal).
            tail_positions[row] = torch.arange(len(prompt) - 1, len(prompt) - 1 + steps)
            rows.extend([row] * len(response))
            cols.extend(range(len(response)))
        attention_mask = torch.cat([prefix_mask[owners], tail_mask.to(device)], dim=1)
        hidden = self.decoder(input_ids=tail_ids.to(device), attention_mask=attention_mask,
                              position_ids=tail_positions.to(device), past_key_values=cache,
                              use_cache=True).last_hidden_state
        return hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]

    # ----------------------------------------------------------------------------------- weights
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named tensors from `state_dict()`, each storage once: a tied output embedding
        (`lm_head.weight` = `model.embed_tokens.weight`) is left out, as in HF checkpoints, and
        every loader ties it itself (a sixth of SmolLM2's bytes per weight sync). CPU tensors are
        cloned so that a consumer holding them does not see later optimizer steps (`.cpu()` of a
        CPU tensor is a view)."""
        exported: set[tuple[int, tuple[int, ...]]] = set()
        for name, tensor in self.model.state_dict().items():
            value = tensor.detach()
            storage = (value.data_ptr(), tuple(value.shape))
            if storage in exported:
                continue
            exported.add(storage)
            yield name, value.clone() if value.device.type == "cpu" else value.cpu()

    def save_pretrained(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)  # safetensors is the default format
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
