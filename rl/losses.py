"""Policy losses, KL estimators and loss aggregation (ALGORITHMS.md §1). Per-token tensors are [B, T]."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenwise.rl.registry import Registry

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
    return loss, clip_stats(ratio, adv_BT, mask_BT, clip_low, clip_high)


def clip_stats(ratio: Tensor, adv: Tensor, mask: Tensor, clip_low: float | Tensor,
                clip_high: float | Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        return {
            "actor/clipfrac_low": ((ratio < 1.0 - clip_low) & (adv < 0)).float().mul(mask).sum(),
            "actor/clipfrac_high": ((ratio > 1.0 + clip_high) & (adv > 0)).float().mul(mask).sum(),
            "actor/ratio_mean": ratio.mul(mask).sum(),
        }


def _seq_mean_log_ratio(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """mean_t delta_{i,t} over each response's valid tokens, [B, 1]."""
    delta = log_ratio(logp_BT, old_logp_BT) * mask_BT
    return delta.sum(1, keepdim=True) / mask_BT.sum(1, keepdim=True).clamp(min=1)


@POLICY_LOSSES.register("gspo")
def gspo(logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, *, clip_low: float,
         clip_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: sequence ratio s_i = exp(mean_t delta_{i,t}), L_i = max(-A_i s_i, -A_i clip(s_i, 1-clip_low, 1+clip_high)),
    broadcast to the response's tokens (pair with seq-mean-token-mean so each response counts once). A_i is the
    response's advantage (its first valid token's; sequence-level estimators give every token the same)."""
    s_B1 = torch.exp(_seq_mean_log_ratio(logp_BT, old_logp_BT, mask_BT).clamp(-20.0, 20.0))
    adv_B1 = (adv_BT * mask_BT).sum(1, keepdim=True) / mask_BT.sum(1, keepdim=True).clamp(min=1)
    loss_B1 = torch.maximum(-adv_B1 * s_B1, -adv_B1 * s_B1.clamp(1.0 - clip_low, 1.0 + clip_high))
    ratio_BT = s_B1.expand_as(logp_BT)
    return loss_B1.expand_as(logp_BT), clip_stats(ratio_BT, adv_B1.expand_as(logp_BT), mask_BT, clip_low, clip_high)


@POLICY_LOSSES.register("gspo_token")
def gspo_token(logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, *, clip_low: float,
               clip_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token: log s_{i,t} = logp_t - sg(logp_t) + sg(mean_t delta_{i,t}): the value of the sequence ratio with a
    per-token gradient, so per-token advantages A_{i,t} flow; L = max(-A s, -A clip(s, 1-clip_low, 1+clip_high))."""
    log_s = logp_BT - logp_BT.detach() + _seq_mean_log_ratio(logp_BT, old_logp_BT, mask_BT).detach()
    s_BT = torch.exp(log_s.clamp(-20.0, 20.0))
    loss = torch.maximum(-adv_BT * s_BT, -adv_BT * s_BT.clamp(1.0 - clip_low, 1.0 + clip_high))
    return loss, clip_stats(s_BT, adv_BT, mask_BT, clip_low, clip_high)


@KL_ESTIMATORS.register("k3")
def k3(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """k3 = exp(-d) - 1 + d with d = logp - ref_logp (clamped ±20), clamped to ±10; unbiased for KL(pi || ref), >= 0."""
    d = log_ratio(logp_BT, ref_logp_BT)
    return (torch.exp(-d) - 1.0 + d).clamp(-10.0, 10.0)


@KL_ESTIMATORS.register("k1")
def k1(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """k1 = d = logp - ref_logp (clamped ±20): unbiased for KL(pi || ref) but can be negative per token."""
    return log_ratio(logp_BT, ref_logp_BT)


@KL_ESTIMATORS.register("k2")
def k2(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """k2 = d^2 / 2: biased, >= 0; its gradient d * grad(logp) is the gradient of the true KL's second-order term."""
    return 0.5 * log_ratio(logp_BT, ref_logp_BT) ** 2


@KL_ESTIMATORS.register("k3+")
def k3_plus(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """k3+ = k2 - sg(k2) + sg(k3): the value of k3 (unbiased, >= 0) with the gradient of k2 (unbiased gradient)."""
    v2 = k2(logp_BT, ref_logp_BT)
    return v2 - v2.detach() + k3(logp_BT, ref_logp_BT).detach()


# Aggregations turn per-token losses of ONE micro-batch into its share of the mini-batch loss. The counts they divide
# by (num_tokens: valid tokens, num_seqs: responses) are those of the WHOLE mini-batch over all micro-batches and
# data-parallel ranks, so splitting a mini-batch never changes the update. Rows without valid tokens add nothing.

@AGGREGATIONS.register("token-mean")
def token_mean(loss_BT: Tensor, mask_BT: Tensor, *, num_tokens: int | Tensor, num_seqs: int = 1,
               max_len: int | None = None) -> Tensor:
    """sum_{i,t} L m / num_tokens: every valid token weighs the same (long responses weigh more)."""
    return (loss_BT * mask_BT).sum() / num_tokens


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(loss_BT: Tensor, mask_BT: Tensor, *, num_tokens: int | Tensor, num_seqs: int = 1,
                        max_len: int | None = None) -> Tensor:
    """sum_i (sum_t L m / sum_t m_i) / num_seqs: mean over each response's tokens, then over responses (original
    GRPO; every response weighs the same)."""
    per_seq = (loss_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1)
    return per_seq.sum() / num_seqs


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(loss_BT: Tensor, mask_BT: Tensor, *, num_tokens: int | Tensor, num_seqs: int = 1,
                       max_len: int | None = None) -> Tensor:
    """sum_{i,t} L m / num_seqs: token sums per response, averaged over responses."""
    return (loss_BT * mask_BT).sum() / num_seqs


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss_BT: Tensor, mask_BT: Tensor, *, num_tokens: int | Tensor, num_seqs: int = 1,
                            max_len: int | None = None) -> Tensor:
    """sum_{i,t} L m / (max_len * num_seqs): token sums per response divided by a constant, the longest allowed
    response (rollout.max_new_tokens), then averaged over responses (Dr. GRPO: no length bias)."""
    if not max_len:
        raise ValueError("seq-mean-token-sum-norm needs max_len (the rollout's max_new_tokens)")
    return (loss_BT * mask_BT).sum() / (max_len * num_seqs)
