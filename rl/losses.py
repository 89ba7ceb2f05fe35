"""Policy losses, KL estimators and loss aggregation (ALGORITHMS.md §1). Per-token tensors are [B, T]."""

from __future__ import annotations

import torch
from torch import Tensor

from rl.registry import Registry

POLICY_LOSSES: Registry = Registry("policy loss")
KL_ESTIMATORS: Registry = Registry("KL estimator")
AGGREGATIONS: Registry = Registry("loss aggregation")


def log_ratio(logp: Tensor, other_logp: Tensor) -> Tensor:
    """delta = logp - other_logp clamped to ±20, so exp() never overflows."""
    return (logp - other_logp).clamp(-20.0, 20.0)


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, *, clip_low: float,
             clip_high: float, dual_clip: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logp - old_logp); with dual_clip c,
    L = min(L, -A c) where A < 0. Returns per-token L and token counts of clipping (summed over mask)."""
    ratio = torch.exp(log_ratio(logp_BT, old_logp_BT))
    unclipped = -adv_BT * ratio
    clipped = -adv_BT * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv_BT < 0, torch.minimum(loss, -adv_BT * dual_clip), loss)
    with torch.no_grad():
        stats = {
            "actor/clipfrac_low": ((ratio < 1.0 - clip_low) & (adv_BT < 0)).float().mul(mask_BT).sum(),
            "actor/clipfrac_high": ((ratio > 1.0 + clip_high) & (adv_BT > 0)).float().mul(mask_BT).sum(),
            "actor/ratio_mean": ratio.mul(mask_BT).sum(),
        }
    return loss, stats


@KL_ESTIMATORS.register("k3")
def k3(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """k3 = exp(-d) - 1 + d with d = logp - ref_logp (clamped ±20), clamped to ±10; unbiased for KL(pi || ref), >= 0."""
    d = log_ratio(logp_BT, ref_logp_BT)
    return (torch.exp(-d) - 1.0 + d).clamp(-10.0, 10.0)


@AGGREGATIONS.register("token-mean")
def token_mean(loss_BT: Tensor, mask_BT: Tensor, *, num_tokens: int | Tensor) -> Tensor:
    """sum(L * m) / num_tokens, where num_tokens counts the valid tokens of the WHOLE mini-batch (all micro-batches
    and, in cluster mode, all data-parallel ranks), so gradient accumulation does not change the update."""
    return (loss_BT * mask_BT).sum() / num_tokens
