"""DAPO dynamic sampling: generation rounds until enough groups with unequal rewards."""

import pytest
import torch

from conftest import TINY, _merge, stage_env
from tokenwise.rl.data import PromptStream
from tokenwise.rl.advantages import informative_groups
from tokenwise.rl.algorithm import Algorithm
from tokenwise.trainer.config import config_from_dict
from tokenwise.trainer.controller import sample
from tokenwise.trainer.workers import LocalWorkers

REWARDS = """
def odd_prompts_only(*, prompt, response, answer, truncated):
    # groups of prompts starting with an even digit all score 0 (uninformative); odd ones vary with the response
    return float(int(prompt[0]) % 2 == 1) * float(len(set(response)) % 2)
"""


def test_informative_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert informative_groups(r, 2).tolist() == [False, True, False]


@pytest.mark.parametrize("max_rounds", [0, 1, 4])
def test_dynamic_sampling_keeps_only_informative_groups(tmp_path, max_rounds):
    (tmp_path / "rw.py").write_text(REWARDS)
    cfg = config_from_dict(_merge(TINY, {
        "stages": ["grpo"], "rewards": [{"type": "python", "function": f"{tmp_path}/rw.py:odd_prompts_only"}],
        "algorithm": {"dynamic_sampling": {"max_rounds": max_rounds}}, "grpo": {"prompts_per_step": 4}}))
    env = stage_env(cfg, tmp_path / "run")
    workers = LocalWorkers(env, micro_batch_size=8, learner_kwargs=dict(
        model_dir=env.init_dir, optim=cfg.grpo.optim, device=env.device, dtype=env.dtype, total_updates=1))
    data = PromptStream(env.data["train"], seed=0)
    algo = Algorithm(cfg.algorithm)
    batch, rewards, stats, seconds = sample(env, workers, algo, data, step=1)
    G = cfg.grpo.group_size
    groups = len(batch) // G
    assert seconds > 0 and len(rewards) == len(batch) == len(batch.prompts)
    if max_rounds == 0:  # off: one round, every group, whatever its rewards
        assert groups == 4 and "sampling/rounds" not in stats and data.state_dict()["index"] == 4
        return
    rounds = int(stats["sampling/rounds"])
    keep = informative_groups(rewards, G)
    if not keep.any():  # nothing informative within max_rounds: the last round is trained on whole
        assert rounds == max_rounds and groups == 4 and stats["sampling/informative_frac"] == 0
        return
    assert keep.all()  # only groups that teach something
    assert data.state_dict()["index"] == 4 * rounds  # fresh prompts every round
    if max_rounds == 4:
        assert groups == 4 and rounds >= 2  # about half the prompts are uninformative: one round is not enough
    assert 0 < stats["sampling/informative_frac"] < 1
    # the same step and rounds draw the same samples again (retries and debug/cluster parity rely on it)
    again = sample(env, workers, algo, PromptStream(env.data["train"], seed=0), step=1)[0]
    assert torch.equal(again.response_ids, batch.response_ids)
