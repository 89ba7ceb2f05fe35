"""HAPO pieces on hand-computed batches, plus the properties in ALGORITHMS.md §3."""

import math

import pytest
import torch

from tokenwise.rl.advantages import grpo
from tokenwise.rl.hapo import entropy_normaliser, hapo_clip, token_group_average
from tokenwise.rl.losses import ppo_clip


def test_entropy_normaliser_hand_computed():
    H = torch.exp(torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 9.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    # log H = 0..4; the 0.8-quantile is 3.2; l - pivot = -3.2 -2.2 -1.2 -0.2 0.8; negatives / 3.2, positives / 0.8
    torch.testing.assert_close(entropy_normaliser(H, mask, q=0.8),
                               torch.tensor([[-1.0, -0.6875, -0.375, -0.0625, 1.0, 0.0]]))


def test_entropy_normaliser_range_share_and_constant_entropy():
    g = torch.Generator().manual_seed(0)
    H = torch.rand(32, 20, generator=g) * 3
    mask = (torch.rand(32, 20, generator=g) > 0.2).float()
    h = entropy_normaliser(H, mask, q=0.8)
    valid = mask > 0
    assert h.min() == -1.0 and h.max() == 1.0 and not h[~valid].any()
    assert (h[valid] > 0).float().mean().item() == pytest.approx(0.2, abs=0.01)
    const = entropy_normaliser(torch.full((4, 5), 0.7), torch.ones(4, 5), q=0.8)
    assert not torch.isnan(const).any() and not const.any()
    assert not torch.isnan(entropy_normaliser(torch.zeros(2, 3), torch.ones(2, 3))).any()  # H = 0 -> log clamp


def test_token_group_average_hand_computed_and_fallback():
    # lengths 1 and 3: tokens carry 1 | 0 0 0 -> mu 0.25, sigma sqrt(0.1875) = 0.4330
    adv = token_group_average(torch.tensor([1.0, 0.0]), 2, lengths_B=torch.tensor([1, 3]))
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25]) / math.sqrt(0.1875), atol=1e-5, rtol=0)
    # lengths 1 and 40: A_1 = 6.3 >= 5 -> that group falls back to GRPO (+-0.7071); the other group is untouched
    adv = token_group_average(torch.tensor([1.0, 0.0, 1.0, 0.0]), 2, lengths_B=torch.tensor([1, 40, 1, 3]))
    torch.testing.assert_close(adv[:2], torch.tensor([0.7071061, -0.7071061]), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv[2:], torch.tensor([0.75, -0.25]) / math.sqrt(0.1875), atol=1e-5, rtol=0)


def test_equal_lengths_give_grpo_with_biased_std():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(48, generator=g)
    adv = token_group_average(r, 8, lengths_B=torch.full((48,), 5))
    r_NG = r.view(-1, 8)
    biased = (r_NG - r_NG.mean(1, keepdim=True)) / (r_NG.std(1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(adv, biased.reshape(-1), atol=1e-5, rtol=0)
    assert not torch.allclose(adv, grpo(r, 8))  # GRPO's unbiased std differs


def test_hapo_loss_hand_computed():
    h = torch.tensor([[1.0, -1.0, 0.5, -0.5]])
    ratio = torch.tensor([[1.0, 1.0, 1.3, 0.75]])
    adv = torch.ones(1, 4)
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    loss, stats = hapo_clip(ratio.log(), old, adv, mask, entropy_norm=h, clip_low=0.2, clip_high=0.2,
                            asymmetric_clip=True, alpha=1.0, redistribution=True, beta=1.0)
    # bounds (low, high): (.2,.4) (.4,.2) (.2,.3) (.3,.2); neutral: yes yes no no
    # A': h>0 & neutral -> A = 1; h<0 & neutral -> A(1+h) = 0; h>0 & not -> 1.5; h<0 & not -> A = 1
    # L: -1 | 0 | -1.5 x 1.3 (inside the widened 1.3 bound) | -0.75 (0.75 inside the widened 0.7 bound)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, 0.0, -1.95, -0.75]]))
    assert stats["hapo/redistributed_frac"].item() == 2
    plain, _ = hapo_clip(ratio.log(), old, adv, mask, entropy_norm=h, clip_low=0.2, clip_high=0.2,
                         asymmetric_clip=False, alpha=1.0, redistribution=False, beta=1.0)
    torch.testing.assert_close(plain, ppo_clip(ratio.log(), old, adv, mask, clip_low=0.2, clip_high=0.2)[0])


def test_normaliser_statistics_reproduce_the_normaliser_and_drive_sampling_temperatures():
    from tokenwise.rl.hapo import apply_normaliser, normaliser_stats, sampling_temperatures
    H = torch.exp(torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 9.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    stats = normaliser_stats(H, mask, q=0.8)
    rms = math.sqrt((3.2 ** 2 + 2.2 ** 2 + 1.2 ** 2 + 0.2 ** 2 + 0.8 ** 2) / 5)
    assert stats["pivot"] == pytest.approx(3.2) and stats["rms"] == pytest.approx(rms)
    assert stats["pos_max"] == pytest.approx(0.8 / rms) and stats["neg_min"] == pytest.approx(-3.2 / rms)
    g = torch.Generator().manual_seed(1)
    Hr, m = torch.rand(8, 9, generator=g) * 2, (torch.rand(8, 9, generator=g) > 0.3).float()
    torch.testing.assert_close(apply_normaliser(Hr, normaliser_stats(Hr, m)) * m, entropy_normaliser(Hr, m))
    # a decoding step: uniform logits over 4 tokens at T = 0.5 -> H = log 4, log H = 0.3266; h = (0.3266 - 3.2) /
    # rms / (3.2 / rms) = -0.8979; T_t = 0.5 (1 + 0.1 h) = 0.45510; a one-hot-ish row has H ~ 0 -> h = -1 -> 0.45
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [50.0, 0.0, 0.0, -math.inf]])
    T = sampling_temperatures(logits, temperature=0.5, tau=0.1, stats=stats)
    expect0 = 0.5 * (1 + 0.1 * (math.log(math.log(4)) - 3.2) / 3.2)
    assert T.tolist() == pytest.approx([expect0, 0.45], abs=1e-6)
    flat = normaliser_stats(torch.full((2, 3), 0.7), torch.ones(2, 3))  # constant entropy: T stays T
    assert sampling_temperatures(logits, temperature=0.5, tau=0.1, stats=flat).tolist() == [0.5, 0.5]
