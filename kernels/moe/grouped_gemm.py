"""Grouped GEMM over experts: rows of `x` sorted by expert (segment e = rows offsets[e]:offsets[e+1]) times that
expert's weight: y[m] = x[m] @ W[e(m)]ᵀ, W [E, N, K]. On CUDA one Triton kernel covers all experts (kernels/moe/
triton.py: a tile map lists, per tile of BLOCK_M rows, its expert and segment end; backward is the same kernel for
dx = dy W[e] and a second kernel for dW[e] = dy[seg]ᵀ x[seg]). Elsewhere a torch loop over the segments does the same
arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grouped_mm_reference(x: Tensor, weight: Tensor, offsets: list[int]) -> Tensor:
    """y [M, N] = per segment e: x[seg] @ weight[e]ᵀ (torch autograd)."""
    parts = [x[offsets[e]:offsets[e + 1]] @ weight[e].T for e in range(weight.shape[0])]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


def grouped_mm(x: Tensor, weight: Tensor, offsets: list[int], *, impl: str = "auto") -> Tensor:
    """y [M, N] = x[seg_e] @ weight[e]ᵀ per expert segment; impl 'auto' → Triton on CUDA, the torch loop elsewhere."""
    if impl == "auto":
        impl = "triton" if x.is_cuda else "reference"
    if impl == "reference":
        return grouped_mm_reference(x, weight, offsets)
    from tokenwise.kernels.moe.triton import TritonGroupedMM
    return TritonGroupedMM.apply(x, weight, offsets)
