"""End to end through the CLI entry point: a whole run's artifacts, exact resume, one-line errors."""

import json
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, TINY, read_metrics
from tokenwise.trainer.cli import main

REQUIRED_GRPO_METRICS = {"reward/mean", "actor/entropy", "actor/kl", "actor/loss", "perf/tokens_per_s",
                         "rollout/response_len_mean", "actor/clipfrac_high", "actor/grad_norm",
                         "rollout/logprob_abs_diff", "rollout/kl_rollout_train", "rollout/tis_clipped_frac",
                         "timing/generate", "timing/reward", "timing/logprob", "timing/train", "timing/sync"}


def _comparable(records):
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(("perf/", "timing/"))} for r in records]


def test_train_writes_config_metrics_tensorboard_plots_and_models(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tiny_recipe(logging={"plot": True}, grpo={"eval_every": 3, "save_every": 2})
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["output_dir"] == str(run) and resolved["grpo"]["steps"] == 6
    grpo = read_metrics(run, "grpo")
    assert [r["step"] for r in grpo if "reward/mean" in r] == [1, 2, 3, 4, 5, 6]
    assert REQUIRED_GRPO_METRICS <= set(grpo[1])
    assert [r["step"] for r in grpo if "eval/accuracy" in r] == [0, 3, 6]  # step 0: the starting point
    assert [r["step"] for r in read_metrics(run, "sft")] == [0, 1, 2, 3, 4]
    for stage in ("sft", "grpo"):
        assert list((run / stage / "tb").glob("events.out.tfevents.*"))
        assert (run / stage / "curves.png").stat().st_size > 10_000
        final = run / stage / "final"
        AutoModelForCausalLM.from_pretrained(final)
        assert AutoTokenizer.from_pretrained(final).decode([10, 11]) != ""
    ckpts = sorted(p.name for p in (run / "grpo" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000004", "step_00000006"]  # keep_last 2 of 2, 4, 6
    assert (run / "grpo" / "checkpoints" / "latest").read_text() == "step_00000006"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["stages"]) == {"sft", "grpo"} and summary["final_model"] == str(run / "grpo" / "final")
    assert summary["stages"]["grpo"]["accuracy_after"] == grpo[-1]["eval/accuracy"]
    # sampled evaluation (eval.k 8 by default) at every evaluation, in the stage results too
    sampled = {"eval/mean@8", "eval/pass@2", "eval/pass@4", "eval/pass@8"}
    assert all(sampled <= set(r) for r in grpo if "eval/accuracy" in r)
    assert all(r["eval/mean@8"] <= r["eval/pass@2"] <= r["eval/pass@4"] <= r["eval/pass@8"] <= 1 for r in grpo
               if "eval/accuracy" in r)
    assert summary["stages"]["grpo"]["eval_after"]["eval/pass@8"] == grpo[-1]["eval/pass@8"]
    out = capsys.readouterr().out
    assert "pass@8 (sampled): start" in out
    # `tokenwise eval` samples like the run's last evaluation (debug mode, same seed): the same numbers
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert str(run / "grpo" / "final") in out and "eval/accuracy" in out
    for key in ("eval/accuracy", "eval/mean@8", "eval/pass@8"):
        assert f"{key:<24} {grpo[-1][key]:.4f}" in out, key


ADAPTIVE = {"adaptive_temperature": {"tau": 0.3}, "kl": {"coef": 0.01}}  # algorithm state: entropy statistics


@pytest.mark.parametrize("stages, num_train, stop_at, records_before, algorithm", [
    (["grpo"], 12, 3, 4, {}),          # step 3 ends epoch 0 exactly: 3 steps x 4 prompts = 12 rows
    (["grpo"], 10, 3, 4, {}),          # a batch straddles the epoch boundary
    (["sft", "grpo"], 16, 2, 3, {}),   # stop inside SFT, on its epoch boundary (2 steps x 8 = 16); resume runs both
    (["sft", "grpo"], 16, 5, 7, {}),   # stop after SFT finished (steps 0-4) and one GRPO step (steps 0-1)
    (["grpo"], 10, 3, 4, ADAPTIVE),    # HAPO adaptive temperature samples step 4 with step 3's statistics
], ids=["grpo-epoch-boundary", "grpo-mid-epoch", "inside-sft", "after-sft", "adaptive-temperature"])
def test_resume_is_bitwise_exact(tiny_recipe, tmp_path, stages, num_train, stop_at, records_before, algorithm):
    recipe = tiny_recipe(stages=stages, data={"num_train": num_train}, algorithm=algorithm or TINY["algorithm"])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", str(recipe), f"output_dir={straight}"]) == 0
    assert main(["train", str(recipe), f"output_dir={resumed}", "--stop-after-steps", str(stop_at)]) == 0
    assert not (resumed / stages[-1] / "final").exists()
    t_resume = time.time()
    assert main(["resume", str(resumed)]) == 0
    # steps up to the stop were not run again: their records (and each started stage's step-0 evaluation)
    # predate the resume, later ones follow it
    done = [(stage, r["step"], r["time"]) for stage in stages for r in read_metrics(resumed, stage)]
    before = [t < t_resume for _, _, t in done]
    assert sum(before) == records_before and before == sorted(before, reverse=True), done
    for stage in stages:
        a, b = _comparable(read_metrics(straight, stage)), _comparable(read_metrics(resumed, stage))
        assert a == b, f"{stage}: metrics differ after resume"
    assert any("actor/loss" in r for r in read_metrics(resumed, "grpo"))
    wa = AutoModelForCausalLM.from_pretrained(straight / stages[-1] / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed / stages[-1] / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_crash_during_checkpoint_then_resume(tiny_recipe, tmp_path):
    """SIGKILL inside the second checkpoint write: `latest` still names the first, and resume finishes the run with
    the same metrics as an uninterrupted run."""
    recipe = tiny_recipe(stages=["grpo"], grpo={"save_every": 2})
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(["train", str(recipe), f"output_dir={straight}"]) == 0
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import tokenwise.trainer.checkpoint as ck
original = ck.save_training_state
calls = []
def dying(path, state):
    calls.append(path)
    if len(calls) == 2:
        (path / "trainer_state.json").write_text('{{"half": ')
        os.kill(os.getpid(), signal.SIGKILL)
    original(path, state)
ck.save_training_state = dying
import tokenwise.trainer.stage
tokenwise.trainer.stage.save_training_state = dying
from tokenwise.trainer.cli import main
main(["train", {str(recipe)!r}, "output_dir={crashed}"])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = crashed / "grpo" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert (ckpts / "step_00000004.tmp").is_dir() and not (ckpts / "step_00000004").exists()
    t_resume = time.time()
    assert main(["resume", str(crashed)]) == 0
    assert not (ckpts / "step_00000004.tmp").exists()
    assert [r["step"] for r in read_metrics(crashed, "grpo") if r["time"] > t_resume] == [3, 4, 5, 6]
    assert _comparable(read_metrics(straight, "grpo")) == _comparable(read_metrics(crashed, "grpo"))


def _cli(args, cwd=ROOT):
    exe = Path(sys.executable).parent / "tokenwise"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd)


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tokenwise: error:")]
    assert len(errors) == 1, proc.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


def test_malformed_recipe_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  steps: 3\n  prompts_per_stpe: 4\n")
    _assert_one_line_error(_cli(["train", str(bad)]), str(bad), "grpo.prompts_per_stpe", "grpo.prompts_per_step")
    _assert_one_line_error(_cli(["check", str(bad)]), "did you mean")


def test_dataset_without_answer_is_one_line_error(tiny_recipe, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "solution": "2"}\n' * 4)
    recipe = tiny_recipe()
    cfg = yaml.safe_load(recipe.read_text())
    cfg["data"] = {"type": "local", "train_files": [str(data)], "heldout_size": 1}
    recipe.write_text(yaml.safe_dump(cfg))
    _assert_one_line_error(_cli(["train", str(recipe), f"output_dir={tmp_path / 'run'}"]),
                           "train.jsonl", "'answer' not found", "data.answer_key")


def test_missing_model_dir_is_one_line_error(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    cfg = yaml.safe_load(recipe.read_text())
    cfg["model"] = {"type": "pretrained", "path": str(tmp_path / "no_such_model")}
    recipe.write_text(yaml.safe_dump(cfg))
    _assert_one_line_error(_cli(["train", str(recipe), f"output_dir={tmp_path / 'run'}"]),
                           "model.path", "no_such_model", "does not exist")


def test_raising_reward_fails_the_step_naming_reward_and_prompt(tiny_recipe, tmp_path):
    reward = tmp_path / "my_rewards.py"
    reward.write_text("def picky(*, prompt, response, answer, truncated):\n"
                      "    raise ValueError('cannot score ' + prompt)\n")
    recipe = tiny_recipe(stages=["grpo"])
    cfg = yaml.safe_load(recipe.read_text())
    cfg["rewards"] = [{"type": "python", "function": f"{reward}:picky"}]
    recipe.write_text(yaml.safe_dump(cfg))
    proc = _cli(["train", str(recipe), f"output_dir={tmp_path / 'run'}"])
    _assert_one_line_error(proc, "reward 'picky'", "ValueError", "on prompt '")


def test_train_refuses_an_existing_run_folder(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    _assert_one_line_error(_cli(["train", str(tiny_recipe()), f"output_dir={run}"]), "already exists", "set output_dir",
                           "tokenwise resume")


def test_check_prints_resolved_config(tmp_path):
    proc = _cli(["check", "recipes/quickstart.yaml", "grpo.steps=5"])
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["grpo"]["steps"] == 5 and cfg["model"]["type"] == "builtin"


MOE_GATED = {"type": "builtin", "arch": "tokenwise", "attn_gate": "elementwise", "ffn": "moe", "num_experts": 4,
             "experts_per_token": 2, "moe_intermediate_size": 16, "shared_expert_size": 8, "hidden_size": 32,
             "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64, "max_position_embeddings": 64}


def test_gated_moe_model_trains_through_sft_and_grpo_with_its_metrics(tiny_recipe, tmp_path):
    """With routing replay on: the engine's recorded experts reach the dumped rollouts, and the learner (fp32, like
    the engine) agrees with nearly all of them on its own."""
    from tokenwise.trainer.dump import load_rollouts
    run = tmp_path / "run"
    recipe = tiny_recipe(model=MOE_GATED, algorithm={"routing_replay": True}, rollout={"dump_dir": "rollouts"})
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    steps = [r for r in read_metrics(run, "grpo") if "actor/loss" in r]
    for key in ("moe/aux_loss", "moe/z_loss", "moe/dropped_frac", "moe/expert_load_max", "moe/layer1/expert_load_max",
                "gate/mean", "gate/layer0/mean", "moe/routing_agreement"):
        assert all(key in r for r in steps), key
    assert all(r["moe/routing_agreement"] > 0.99 for r in steps)
    batch, _, _ = load_rollouts(run / "rollouts", 2)
    assert batch.response_expert_ids.shape == (*batch.response_ids.shape, 2, 2)
    assert batch.prompt_expert_ids.shape == (*batch.prompt_ids.shape, 2, 2)
    assert torch.equal(batch.prompt_expert_ids[..., 0, 0] >= 0, batch.prompt_mask > 0)
    assert all(0 < r["gate/mean"] < 1 and r["moe/aux_loss"] > 0 for r in steps)
    evals = [r for r in read_metrics(run, "grpo") if "eval/accuracy" in r]
    assert all(0 < r["eval/attn_sink"] <= 1 and "eval/attn_sink_layer1" in r for r in evals)
    final = AutoModelForCausalLM.from_pretrained(run / "grpo" / "final")
    assert type(final).__name__ == "TokenwiseForCausalLM" and final.config.ffn == "moe"


def test_rollout_dump_then_replay_trains_identically(tiny_recipe, tmp_path):
    """A run that dumps its rollouts, and a run replaying that dump without generating, take the same updates."""
    from tokenwise.trainer.dump import dumped_steps, load_rollouts
    dumped, replayed = tmp_path / "dumped", tmp_path / "replayed"
    grpo = {"steps": 3, "prompts_per_step": 4, "group_size": 4, "micro_batch_size": 8}
    assert main(["train", str(tiny_recipe("a.yaml", stages=["grpo"], grpo=grpo, rollout={"dump_dir": "rollouts"})),
                 f"output_dir={dumped}"]) == 0
    assert dumped_steps(dumped / "rollouts") == [1, 2, 3]
    batch, rewards, stats = load_rollouts(dumped / "rollouts", 2)
    lines = (dumped / "rollouts" / "step_000002.jsonl").read_text().splitlines()
    assert len(batch) == len(rewards) == len(lines) == 16 and batch.group_size == 4
    assert json.loads(lines[0])["reward"] == pytest.approx(float(rewards[0]))
    original = [r for r in read_metrics(dumped, "grpo") if "actor/loss" in r]
    assert stats["reward/mean"] == pytest.approx(original[1]["reward/mean"])

    recipe = tiny_recipe("b.yaml", stages=["grpo"], grpo=grpo, trainer={"replay": str(dumped / "rollouts")})
    assert main(["train", str(recipe), f"output_dir={replayed}"]) == 0
    again = [r for r in read_metrics(replayed, "grpo") if "actor/loss" in r]
    for a, b in zip(original, again, strict=True):
        for key in ("reward/mean", "actor/loss", "actor/grad_norm", "actor/kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
        assert b["timing/generate"] == 0.0

    too_many = tiny_recipe("c.yaml", stages=["grpo"], grpo={**grpo, "steps": 5},
                           trainer={"replay": str(dumped / "rollouts")})
    _assert_one_line_error(_cli(["train", str(too_many), f"output_dir={tmp_path / 'c'}"]), "trainer.replay",
                           "steps 1..3", "grpo.steps is 5")
    routed = tiny_recipe("d.yaml", stages=["grpo"], grpo=grpo, trainer={"replay": str(dumped / "rollouts")},
                         algorithm={"routing_replay": True})
    _assert_one_line_error(_cli(["train", str(routed), f"output_dir={tmp_path / 'd'}"]), "algorithm.routing_replay",
                           "no recorded MoE experts")


@pytest.mark.parametrize("kl, mini_batches, calls", [(0.0, 1, []), (0.01, 1, [False]), (0.0, 2, [True]),
                                                     (0.01, 2, [True])])
def test_a_step_runs_only_the_scoring_passes_it_needs(tiny_recipe, tmp_path, monkeypatch, kl, mini_batches, calls):
    """One on-policy update without KL scores nothing before it trains; with KL only the reference pass runs
    (score(old=False)); several updates need the old-policy pass (score(old=True)), and the learner loads no
    reference model when the KL coefficient is 0."""
    from tokenwise.trainer.learner import Learner, LearnerPool
    seen, references = [], []
    score, init = LearnerPool.score, Learner.__init__

    def spy_score(self, batch, *, old=True):
        seen.append(old)
        return score(self, batch, old=old)

    def spy_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        references.append(self.reference is not None)

    monkeypatch.setattr(LearnerPool, "score", spy_score)
    monkeypatch.setattr(Learner, "__init__", spy_init)
    recipe = tiny_recipe(stages=["grpo"], grpo={"steps": 2, "mini_batches": mini_batches},
                         algorithm={"kl": {"coef": kl}})
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'run'}"]) == 0
    assert seen == calls * 2
    assert references == [kl > 0]
    assert len([r for r in read_metrics(tmp_path / "run", "grpo") if "actor/loss" in r]) == 2
