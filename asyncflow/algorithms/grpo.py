"""GRPO: group-relative advantages and the clipped policy-gradient loss.

For a group of G responses to one prompt with rewards r_1..r_G, GRPO replaces a learned value
baseline by the group's own statistics:

    A_i = (r_i - mean(r)) / (std(r) + eps)

and trains each response's tokens with the PPO clipped surrogate, the importance ratio taken
against the policy that generated the sample (the *behaviour* policy, possibly a few versions
stale), plus an optional k3 estimate of KL(policy || reference).
"""

from __future__ import annotations

import numpy as np
import torch


def group_advantages(
    rewards: np.ndarray,
    valid: np.ndarray | None = None,
    scale: bool = True,
    eps: float = 1e-6,
) -> np.ndarray:
    """Advantages of one GRPO group.

    A_i = (r_i - mean_V(r)) / (std_V(r) + eps) for i in V, the valid samples; with `scale=False`
    only the centring r_i - mean_V(r) is applied (Dr. GRPO style). `std` is the *population*
    standard deviation (numpy's default ddof=0), as in the reference GRPO implementations: with
    two samples of rewards {0, 1} it is 0.5, so the advantages are ±1/(0.5 + eps).

    Invalid samples (a failed generation or reward) get 0.0 and take no part in the statistics;
    callers must not train on them. A group whose valid rewards are all equal carries no signal
    and gets exactly zero (checked explicitly: the float mean of equal values need not equal
    them, and dividing that rounding error by eps would blow it up). A group with no valid
    sample gets all zeros.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be one-dimensional (one group), got shape {r.shape}")
    mask = np.ones(r.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if mask.shape != r.shape:
        raise ValueError(f"valid has shape {mask.shape}, rewards {r.shape}")
    advantages = np.zeros_like(r)
    if not mask.any():
        return advantages
    chosen = r[mask]
    if np.all(chosen == chosen[0]):
        return advantages
    centred = chosen - chosen.mean()
    if scale:
        centred = centred / (chosen.std() + eps)
    advantages[mask] = centred
    return advantages


def grpo_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed GRPO loss of a micro-batch and its statistics.

    Shapes: `logprobs`, `behaviour_logprobs`, `mask` and `ref_logprobs` are [B, T] over response
    positions, `advantages` is [B]. Per token t of sample i:

        r_t   = exp(logp_t - logp_behaviour_t)
        obj_t = min(r_t * A_i, clip(r_t, 1 - clip_low, 1 + clip_high) * A_i)
        k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (only if ref given and kl_coef > 0)
        l_t   = -obj_t + kl_coef * k3_t

    The sample's loss is the mean of l_t over its response tokens (mask = 1), as in the original
    GRPO (each sequence weighs the same whatever its length); a sample with no response tokens
    contributes 0. The returned loss is the *sum* over samples, so micro-batches of one step add
    up exactly and the caller divides the gradient once by the step's sample count.

    Stats are python floats that add across micro-batches, except `ratio_max`, which combines by
    max: `loss_sum`, `clip_frac_tokens` (tokens whose clipped term was the active one, i.e. the
    gradient through them is zero), `tokens`, `kl_sum` (sum of per-token k3, 0 if no reference),
    `ratio_max` (over valid tokens) and `samples` (samples with at least one token).
    """
    mask_f = mask.to(logprobs.dtype)
    behaviour = behaviour_logprobs.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)
    # Padding may hold anything (even logprobs far apart): zero the log-ratio there so exp() stays finite.
    log_ratio = torch.where(mask_f > 0, logprobs - behaviour, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    objective = torch.minimum(unclipped, clipped)
    per_token = -objective

    kl = None
    if ref_logprobs is not None and kl_coef > 0:
        ref = ref_logprobs.to(logprobs.dtype)
        delta = torch.where(mask_f > 0, ref - logprobs, torch.zeros_like(logprobs))
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_coef * kl

    token_counts = mask_f.sum(dim=-1)
    # clamp(min=1) keeps empty samples at 0 / 1 = 0 rather than 0 / 0 = NaN.
    per_sample = (per_token * mask_f).sum(dim=-1) / token_counts.clamp(min=1.0)
    loss = per_sample.sum()

    with torch.no_grad():
        valid = mask_f > 0
        clip_active = (clipped < unclipped) & valid
        stats = {
            "loss_sum": float(loss.detach()),
            "clip_frac_tokens": float(clip_active.sum()),
            "tokens": float(token_counts.sum()),
            "kl_sum": float((kl * mask_f).sum()) if kl is not None else 0.0,
            "ratio_max": float(ratio[valid].max()) if bool(valid.any()) else 0.0,
            "samples": float((token_counts > 0).sum()),
        }
    return loss, stats
