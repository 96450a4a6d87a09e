"""GRPO: group-relative advantages and the clipped policy-gradient loss.

For a group of G responses to one prompt with rewards r_1..r_G, GRPO replaces a learned value
baseline by the group's own statistics:

    A_i = (r_i - mean(r)) / (std(r) + eps)

and trains each response's tokens with the PPO clipped surrogate plus an optional k3 estimate of
KL(policy || reference). Samples may come from a policy a few versions older than the trainer's
(the *behaviour* policy); `grpo_loss` corrects for that in one of two ways (`OffPolicyCorrection`):
the PPO ratio taken against the behaviour policy and clipped, or decoupled PPO, which clips against
the trainer's current (proximal) policy and weights each token by a truncated importance weight.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

OffPolicyCorrection = Literal["ppo_clip", "decoupled"]
"""How `grpo_loss` treats tokens sampled by an older policy (`algorithm.off_policy_correction`)."""


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
    correction: OffPolicyCorrection = "ppo_clip",
    weight_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed GRPO loss of a micro-batch and its statistics.

    Shapes: `logprobs`, `behaviour_logprobs`, `mask` and `ref_logprobs` are [B, T] over response
    positions, `advantages` is [B]. Per token t of sample i, with `correction="ppo_clip"`:

        r_t   = exp(logp_t - logp_behaviour_t)
        obj_t = min(r_t * A_i, clip(r_t, 1 - clip_low, 1 + clip_high) * A_i)

    and with `correction="decoupled"` (decoupled PPO, Hilton et al. 2021), the proximal policy
    being the trainer's weights at this step, i.e. logp_prox = logp.detach() (one optimizer step
    per partition, so r_t is 1 in value and only its gradient matters):

        r_t   = exp(logp_t - logp_prox_t)
        w_t   = min(exp(logp_prox_t - logp_behaviour_t), weight_cap)    (no gradient)
        obj_t = w_t * min(r_t * A_i, clip(r_t, 1 - clip_low, 1 + clip_high) * A_i)

    then in both cases

        k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (only if ref given and kl_coef > 0)
        l_t   = -obj_t + kl_coef * k3_t

    The sample's loss is the mean of l_t over its response tokens (mask = 1), as in the original
    GRPO (each sequence weighs the same whatever its length); a sample with no response tokens
    contributes 0. The returned loss is the *sum* over samples, so micro-batches of one step add
    up exactly and the caller divides the gradient once by the step's sample count. Padding
    (mask = 0) may hold any value, infinities included: it changes neither the loss nor a gradient.

    Stats are python floats that add across micro-batches, except `ratio_max`, which combines by
    max: `loss_sum`, `clip_frac_tokens` (tokens whose clipped term was the active one, i.e. the
    gradient through them is zero), `tokens`, `kl_sum` (sum of per-token k3, 0 if no reference),
    `ratio_max` (of r_t over valid tokens) and `samples` (samples with at least one token).
    `decoupled` adds `importance_weight_sum` (sum of the truncated w_t over valid tokens),
    `importance_weight_tokens` (their count: the mean weight of a step is the ratio of the two
    summed over its micro-batches) and `importance_weight_truncated` (valid tokens whose weight
    exceeded `weight_cap` and was cut to it).
    """
    if correction not in get_args(OffPolicyCorrection):
        raise ValueError(f"correction must be one of {get_args(OffPolicyCorrection)}, got {correction!r}")
    if not weight_cap > 0:
        raise ValueError(f"weight_cap must be positive, got {weight_cap}")
    mask_f = mask.to(logprobs.dtype)
    behaviour = behaviour_logprobs.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)
    valid = mask_f > 0
    weight = raw_weight = None
    if correction == "ppo_clip":
        # Padding may hold anything (even logprobs far apart): zero the log-ratio there so exp() stays finite.
        log_ratio = torch.where(valid, logprobs - behaviour, torch.zeros_like(logprobs))
    else:
        proximal = logprobs.detach()
        log_ratio = torch.where(valid, logprobs - proximal, torch.zeros_like(logprobs))
        # The weight only rescales each token's gradient: detached, so no gradient flows through the
        # behaviour correction itself. Zeroed on padding for the same reason as the log-ratio.
        log_weight = torch.where(valid, proximal - behaviour, torch.zeros_like(logprobs))
        raw_weight = torch.exp(log_weight)  # may be inf for a very stale token: the cap below bounds it
        # Truncate rather than drop (AReaL zeroes tokens over the cap): a very stale token still pushes
        # in its advantage's direction, with at most weight_cap times an on-policy token's gradient.
        weight = torch.clamp(raw_weight, max=weight_cap)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    objective = torch.minimum(unclipped, clipped)
    if weight is not None:
        objective = weight * objective
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
        clip_active = (clipped < unclipped) & valid
        stats = {
            "loss_sum": float(loss.detach()),
            "clip_frac_tokens": float(clip_active.sum()),
            "tokens": float(token_counts.sum()),
            "kl_sum": float((kl * mask_f).sum()) if kl is not None else 0.0,
            "ratio_max": float(ratio[valid].max()) if bool(valid.any()) else 0.0,
            "samples": float((token_counts > 0).sum()),
        }
        if weight is not None and raw_weight is not None:
            stats["importance_weight_sum"] = float(weight[valid].sum())
            stats["importance_weight_tokens"] = float(valid.sum())
            stats["importance_weight_truncated"] = float(((raw_weight > weight_cap) & valid).sum())
    return loss, stats
