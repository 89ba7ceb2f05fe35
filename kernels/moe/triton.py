"""Triton grouped GEMM over experts (see kernels/moe/grouped_gemm.py): one kernel for y = x W[e]ᵀ and dx = dy W[e]
over all experts' row segments, one for dW[e] = dy[seg]ᵀ x[seg]."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def _tile_map(offsets: list[int], block_m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per row tile: (expert, first row, segment end)."""
    experts, starts, ends = [], [], []
    for e in range(len(offsets) - 1):
        for s in range(offsets[e], offsets[e + 1], block_m):
            experts.append(e)
            starts.append(s)
            ends.append(offsets[e + 1])
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(experts), as_t(starts), as_t(ends)


@triton.jit
def grouped_mm_kernel(a_ptr, b_ptr, c_ptr, tile_expert, tile_start, tile_end, Ndim, Kdim, stride_am, stride_be,
                      stride_bk, stride_bn, stride_cm, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[rows] = A[rows] @ B_e ([Kdim, Ndim] through strides) for one row tile and one column tile."""
    t = tl.program_id(0)
    e = tl.load(tile_expert + t)
    start = tl.load(tile_start + t)
    end = tl.load(tile_end + t)
    rows = start + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < end
    col_ok = cols < Ndim
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, Kdim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < Kdim
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(b_ptr + e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])

@triton.jit
def weight_grad_kernel(dy_ptr, x_ptr, dw_ptr, offsets_ptr, Ndim, Kdim, stride_dy, stride_x, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW[e][n_tile, k_tile] = Σ over the segment's rows of dy[m, n_tile]ᵀ x[m, k_tile]."""
    e = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + ns[None, :], mask=row_ok[:, None] & (ns < Ndim)[None, :],
                     other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & (ks < Kdim)[None, :],
                    other=0.0)
        if UPCAST:
            acc += tl.dot(tl.trans(dy.to(tl.float32)), x.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(dy), x)
    tl.store(dw_ptr + e * Ndim * Kdim + ns[:, None] * Kdim + ks[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=(ns < Ndim)[:, None] & (ks < Kdim)[None, :])



def _alloc(shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Output buffers (every element is written by a kernel; tests replace this with a NaN fill to check that)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(x: Tensor) -> tuple[int, int, int]:
    return (16, 16, 16) if _interpret() else (64, 64, 32)


def _launch_mm(a: Tensor, weight: Tensor, offsets: list[int], *, transpose_b: bool) -> Tensor:
    """transpose_b: C = A @ W[e]ᵀ ([M, N] from A [M, K]); else C = A @ W[e] ([M, K] from A [M, N])."""
    E, N, K = weight.shape
    Ndim, Kdim = (N, K) if transpose_b else (K, N)
    bm, bn, bk = _blocks(a)
    tiles = _tile_map(offsets, bm, a.device)
    c = _alloc((a.shape[0], Ndim), a.dtype, a.device)
    if a.shape[0] == 0:
        return c
    stride_bk, stride_bn = (weight.stride(2), weight.stride(1)) if transpose_b else (weight.stride(1), weight.stride(2))
    upcast = _interpret() or a.dtype == torch.float32
    grouped_mm_kernel[(len(tiles[0]), triton.cdiv(Ndim, bn))](a, weight, c, *tiles, Ndim, Kdim, a.stride(0), weight.stride(0),
                                               stride_bk, stride_bn, c.stride(0), UPCAST=upcast, BLOCK_M=bm,
                                               BLOCK_N=bn, BLOCK_K=bk)
    return c


class TritonGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offsets: list[int]) -> Tensor:
        x, weight = x.contiguous(), weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.offsets = offsets
        return _launch_mm(x, weight, offsets, transpose_b=True)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _launch_mm(dy, weight, ctx.offsets, transpose_b=False)
        E, N, K = weight.shape
        bm, bn, bk = _blocks(x)
        dw = _alloc(weight.shape, weight.dtype, weight.device)
        offs = torch.tensor(ctx.offsets, dtype=torch.int32, device=x.device)
        upcast = _interpret() or x.dtype == torch.float32
        weight_grad_kernel[(E, triton.cdiv(N, bn), triton.cdiv(K, bk))](dy, x, dw, offs, N, K, dy.stride(0), x.stride(0),
                                                        UPCAST=upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        return dx, dw, None
