"""Typed data passed between the stages of a step. Shapes: B rows (responses), P prompt tokens, T response tokens.

Groups are contiguous: rows [g*G, (g+1)*G) are the G responses to prompt g.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


# Columns of RolloutBatch.episode_stats: the environment's return (sum of its step rewards), assistant turns, tool calls,
# tool calls that failed, and 1 where the episode was cut (a turn hit its token limit, or the turn or token budget
# ran out) rather than ended by the environment
EPISODE_STATS = ("env_reward", "turns", "tool_calls", "tool_errors", "cut")


class _Rows:
    """Row selection over every per-row field (tensors with a leading B dimension and per-row lists)."""

    def select(self, rows: Tensor | list[int] | slice):
        if isinstance(rows, slice):
            rows = list(range(*rows.indices(len(self))))
        idx = torch.as_tensor(rows, dtype=torch.long)
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.dim() > 0:
                out[f.name] = v[idx]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx.tolist()]
            else:
                out[f.name] = v
        return type(self)(**out)

    def to(self, device: torch.device | str):
        """The same rows with every tensor on `device`."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])


@dataclass
class RolloutBatch(_Rows):
    prompt_ids: Tensor         # [B, P] int64, left-padded with the pad id
    prompt_mask: Tensor        # [B, P] int64, 1 on prompt tokens
    response_ids: Tensor       # [B, T] int64, right-padded with the pad id
    response_mask: Tensor      # [B, T] float32, 1 on generated tokens up to and including the end-of-turn token
    rollout_logprobs: Tensor   # [B, T] float32, log-prob of each sampled token under the sampling distribution
    truncated: Tensor          # [B] bool, no end-of-turn token within max_new_tokens
    prompts: list[str]         # [B] prompt text as in the data set (before the chat template)
    answers: list[str]         # [B] reference answers
    responses: list[str]       # [B] decoded responses, without the end-of-turn token
    group_size: int            # G
    policy_version: int        # learner update count of the weights that generated this batch
    temperatures: Tensor | None = None  # [B, T] float32, per-token sampling temperature (None: rollout.temperature)
    # MoE routing as the engine chose it (routing replay): per token, per MoE layer, its top-k experts; -1 where not
    # recorded (padding, a response's last token, which no forward reads; prompt tokens a prefix cache served)
    prompt_expert_ids: Tensor | None = None    # [B, P, MoE layers, k] int16, left-padded like prompt_ids
    response_expert_ids: Tensor | None = None  # [B, T, MoE layers, k] int16
    # Multi-turn episodes (rollout.env): the response is every turn after the prompt, the model's sampled tokens
    # (response_mask: what every loss, advantage and statistic counts) and between them the environment's tokens
    # (context_mask: read, never trained on). None for single-turn rollouts.
    context_mask: Tensor | None = None    # [B, T] float32, 1 on environment tokens inside the response
    episode_stats: Tensor | None = None   # [B, len(EPISODE_STATS)] float32, per episode (see EPISODE_STATS)
    # Asynchronous RL (grpo.max_staleness): the policy version that sampled each response token, -1 where nothing
    # was sampled (padding, environment tokens); stamped from policy_version when an engine does not set it
    token_versions: Tensor | None = None  # [B, T] int32

    def __post_init__(self) -> None:
        if self.token_versions is None and self.response_mask is not None:
            self.token_versions = torch.where(self.response_mask > 0, self.policy_version, -1).to(torch.int32)

    @property
    def present_mask(self) -> Tensor:
        """[B, T] every response token the model reads: sampled and environment tokens (attention, packing)."""
        if self.context_mask is None:
            return self.response_mask
        return (self.response_mask + self.context_mask).clamp(max=1)


@dataclass
class TrainBatch(RolloutBatch):
    rewards: Tensor | None = None        # [B] float32, summed weighted rewards
    advantages: Tensor | None = None     # [B, T] float32, per token (0 on padding)
    old_logprobs: Tensor | None = None   # [B, T] float32, learner log-probs before the update
    ref_logprobs: Tensor | None = None   # [B, T] float32, reference-policy log-probs (None without KL)
    old_entropy: Tensor | None = None    # [B, T] float32, token entropy of the old policy
    pg_mask: Tensor | None = None        # [B, T] float32, 1 where the policy-gradient term applies (token shapers)
    entropy_norm: Tensor | None = None   # [B, T] float32, HAPO's normalised entropy in [-1, 1] (hapo_entropy shaper)
    loss_mask: Tensor | None = None      # [B, T] float32, tokens every loss term and denominator counts (None: the
                                         # response mask); narrowed by token shapers with denominator 'kept'
    is_weights: Tensor | None = None     # [B, T] float32, rollout-correction weights pi_old / pi_rollout, bounded
                                         # (rl/correction.py), multiplying the policy-gradient term; None = off
    group_vocab: Tensor | None = None    # [B, V] int64, THR: distinct sampled ids of the row's group, -1 padded
    old_hidden: Tensor | None = None     # [B, T, d] float32, THR: old policy's last-layer hidden states
    old_vocab_probs: Tensor | None = None  # [B, T, V] float32, THR: old policy's probabilities of group_vocab ids

    @property
    def loss_tokens(self) -> Tensor:
        """[B, T] the tokens the loss counts: loss_mask if a shaper set one, else the response mask."""
        return self.response_mask if self.loss_mask is None else self.loss_mask

    @classmethod
    def from_rollouts(cls, rollouts: RolloutBatch, **extra: Tensor | None) -> "TrainBatch":
        base = {f.name: getattr(rollouts, f.name) for f in dataclasses.fields(RolloutBatch)}
        return cls(**base, **extra)


@dataclass
class SFTBatch:
    input_ids: Tensor       # [B, L] int64, right-padded
    attention_mask: Tensor  # [B, L] int64
    loss_mask: Tensor       # [B, L] float32, 1 where input_ids[:, t] is a target (response tokens and end-of-turn)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: slice) -> "SFTBatch":
        return SFTBatch(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows])
