"""Triton kernels of log p(label) and entropy from hidden states and the output head, never holding [N, V] logits.

Forward: one program per block of BLOCK_N tokens walks the vocabulary in BLOCK_V tiles (each tile's logits from a
loop over D in BLOCK_D slices) and keeps running (max m, Z = Σ e^{z−m}, B = Σ z e^{z−m}, target logit);
H = log Z + m − B / Z, log p = z_y − m − log Z. It also stores lse = m + log Z and E_p[z] = B / Z for backward.
Backward, in vocabulary chunks of C columns (C chosen so the [N, C] buffer stays within DLOGITS_BUDGET_BYTES): a
Triton pass recomputes the chunk's logits tile by tile and writes dz = (g_lp (onehot − p) − g_H p (z − E_p[z])) / T
into that buffer; then two GEMMs: d_hidden += dz W_C (accumulated in fp32 over the chunks) and d_weight[C] = dzᵀ h,
each gradient row written once. No atomics, no fp32 [V, D] scratch (d_weight is the gradient itself, in the
weight's dtype), and the result is the same on every run. bf16 / fp16 inputs on a GPU keep dz in their dtype for
the tensor-core GEMMs (fp32 accumulation inside them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        h = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # fp32 inputs (and the CPU interpreter, whose bf16 arithmetic is wrong): exact fp32 products
            acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:  # bf16 / fp16 on a GPU: tensor cores, fp32 accumulation
            acc += tl.dot(h, tl.trans(w))
    return acc


@triton.jit
def _forward_kernel(h_ptr, w_ptr, labels_ptr, inv_t_ptr, logp_ptr, ent_ptr, lse_ptr, ez_ptr, N, V, D, stride_h,
                    stride_w, ignore_index, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    inv_t = tl.load(inv_t_ptr + rows, mask=row_ok, other=1.0)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    Z = tl.zeros([BLOCK_N], dtype=tl.float32)
    B = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_D, UPCAST) * inv_t[:, None]
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        Z = Z * alpha + tl.sum(e, axis=1)
        B = B * alpha + tl.sum(tl.where(col_ok[None, :], z, 0.0) * e, axis=1)  # e = 0 off the vocabulary
        zy += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        m = m_new
    lse = m + tl.log(Z)
    ez = B / Z
    valid = row_ok & (labels != ignore_index)
    tl.store(logp_ptr + rows, tl.where(valid, zy - lse, 0.0), mask=row_ok)
    tl.store(ent_ptr + rows, tl.where(valid, lse - ez, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(ez_ptr + rows, ez, mask=row_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, labels_ptr, inv_t_ptr, lse_ptr, ez_ptr, g_lp_ptr, g_ent_ptr, dz_ptr, N, V, D,
                    v_start, v_count, stride_h, stride_w, stride_dz, ignore_index, BLOCK_N: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """dz of one (token block, vocabulary tile) of the chunk [v_start, v_start + v_count), stored at its column in
    the chunk's [N, C] buffer."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_start + local
    row_ok = rows < N
    col_ok = (local < v_count) & (cols < V)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (labels != ignore_index)
    inv_t = tl.load(inv_t_ptr + rows, mask=row_ok, other=1.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ez = tl.load(ez_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.where(valid, tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0), 0.0)
    g_ent = tl.where(valid, tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0), 0.0)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_D, UPCAST) * inv_t[:, None]
    p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
    onehot = (cols[None, :] == labels[:, None]).to(tl.float32)
    dz = g_lp[:, None] * (onehot - p) - g_ent[:, None] * p * (z - ez[:, None])
    dz = tl.where(row_ok[:, None] & col_ok[None, :], dz * inv_t[:, None], 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dz + local[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


DLOGITS_BUDGET_BYTES = 256 << 20  # the backward's one scratch buffer, [N, C] dz of a vocabulary chunk


def vocab_chunk(n: int, v: int, element_size: int, block_v: int) -> int:
    """Columns per backward pass: the [n, C] dz buffer within DLOGITS_BUDGET_BYTES, a multiple of the tile width."""
    c = DLOGITS_BUDGET_BYTES // max(1, n * element_size)
    return max(block_v, min(v, c) // block_v * block_v) if c < v else v


def _alloc(n: int, device: torch.device) -> Tensor:
    """Output buffers (every element is written by the kernel; tests replace this with a NaN fill to check that)."""
    return torch.empty(n, dtype=torch.float32, device=device)


def _blocks(hidden: Tensor, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D): small tiles for the CPU interpreter, tensor-core-sized tiles on a GPU."""
    if interpret:
        return 16, 32, 16
    return (64, 128, 64) if hidden.dtype != torch.float32 else (32, 64, 32)


class TritonLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, inv_t: Tensor, ignore_index: int,
                interpret: bool) -> tuple[Tensor, Tensor]:
        hidden, weight = hidden.contiguous(), weight.contiguous()
        labels, inv_t = labels.contiguous(), inv_t.float().contiguous()
        N, D = hidden.shape
        V = weight.shape[0]
        out = [_alloc(N, hidden.device) for _ in range(4)]
        bn, bv, bd = _blocks(hidden, interpret)
        upcast = interpret or hidden.dtype == torch.float32
        _forward_kernel[(triton.cdiv(N, bn),)](hidden, weight, labels, inv_t, *out, N, V, D, hidden.stride(0),
                                               weight.stride(0), ignore_index, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd,
                                               UPCAST=upcast)
        logp, ent, lse, ez = out
        ctx.save_for_backward(hidden, weight, labels, inv_t, lse, ez)
        ctx.ignore_index, ctx.interpret = ignore_index, interpret
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None):
        hidden, weight, labels, inv_t, lse, ez = ctx.saved_tensors
        N, D = hidden.shape
        V = weight.shape[0]
        zeros = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        g_lp = zeros if g_lp is None else g_lp.float().contiguous()
        g_ent = zeros if g_ent is None else g_ent.float().contiguous()
        bn, bv, bd = _blocks(hidden, ctx.interpret)
        upcast = ctx.interpret or hidden.dtype == torch.float32
        gemm = torch.float32 if upcast else hidden.dtype  # bf16 / fp16 on a GPU: tensor-core GEMMs
        h_gemm = hidden if hidden.dtype == gemm else hidden.to(gemm)
        chunk = vocab_chunk(N, V, torch.finfo(gemm).bits // 8, bv)
        dz = torch.empty(N, chunk, dtype=gemm, device=hidden.device)
        d_hidden = torch.zeros(N, D, dtype=torch.float32, device=hidden.device)
        d_weight = torch.empty(V, D, dtype=weight.dtype, device=weight.device)
        for v0 in range(0, V, chunk):
            c = min(chunk, V - v0)
            _dlogits_kernel[(triton.cdiv(N, bn), triton.cdiv(c, bv))](
                hidden, weight, labels, inv_t, lse, ez, g_lp, g_ent, dz, N, V, D, v0, c, hidden.stride(0),
                weight.stride(0), dz.stride(0), ctx.ignore_index, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, UPCAST=upcast)
            dz_c, w_c = dz[:, :c], weight[v0:v0 + c]
            d_hidden += dz_c @ (w_c if w_c.dtype == gemm else w_c.to(gemm))
            d_weight[v0:v0 + c] = dz_c.T @ h_gemm
        return d_hidden.to(hidden.dtype), d_weight, None, None, None, None


def logprob_entropy_triton(hidden: Tensor, weight: Tensor, labels: Tensor, inv_t: Tensor, *,
                           ignore_index: int) -> tuple[Tensor, Tensor]:
    import os
    return TritonLogprobEntropy.apply(hidden, weight, labels, inv_t, ignore_index,
                                      os.environ.get("TRITON_INTERPRET") == "1")
