"""HAPO, token-aware policy optimisation (ALGORITHMS.md §3): an entropy normaliser ĥ shared by three switches.

- `hapo` advantage estimator: token-level group average (mean and biased std over every valid token of the group).
- `hapo_entropy` token shaper: ĥ ∈ [-1, 1] per token from the step's old-policy entropies (pivot = q-quantile of
  log H, scale = RMS distance to the pivot, then positives and negatives scaled to reach ±1).
- `hapo` policy loss: PPO-clip with asymmetric adaptive clipping and differential advantage redistribution.

ĥ comes from the OLD policy's entropy over the whole step (equal to the current policy's at the step's first
update). The spec reads "current policy"; statistics over the whole step keep every update independent of how the
batch is cut into micro-batches and ranks, which a per-micro-batch current-entropy pivot would not.
- adaptive temperature sampling (`algorithm.adaptive_temperature`): the rollout engine samples each token at
  T (1 + tau ĥ), ĥ from the step's logits under the previous training step's normaliser statistics
  (`normaliser_stats`, kept in the algorithm state); the learner scores each token at the temperature it was
  sampled with.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from tokenwise.rl.advantages import ADVANTAGES, group_rewards, grpo, per_response
from tokenwise.rl.losses import POLICY_LOSSES, clip_stats, log_ratio
from tokenwise.rl.shaping import TOKEN_SHAPERS
from tokenwise.rl.stats import quantile
from tokenwise.rl.types import TrainBatch


def normaliser_stats(entropy_BT: Tensor, mask_BT: Tensor, *, q: float = 0.8) -> dict[str, float]:
    """The normaliser's statistics over the valid tokens: pivot = q-quantile of l = log(max(H, 1e-8)); rms =
    sqrt(mean (l - pivot)^2); pos_max / neg_min = the largest / smallest h = (l - pivot) / rms (1.0 / -1.0 when there
    is no such token, and everything 0 when rms is 0: constant entropy)."""
    vals = torch.log(entropy_BT.double().clamp(min=1e-8))[mask_BT > 0]
    if vals.numel() == 0:
        return {"pivot": 0.0, "rms": 0.0, "pos_max": 1.0, "neg_min": -1.0}
    pivot = quantile(vals, q)
    rms = float(torch.sqrt(((vals - pivot) ** 2).mean()))
    if rms <= 1e-12:
        return {"pivot": float(pivot), "rms": 0.0, "pos_max": 1.0, "neg_min": -1.0}
    h = (vals - pivot) / rms
    return {"pivot": float(pivot), "rms": rms, "pos_max": float(h.max()) if (h > 0).any() else 1.0,
            "neg_min": float(h.min()) if (h < 0).any() else -1.0}


def apply_normaliser(entropy: Tensor, stats: dict[str, float]) -> Tensor:
    """ĥ = h / pos_max for h > 0, h / |neg_min| for h < 0, h = (log(max(H, 1e-8)) - pivot) / rms, clamped to [-1, 1]
    (0 everywhere when rms is 0). Any shape; float64 inside, returned in the input dtype."""
    if stats["rms"] <= 0:
        return torch.zeros_like(entropy)
    h = (torch.log(entropy.double().clamp(min=1e-8)) - stats["pivot"]) / stats["rms"]
    h = torch.where(h > 0, h / stats["pos_max"], h / abs(stats["neg_min"]))
    return h.clamp(-1.0, 1.0).to(entropy.dtype)


def entropy_normaliser(entropy_BT: Tensor, mask_BT: Tensor, *, q: float = 0.8) -> Tensor:
    """ĥ: l = log(max(H, 1e-8)); pivot = q-quantile of l over valid tokens; h = (l - pivot) / sqrt(mean_valid
    (l - pivot)^2); positives divided by max(h), negatives by |min(h)|, so ĥ ∈ [-1, 1] and about (1-q) of the tokens
    are above 0. Constant entropy gives ĥ = 0 (no NaN). Zero on padding."""
    return apply_normaliser(entropy_BT, normaliser_stats(entropy_BT, mask_BT, q=q)) * (mask_BT > 0)


def sampling_temperatures(logits_NV: Tensor, *, temperature: float, tau: float, stats: dict[str, float]) -> Tensor:
    """HAPO adaptive temperature for one decoding step: T_t = T (1 + tau ĥ_t) [N], ĥ_t from the entropy of the logits
    at the base temperature T under the previous training step's normaliser statistics."""
    z = logits_NV.float() / temperature
    logz = torch.logsumexp(z, dim=-1)
    entropy = logz - (torch.softmax(z, dim=-1) * z.masked_fill(torch.isinf(z), 0.0)).sum(-1)
    return temperature * (1.0 + tau * apply_normaliser(entropy, stats))


@ADVANTAGES.register("hapo")
def token_group_average(rewards_B: Tensor, group_size: int, *, lengths_B: Tensor, eps: float = 1e-6,
                        fallback: float = 5.0) -> Tensor:
    """A_i = (R_i - mu_tok) / (sigma_tok + eps), mean and biased std over ALL valid tokens of the group (each token of
    y_i carries R_i); a group where any |A| >= fallback uses GRPO instead. Equal lengths give GRPO with a biased std."""
    if group_size == 1:
        return rewards_B.clone()
    r = group_rewards(rewards_B, group_size)
    w = group_rewards(lengths_B, group_size)
    n = w.sum(1, keepdim=True).clamp(min=1)
    mu = (r * w).sum(1, keepdim=True) / n
    sigma = torch.sqrt(((r - mu) ** 2 * w).sum(1, keepdim=True) / n)
    adv = (r - mu) / (sigma + eps)
    bad = (adv.abs() >= fallback).any(1, keepdim=True)
    adv = torch.where(bad, grpo(rewards_B, group_size, eps=eps).double().view(-1, group_size), adv)
    return per_response(adv, rewards_B, group_size)


@TOKEN_SHAPERS.register("hapo_entropy")
def hapo_entropy(batch: TrainBatch, *, q: float, progress: float = 0.0) -> tuple[TrainBatch, dict[str, float]]:
    """Attach ĥ (`entropy_norm`) from the step's old-policy entropies, for the `hapo` policy loss."""
    hhat = entropy_normaliser(batch.old_entropy, batch.response_mask, q=q)
    valid = batch.response_mask > 0
    return dataclasses.replace(batch, entropy_norm=hhat), {
        "hapo/high_entropy_frac": float((hhat[valid] > 0).float().mean()),
        "hapo/hhat_mean": float(hhat[valid].mean())}


@POLICY_LOSSES.register("hapo")
def hapo_clip(logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, *, entropy_norm: Tensor,
              clip_low: float, clip_high: float, asymmetric_clip: bool, alpha: float, redistribution: bool,
              beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip with two token-aware switches (h = ĥ):
    - asymmetric clipping: eps_low' = eps_low (1 - alpha h) where h < 0, eps_high' = eps_high (1 + alpha h) where h > 0
      (each at most doubled); the other bound unchanged;
    - redistribution (after clipping bounds are set): A_ent = A (1 + beta h); "neutral" = 1 - eps_low'/2 < r <
      1 + eps_high'/2; tokens with h > 0 use A when neutral, A_ent otherwise; the others A_ent when neutral, A otherwise.
    L = max(-A' r, -A' clip(r, 1 - eps_low', 1 + eps_high'))."""
    h = entropy_norm
    ratio = torch.exp(log_ratio(logp_BT, old_logp_BT))
    low = torch.full_like(h, clip_low)
    high = torch.full_like(h, clip_high)
    if asymmetric_clip:
        low = torch.where(h < 0, clip_low * (1 - alpha * h), low).clamp(max=2 * clip_low)
        high = torch.where(h > 0, clip_high * (1 + alpha * h), high).clamp(max=2 * clip_high)
    adv = adv_BT
    if redistribution:
        a_ent = adv_BT * (1 + beta * h)
        with torch.no_grad():
            neutral = (ratio > 1 - low / 2) & (ratio < 1 + high / 2)
        adv = torch.where((h > 0) == neutral, adv_BT, a_ent)
    loss = torch.maximum(-adv * ratio, -adv * torch.maximum(torch.minimum(ratio, 1 + high), 1 - low))
    stats = clip_stats(ratio, adv, mask_BT, low, high)  # against the per-token bounds
    stats["hapo/redistributed_frac"] = ((adv != adv_BT).float() * mask_BT).sum()
    return loss, stats
