"""MoE router (ALGORITHMS.md §7): fp32 softmax over experts, top-k, optional renormalisation, optional capacity with
drops, and the auxiliary losses.

Capacity: with capacity factor cf, each expert takes at most C = k·⌈cf·N/E⌉ of the N·k routed slots; slots are served
in token order (and, within a token, in rank order), and a slot past its expert's capacity is dropped (contributes
zero). cf = None is dropless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Routing:
    expert_idx: Tensor     # [N, k] int64, the chosen experts, best first
    weight: Tensor         # [N, k] float32, gate weights (0 for dropped slots)
    kept: Tensor           # [N, k] bool, False where the slot overflowed its expert's capacity
    aux_loss: Tensor       # scalar: E · Σ_e f_e · P_e (f = share of routed slots, P = mean router probability)
    z_loss: Tensor         # scalar: mean over tokens of logsumexp(router logits)²
    expert_load: Tensor    # [E] float32, share of the N·k slots sent to each expert (before drops)
    own_idx: Tensor | None = None  # [N, k] int64, the router's own top-k (differs from expert_idx under replay)

    @property
    def dropped_frac(self) -> float:
        return float((~self.kept).float().mean())


def route(x: Tensor, router_weight: Tensor, *, top_k: int, renormalize: bool = True,
          capacity_factor: float | None = None, replay: Tensor | None = None) -> Routing:
    """x [N, H], router_weight [E, H] → Routing. logits = x W_gᵀ in fp32, p = softmax, top-k of p; with renormalize
    the k weights are divided by their sum.

    `replay` [N, k] int64 (routing replay): route token n through the experts replay[n] instead of its top-k — rows
    of -1 keep the router's own choice. The gate weights are still this router's probabilities of those experts (so
    the router keeps its gradient), renormalised as usual; the losses and load see the replayed experts."""
    E = router_weight.shape[0]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E} (the number of experts), got {top_k}")
    logits = x.float() @ router_weight.float().T
    probs = torch.softmax(logits, dim=-1)
    weight, expert_idx = torch.topk(probs, top_k, dim=-1)
    own_idx = expert_idx
    if replay is not None:
        if replay.shape != expert_idx.shape or replay.dtype != torch.long:
            raise ValueError(f"replayed experts must be int64 [{x.shape[0]}, {top_k}] (tokens x top_k), got "
                             f"{replay.dtype} {tuple(replay.shape)}")
        if bool((replay >= E).any()) or bool(((replay < 0) & (replay[:, :1] >= 0)).any()):
            raise ValueError(f"replayed experts must be in 0..{E - 1}, or -1 for a whole row the router decides")
        own = replay[:, :1] < 0
        expert_idx = torch.where(own, expert_idx, replay.to(expert_idx.device))
        weight = probs.gather(-1, expert_idx)
    if renormalize:
        weight = weight / weight.sum(-1, keepdim=True)
    N = x.shape[0]
    slots = torch.zeros(E, device=x.device).scatter_add_(0, expert_idx.reshape(-1),
                                                         torch.ones(N * top_k, device=x.device))
    load = slots / max(1, N * top_k)
    aux = E * (load * probs.mean(0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
    kept = torch.ones_like(expert_idx, dtype=torch.bool)
    if capacity_factor is not None:
        capacity = top_k * math.ceil(capacity_factor * N / E)
        flat = expert_idx.reshape(-1)  # token-major: token 0's slots, then token 1's, ...
        onehot = torch.nn.functional.one_hot(flat, E)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # this slot's place in its expert's queue
        kept = (position < capacity).view(N, top_k)
    return Routing(expert_idx, weight * kept, kept, aux, z_loss, load, own_idx)
