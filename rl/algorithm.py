"""A GRPO-family algorithm as a composition of registered pieces named in the recipe's `algorithm:` section."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from torch import Tensor

from tokenwise.rl.advantages import ADVANTAGES
from tokenwise.rl.correction import mismatch_stats, rollout_weights
from tokenwise.rl.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from tokenwise.rl import d3s, hapo, thr  # noqa: F401  (register the D³S, HAPO and THR pieces)
from tokenwise.rl.shaping import SAMPLE_FILTERS, TOKEN_SHAPERS, shaped_rewards
from tokenwise.rl.types import RolloutBatch, TrainBatch


def _piece(registry: Any, cfg: Any) -> Any:
    """The registered function named by cfg.type, with cfg's other fields bound as keyword arguments."""
    params = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "type"}
    return functools.partial(registry.get(cfg.type), **params)


class Algorithm:
    """make_batch: rewards → advantages; loss: per-token policy loss (+ KL) aggregated over the mini-batch.

    `cfg` is trainer.config.AlgorithmConfig (duck-typed here, so rl/ does not import the trainer)."""

    def __init__(self, cfg: Any, *, max_response_len: int | None = None) -> None:
        """max_response_len: the rollout's max_new_tokens, or an episode's token budget (the constant of
        seq-mean-token-sum-norm and the overlong shaping's limit)."""
        self.advantage = _piece(ADVANTAGES, cfg.advantage)
        self.policy_loss = _piece(POLICY_LOSSES, cfg.policy_loss)
        self.aggregate = AGGREGATIONS.get(cfg.aggregation)
        self.kl = KL_ESTIMATORS.get(cfg.kl.estimator)
        self.kl_coef = cfg.kl.coef
        self.kl_in_reward = cfg.kl.placement == "reward"
        self.max_response_len = max_response_len
        self.entropy_coef = cfg.entropy_coef
        self.overlong = cfg.overlong
        self.token_shapers = [_piece(TOKEN_SHAPERS, c) for c in cfg.token_shapers]
        self.sample_filters = [_piece(SAMPLE_FILTERS, c) for c in cfg.sample_filters]
        self._wants_entropy_norm = "entropy_norm" in inspect.signature(self.policy_loss).parameters
        self._wants_lengths = "lengths_B" in inspect.signature(self.advantage).parameters  # token-level estimators
        self.needs_token_features = any(c.type == "thr" for c in cfg.token_shapers)  # THR: hidden states + probs
        self.adaptive_tau, self.adaptive_q = cfg.adaptive_temperature.tau, cfg.adaptive_temperature.q
        self.entropy_stats: dict[str, float] | None = None  # normaliser statistics of the last step (adaptive T)
        self.correction = cfg.rollout_correction

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def needs_old_pass(self, *, ppo_epochs: int, mini_batches: int) -> bool:
        """Whether the step needs old-policy log-probs / entropies before its update. With one on-policy update (one
        epoch, one mini-batch) the old policy is the policy being trained, so its log-probs are the training forward's
        own values, detached (and the rollout-correction weights π_old/π_rollout, per row, come from them in the
        loss): the separate scoring pass can be skipped — unless something reads them before the update (KL in the
        reward, token shapers, THR features, adaptive temperature, an entropy-normalised loss)."""
        return not (ppo_epochs == 1 and mini_batches == 1
                    and not (self.kl_in_reward and self.kl_coef > 0) and not self.token_shapers
                    and not self.needs_token_features and self.adaptive_tau <= 0 and not self._wants_entropy_norm)

    def make_batch(self, rollouts: RolloutBatch, rewards_B: Tensor) -> TrainBatch:
        """Shape the rewards (overlong penalty), then advantages; `rewards` of the batch are the shaped ones."""
        rewards_B = shaped_rewards(rollouts, rewards_B, max_len=self.max_response_len, buffer=self.overlong.buffer,
                                   factor=self.overlong.factor)
        return TrainBatch.from_rollouts(rollouts, rewards=rewards_B,
                                        advantages=self._advantages(rollouts, rewards_B))

    def _advantages(self, rollouts: RolloutBatch, rewards_B: Tensor) -> Tensor:
        """[B, T] per-token advantages from the estimator (token-level ones also get the response lengths)."""
        if self._wants_lengths:
            adv_B = self.advantage(rewards_B, rollouts.group_size, lengths_B=rollouts.response_mask.sum(1))
        else:
            adv_B = self.advantage(rewards_B, rollouts.group_size)
        return adv_B[:, None] * rollouts.response_mask

    def filter(self, batch: TrainBatch, *, progress: float = 0.0) -> tuple[TrainBatch, dict[str, float]]:
        """Sample filters (e.g. D³S) on the batch with advantages, before scoring; progress in [0, 1] drives
        schedules. With a THR shaper, the kept batch also carries each group's sampled vocabulary, which asks the
        learner's scoring pass for hidden states and probabilities."""
        batch, stats = self._chain(self.sample_filters, batch, progress)
        if self.needs_token_features:
            batch = dataclasses.replace(batch, group_vocab=thr.group_vocab(batch.response_ids, batch.response_mask,
                                                                          batch.group_size))
        return batch, stats

    def shape(self, batch: TrainBatch, *, progress: float = 0.0) -> tuple[TrainBatch, dict[str, float]]:
        """After scoring: rollout-correction weights π_old/π_rollout (rl/correction.py) and mismatch metrics, KL into
        the rewards (kl.placement 'reward', then advantages again), then the token shapers in recipe order (each may
        narrow pg_mask)."""
        c = self.correction
        if c.level == "none":
            stats = mismatch_stats(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask)
        else:
            weights, stats = rollout_weights(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask,
                                             level=c.level, mode=c.mode, cap=c.cap)
            batch = dataclasses.replace(batch, is_weights=weights)
        if self.kl_in_reward and self.kl_coef > 0:
            kl_B = (self.kl(batch.old_logprobs, batch.ref_logprobs) * batch.response_mask).sum(1)
            rewards = batch.rewards - self.kl_coef * kl_B
            batch = dataclasses.replace(batch, rewards=rewards, advantages=self._advantages(batch, rewards))
            stats["actor/kl_in_reward"] = float((self.kl_coef * kl_B).mean())
        batch, more = self._chain(self.token_shapers, batch, progress)
        if self.adaptive_tau > 0:  # the next step samples with this step's entropy statistics
            self.entropy_stats = hapo.normaliser_stats(batch.old_entropy, batch.response_mask, q=self.adaptive_q)
            stats.update({f"sampling/entropy_{k}": v for k, v in self.entropy_stats.items()})
        return batch, {**stats, **more}

    def sampling(self) -> dict | None:
        """What the rollout engine needs for HAPO adaptive temperature ({tau, stats}), or None: off, or no statistics
        yet (the first step samples at the fixed temperature)."""
        if self.adaptive_tau <= 0 or self.entropy_stats is None:
            return None
        return {"tau": self.adaptive_tau, "stats": dict(self.entropy_stats)}

    @staticmethod
    def _chain(pieces: list, batch: TrainBatch, progress: float) -> tuple[TrainBatch, dict[str, float]]:
        stats: dict[str, float] = {}
        for piece in pieces:
            batch, s = piece(batch, progress=progress)
            stats.update(s)
        return batch, stats

    def loss(self, logp_BT: Tensor, entropy_BT: Tensor, batch: TrainBatch, *,
             num_tokens: int, num_seqs: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss of one micro-batch: its share of the mini-batch loss, normalised by the mini-batch's token /
        response counts (num_tokens, num_seqs) as the aggregation says, and token-summed statistics (the learner
        divides them by the token count)."""
        mask = batch.loss_tokens
        extra = {"entropy_norm": batch.entropy_norm} if self._wants_entropy_norm else {}
        is_weights = batch.is_weights
        if batch.old_logprobs is None:  # one on-policy update (needs_old_pass False): the old policy is this forward
            old_BT = logp_BT.detach()
            if self.correction.level != "none":  # per row, as shape() computes them for a scored batch
                c = self.correction
                is_weights, _ = rollout_weights(old_BT.float(), batch.rollout_logprobs.to(old_BT.device),
                                                batch.response_mask.to(old_BT.device), level=c.level, mode=c.mode,
                                                cap=c.cap)
        else:
            old_BT = batch.old_logprobs
        pg_BT, stats = self.policy_loss(logp_BT, old_BT, batch.advantages, mask, **extra)
        if is_weights is not None:
            pg_BT = pg_BT * is_weights
        if batch.pg_mask is not None:
            pg_BT = pg_BT * batch.pg_mask
            stats["actor/pg_token_frac"] = batch.pg_mask.detach().mul(mask).sum()
        counts = {"num_tokens": num_tokens, "num_seqs": num_seqs, "max_len": self.max_response_len}
        loss = self.aggregate(pg_BT, mask, **counts)
        stats["actor/pg_loss"] = (pg_BT.detach() * mask).sum()
        if self.needs_reference and not self.kl_in_reward:
            kl_BT = self.kl(logp_BT, batch.ref_logprobs)
            loss = loss + self.kl_coef * self.aggregate(kl_BT, mask, **counts)
            stats["actor/kl"] = (kl_BT.detach() * mask).sum()
        if self.entropy_coef:
            loss = loss - self.entropy_coef * self.aggregate(entropy_BT, mask, **counts)
        stats["actor/entropy"] = (entropy_BT.detach() * mask).sum()
        return loss, stats

    def state_dict(self) -> dict:
        """Algorithm state that checkpoints keep: the entropy statistics adaptive temperature samples with (schedules
        such as D³S's follow training progress, which the step restores)."""
        return {"entropy_stats": self.entropy_stats} if self.adaptive_tau > 0 else {}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise ValueError(f"this recipe's algorithm keeps no state {sorted(unknown)}, but the checkpoint has it: "
                             f"resume with the recipe the run started with")
        if "entropy_stats" in state:
            self.entropy_stats = state["entropy_stats"]
