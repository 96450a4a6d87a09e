"""GRPO advantages and loss against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyncflow.algorithms import group_advantages, grpo_loss

EPS = 1e-6


# ---------------------------------------------------------------------------- group_advantages
def test_advantages_two_levels() -> None:
    # mean 0.5, population std 0.5
    out = group_advantages(np.array([1.0, 0.0, 0.0, 1.0]))
    expected = np.array([1, -1, -1, 1]) * (0.5 / (0.5 + EPS))
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_advantages_uneven_group() -> None:
    rewards = np.array([3.0, 1.0, 2.0])
    out = group_advantages(rewards, eps=0.0)
    std = math.sqrt(2.0 / 3.0)  # deviations 1, -1, 0 → variance 2/3 (ddof=0)
    np.testing.assert_allclose(out, [1 / std, -1 / std, 0.0], rtol=1e-12)


def test_advantages_invalid_samples_excluded() -> None:
    rewards = np.array([1.0, 0.0, 5.0, 0.0])
    valid = np.array([True, True, False, True])
    out = group_advantages(rewards, valid)
    mean = 1.0 / 3.0
    std = math.sqrt(((1 - mean) ** 2 + 2 * mean**2) / 3)
    np.testing.assert_allclose(out, [(1 - mean) / (std + EPS), -mean / (std + EPS), 0.0, -mean / (std + EPS)])
    assert out[2] == 0.0


def test_advantages_all_equal_and_no_valid() -> None:
    assert np.all(group_advantages(np.array([0.7, 0.7, 0.7])) == 0.0)
    assert np.all(group_advantages(np.array([1.0, 2.0]), np.array([False, False])) == 0.0)


def test_advantages_centring_only() -> None:
    out = group_advantages(np.array([1.0, 0.0, 0.0, 1.0]), scale=False)
    np.testing.assert_allclose(out, [0.5, -0.5, -0.5, 0.5])


def test_advantages_bad_shapes() -> None:
    with pytest.raises(ValueError):
        group_advantages(np.zeros((2, 2)))
    with pytest.raises(ValueError):
        group_advantages(np.zeros(3), np.ones(2, dtype=bool))


# ---------------------------------------------------------------------------------- grpo_loss
def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two samples, behaviour logprobs -1 everywhere; ratios chosen to hit both clip edges."""
    ratios = torch.tensor([[1.5, 1.0, 0.9], [0.5, 1.1, 7.0]], dtype=torch.float64)
    behaviour = torch.full((2, 3), -1.0, dtype=torch.float64)
    logprobs = behaviour + ratios.log()
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    return logprobs, behaviour, advantages, mask


def test_loss_hand_computed() -> None:
    logprobs, behaviour, advantages, mask = _case()
    loss, stats = grpo_loss(logprobs, behaviour, advantages, mask)
    # Sample 0 (A=+1): token 0 clipped at 1.2, then 1.0, 0.9 → loss -(1.2+1.0+0.9)/3.
    # Sample 1 (A=-2): min(-1.0, 0.8·-2 = -1.6) = -1.6 (clipped), min(-2.2, -2.2) → loss 3.8/2.
    expected = -3.1 / 3 + 3.8 / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["loss_sum"] == pytest.approx(expected, abs=1e-12)
    assert stats["clip_frac_tokens"] == 2.0
    assert stats["tokens"] == 5.0
    assert stats["samples"] == 2.0
    assert stats["ratio_max"] == pytest.approx(1.5)  # the padded 7.0 is ignored
    assert stats["kl_sum"] == 0.0


def test_clipped_tokens_get_no_gradient() -> None:
    logprobs, behaviour, advantages, mask = _case()
    logprobs.requires_grad_(True)
    loss, _ = grpo_loss(logprobs, behaviour, advantages, mask)
    loss.backward()
    grad = logprobs.grad
    assert grad[0, 0] == 0.0 and grad[1, 0] == 0.0  # the two clipped tokens
    # Unclipped token: d(-r·A/n)/dlogp = -r·A/n.
    assert grad[0, 1].item() == pytest.approx(-1.0 / 3)
    assert grad[1, 1].item() == pytest.approx(1.1 * 2 / 2)
    assert grad[1, 2] == 0.0  # padding


def test_padding_values_do_not_matter() -> None:
    logprobs, behaviour, advantages, mask = _case()
    loss, stats = grpo_loss(logprobs, behaviour, advantages, mask)
    logprobs2, behaviour2 = logprobs.clone(), behaviour.clone()
    logprobs2[1, 2], behaviour2[1, 2] = 50.0, -1e4  # would overflow exp() if not masked
    ref = torch.zeros_like(logprobs)
    ref2 = ref.clone()
    ref2[1, 2] = 1e4
    loss2, stats2 = grpo_loss(logprobs2, behaviour2, advantages, mask)
    assert loss2.item() == loss.item() and stats2 == stats
    with_ref = grpo_loss(logprobs, behaviour, advantages, mask, ref, kl_coef=0.5)
    with_ref2 = grpo_loss(logprobs2, behaviour2, advantages, mask, ref2, kl_coef=0.5)
    assert with_ref[0].item() == with_ref2[0].item()
    assert math.isfinite(with_ref2[0].item())


def test_kl_term() -> None:
    logprobs, behaviour, advantages, mask = _case()
    ref = torch.tensor([[-1.2, -0.5, -1.0], [-2.0, -1.0, 0.0]], dtype=torch.float64)
    base, _ = grpo_loss(logprobs, behaviour, advantages, mask)
    loss, stats = grpo_loss(logprobs, behaviour, advantages, mask, ref, kl_coef=0.1)
    delta = (ref - logprobs).numpy()
    k3 = np.exp(delta) - delta - 1
    m = mask.numpy()
    per_sample_kl = (k3 * m).sum(1) / m.sum(1)
    assert loss.item() == pytest.approx(base.item() + 0.1 * per_sample_kl.sum(), abs=1e-12)
    assert stats["kl_sum"] == pytest.approx((k3 * m).sum())
    assert np.all(k3 >= 0)
    # No reference effect when kl_coef is 0.
    assert grpo_loss(logprobs, behaviour, advantages, mask, ref)[0].item() == base.item()


def test_zero_length_response_no_nan() -> None:
    logprobs = torch.zeros((2, 2), requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss, stats = grpo_loss(logprobs, torch.zeros((2, 2)), torch.tensor([1.0, 1.0]), mask)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)  # sample 0: ratio 1, A 1; sample 1 adds 0
    assert torch.isfinite(logprobs.grad).all()
    assert stats["samples"] == 1.0 and stats["tokens"] == 2.0

    empty = torch.zeros((1, 0), requires_grad=True)
    loss, stats = grpo_loss(empty, torch.zeros((1, 0)), torch.tensor([1.0]), torch.zeros((1, 0)))
    assert loss.item() == 0.0 and stats["ratio_max"] == 0.0 and stats["tokens"] == 0.0


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_gradient_direction(advantage: float) -> None:
    theta = torch.zeros(5, requires_grad=True)
    response = torch.tensor([[2, 2, 4]])
    optimizer = torch.optim.SGD([theta], lr=0.5)

    def logprobs() -> torch.Tensor:
        return torch.log_softmax(theta, -1)[response]

    before = logprobs().sum().item()
    for _ in range(3):
        current = logprobs()
        loss, _ = grpo_loss(current, current.detach(), torch.tensor([advantage]), torch.ones(1, 3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = logprobs().sum().item()
    assert (after - before) * advantage > 0


# ------------------------------------------------------------------------ off-policy correction
def _token_grads(
    logprobs: torch.Tensor, behaviour: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Loss, d loss / d logprobs and stats of grpo_loss at `logprobs` (a fresh leaf each call)."""
    leaf = logprobs.detach().clone().requires_grad_(True)
    loss, stats = grpo_loss(leaf, behaviour, advantages, mask, **kwargs)
    loss.backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad, stats


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_decoupled_equals_ppo_clip_on_policy(kl_coef: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand((3, 5), generator=generator, dtype=torch.float64) * 3
    ref = -torch.rand((3, 5), generator=generator, dtype=torch.float64) * 3
    advantages = torch.tensor([1.3, -0.7, 0.2], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    behaviour = logprobs.clone()  # on-policy: the sample came from the trainer's current weights
    ppo = _token_grads(logprobs, behaviour, advantages, mask, ref_logprobs=ref, kl_coef=kl_coef)
    dec = _token_grads(logprobs, behaviour, advantages, mask, ref_logprobs=ref, kl_coef=kl_coef,
                       correction="decoupled", weight_cap=2.0)
    # Every weight is exp(0) = 1 and every ratio 1, so the two losses are the same computation.
    assert torch.equal(ppo[0], dec[0])
    assert torch.equal(ppo[1], dec[1])
    assert dec[2]["importance_weight_sum"] == dec[2]["importance_weight_tokens"] == 9.0
    assert dec[2]["importance_weight_truncated"] == 0.0


def _stale_case(weight: float, advantage: float) -> tuple[torch.Tensor, ...]:
    """One sample of two tokens: token 0 has π_θ/π_behaviour = `weight`, token 1 is on-policy."""
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    behaviour = logprobs - torch.tensor([[math.log(weight), 0.0]], dtype=torch.float64)
    return logprobs, behaviour, torch.tensor([advantage], dtype=torch.float64), torch.ones((1, 2), dtype=torch.float64)


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_stale_token_weight_truncated_at_cap(advantage: float) -> None:
    logprobs, behaviour, advantages, mask = _stale_case(3.0, advantage)
    _, on_policy, _ = _token_grads(logprobs, logprobs, advantages, mask)
    loss, grad, stats = _token_grads(logprobs, behaviour, advantages, mask, correction="decoupled", weight_cap=2.0)
    assert on_policy[0, 0].item() == pytest.approx(-advantage / 2)  # -A/n with n = 2 tokens
    # The weight 3 is cut to the cap 2, whatever the advantage's sign; token 1 is untouched.
    assert grad[0, 0].item() == pytest.approx(2.0 * on_policy[0, 0].item(), rel=1e-12)
    assert grad[0, 1].item() == pytest.approx(on_policy[0, 1].item(), rel=1e-12)
    assert loss.item() == pytest.approx(-(2.0 + 1.0) * advantage / 2, rel=1e-12)
    assert stats["importance_weight_truncated"] == 1.0
    assert stats["importance_weight_sum"] == pytest.approx(3.0)

    _, ppo, _ = _token_grads(logprobs, behaviour, advantages, mask, correction="ppo_clip")
    if advantage > 0:
        assert ppo[0, 0].item() == 0.0  # ratio 3 > 1.2 with A > 0: the clipped term is active
    else:
        # With A < 0 the PPO min keeps the unclipped term: the full, untruncated ratio 3.
        assert ppo[0, 0].item() == pytest.approx(3.0 * on_policy[0, 0].item(), rel=1e-12)


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_stale_token_small_weight_scales_gradient(advantage: float) -> None:
    logprobs, behaviour, advantages, mask = _stale_case(0.5, advantage)
    _, on_policy, _ = _token_grads(logprobs, logprobs, advantages, mask)
    loss, grad, stats = _token_grads(logprobs, behaviour, advantages, mask, correction="decoupled", weight_cap=2.0)
    assert grad[0, 0].item() == pytest.approx(0.5 * on_policy[0, 0].item(), rel=1e-12)
    assert grad[0, 1].item() == pytest.approx(on_policy[0, 1].item(), rel=1e-12)
    assert loss.item() == pytest.approx(-(0.5 + 1.0) * advantage / 2, rel=1e-12)
    assert stats["importance_weight_truncated"] == 0.0
    # The clip acts on π_θ/π_prox, which is 1: it never cuts a token's gradient here.
    assert stats["clip_frac_tokens"] == 0.0 and stats["ratio_max"] == 1.0


@pytest.mark.parametrize("correction", ["ppo_clip", "decoupled"])
def test_extreme_padding_is_harmless(correction: str) -> None:
    logprobs, behaviour, advantages, mask = _case()
    ref = torch.full_like(logprobs, -1.0)
    base = _token_grads(logprobs, behaviour, advantages, mask, ref_logprobs=ref, kl_coef=0.1, correction=correction)
    wild_logprobs, wild_behaviour, wild_ref = logprobs.clone(), behaviour.clone(), ref.clone()
    wild_logprobs[1, 2], wild_behaviour[1, 2], wild_ref[1, 2] = 1e4, -math.inf, 1e4  # exp() of these overflows
    wild = _token_grads(wild_logprobs, wild_behaviour, advantages, mask, ref_logprobs=wild_ref, kl_coef=0.1,
                        correction=correction)
    assert math.isfinite(wild[0].item()) and wild[0].item() == base[0].item()
    assert torch.isfinite(wild[1]).all() and wild[1][1, 2] == 0.0
    assert torch.equal(wild[1], base[1])
    assert wild[2] == base[2]


def test_truncated_tokens_counted() -> None:
    # Weights π_θ/π_behaviour per token; cap 2. Row 1's last token is padding with weight 100.
    weights = torch.tensor([[3.0, 2.5, 1.5], [0.5, 40.0, 100.0]], dtype=torch.float64)
    logprobs = torch.full((2, 3), -1.0, dtype=torch.float64)
    behaviour = logprobs - weights.log()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    _, stats = grpo_loss(logprobs, behaviour, advantages, mask, correction="decoupled", weight_cap=2.0)
    assert stats["importance_weight_truncated"] == 3.0  # 3.0, 2.5 and 40; not the padded 100
    assert stats["importance_weight_tokens"] == stats["tokens"] == 5.0
    assert stats["importance_weight_sum"] == pytest.approx(2.0 + 2.0 + 1.5 + 0.5 + 2.0)
    # Split into micro-batches, the stats add up to the same step totals (the trainer sums them).
    parts = [grpo_loss(logprobs[i : i + 1], behaviour[i : i + 1], advantages[i : i + 1], mask[i : i + 1],
                       correction="decoupled", weight_cap=2.0)[1] for i in range(2)]
    for key in ("importance_weight_sum", "importance_weight_tokens", "importance_weight_truncated"):
        assert sum(p[key] for p in parts) == pytest.approx(stats[key])
    # ppo_clip reports no importance weights: it has none besides the clipped ratio.
    _, ppo_stats = grpo_loss(logprobs, behaviour, advantages, mask)
    assert not any(key.startswith("importance_weight") for key in ppo_stats)


def test_correction_arguments_checked() -> None:
    logprobs, behaviour, advantages, mask = _case()
    with pytest.raises(ValueError, match="correction"):
        grpo_loss(logprobs, behaviour, advantages, mask, correction="vtrace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_cap"):
        grpo_loss(logprobs, behaviour, advantages, mask, correction="decoupled", weight_cap=0.0)
