"""Reward shapers (before advantages) and token shapers (after scoring, before the update); ALGORITHMS.md §2.

A sample filter sees the batch with advantages (before scoring) and returns a subset of its responses. A token shaper
sees the scored batch (old-policy log-probs and entropies over the whole step) and returns it with a
`pg_mask` [B, T]: 1 where the policy-gradient term applies. Aggregation denominators stay the valid-token counts.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from tokenwise.rl.registry import Registry
from tokenwise.rl.types import RolloutBatch, TrainBatch

TOKEN_SHAPERS: Registry = Registry("token shaper")
SAMPLE_FILTERS: Registry = Registry("sample filter")


def overlong_penalty(lengths_B: Tensor, truncated_B: Tensor, *, max_len: int, buffer: int, factor: float) -> Tensor:
    """DAPO overlong shaping, added to the reward: 0 for |y| <= L - Lc; ((L - Lc) - |y|) / Lc * factor inside the
    buffer; -factor for a truncated response (it would have run past L). L = max_len, Lc = buffer."""
    start = max_len - buffer
    inside = (start - lengths_B.float()) / buffer * factor
    penalty = torch.where(lengths_B > start, inside, torch.zeros_like(inside))
    return torch.where(truncated_B, torch.full_like(penalty, -factor), penalty)


def shaped_rewards(rollouts: RolloutBatch, rewards_B: Tensor, *, max_len: int | None, buffer: int,
                   factor: float) -> Tensor:
    if not buffer:
        return rewards_B
    if not max_len:
        raise ValueError("overlong shaping needs the rollout's max_new_tokens")
    lengths = rollouts.response_mask.sum(1)
    return rewards_B + overlong_penalty(lengths, rollouts.truncated, max_len=max_len, buffer=buffer, factor=factor)


def keep_top_tokens(batch: TrainBatch, score_BT: Tensor, fraction: float) -> tuple[TrainBatch, int, Tensor]:
    """The batch with `pg_mask` on the ceil(fraction * N) valid tokens of highest score (ties: earlier token first),
    N = valid tokens of the step, combined with any pg_mask already set. Also returns the kept count and the kept
    tokens' scores."""
    mask = batch.response_mask > 0
    n = int(mask.sum())
    keep = math.ceil(fraction * n)
    scores = score_BT[mask]
    order = torch.sort(-scores, stable=True).indices[:keep]
    kept = torch.zeros(n)
    kept[order] = 1.0
    pg_mask = torch.zeros_like(batch.response_mask)
    pg_mask[mask] = kept
    if batch.pg_mask is not None:
        pg_mask = pg_mask * batch.pg_mask
    return dataclasses.replace(batch, pg_mask=pg_mask), keep, scores[order]


@TOKEN_SHAPERS.register("forking")
def forking_tokens(batch: TrainBatch, *, rho: float, progress: float = 0.0) -> tuple[TrainBatch, dict[str, float]]:
    """High-entropy ("forking") tokens: keep the policy-gradient term only on the ceil(rho * N) valid tokens of the
    step's batch with the highest old-policy entropy (ties: earlier token first), N = valid tokens. (Training
    progress, given to every shaper, is unused.)"""
    out, keep, kept_entropy = keep_top_tokens(batch, batch.old_entropy, rho)
    n = int((batch.response_mask > 0).sum())
    threshold = float(kept_entropy.min()) if keep else float("inf")
    return out, {"shaping/forking_kept_frac": keep / max(1, n), "shaping/forking_entropy_threshold": threshold}
