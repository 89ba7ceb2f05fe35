"""Rollout ↔ train mismatch correction: truncated importance sampling (TIS) of the policy loss.

The rollout engine (vLLM, another kernel, other numerics) samples from π_rollout, while the loss's ratio is taken
against π_old as the learner computes it. Each token's policy-gradient term is weighted by the (detached) ratio
w = π_old / π_rollout, at token level (w_t = exp(old_t - rollout_t)) or sequence level (one w_i = exp(Σ_t ...) for all
tokens of response i), and made bounded:

- truncate: w ← min(w, cap) (truncated IS; "TIS");
- mask: w kept where w ≤ cap, the token (or the whole response) dropped from the policy loss where w > cap.

The KL term is not weighted. With the transformers backend in fp32 w ≈ 1 (only the top-k/top-p renormalisation
shows), so the correction costs nothing where there is no mismatch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rollout_weights(old_BT: Tensor, rollout_BT: Tensor, mask_BT: Tensor, *, level: str, mode: str,
                    cap: float) -> tuple[Tensor, dict[str, float]]:
    """[B, T] detached importance weights (0 on padding) and the mismatch metrics."""
    if level not in ("token", "sequence") or mode not in ("truncate", "mask"):
        raise ValueError(f"rollout correction: level must be token|sequence and mode truncate|mask, got {level}, {mode}")
    mask64 = mask_BT.double()
    token_log_ratio = (old_BT.double() - rollout_BT.double()) * mask64
    stats = _mismatch_stats(token_log_ratio, mask64)
    log_ratio = (token_log_ratio.sum(1, keepdim=True).expand_as(token_log_ratio) if level == "sequence"
                 else token_log_ratio)
    over = log_ratio > math.log(cap)
    weights = torch.exp(log_ratio.clamp(max=math.log(cap)))
    if mode == "mask":
        weights = weights.masked_fill(over, 0.0)
    weights = weights * mask64
    n = mask64.sum().clamp(min=1)
    if level == "token":
        stats["rollout/tis_clipped_frac"] = float((over * mask64).sum() / n)
    else:
        rows = mask64.sum(1) > 0
        stats["rollout/tis_clipped_frac"] = float(over[:, 0][rows].double().mean()) if rows.any() else 0.0
    stats["rollout/tis_weight_mean"] = float(weights.sum() / n)
    return weights.to(old_BT.dtype), stats


def mismatch_stats(old_BT: Tensor, rollout_BT: Tensor, mask_BT: Tensor) -> dict[str, float]:
    """Mean |log π_old − log π_rollout| per token, and KL(π_rollout ‖ π_old) per token by the k3 estimator on the
    rollout's own samples (r − 1 − log r with r = π_old/π_rollout; non-negative, unbiased)."""
    mask64 = mask_BT.double()
    return _mismatch_stats((old_BT.double() - rollout_BT.double()) * mask64, mask64)


def _mismatch_stats(log_ratio_BT: Tensor, mask_BT: Tensor) -> dict[str, float]:
    """mismatch_stats from the masked per-token log-ratio log π_old − log π_rollout (float64)."""
    n = mask_BT.sum().clamp(min=1)
    k3 = (torch.exp(log_ratio_BT) - 1 - log_ratio_BT) * mask_BT
    return {"rollout/logprob_abs_diff": float(log_ratio_BT.abs().sum() / n),
            "rollout/kl_rollout_train": float(k3.sum() / n)}
