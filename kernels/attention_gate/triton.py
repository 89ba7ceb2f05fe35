"""Triton kernel of the attention output gate Y ⊙ σ(G), forward and backward, for headwise gates (one per head,
broadcast over the head's channels) and elementwise gates (one per channel).

Rows are (token, head) pairs, columns the head's Dh channels: one program handles BLOCK_R rows x all Dh columns
(Dh ≤ BLOCK_D, a power of two), so the headwise gate gradient Σ_c dout·y·σ'(g) is a row reduction in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _forward_kernel(y_ptr, g_ptr, out_ptr, R, Dh, HEADWISE: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < Dh)[None, :]
    offs = rows[:, None] * Dh + cols[None, :]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HEADWISE:
        g = tl.load(g_ptr + rows, mask=rows < R, other=0.0).to(tl.float32)[:, None]
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(out_ptr + offs, (y * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(y_ptr, g_ptr, dout_ptr, dy_ptr, dg_ptr, R, Dh, HEADWISE: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < Dh)[None, :]
    offs = rows[:, None] * Dh + cols[None, :]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HEADWISE:
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(dy_ptr + offs, (dout * s).to(dy_ptr.dtype.element_ty), mask=mask)
    dg = dout * y * s * (1.0 - s)
    if HEADWISE:
        tl.store(dg_ptr + rows, tl.sum(dg, axis=1).to(dg_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)


def _alloc(like: Tensor) -> Tensor:
    """Output buffers (every element is written by a kernel; tests replace this with a NaN fill to check that)."""
    return torch.empty_like(like)


class TritonAttentionGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, gate: Tensor) -> Tensor:
        y, gate = y.contiguous(), gate.contiguous()
        headwise = gate.dim() == y.dim() - 1
        Dh = y.shape[-1]
        R = y.numel() // Dh
        out = _alloc(y)
        block_d = triton.next_power_of_2(Dh)
        block_r = max(1, min(64, 4096 // block_d))
        _forward_kernel[(triton.cdiv(R, block_r),)](y, gate, out, R, Dh, HEADWISE=headwise, BLOCK_R=block_r,
                                                    BLOCK_D=block_d)
        ctx.save_for_backward(y, gate)
        ctx.blocks = (block_r, block_d, headwise)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        y, gate = ctx.saved_tensors
        block_r, block_d, headwise = ctx.blocks
        Dh = y.shape[-1]
        R = y.numel() // Dh
        dy, dg = _alloc(y), _alloc(gate)
        _backward_kernel[(triton.cdiv(R, block_r),)](y, gate, dout.contiguous(), dy, dg, R, Dh, HEADWISE=headwise,
                                                     BLOCK_R=block_r, BLOCK_D=block_d)
        return dy, dg


def attention_gate_triton(y: Tensor, gate: Tensor) -> Tensor:
    return TritonAttentionGate.apply(y, gate)
