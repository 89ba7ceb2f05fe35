"""Token Hidden Reward (ALGORITHMS.md §5; its details are uncertain, so the free choices are config values).

For every response token, the old-policy pass supplies the last-layer hidden state h ∈ R^d and the prediction error
g = onehot(y) − π_old(·) restricted to V*, the distinct token ids sampled (on valid tokens) in the response's group.
A token's influence on the group's correct responses P is

    s_{j,k} = Σ_{i∈P} Σ_t ⟨g_{i,t}, g_{j,k}⟩ · ⟨h_{i,t}, h_{j,k}⟩,   computed as M = G_Pᵀ H_P (|V*| × d),
                                                                     s = rowsum((G M) ⊙ H).

THR_{j,k} = A_{j,k} · s_{j,k}. With τ = min over correct responses of their mean s, tokens with |THR| > τ get
A' = A (1 + p · sign(THR)); the others keep A (mode 'keep') or leave the policy gradient (mode 'mask').
p > 0 favours exploitation (greedy accuracy), p < 0 exploration (pass@k); p = 0 in mode 'keep' is plain GRPO.
A group without a correct response is untouched.

What the learner must supply (only when a recipe lists the `thr` shaper): `Algorithm.filter` attaches
`group_vocab` [B, V] (V* per row, -1 padded); the learner's scoring pass then returns `old_hidden` [B, T, d] and
`old_vocab_probs` [B, T, V] (π_old at those ids, at the sampling temperature); this shaper consumes both and drops
them, so they never travel to the update.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from tokenwise.rl.shaping import TOKEN_SHAPERS
from tokenwise.rl.types import TrainBatch


def group_vocab(response_ids: Tensor, response_mask: Tensor, group_size: int) -> Tensor:
    """[B, V] long: per row, the sorted distinct token ids sampled on valid tokens of its group, padded with -1
    (V = the largest such set in the batch); rows of one group share one vocabulary."""
    B = response_ids.shape[0]
    sets = []
    for g in range(B // group_size):
        rows = slice(g * group_size, (g + 1) * group_size)
        sets.append(torch.unique(response_ids[rows][response_mask[rows] > 0]))
    V = max(1, max(s.numel() for s in sets))
    out = torch.full((B, V), -1, dtype=torch.long)
    for g, s in enumerate(sets):
        out[g * group_size:(g + 1) * group_size, :s.numel()] = s
    return out


def prediction_error(response_ids: Tensor, vocab: Tensor, probs: Tensor) -> Tensor:
    """g = onehot(y) − π_old over V*: [B, T, V] from ids [B, T], the rows' V* [B, V] and π_old at V* [B, T, V]."""
    onehot = (response_ids[:, :, None] == vocab[:, None, :]).to(probs.dtype)
    return (onehot - probs) * (vocab >= 0)[:, None, :]


def influence(g_GTV: Tensor, h_GTD: Tensor, mask_GT: Tensor, correct_G: Tensor) -> Tensor:
    """s [G, T]: each token's summed influence on the correct responses' tokens (see the module docstring), 0 on
    padding; float64."""
    g = g_GTV.double() * mask_GT[:, :, None]
    h = h_GTD.double() * mask_GT[:, :, None]
    gp, hp = g[correct_G].flatten(0, 1), h[correct_G].flatten(0, 1)
    M = gp.T @ hp                                   # [V, d]
    return ((g @ M) * h).sum(-1) * mask_GT


@TOKEN_SHAPERS.register("thr")
def token_hidden_reward(batch: TrainBatch, *, p: float, mode: str, correct_reward: float,
                        progress: float = 0.0) -> tuple[TrainBatch, dict[str, float]]:
    """Rescale (or, mode 'mask', keep only) the advantages of tokens with |A · s| > τ, per group with a correct
    response (reward ≥ correct_reward); see the module docstring. Consumes and drops old_hidden / old_vocab_probs."""
    if batch.old_hidden is None or batch.old_vocab_probs is None or batch.group_vocab is None:
        raise ValueError("the thr token shaper needs the learner's hidden states and group-vocabulary probabilities: "
                         "score the batch after Algorithm.filter (which requests them)")
    G = batch.group_size
    mask = batch.response_mask
    g_all = prediction_error(batch.response_ids, batch.group_vocab, batch.old_vocab_probs)
    adv = batch.advantages.clone()
    pg_mask = torch.ones_like(mask) if batch.pg_mask is None else batch.pg_mask.clone()
    selected = considered = up = groups_with_correct = 0
    taus = []
    for k in range(len(batch) // G):
        rows = slice(k * G, (k + 1) * G)
        correct = batch.rewards[rows] >= correct_reward
        m = mask[rows]
        if not correct.any():
            continue
        groups_with_correct += 1
        s = influence(g_all[rows], batch.old_hidden[rows], m, correct)
        tau = float(min((s[i].sum() / m[i].sum().clamp(min=1)) for i in correct.nonzero().squeeze(1).tolist()))
        thr = batch.advantages[rows].double() * s
        sel = (thr.abs() > tau) & (m > 0)
        a = batch.advantages[rows]
        adv[rows] = torch.where(sel, a * (1 + p * torch.sign(thr)).to(a.dtype), a)
        if mode == "mask":
            pg_mask[rows] = pg_mask[rows] * sel.to(pg_mask.dtype)
        selected += int(sel.sum())
        up += int((sel & (thr > 0)).sum())
        considered += int((m > 0).sum())
        taus.append(tau)
    out = dataclasses.replace(batch, advantages=adv, old_hidden=None, old_vocab_probs=None, group_vocab=None,
                              pg_mask=pg_mask if mode == "mask" else batch.pg_mask)
    return out, {"thr/selected_frac": selected / max(1, considered),
                 "thr/up_frac": up / max(1, selected),
                 "thr/groups_with_correct_frac": groups_with_correct / max(1, len(batch) // G),
                 "thr/tau_mean": sum(taus) / len(taus) if taus else 0.0}
