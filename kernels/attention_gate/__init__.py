"""The gated-attention output gate: out = Y ⊙ σ(G), applied after SDPA and before o_proj.

    out = attention_gate(y [..., H, Dh], gate [..., H] (headwise) or [..., H, Dh] (elementwise))

impl 'auto' runs the Triton kernel on CUDA tensors and the torch reference elsewhere.
"""

from __future__ import annotations

from torch import Tensor

from tokenwise.kernels.attention_gate.reference import attention_gate_reference

IMPLS = ("auto", "triton", "reference")


def attention_gate(y: Tensor, gate: Tensor, *, impl: str = "auto") -> Tensor:
    headwise = gate.shape == y.shape[:-1]
    if not headwise and gate.shape != y.shape:
        raise ValueError(f"attention_gate: gate must be [..., H] (headwise) or [..., H, Dh] (elementwise) for y of "
                         f"shape {tuple(y.shape)}; got {tuple(gate.shape)}")
    if impl not in IMPLS:
        raise ValueError(f"attention_gate: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if y.is_cuda else "reference"
    if impl == "reference":
        return attention_gate_reference(y, gate)
    from tokenwise.kernels.attention_gate.triton import attention_gate_triton
    return attention_gate_triton(y, gate)
