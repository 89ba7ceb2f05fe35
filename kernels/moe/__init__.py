"""Mixture-of-experts feed-forward (ALGORITHMS.md §7) on SwiGLU experts held as 3-D weights.

    out, routing = moe_ffn(x [N, H], router_weight [E, H], w_gate_up [E, 2F, H], w_down [E, H, F], top_k=2)

Fast path: route → sort the kept (token, slot) pairs by expert → permute x → grouped GEMM (gate/up) → SiLU(gate)·up →
grouped GEMM (down) → unpermute, weighted by the gate weights (Triton grouped GEMM on CUDA, a torch loop over the
segments elsewhere). `moe_ffn_reference` is the per-expert loop it must equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenwise.kernels.moe.grouped_gemm import grouped_mm
from tokenwise.kernels.moe.routing import Routing, route

__all__ = ["Routing", "route", "grouped_mm", "moe_ffn", "moe_ffn_reference"]


def _expert(h_gate_up: Tensor) -> Tensor:
    gate, up = h_gate_up.chunk(2, dim=-1)  # w_gate_up rows: F gate rows, then F up rows
    return F.silu(gate) * up


def moe_ffn(x: Tensor, router_weight: Tensor, w_gate_up: Tensor, w_down: Tensor, *, top_k: int,
            renormalize: bool = True, capacity_factor: float | None = None,
            impl: str = "auto", replay: Tensor | None = None) -> tuple[Tensor, Routing]:
    routing = route(x, router_weight, top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor,
                    replay=replay)
    N, E = x.shape[0], w_gate_up.shape[0]
    slot_expert = routing.expert_idx.reshape(-1)
    slot_token = torch.arange(N, device=x.device).repeat_interleave(top_k)
    kept = routing.kept.reshape(-1).nonzero().squeeze(1)
    order = kept[torch.argsort(slot_expert[kept], stable=True)]  # kept slots grouped by expert, token order inside
    counts = torch.bincount(slot_expert[order], minlength=E).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    tokens = slot_token[order]
    h = grouped_mm(x[tokens], w_gate_up, offsets, impl=impl)
    y = grouped_mm(_expert(h), w_down, offsets, impl=impl)
    gates = routing.weight.reshape(-1)[order].to(y.dtype)
    out = torch.zeros_like(x).index_add(0, tokens, y * gates[:, None])
    return out, routing


def moe_ffn_reference(x: Tensor, w_gate_up: Tensor, w_down: Tensor, routing: Routing) -> Tensor:
    """The per-expert loop: for each expert, its kept tokens through its SwiGLU, added back weighted by the gates."""
    out = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        token, slot = ((routing.expert_idx == e) & routing.kept).nonzero(as_tuple=True)
        if len(token):
            y = _expert(x[token] @ w_gate_up[e].T) @ w_down[e].T
            out = out.index_add(0, token, y * routing.weight[token, slot].to(y.dtype)[:, None])
    return out
