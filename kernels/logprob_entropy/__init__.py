"""log p(label) and token entropy straight from hidden states and the output head, without [N, V] logits.

    logp, entropy = logprob_entropy(hidden [N, D], weight [V, D], labels [N], temperature=T, ignore_index=-100)

Both outputs are fp32 [N] (0 on ignore_index rows, which get no gradient) and differentiable with respect to
hidden and weight. `temperature` is a float or a [N] tensor (per-token sampling temperatures). impl 'auto' runs the
Triton kernel on CUDA tensors and the chunked torch reference elsewhere; 'naive' materialises the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenwise.kernels.logprob_entropy.reference import logprob_entropy_naive, logprob_entropy_reference

IMPLS = ("auto", "triton", "chunked", "naive")


def logprob_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, temperature: float | Tensor = 1.0,
                    ignore_index: int = -100, impl: str = "auto",
                    chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"logprob_entropy: hidden [N, D] and weight [V, D] must share D; got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"logprob_entropy: labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if impl not in IMPLS:
        raise ValueError(f"logprob_entropy: impl must be one of {IMPLS}, got {impl!r}")
    acc = torch.promote_types(hidden.dtype, torch.float32)  # float64 inputs keep float64 throughout
    inv_t = (1.0 / torch.as_tensor(temperature, dtype=acc, device=hidden.device)).expand(hidden.shape[0])
    if impl == "auto":
        impl = "triton" if hidden.is_cuda else "chunked"
    if impl == "naive":
        return logprob_entropy_naive(hidden, weight, labels, inv_t, ignore_index=ignore_index)
    if impl == "chunked":
        return logprob_entropy_reference(hidden, weight, labels, inv_t.contiguous(), ignore_index=ignore_index,
                                         chunk_size=chunk_size)
    from tokenwise.kernels.logprob_entropy.triton import logprob_entropy_triton
    return logprob_entropy_triton(hidden, weight, labels, inv_t.contiguous(), ignore_index=ignore_index)
