"""Torch reference of the attention output gate Y ⊙ σ(G) (ALGORITHMS.md §6)."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_gate_reference(y: Tensor, gate: Tensor) -> Tensor:
    """y [..., H, Dh]; gate [..., H] (headwise: one scalar per head) or [..., H, Dh] (elementwise). The sigmoid is
    taken in fp32 (float64 for float64 inputs); the result has y's dtype."""
    acc = torch.promote_types(y.dtype, torch.float32)
    s = torch.sigmoid(gate.to(acc))
    if gate.dim() == y.dim() - 1:
        s = s.unsqueeze(-1)
    return (y.to(acc) * s).to(y.dtype)
