"""Chunked torch reference of log p(label) and entropy from hidden states and the output head (ALGORITHMS.md §8).

It never holds the [N, V] logits: tokens go through in chunks of `chunk_size` rows, and backward recomputes each
chunk's logits. This is what CPU runs use, so it is also a real implementation, not only a test oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor


def default_chunk_size(n: int, v: int, *, budget_bytes: int = 64 << 20) -> int:
    """Rows per chunk so that one chunk's fp32 logits stay within `budget_bytes` (a few such temporaries live at once)."""
    return max(1, min(n, budget_bytes // (4 * max(1, v))))


def _chunk(h: Tensor, weight: Tensor, inv_t: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
    """One chunk's logits z = h W^T / T and softmax p (the only two [c, V] buffers), its logsumexp, E_p[z] and target
    logit, in the accumulation dtype."""
    z = (h @ weight.T).mul_(inv_t[:, None])
    m = z.max(dim=-1).values
    p = (z - m[:, None]).exp_()
    Z = p.sum(-1)
    p /= Z[:, None]
    ez = (p.unsqueeze(1) @ z.unsqueeze(2)).view(-1)  # row-wise dot without a [c, V] product buffer
    zy = z.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return z, p, m + Z.log(), ez, zy


class ChunkedLogprobEntropy(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], labels [N], inv_temperature [N]) → (log p [N], H [N]); gradients for hidden and
    weight from both outputs: dz = g_lp (onehot − p) − g_H p (z − E_p[z]), then / T."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, inv_t: Tensor, ignore_index: int,
                chunk_size: int) -> tuple[Tensor, Tensor]:
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        logp = torch.zeros(n, dtype=acc, device=hidden.device)
        ent = torch.zeros(n, dtype=acc, device=hidden.device)
        w = weight.to(acc)
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            _, _, lse, ez, zy = _chunk(hidden[s:e].to(acc), w, inv_t[s:e].to(acc), labels[s:e])
            logp[s:e], ent[s:e] = zy - lse, lse - ez
        valid = labels != ignore_index
        ctx.save_for_backward(hidden, weight, labels, inv_t)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        return logp * valid, ent * valid

    @staticmethod
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None):
        hidden, weight, labels, inv_t = ctx.saved_tensors
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        w = weight.to(acc)
        valid = (labels != ctx.ignore_index).to(acc)
        g_lp = torch.zeros(n, dtype=acc, device=hidden.device) if g_lp is None else g_lp.to(acc) * valid
        g_ent = torch.zeros(n, dtype=acc, device=hidden.device) if g_ent is None else g_ent.to(acc) * valid
        d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for s in range(0, n, ctx.chunk_size):
            e = min(n, s + ctx.chunk_size)
            h = hidden[s:e].to(acc)
            z, p, _, ez, _ = _chunk(h, w, inv_t[s:e].to(acc), labels[s:e])
            # dz = g_lp (onehot - p) - g_H p (z - E_p[z]), built in z's buffer
            dz = z.sub_(ez[:, None]).mul_(p).mul_(-g_ent[s:e, None]).sub_(p.mul_(g_lp[s:e, None]))
            dz.scatter_add_(1, labels[s:e].clamp(min=0)[:, None], g_lp[s:e, None])
            dz *= inv_t[s:e, None].to(acc)
            del p
            torch.mm(dz, w, out=d_hidden[s:e])
            d_weight.addmm_(dz.T, h)  # in place: no [V, D] temporary per chunk
        return d_hidden.to(hidden.dtype), d_weight.to(weight.dtype), None, None, None, None


def logprob_entropy_reference(hidden: Tensor, weight: Tensor, labels: Tensor, inv_t: Tensor, *, ignore_index: int,
                              chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    n, v = hidden.shape[0], weight.shape[0]
    return ChunkedLogprobEntropy.apply(hidden, weight, labels, inv_t, ignore_index,
                                       chunk_size or default_chunk_size(n, v))


def logprob_entropy_naive(hidden: Tensor, weight: Tensor, labels: Tensor, inv_t: Tensor, *,
                          ignore_index: int) -> tuple[Tensor, Tensor]:
    """The usual path, for comparison: the full [N, V] fp32 logits, log-softmax and softmax."""
    z = (hidden.float() @ weight.float().T) * inv_t[:, None].float()
    logp_all = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    logp = logp_all.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp * valid, ent * valid
