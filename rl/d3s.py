"""D³S, dual-level down-sampling (ALGORITHMS.md §4; its constants are uncertain, so all are config values).

Sample level: keep the responses whose advantages have the largest variance; token level: keep the valid tokens
with the largest |A|·H. Both fractions follow a linear schedule in training progress p ∈ [0, 1]:
value(p) = (1 - p) · init + p · final.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from tokenwise.rl.advantages import informative_groups
from tokenwise.rl.shaping import SAMPLE_FILTERS, TOKEN_SHAPERS, keep_top_tokens
from tokenwise.rl.types import TrainBatch


def schedule(init: float, final: float, progress: float) -> float:
    p = min(1.0, max(0.0, progress))
    return (1.0 - p) * init + p * final


def max_variance_subset(a: Tensor, n: int) -> Tensor:
    """Indices of the size-n subset of `a` with the largest (biased) variance. The optimum is always the k largest
    together with the n-k smallest values for some k: sort once, then scan k with prefix sums of a and a^2
    (O(len log len)). Ties between k prefer the smaller k."""
    m = a.numel()
    if not 0 < n <= m:
        raise ValueError(f"subset size {n} must be in 1..{m}")
    v, order = torch.sort(a.double(), stable=True)
    c1 = torch.cat([v.new_zeros(1), v.cumsum(0)])
    c2 = torch.cat([v.new_zeros(1), (v * v).cumsum(0)])
    k = torch.arange(n + 1)
    s1 = c1[n - k] + (c1[m] - c1[m - k])
    s2 = c2[n - k] + (c2[m] - c2[m - k])
    var = s2 / n - (s1 / n) ** 2
    best = int(torch.argmax(var))  # first maximum: smallest k
    return torch.cat([order[:n - best], order[m - best:]]).sort().values


def row_advantages(batch: TrainBatch) -> Tensor:
    """[B] the advantage of each response (mean over its valid tokens)."""
    mask = batch.response_mask
    return (batch.advantages * mask).sum(1) / mask.sum(1).clamp(min=1)


@SAMPLE_FILTERS.register("d3s")
def d3s_samples(batch: TrainBatch, *, progress: float, n_init: float, n_final: float,
                scope: str = "group") -> tuple[TrainBatch, dict]:
    """Sample level. scope 'group': of the groups whose rewards differ, keep in each the round(n * G)
    responses (at least 1) whose advantages have the largest variance; groups stay contiguous and equal-sized
    (group_size becomes the kept count). scope 'batch': keep the round(n * B) responses (at most those of such groups)
    whose advantages have the largest variance over the whole batch; groups no longer line up, so every kept response
    becomes its own group (group_size 1) for mini-batch splitting. Advantages are not re-normalised; groups whose
    rewards are all equal (zero advantage) drop out (if every group is such, the batch is kept whole)."""
    G = batch.group_size
    frac = schedule(n_init, n_final, progress)
    adv = row_advantages(batch)
    live = informative_groups(batch.rewards, G)
    if not live.any():
        return batch, {"d3s/sample_frac": 1.0, "d3s/groups_kept_frac": 1.0}
    if scope == "group":
        keep_n = max(1, min(G, round(frac * G)))
        rows = [g * G + int(i) for g in live.nonzero().squeeze(1).tolist()
                for i in max_variance_subset(adv.view(-1, G)[g], keep_n)]
        out = dataclasses.replace(batch.select(rows), group_size=keep_n)
    elif scope == "batch":
        candidates = live.repeat_interleave(G).nonzero().squeeze(1)
        keep_n = max(1, min(len(candidates), round(frac * len(batch))))
        rows = candidates[max_variance_subset(adv[candidates], keep_n)].tolist()
        out = dataclasses.replace(batch.select(rows), group_size=1)
    else:
        raise ValueError(f"d3s scope must be 'group' or 'batch', got {scope!r}")
    groups_kept = len({r // G for r in rows}) / len(live)
    return out, {"d3s/sample_frac": len(rows) / len(batch), "d3s/groups_kept_frac": groups_kept}


@TOKEN_SHAPERS.register("d3s_token")
def d3s_tokens(batch: TrainBatch, *, progress: float, k_init: float, k_final: float,
               denominator: str = "kept") -> tuple[TrainBatch, dict]:
    """Token level: keep the policy-gradient term on the ceil(k * N) valid tokens with the largest |A_{i,t}| · H_{i,t}
    (old-policy entropy; ties: earlier token first), N = valid tokens of the step. denominator 'kept': the other
    tokens also leave the loss's denominators (loss_mask); 'valid': denominators count every valid token."""
    score = batch.advantages.abs() * batch.old_entropy
    out, keep, _ = keep_top_tokens(batch, score, schedule(k_init, k_final, progress))
    if denominator == "kept":
        out = dataclasses.replace(out, loss_mask=out.pg_mask * batch.loss_tokens)
    elif denominator != "valid":
        raise ValueError(f"d3s_token denominator must be 'kept' or 'valid', got {denominator!r}")
    return out, {"d3s/token_frac": keep / max(1, int((batch.response_mask > 0).sum()))}
