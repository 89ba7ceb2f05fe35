"""D³S: the max-variance subset selector against brute force, the sample and token levels, the schedule."""

import itertools
import math

import pytest
import torch

from tokenwise.rl.d3s import d3s_samples, d3s_tokens, max_variance_subset, schedule
from conftest import rollout_batch
from tokenwise.rl.types import TrainBatch


def _var(x):
    x = x.double()
    return float((x * x).mean() - x.mean() ** 2)


@pytest.mark.parametrize("seed", range(6))
def test_subset_selector_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    for m in range(1, 13):
        a = torch.randn(m, generator=g)
        if seed % 2:
            a = a.round()  # ties
        for n in range(1, m + 1):
            best = max(_var(a[list(c)]) for c in itertools.combinations(range(m), n))
            idx = max_variance_subset(a, n)
            assert len(idx) == n == len(set(idx.tolist()))
            assert _var(a[idx]) == pytest.approx(best, abs=1e-12), (m, n)


def test_subset_selector_hand_example():
    a = torch.tensor([0.0, 5.0, 1.0, -4.0, 2.0])
    assert max_variance_subset(a, 2).tolist() == [1, 3]     # {5, -4}
    # {-4, 2, 5}: mean 1, variance 45/3 - 1 = 14; beats {-4, 0, 5} and {-4, 1, 5} (13.56 each)
    assert max_variance_subset(a, 3).tolist() == [1, 3, 4]
    with pytest.raises(ValueError):
        max_variance_subset(a, 6)


def test_schedule():
    assert schedule(0.2, 1.0, 0.0) == 0.2 and schedule(0.2, 1.0, 1.0) == 1.0
    assert schedule(0.2, 1.0, 0.5) == pytest.approx(0.6) and schedule(0.5, 1.0, 7.0) == 1.0


def _batch(adv_rows, lengths, G, rewards=None):
    """Rewards default to the advantages themselves (a group of zeros is then a group of equal rewards)."""
    base = rollout_batch(lengths, G)
    return TrainBatch.from_rollouts(base, advantages=torch.tensor(adv_rows)[:, None] * base.response_mask,
                                    rewards=torch.tensor(rewards if rewards is not None else adv_rows))


def test_sample_level_keeps_the_widest_responses_per_group_and_drops_zero_groups():
    adv = [1.0, -1.0, 0.1, 0.0,   0.0, 0.0, 0.0, 0.0,   2.0, 0.5, -0.5, -3.0]
    batch = _batch(adv, [2] * 12, G=4)
    out, stats = d3s_samples(batch, progress=0.0, n_init=0.5, n_final=1.0)
    assert out.group_size == 2 and out.prompts == ["0", "1", "8", "11"]  # group 2 (all zero) dropped
    assert stats == {"d3s/sample_frac": 4 / 12, "d3s/groups_kept_frac": pytest.approx(2 / 3)}
    torch.testing.assert_close(out.advantages[:, 0], torch.tensor([1.0, -1.0, 2.0, -3.0]))  # not re-normalised
    full, _ = d3s_samples(batch, progress=1.0, n_init=0.5, n_final=1.0)  # the schedule ends at every response
    assert full.group_size == 4 and len(full) == 8


def test_sample_level_drops_groups_of_equal_rewards_whatever_their_advantages():
    """Liveness comes from the rewards: a group of 4 x 1.1 whose float32 advantages came out as rounding noise
    (what the old float32 GRPO produced) is dropped; a group with a zero-advantage row but unequal rewards is kept."""
    adv = [0.1, 0.1, -0.1, -0.1,   1.0, -1.0, 0.0, 0.0]
    rewards = [1.1, 1.1, 1.1, 1.1,   1.0, 0.0, 0.5, 0.5]
    out, stats = d3s_samples(_batch(adv, [2] * 8, G=4, rewards=rewards), progress=0.0, n_init=0.5, n_final=1.0)
    assert out.prompts == ["4", "5"] and stats["d3s/groups_kept_frac"] == 0.5


def test_sample_level_batch_scope_keeps_the_widest_responses_of_the_batch():
    adv = [1.0, -1.0, 0.1, 0.0,   0.0, 0.0, 0.0, 0.0,   2.0, 0.5, -0.5, -3.0]
    batch = _batch(adv, [2] * 12, G=4)
    # n = 0.25 of 12 -> 3 of the 8 rows of live groups: sorted -3 -1 -0.5 0 0.1 0.5 1 2; {-3, 1, 2} (variance 14/3)
    # beats {-3, -1, 2} (38/9) and {-3, -1, -0.5} (7/6)
    out, stats = d3s_samples(batch, progress=0.0, n_init=0.25, n_final=1.0, scope="batch")
    assert out.prompts == ["0", "8", "11"] and out.group_size == 1
    torch.testing.assert_close(out.advantages[:, 0], torch.tensor([1.0, 2.0, -3.0]))
    assert stats == {"d3s/sample_frac": 3 / 12, "d3s/groups_kept_frac": pytest.approx(2 / 3)}
    full, _ = d3s_samples(batch, progress=1.0, n_init=0.25, n_final=1.0, scope="batch")
    assert len(full) == 8 and full.prompts == [str(i) for i in [0, 1, 2, 3, 8, 9, 10, 11]]
    with pytest.raises(ValueError, match="scope"):
        d3s_samples(batch, progress=0.0, n_init=0.25, n_final=1.0, scope="prompt")


def test_token_level_keeps_top_abs_adv_times_entropy():
    batch = _batch([1.0, -2.0], [3, 2], G=2)
    batch.old_entropy = torch.tensor([[0.5, 3.0, 1.0], [0.5, 0.1, 0.0]])
    # |A| H: row 0: 0.5 3.0 1.0 | row 1: 1.0 0.2 ; k = 0.4 -> ceil(2) tokens: 3.0 and the earlier 1.0 (row 0, t 2)
    out, stats = d3s_tokens(batch, progress=0.0, k_init=0.4, k_final=1.0)
    assert out.pg_mask.tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert stats["d3s/token_frac"] == pytest.approx(0.4)
    out, _ = d3s_tokens(batch, progress=1.0, k_init=0.4, k_final=1.0)
    assert out.pg_mask.tolist() == batch.response_mask.tolist()
    assert math.ceil(0.7 * 5) == int(d3s_tokens(batch, progress=0.5, k_init=0.4, k_final=1.0)[0].pg_mask.sum())


def test_token_level_denominator_kept_or_valid():
    """'kept' narrows the loss mask to the kept tokens (token-mean then divides by their count); 'valid' leaves it."""
    from types import SimpleNamespace
    from tokenwise.rl.algorithm import Algorithm
    from tokenwise.trainer.batching import plan_updates
    batch = _batch([1.0, -2.0], [3, 2], G=2)
    batch.old_entropy = torch.tensor([[0.5, 3.0, 1.0], [0.5, 0.1, 0.0]])
    kept, _ = d3s_tokens(batch, progress=0.0, k_init=0.4, k_final=1.0, denominator="kept")
    valid, _ = d3s_tokens(batch, progress=0.0, k_init=0.4, k_final=1.0, denominator="valid")
    assert kept.loss_mask.tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]] and valid.loss_mask is None
    assert plan_updates(kept, world=1, ppo_epochs=1, mini_batches=1, max_rows=4)[0][0].num_tokens == 2
    assert plan_updates(valid, world=1, ppo_epochs=1, mini_batches=1, max_rows=4)[0][0].num_tokens == 5
    # token-mean of the PPO loss at ratio 1 (-A on kept tokens): kept -> (-1 - 1) / 2 = -1; valid -> -2 / 5
    from tokenwise.trainer.config import AlgorithmConfig
    algo = Algorithm(AlgorithmConfig())
    zeros = torch.zeros(2, 3)
    for b, n, expect in [(kept, 2, -1.0), (valid, 5, -0.4)]:
        b.old_logprobs = zeros
        loss, _ = algo.loss(zeros.clone(), zeros, b, num_tokens=n)
        assert float(loss) == pytest.approx(expect)
    with pytest.raises(ValueError, match="denominator"):
        d3s_tokens(batch, progress=0.0, k_init=0.4, k_final=1.0, denominator="all")
