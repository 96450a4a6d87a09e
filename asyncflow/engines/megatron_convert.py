"""HF ↔ Megatron-core conversion for Llama and Qwen2: TransformerConfig, GPTModel arguments, weights.

The training side (`megatron_engine`) runs a Megatron-core `GPTModel`; everything outside it
speaks HF names. This module is the only place that knows how the two layouts correspond:

    HF                                             Megatron-core (local layer spec, TP = 1)
    model.embed_tokens.weight                      embedding.word_embeddings.weight
    model.layers.i.input_layernorm.weight          decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.*        decoder.layers.i.self_attention.linear_qkv.*  (fused)
    model.layers.i.self_attn.o_proj.weight         decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight       decoder.layers.i.mlp.linear_fc1.weight        (fused)
    model.layers.i.mlp.down_proj.weight            decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                              decoder.final_layernorm.weight
    lm_head.weight                                 output_layer.weight (absent when tied)

Megatron fuses QKV per query group: for each of the `num_query_groups` KV heads it stores that
group's query heads, then its key head, then its value head ([q_1 .. q_r, k, v] per group,
r = heads / groups). `linear_fc1` is cat(gate, up) along the output dimension, which is what
Megatron's gated linear unit splits in half (first half through the activation). Conversions
only reshape, concatenate and split, so HF → Megatron → HF gives back the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from asyncflow.errors import EngineError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")

# Per-layer names that map one to one (HF suffix, Megatron suffix).
_LAYER_RENAMES = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight"),
)
_GLOBAL_RENAMES = (
    ("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
    ("model.norm.weight", "decoder.final_layernorm.weight"),
)


def _model_type(hf_config: Any) -> str:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(
            f"the Megatron converter supports model types {list(SUPPORTED_MODEL_TYPES)}, got {model_type!r}"
        )
    return str(model_type)


def _head_dim(hf_config: Any) -> int:
    head_dim = getattr(hf_config, "head_dim", None)
    return int(head_dim) if head_dim else hf_config.hidden_size // hf_config.num_attention_heads


def _num_query_groups(hf_config: Any) -> int:
    groups = getattr(hf_config, "num_key_value_heads", None)
    return int(groups) if groups else int(hf_config.num_attention_heads)


def _qkv_bias(hf_config: Any) -> bool:
    if _model_type(hf_config) == "qwen2":
        return True  # Qwen2 always has q/k/v biases and no o_proj bias
    if getattr(hf_config, "attention_bias", False):
        # Llama's attention_bias also puts a bias on o_proj, which Megatron only offers together
        # with biases on every linear layer (add_bias_linear); not worth supporting here.
        raise EngineError("Llama with attention_bias=True is not supported by the Megatron converter")
    return False


def rope_settings(hf_config: Any) -> tuple[float, float | None]:
    """(rotary base, Llama-3 scaling factor or None) from an HF config; other RoPE types raise.

    transformers v5 keeps RoPE in `rope_parameters`; older versions in `rope_theta`/`rope_scaling`.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if not params and isinstance(legacy_scaling, Mapping):
        params = dict(legacy_scaling)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        # Megatron's Llama-3 scaling fixes these three; anything else would silently differ.
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, expected in fixed.items():
            if float(params.get(key, expected)) != expected:
                raise EngineError(f"llama3 RoPE with {key}={params[key]} is not supported (Megatron fixes {expected})")
        return float(theta), float(params.get("factor", 8.0))
    raise EngineError(f"RoPE type {rope_type!r} is not supported by the Megatron converter")


def _check_attention(hf_config: Any) -> None:
    if getattr(hf_config, "use_sliding_window", False) or "sliding_attention" in (
        getattr(hf_config, "layer_types", None) or []
    ):
        raise EngineError("sliding-window attention is not supported by the Megatron converter")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise EngineError(f"hidden_act {act!r} is not supported; Megatron's swiglu needs 'silu'")
    if getattr(hf_config, "mlp_bias", False):
        raise EngineError("Llama with mlp_bias=True is not supported by the Megatron converter")


def transformer_config_from_hf(hf_config: Any, **overrides: Any) -> TransformerConfig:
    """A Megatron `TransformerConfig` equivalent to an HF Llama / Qwen2 config.

    Defaults pick the plain-PyTorch paths (no fused kernels, no dropout), so the model runs on
    CPU and matches HF's numerics; `overrides` (e.g. `MegatronTrainingSettings.megatron_kwargs`,
    params_dtype, use_cpu_initialization) win over everything here.
    """
    _model_type(hf_config)
    _check_attention(hf_config)
    kwargs: dict[str, Any] = {
        "num_layers": int(hf_config.num_hidden_layers),
        "hidden_size": int(hf_config.hidden_size),
        "num_attention_heads": int(hf_config.num_attention_heads),
        "num_query_groups": _num_query_groups(hf_config),
        "kv_channels": _head_dim(hf_config),
        "ffn_hidden_size": int(hf_config.intermediate_size),
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf_config.rms_norm_eps),
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": _qkv_bias(hf_config),
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        # HF RMSNorm has no bias and plain (not 1 + w) gamma; these keep Megatron's the same.
        "layernorm_zero_centered_gamma": False,
        "apply_residual_connection_post_layernorm": False,
        # Fused kernels need CUDA extensions (apex / TE); a user can turn them on via overrides.
        "masked_softmax_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
        "attention_softmax_in_fp32": True,
        "cuda_graph_scope": [],  # the default "full" only triggers a deprecation warning
    }
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def gpt_model_kwargs_from_hf(hf_config: Any) -> dict[str, Any]:
    """`GPTModel(...)` keyword arguments that live outside TransformerConfig: vocab, positions, RoPE, tying."""
    _model_type(hf_config)
    rotary_base, scaling_factor = rope_settings(hf_config)
    kwargs: dict[str, Any] = {
        "vocab_size": int(hf_config.vocab_size),
        "max_sequence_length": int(hf_config.max_position_embeddings),
        "position_embedding_type": "rope",
        "rotary_base": rotary_base,
        "share_embeddings_and_output_weights": bool(getattr(hf_config, "tie_word_embeddings", False)),
    }
    if scaling_factor is not None:
        kwargs.update(rope_scaling=True, rope_scaling_factor=scaling_factor)
    return kwargs


# ------------------------------------------------------------------------------------ weights
def _qkv_shapes(hf_config: Any) -> tuple[int, int, int]:
    """(query groups, query heads per group, head dim)."""
    heads, groups = int(hf_config.num_attention_heads), _num_query_groups(hf_config)
    if heads % groups:
        raise EngineError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {groups}")
    return groups, heads // groups, _head_dim(hf_config)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hf_config: Any) -> torch.Tensor:
    """HF q/k/v projections (weights [out, in] or biases [out]) → Megatron's per-group layout."""
    groups, per_group, head_dim = _qkv_shapes(hf_config)
    tail = q.shape[1:]
    fused = torch.cat(
        [
            q.reshape(groups, per_group * head_dim, *tail),
            k.reshape(groups, head_dim, *tail),
            v.reshape(groups, head_dim, *tail),
        ],
        dim=1,
    )
    return fused.reshape(groups * (per_group + 2) * head_dim, *tail)


def split_qkv(fused: torch.Tensor, hf_config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`: Megatron's fused QKV → (q, k, v) in HF layout."""
    groups, per_group, head_dim = _qkv_shapes(hf_config)
    tail = fused.shape[1:]
    grouped = fused.reshape(groups, (per_group + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(groups * per_group * head_dim, *tail).contiguous(),
        k.reshape(groups * head_dim, *tail).contiguous(),
        v.reshape(groups * head_dim, *tail).contiguous(),
    )


def hf_to_megatron(hf_state_dict: Mapping[str, torch.Tensor], hf_config: Any) -> dict[str, torch.Tensor]:
    """An HF Llama / Qwen2 state dict renamed and fused into a Megatron GPTModel state dict.

    Every HF tensor must be consumed: an unknown name raises rather than being dropped. With
    tied embeddings a `lm_head.weight` entry (HF state dicts carry it) is accepted and skipped.
    """
    _model_type(hf_config)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    bias = _qkv_bias(hf_config)
    remaining = dict(hf_state_dict)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        try:
            return remaining.pop(name)
        except KeyError:
            raise EngineError(f"hf_to_megatron: the HF state dict has no {name}") from None

    for hf_name, megatron_name in _GLOBAL_RENAMES:
        out[megatron_name] = take(hf_name)
    if tied:
        remaining.pop("lm_head.weight", None)
    else:
        out["output_layer.weight"] = take("lm_head.weight")
    for i in range(int(hf_config.num_hidden_layers)):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_suffix, mg_suffix in _LAYER_RENAMES:
            out[mg + mg_suffix] = take(hf + hf_suffix)
        attn = hf + "self_attn."
        out[mg + "self_attention.linear_qkv.weight"] = fuse_qkv(
            take(attn + "q_proj.weight"), take(attn + "k_proj.weight"), take(attn + "v_proj.weight"), hf_config
        )
        if bias:
            out[mg + "self_attention.linear_qkv.bias"] = fuse_qkv(
                take(attn + "q_proj.bias"), take(attn + "k_proj.bias"), take(attn + "v_proj.bias"), hf_config
            )
        out[mg + "mlp.linear_fc1.weight"] = torch.cat(
            [take(hf + "mlp.gate_proj.weight"), take(hf + "mlp.up_proj.weight")], dim=0
        )
    # Rotary inverse frequencies are buffers some HF versions still save; they are derived state.
    leftover = sorted(n for n in remaining if not n.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise EngineError(f"hf_to_megatron: HF tensors with no Megatron counterpart: {leftover}")
    return out


def megatron_to_hf(
    megatron_state_dict: Mapping[str, torch.Tensor], hf_config: Any
) -> dict[str, torch.Tensor]:
    """A Megatron GPTModel state dict as HF Llama / Qwen2 names (inverse of `hf_to_megatron`).

    With tied embeddings `lm_head.weight` is emitted as the embedding tensor itself, since an HF
    model's `state_dict()` lists it too and strict loaders expect it. Megatron's `_extra_state`
    entries (serialisation metadata, not weights) are ignored.
    """
    _model_type(hf_config)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    bias = _qkv_bias(hf_config)
    remaining = {n: t for n, t in megatron_state_dict.items() if not n.endswith("_extra_state")}
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        try:
            return remaining.pop(name)
        except KeyError:
            raise EngineError(f"megatron_to_hf: the Megatron state dict has no {name}") from None

    for hf_name, megatron_name in _GLOBAL_RENAMES:
        out[hf_name] = take(megatron_name)
    if tied:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
        remaining.pop("output_layer.weight", None)
    else:
        out["lm_head.weight"] = take("output_layer.weight")
    ffn = int(hf_config.intermediate_size)
    for i in range(int(hf_config.num_hidden_layers)):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_suffix, mg_suffix in _LAYER_RENAMES:
            out[hf + hf_suffix] = take(mg + mg_suffix)
        attn = hf + "self_attn."
        q, k, v = split_qkv(take(mg + "self_attention.linear_qkv.weight"), hf_config)
        out[attn + "q_proj.weight"], out[attn + "k_proj.weight"], out[attn + "v_proj.weight"] = q, k, v
        if bias:
            q, k, v = split_qkv(take(mg + "self_attention.linear_qkv.bias"), hf_config)
            out[attn + "q_proj.bias"], out[attn + "k_proj.bias"], out[attn + "v_proj.bias"] = q, k, v
        gate, up = torch.split(take(mg + "mlp.linear_fc1.weight"), [ffn, ffn], dim=0)
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
    if remaining:
        raise EngineError(f"megatron_to_hf: Megatron tensors with no HF counterpart: {sorted(remaining)}")
    return out
