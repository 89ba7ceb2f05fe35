"""Rollout ↔ train mismatch correction (truncated importance sampling) against a float64 reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tokenwise.rl.correction import mismatch_stats, rollout_weights


def _inputs(seed: int, B: int = 6, T: int = 9, scale: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    rollout = old + torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    return old.float(), rollout.float(), mask.float(), old, rollout, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_token_level_weights_match_reference(seed, mode):
    old, rollout, mask, old64, rollout64, mask64 = _inputs(seed)
    cap = 1.5
    w, stats = rollout_weights(old, rollout, mask, level="token", mode=mode, cap=cap)
    ratio = torch.exp(old64 - rollout64)
    ref = torch.where(ratio > cap, torch.full_like(ratio, cap if mode == "truncate" else 0.0), ratio) * mask64
    assert torch.allclose(w.double(), ref, rtol=1e-5, atol=1e-6)
    over = ((ratio > cap).double() * mask64).sum() / mask64.sum()
    assert 0 < over < 1  # the draw exercises both branches
    assert stats["rollout/tis_clipped_frac"] == pytest.approx(float(over), abs=1e-9)
    assert stats["rollout/tis_weight_mean"] == pytest.approx(float(ref.sum() / mask64.sum()), rel=1e-5)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_sequence_level_weights_share_one_ratio_per_response(mode):
    old, rollout, mask, old64, rollout64, mask64 = _inputs(3, scale=0.2)
    cap = 2.0
    w, stats = rollout_weights(old, rollout, mask, level="sequence", mode=mode, cap=cap)
    seq = torch.exp(((old64 - rollout64) * mask64).sum(1))
    per_row = torch.where(seq > cap, torch.full_like(seq, cap if mode == "truncate" else 0.0), seq)
    assert torch.allclose(w.double(), per_row[:, None] * mask64, rtol=1e-5, atol=1e-6)
    assert stats["rollout/tis_clipped_frac"] == pytest.approx(float((seq > cap).double().mean()))


def test_no_mismatch_gives_unit_weights_and_zero_metrics():
    old, _, mask, *_ = _inputs(4)
    w, stats = rollout_weights(old, old.clone(), mask, level="token", mode="truncate", cap=2.0)
    assert torch.equal(w, mask)
    assert stats["rollout/logprob_abs_diff"] == 0 and stats["rollout/kl_rollout_train"] == 0
    assert stats["rollout/tis_clipped_frac"] == 0


def test_mismatch_metrics_match_reference():
    old, rollout, mask, old64, rollout64, mask64 = _inputs(5)
    stats = mismatch_stats(old, rollout, mask)
    d = (old64 - rollout64) * mask64
    assert stats["rollout/logprob_abs_diff"] == pytest.approx(float(d.abs().sum() / mask64.sum()), rel=1e-5)
    kl = ((torch.exp(d) - 1 - d) * mask64).sum() / mask64.sum()
    assert stats["rollout/kl_rollout_train"] == pytest.approx(float(kl), rel=1e-5)
    assert stats["rollout/kl_rollout_train"] > 0


def test_weights_scale_the_policy_gradient_term_only():
    """At the old policy (ratio 1, unclipped) the PPO term is -A per token, so weighting it by w is the same as
    multiplying the advantages by w; the KL term is not weighted."""
    from conftest import rollout_batch
    from tokenwise.rl.algorithm import Algorithm
    from tokenwise.trainer.config import config_from_dict
    torch.manual_seed(0)
    cfg = config_from_dict({"algorithm": {"kl": {"coef": 0.1}}})
    algo = Algorithm(cfg.algorithm, max_response_len=5)
    rollouts = rollout_batch([3, 5, 2, 4], group_size=2)
    rollouts = dataclasses.replace(rollouts, rollout_logprobs=-torch.rand(4, 5) * rollouts.response_mask)
    batch = algo.make_batch(rollouts, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    old = (rollouts.rollout_logprobs + torch.randn(4, 5)) * rollouts.response_mask
    batch = dataclasses.replace(batch, old_logprobs=old, old_entropy=torch.rand(4, 5),
                                ref_logprobs=old - 0.1 * rollouts.response_mask)
    shaped, stats = algo.shape(batch)
    assert shaped.is_weights is not None and stats["rollout/tis_clipped_frac"] > 0
    logp = old.clone().requires_grad_(True)
    loss, _ = algo.loss(logp, torch.zeros(4, 5), shaped, num_tokens=int(batch.response_mask.sum()))
    scaled = dataclasses.replace(batch, advantages=batch.advantages * shaped.is_weights)
    logp2 = old.clone().requires_grad_(True)
    assert scaled.is_weights is None
    loss2, _ = algo.loss(logp2, torch.zeros(4, 5), scaled, num_tokens=int(batch.response_mask.sum()))
    torch.testing.assert_close(loss, loss2, rtol=1e-6, atol=1e-7)
    loss.backward(), loss2.backward()
    torch.testing.assert_close(logp.grad, logp2.grad, rtol=1e-5, atol=1e-7)
    off = Algorithm(config_from_dict({"algorithm": {"rollout_correction": {"level": "none"}}}).algorithm)
    unweighted, stats_off = off.shape(batch)
    assert unweighted.is_weights is None and "rollout/kl_rollout_train" in stats_off
    assert stats_off["rollout/logprob_abs_diff"] == pytest.approx(stats["rollout/logprob_abs_diff"])
    assert math.isfinite(stats["rollout/tis_weight_mean"])


def test_config_defaults_and_validation():
    from tokenwise.rl.errors import ConfigError
    from tokenwise.trainer.config import config_from_dict
    c = config_from_dict({}).algorithm.rollout_correction
    assert (c.level, c.mode, c.cap) == ("token", "truncate", 2.0)
    with pytest.raises(ConfigError, match="rollout_correction.cap"):
        config_from_dict({"algorithm": {"rollout_correction": {"cap": 1.0}}})
    with pytest.raises(ConfigError, match="rollout_correction.level"):
        config_from_dict({"algorithm": {"rollout_correction": {"level": "tokens"}}})
