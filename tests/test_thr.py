"""Token Hidden Reward: the influence score against brute force, a hand-computed batch, p = 0 is GRPO, and the
learner's hidden-state / group-vocabulary pass."""

import dataclasses

import pytest
import torch

from conftest import rollout_batch
from tokenwise.rl.thr import group_vocab, influence, prediction_error, token_hidden_reward
from tokenwise.rl.types import TrainBatch


def _hand_batch() -> TrainBatch:
    """Group 0 (V* = {3, 5}, d = 2): row 0 correct (reward 1), row 1 wrong; group 1: no correct response."""
    batch = TrainBatch.from_rollouts(rollout_batch([2, 2, 2, 1], 2))
    ids = torch.tensor([[3, 5], [5, 5], [3, 3], [5, 0]])
    vocab = group_vocab(ids, batch.response_mask, 2)
    probs = torch.tensor([[[0.5, 0.5], [0.0, 0.5]],      # rows of group 0: probabilities of ids 3 and 5
                          [[0.5, 0.5], [0.25, 0.75]],
                          [[0.5, 0.5], [0.5, 0.5]],       # group 1 (V* = {3, 5} as well)
                          [[0.5, 0.5], [0.0, 0.0]]])
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]],
                           [[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * batch.response_mask
    return dataclasses.replace(batch, response_ids=ids, rewards=torch.tensor([1.0, 0.0, 0.5, 0.0]), advantages=adv,
                               group_vocab=vocab, old_vocab_probs=probs, old_hidden=hidden,
                               old_entropy=torch.ones(4, 2), old_logprobs=torch.zeros(4, 2))


def test_group_vocab_lists_each_groups_sampled_ids():
    ids = torch.tensor([[3, 5, 9], [5, 5, 1], [2, 2, 2], [7, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]).float()
    v = group_vocab(ids, mask, 2)
    assert v.tolist() == [[1, 3, 5], [1, 3, 5], [0, 2, 7], [0, 2, 7]]  # 9 sits on padding; 0 is valid in row 3
    ids[3, 1] = 2
    assert group_vocab(ids, mask, 2)[2].tolist() == [2, 7, -1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_influence_equals_the_double_sum(seed):
    g = torch.Generator().manual_seed(seed)
    G, T, V, d = 4, 5, 6, 3
    gv, h = torch.randn(G, T, V, generator=g), torch.randn(G, T, d, generator=g)
    mask = (torch.rand(G, T, generator=g) > 0.3).float()
    correct = torch.tensor([True, False, True, False])
    s = influence(gv, h, mask, correct)
    ref = torch.zeros(G, T, dtype=torch.float64)
    for j in range(G):
        for k in range(T):
            if mask[j, k]:
                ref[j, k] = sum(float(gv[i, t].double() @ gv[j, k].double()) * float(h[i, t].double() @ h[j, k].double())
                                for i in range(G) if correct[i] for t in range(T) if mask[i, t])
    torch.testing.assert_close(s, ref, atol=1e-10, rtol=1e-10)


def test_prediction_error_is_onehot_minus_probs_on_the_group_vocabulary():
    b = _hand_batch()
    g = prediction_error(b.response_ids, b.group_vocab, b.old_vocab_probs)
    assert g[0].tolist() == [[0.5, -0.5], [0.0, 0.5]]
    assert g[1].tolist() == [[-0.5, 0.5], [-0.25, 0.25]]


@pytest.mark.parametrize("mode", ["keep", "mask"])
def test_thr_hand_computed(mode):
    # M = sum over row 0's tokens of g h^T = [[0.5, 0], [-0.5, 0.5]]; s = g M h:
    # row 0: [0.5, 0.25] (tau = their mean = 0.375), row 1: [-0.5, -0.125]; THR = A s: row 0 [0.5, 0.25],
    # row 1 [0.5, 0.125]; |THR| > 0.375 on the first token of each row, both with THR > 0, so A' = A (1 + p).
    out, stats = token_hidden_reward(_hand_batch(), p=0.5, mode=mode, correct_reward=1.0)
    assert out.advantages[:2].tolist() == [[1.5, 1.0], [-1.5, -1.0]]
    assert out.advantages[2:].tolist() == [[0.5, 0.5], [-0.5, 0.0]]  # no correct response: untouched
    assert stats["thr/tau_mean"] == pytest.approx(0.375)
    assert stats["thr/selected_frac"] == 0.5 and stats["thr/up_frac"] == 1.0
    assert stats["thr/groups_with_correct_frac"] == 0.5
    assert out.old_hidden is None and out.old_vocab_probs is None and out.group_vocab is None  # consumed
    if mode == "keep":
        assert out.pg_mask is None
    else:
        assert out.pg_mask.tolist() == [[1, 0], [1, 0], [1, 1], [1, 1]]


def test_negative_p_shrinks_the_selected_advantages():
    out, _ = token_hidden_reward(_hand_batch(), p=-0.5, mode="keep", correct_reward=1.0)
    assert out.advantages[:2].tolist() == [[0.5, 1.0], [-0.5, -1.0]]


@pytest.mark.parametrize("seed", [0, 1])
def test_p_zero_is_plain_grpo(seed):
    g = torch.Generator().manual_seed(seed)
    batch = TrainBatch.from_rollouts(rollout_batch([3, 5, 2, 4, 5, 1], 3))
    ids = torch.randint(0, 20, batch.response_ids.shape, generator=g)
    vocab = group_vocab(ids, batch.response_mask, 3)
    batch = dataclasses.replace(batch, response_ids=ids, rewards=torch.tensor([1.0, 0, 1, 0, 0, 1]),
                                advantages=torch.randn(6, 5, generator=g) * batch.response_mask, group_vocab=vocab,
                                old_vocab_probs=torch.rand(6, 5, vocab.shape[1], generator=g) / 4,
                                old_hidden=torch.randn(6, 5, 8, generator=g))
    out, stats = token_hidden_reward(batch, p=0.0, mode="keep", correct_reward=1.0)
    assert torch.equal(out.advantages, batch.advantages) and out.pg_mask is None
    assert stats["thr/selected_frac"] > 0  # tokens were selected, and p = 0 left them alone


def test_thr_without_the_learners_features_is_a_clear_error():
    batch = dataclasses.replace(_hand_batch(), old_hidden=None)
    with pytest.raises(ValueError, match="hidden states"):
        token_hidden_reward(batch, p=0.5, mode="keep", correct_reward=1.0)
