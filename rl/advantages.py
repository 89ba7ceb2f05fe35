"""Advantage estimators: outcome rewards of a group [B] → one advantage per response [B] (see ALGORITHMS.md §2)."""

from __future__ import annotations

from torch import Tensor

from rl.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")


@ADVANTAGES.register("grpo")
def grpo(rewards_B: Tensor, group_size: int, *, eps: float = 1e-6) -> Tensor:
    """A_i = (R_i - mean_g R) / (std_g R + eps), std unbiased over the G responses of the group; a group of one
    gives A = R."""
    if group_size == 1:
        return rewards_B.clone()
    r_NG = rewards_B.view(-1, group_size)
    adv_NG = (r_NG - r_NG.mean(1, keepdim=True)) / (r_NG.std(1, keepdim=True) + eps)
    return adv_NG.reshape(-1)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards_B: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO: A_i = R_i - mean_g R (no division by the std); a group of one gives A = R."""
    if group_size == 1:
        return rewards_B.clone()
    r_NG = rewards_B.view(-1, group_size)
    return (r_NG - r_NG.mean(1, keepdim=True)).reshape(-1)


@ADVANTAGES.register("rloo")
def rloo(rewards_B: Tensor, group_size: int) -> Tensor:
    """RLOO: A_i = R_i - mean of the other G-1 rewards of the group = G/(G-1) (R_i - mean_g R); a group of one
    gives A = R."""
    if group_size == 1:
        return rewards_B.clone()
    r_NG = rewards_B.view(-1, group_size)
    others = (r_NG.sum(1, keepdim=True) - r_NG) / (group_size - 1)
    return (r_NG - others).reshape(-1)
