"""Planning a step's batch over learner ranks: coverage, balance, budgets, and equal pass counts per rank."""

import random

import pytest
import torch

from conftest import rollout_batch
from tokenwise.rl.types import SFTBatch, TrainBatch
from tokenwise.trainer.batching import balance, gather_rows, micro_split, plan_rows, plan_sft, plan_updates


def _batch(lengths, G=4):
    return TrainBatch.from_rollouts(rollout_batch(lengths, G, prompt_len=3))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_updates_covers_each_row_once_per_update_with_equal_pass_counts(world, seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 20) for _ in range(32)]
    batch = _batch(lengths)
    plans = plan_updates(batch, world=world, ppo_epochs=2, mini_batches=4, max_rows=3, max_tokens=40)
    assert len(plans) == world and len({len(p) for p in plans}) == 1 and len(plans[0]) == 8
    for u in range(8):
        updates = [p[u] for p in plans]
        assert len({len(x.micros) for x in updates}) == 1  # same number of forward/backward passes on every rank
        rows = sorted(r for x in updates for m in x.micros if m.weight for r in m.rows)
        m = u % 4
        assert rows == list(range(m * 8, (m + 1) * 8))  # mini-batch m = groups 2m, 2m+1, each row exactly once
        assert {x.num_tokens for x in updates} == {sum(lengths[r] for r in rows)}  # global count on every rank
        for x in updates:
            for micro in x.micros:
                assert micro.weight in (0.0, 1.0)
                assert len(micro.rows) <= 3
                if len(micro.rows) > 1:
                    assert len(micro.rows) * max(lengths[r] + 3 for r in micro.rows) <= 40


def test_world_one_keeps_row_order_and_row_budget():
    batch = _batch([5] * 16)
    (updates,) = plan_updates(batch, world=1, ppo_epochs=1, mini_batches=1, max_rows=6)
    assert [m.rows for m in updates[0].micros] == [list(range(0, 6)), list(range(6, 12)), list(range(12, 16))]


def test_balance_evens_out_tokens():
    tokens = [100, 1, 1, 1, 50, 50, 2, 2]
    parts = balance(list(range(8)), tokens, 2)
    loads = sorted(sum(tokens[r] for r in p) for p in parts)
    assert loads == [103, 104] and all(p == sorted(p) for p in parts)


def test_micro_split_lets_an_over_budget_row_go_alone():
    assert micro_split([0, 1, 2], [50, 5, 5], max_rows=8, max_tokens=20) == [[0], [1, 2]]


def test_more_ranks_than_rows_pad_with_zero_weight_passes():
    plans = plan_rows([0, 1], [3, 4], world=3, max_rows=8)
    assert [[(m.rows, m.weight) for m in p] for p in plans] == [[([1], 1.0)], [([0], 1.0)], [([0], 0.0)]]


def test_plan_sft_counts_target_tokens_globally():
    ids = torch.zeros(5, 6, dtype=torch.long)
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 0]] * 5, dtype=torch.float32)
    plans = plan_sft(SFTBatch(ids, torch.ones(5, 6, dtype=torch.long), loss_mask), world=2, max_rows=2)
    assert [u.num_tokens for u in plans] == [10, 10]
    assert sorted(r for u in plans for m in u.micros if m.weight for r in m.rows) == [0, 1, 2, 3, 4]


def test_gather_rows_restores_row_order():
    out = gather_rows([([2, 0], torch.tensor([[2.0], [0.0]])), ([1], torch.tensor([[1.0]]))], 3)
    assert out.squeeze(1).tolist() == [0.0, 1.0, 2.0]
