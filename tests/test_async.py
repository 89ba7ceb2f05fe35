"""Asynchronous generation (grpo.max_staleness, trainer/async_rollouts.py) in debug mode: the queue without lag is
the synchronous loop bit for bit; the version stamps never exceed the bound whichever side is slow; resume with
generations in flight loses and repeats nothing. Cluster mode: tests/test_cluster.py."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tokenwise.trainer.cli import main
from tests.conftest import read_metrics

DUMP = "dump"


def _steps(run) -> list[dict]:
    return [r for r in read_metrics(run, "grpo") if "actor/loss" in r]


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(("perf/", "timing/"))} for r in records]


def _stamps(run, step: int) -> torch.Tensor:
    return load_file(str(run / DUMP / f"step_{step:06d}.safetensors"))["token_versions"]


def _prompts(run, step: int) -> list[str]:
    lines = (run / DUMP / f"step_{step:06d}.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines]


def test_the_queue_without_lag_is_the_synchronous_loop_bit_for_bit(tiny_recipe, tmp_path, monkeypatch):
    """max_staleness 0 runs the synchronous loop; forced through the asynchronous machinery (generation thread,
    queued weight loads from snapshots, the queued prompt cursor) with a bound of 0, every metric but timings and
    the final weights are the same bits."""
    from tokenwise.trainer import controller, workers
    recipe = tiny_recipe(stages=["grpo"], grpo={"steps": 4, "eval_every": 2})
    sync, queued = tmp_path / "sync", tmp_path / "queued"
    assert main(["train", str(recipe), f"output_dir={sync}"]) == 0
    submitted = []
    original = workers.LocalWorkers.submit_generate
    monkeypatch.setattr(workers.LocalWorkers, "submit_generate",
                        lambda self, *a, **k: submitted.append(k["step"]) or original(self, *a, **k))
    monkeypatch.setattr(controller, "PIPELINE_FROM", 0)
    assert main(["train", str(recipe), f"output_dir={queued}"]) == 0
    assert submitted == [1, 2, 3, 4]  # the queue was used, one generation per step
    a, b = read_metrics(sync, "grpo"), read_metrics(queued, "grpo")
    assert len(a) == len(b) and _comparable(a) == _comparable(b)
    assert all(r["async/staleness_max"] == 0 for r in _steps(queued))
    wa = AutoModelForCausalLM.from_pretrained(sync / "grpo" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(queued / "grpo" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("slow", ["learner", "engine"])
def test_no_update_uses_a_token_older_than_the_bound(tiny_recipe, tmp_path, monkeypatch, slow):
    """max_staleness 2, with a deliberately slow learner (the engines run ahead and wait) or a slow engine (the
    learner waits): the version stamps of every trained token, read from the dumped rollouts, are at most 2 versions
    behind the policy the update starts from (step s starts from version s-1): exactly min(2, s-1)."""
    from tokenwise.trainer.learner import LearnerPool
    from tokenwise.trainer.rollout.hf import HFRollout
    delay = 0.6
    target, name = (LearnerPool, "train_step") if slow == "learner" else (HFRollout, "generate")
    original = getattr(target, name)

    def slowed(self, *a, **k):
        time.sleep(delay)
        return original(self, *a, **k)
    monkeypatch.setattr(target, name, slowed)
    recipe = tiny_recipe(stages=["grpo"], grpo={"steps": 6, "max_staleness": 2}, rollout={"dump_dir": DUMP},
                         eval={"num_prompts": 8, "k": 0})
    run = tmp_path / "run"
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    steps = _steps(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        s = r["step"]
        stamps = _stamps(run, s)
        sampled = stamps[stamps >= 0]
        assert sampled.numel() > 0 and int((s - 1 - sampled).max()) == min(2, s - 1) <= 2
        assert r["async/staleness_max"] == min(2, s - 1)
    late = steps[2:]  # the queue is full from step 3
    learner_idle = sum(r["timing/learner_idle"] for r in late)
    rollout_idle = sum(r["timing/rollout_idle"] for r in late)
    if slow == "learner":  # the engines finish ahead and wait for the next version; the learner never waits long
        assert rollout_idle > 0.5 * delay * len(late) > learner_idle
    else:  # the learner waits for every batch; the engine always has queued work
        assert learner_idle > 0.5 * delay * len(late) > rollout_idle


def test_check_bound_refuses_a_token_older_than_the_bound():
    from tests.conftest import rollout_batch
    from tokenwise.trainer.async_rollouts import StalenessError, check_bound
    batch = rollout_batch([3, 2, 4, 1], group_size=2)
    batch.token_versions = torch.where(batch.response_mask > 0, 5, -1).int()
    assert check_bound(batch, 6, 1, step=7) == {"async/staleness_mean": 1.0, "async/staleness_max": 1.0,
                                                "async/mixed_frac": 0.0}
    batch.token_versions[2, 0] = 4  # a response that changed policy after its first token (partial rollouts)
    assert check_bound(batch, 6, 2, step=7)["async/mixed_frac"] == 0.25
    batch.token_versions[2, 0] = 5
    batch.token_versions[1, 0] = 4  # one token two versions behind
    with pytest.raises(StalenessError, match="versions 4..5"):
        check_bound(batch, 6, 1, step=7)
    with pytest.raises(StalenessError):  # newer than the learners: a broken schedule
        check_bound(batch, 4, 3, step=5)


def test_resume_with_generations_in_flight_loses_and_repeats_nothing(tiny_recipe, tmp_path):
    """max_staleness 1, stopped after step 3 while step 4's and 5's generations were queued: the checkpoint's
    prompt cursor is before them, so the resumed run trains every step once, on the same prompts, in the same
    order, as the uninterrupted run; steps before the stop are the same bits."""
    recipe = tiny_recipe(stages=["grpo"], grpo={"steps": 6, "max_staleness": 1, "save_every": 1},
                         data={"num_train": 20}, rollout={"dump_dir": DUMP}, eval={"num_prompts": 8, "k": 0})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", str(recipe), f"output_dir={straight}"]) == 0
    assert main(["train", str(recipe), f"output_dir={resumed}", "--stop-after-steps", "3"]) == 0
    assert not (resumed / DUMP / "step_000004.safetensors").exists()
    assert main(["resume", str(resumed)]) == 0
    assert [r["step"] for r in _steps(resumed)] == [1, 2, 3, 4, 5, 6]
    for s in range(1, 7):
        assert _prompts(resumed, s) == _prompts(straight, s), s
    for s in (1, 2, 3):
        assert torch.equal(_stamps(resumed, s), _stamps(straight, s))
    # the regenerated steps were sampled by the resumed weights (version 3), then the schedule's lag returns
    assert [r["async/staleness_max"] for r in _steps(resumed)] == [0, 1, 1, 0, 1, 1]
