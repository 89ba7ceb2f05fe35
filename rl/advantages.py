"""Advantage estimators: outcome rewards of a group [B] → one advantage per response [B] (see ALGORITHMS.md §2, §11).

Group statistics are computed in float64 and cast back to the rewards' dtype, and a group whose rewards are all equal
gets advantage exactly 0 (in float32 the rounded mean of 8 × 1.1 would leave ±0.1 after dividing by a tiny std).
Whether a group is informative is decided from its rewards (`informative_groups`), never from `advantage != 0`.
"""

from __future__ import annotations

from torch import Tensor

from tokenwise.rl.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")


def informative_groups(rewards_B: Tensor, group_size: int) -> Tensor:
    """[N] bool: groups whose rewards are not all equal (all-equal groups have zero advantage and teach nothing).
    A group of one, whose advantage is its reward, is informative when that reward is not 0."""
    if group_size == 1:
        return rewards_B != 0
    r_NG = rewards_B.view(-1, group_size)
    return r_NG.max(1).values > r_NG.min(1).values


def group_rewards(rewards_B: Tensor, group_size: int) -> Tensor:
    """[N, G] float64 view of the rewards, one row per prompt group."""
    return rewards_B.double().view(-1, group_size)


def per_response(adv_NG: Tensor, rewards_B: Tensor, group_size: int) -> Tensor:
    """[B] in the rewards' dtype, with the groups whose rewards are all equal set to exactly 0."""
    live_N1 = informative_groups(rewards_B, group_size).unsqueeze(1)
    return adv_NG.where(live_N1, adv_NG.new_zeros(())).reshape(-1).to(rewards_B.dtype)


@ADVANTAGES.register("grpo")
def grpo(rewards_B: Tensor, group_size: int, *, eps: float = 1e-6) -> Tensor:
    """A_i = (R_i - mean_g R) / (std_g R + eps), std unbiased over the G responses of the group; a group of one
    gives A = R."""
    if group_size == 1:
        return rewards_B.clone()
    r_NG = group_rewards(rewards_B, group_size)
    adv_NG = (r_NG - r_NG.mean(1, keepdim=True)) / (r_NG.std(1, keepdim=True) + eps)
    return per_response(adv_NG, rewards_B, group_size)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards_B: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO: A_i = R_i - mean_g R (no division by the std); a group of one gives A = R."""
    if group_size == 1:
        return rewards_B.clone()
    r_NG = group_rewards(rewards_B, group_size)
    return per_response(r_NG - r_NG.mean(1, keepdim=True), rewards_B, group_size)


@ADVANTAGES.register("rloo")
def rloo(rewards_B: Tensor, group_size: int) -> Tensor:
    """RLOO: A_i = R_i - mean of the other G-1 rewards of the group = G/(G-1) (R_i - mean_g R); a group of one
    gives A = R."""
    if group_size == 1:
        return rewards_B.clone()
    r_NG = group_rewards(rewards_B, group_size)
    others = (r_NG.sum(1, keepdim=True) - r_NG) / (group_size - 1)
    return per_response(r_NG - others, rewards_B, group_size)
