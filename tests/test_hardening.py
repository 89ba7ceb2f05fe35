"""Nothing lost, nothing hangs: non-finite guards, rewards that hang or end their process, bad input as one line.

Each bad input must end with exit status 2, at most 3 lines on the terminal, no traceback, and nothing on disk
changed; the full traceback of an error goes to <run>/error.log when there is a run folder.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import read_metrics
from trainer.cli import main


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime (ns): what 'nothing on disk changed' compares. error.log, where
    the error's traceback is appended, is the one file an error may add to."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "error.log"}


def one_line_error(capsys, argv: list[str], *fragments: str, watch: Path | None = None) -> str:
    """Run the CLI in-process; assert exit 2, ≤ 3 lines on the terminal, no traceback, `fragments` in the error
    line, and (with `watch`) nothing under that folder changed. Returns the error line."""
    before = snapshot(watch) if watch is not None else None
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    errors = [line for line in err.splitlines() if line.startswith("tokenwise: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in out + err
    new_lines = [line for line in lines if not line.startswith("run folder:")]
    assert len(new_lines) <= 3, lines
    for f in fragments:
        assert f in errors[0], errors[0]
    if watch is not None:
        assert snapshot(watch) == before
    return errors[0]


def python_reward(tmp_path: Path, body: str, name: str = "r") -> str:
    path = tmp_path / f"reward_{name}.py"
    path.write_text(body)
    return f"{path}:{name}"


# ------------------------------------------------------------------------------------------------ non-finite
NAN_AT_STEP_3 = """
calls = 0
def r(*, prompt, response, answer, truncated):
    global calls
    calls += 1                     # 4 prompts x 4 samples a step: calls 33.. are step 3
    return float('nan') if calls > 32 else float(len(response) % 2)
"""


def test_nan_reward_stops_before_the_update_and_latest_stays_finite(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tiny_recipe(stages=["grpo"], grpo={"save_every": 1}, checkpoint={"keep_last": 1},
                         rewards=[{"type": "python", "function": python_reward(tmp_path, NAN_AT_STEP_3)}])
    line = one_line_error(capsys, ["train", str(recipe), f"output_dir={run}"],
                          "grpo step 3", "reward 'r' returned nan on prompt '", "on_nonfinite: skip", "error.log")
    ckpts = run / "grpo" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002"]
    weights = load_file(ckpts / "step_00000002" / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [r["step"] for r in read_metrics(run, "grpo")] == [0, 1, 2]
    assert "Traceback" in (run / "error.log").read_text() and "error.log" in line


def test_nan_reward_skipped_with_on_nonfinite_skip(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(stages=["grpo"], trainer={"on_nonfinite": "skip"},
                         rewards=[{"type": "python", "function": python_reward(tmp_path, NAN_AT_STEP_3)}])
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    records = [r for r in read_metrics(run, "grpo") if r["step"] > 0]
    assert [r["nonfinite/skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    weights = load_file(run / "grpo" / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_gradient_skips_the_optimizer_step():
    from trainer.config import OptimConfig
    from trainer.learner import TorchOptimizer
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = TorchOptimizer(model, OptimConfig(), total_updates=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(2, 4)).sum().backward()
    model.weight.grad[0, 0] = float("inf")
    assert math.isinf(opt.step())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.optimizer.state == {} and opt.scheduler.last_epoch == 0  # no moments, schedule not advanced
    model(torch.randn(2, 4)).sum().backward()
    assert math.isfinite(opt.step()) and not torch.equal(before["weight"], model.weight)


def test_saving_nonfinite_weights_is_refused(tmp_path):
    from rl.errors import NonFiniteError
    from conftest import TINY
    from trainer.config import config_from_dict
    from trainer.learner import Learner
    from trainer.loading import load_tokenizer
    from trainer.run import prepare_base_model
    cfg = config_from_dict(TINY)
    model_dir, tok_dir = prepare_base_model(cfg, tmp_path)
    learner = Learner(model_dir, load_tokenizer(tok_dir), optim=cfg.grpo.optim, total_updates=1,
                      device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        next(learner.model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match="holds NaN"):
        learner.save_model(tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------- rewards
def test_reward_past_its_timeout_is_stopped_and_named(tiny_recipe, tmp_path, capsys):
    slow = python_reward(tmp_path, "import time\ndef r(*, prompt, response, answer, truncated):\n"
                                   "    time.sleep(60)\n    return 1.0\n")
    recipe = tiny_recipe(stages=["grpo"], rewards=[{"type": "python", "function": slow, "timeout_s": 1}])
    t0 = time.time()
    one_line_error(capsys, ["train", str(recipe), f"output_dir={tmp_path / 'run'}"],
                   "reward 'r' took longer than rewards[0].timeout_s (1 s)", "on prompt '")
    assert time.time() - t0 < 45


@pytest.mark.parametrize("body, fragment", [
    ("import os\ndef r(*, prompt, response, answer, truncated):\n    os._exit(1)\n",
     "ended its process while scoring a response: the process exited with status 1"),
    ("def r(*, prompt, response, answer, truncated):\n    return 'high'\n", "raised TypeError: returned str 'high'"),
    ("def r(*, prompt, response, answer, truncated):\n    raise SystemExit(3)\n", "raised SystemExit: 3"),
    ("import nosuchmodule\ndef r(**kw):\n    return 1.0\n", "rewards[0].function: cannot load"),
], ids=["os-exit", "not-a-number", "sys-exit", "import-error"])
def test_reward_that_ends_its_process_or_misbehaves_is_one_line(tiny_recipe, tmp_path, capsys, body, fragment):
    recipe = tiny_recipe(stages=["grpo"], rewards=[{"type": "python", "function": python_reward(tmp_path, body)}])
    one_line_error(capsys, ["train", str(recipe), f"output_dir={tmp_path / 'run'}"], fragment)


def test_isolated_reward_keeps_state_and_matches_in_process(tmp_path):
    from rl.rewards import close_rewards, compute_rewards, reward_specs
    from trainer.config import PythonReward
    spec = python_reward(tmp_path, "seen = []\ndef r(*, prompt, response, answer, truncated):\n"
                                   "    seen.append(prompt)\n    return len(seen) + (0.5 if truncated else 0.0)\n")
    specs = reward_specs([PythonReward(function=spec)])
    try:
        kw = dict(prompts=["a", "b"], responses=["x", "y"], answers=["1", "2"], truncated=[False, True])
        first, _ = compute_rewards(specs, **kw)
        second, means = compute_rewards(specs, **kw)
    finally:
        close_rewards(specs)
    assert first.tolist() == [1.0, 2.5] and second.tolist() == [3.0, 4.5] and means == {"reward/r": 3.75}
    assert specs[0][2].proc is None


# ---------------------------------------------------------------------------------------------- checkpoints
def test_kill_between_rename_and_latest_then_resume_repoints_and_prunes(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tiny_recipe(stages=["grpo"], grpo={"save_every": 1}, checkpoint={"keep_last": 2})
    assert main(["train", str(recipe), f"output_dir={run}", "--stop-after-steps", "3"]) == 0
    ckpts = run / "grpo" / "checkpoints"
    # as if killed after step_3 was renamed into place but before `latest` was repointed and step_1 pruned
    shutil.copytree(ckpts / "step_00000002", ckpts / "step_00000001")
    (ckpts / "latest").write_text("step_00000002")
    assert main(["resume", str(run), "--stop-after-steps", "1"]) == 0  # redoes step 3, whose folder exists
    assert (ckpts / "latest").read_text() == "step_00000003"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000003"]


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tiny_recipe(stages=["grpo"], grpo={"save_every": 1}, checkpoint={"keep_last": 2})
    assert main(["train", str(recipe), f"output_dir={run}", "--stop-after-steps", "3"]) == 0
    weights = run / "grpo" / "checkpoints" / "step_00000003" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(["resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step_00000003 is corrupt: model/model.safetensors has" in out
    assert "resuming from step_00000002" in out
    steps = [r["step"] for r in read_metrics(run, "grpo")]
    assert steps == [0, 1, 2, 3, 4, 5, 6]  # step 3 ran again from step 2's state
    assert (run / "grpo" / "final" / "model.safetensors").is_file()


def test_corrupt_optimizer_state_without_an_intact_fallback_is_one_line(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tiny_recipe(stages=["grpo"], grpo={"save_every": 2}, checkpoint={"keep_last": 1})
    assert main(["train", str(recipe), f"output_dir={run}", "--stop-after-steps", "2"]) == 0
    opt = run / "grpo" / "checkpoints" / "step_00000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    one_line_error(capsys, ["resume", str(run)], "no intact checkpoint", "optimizer.pt")


def test_resume_with_the_checkpoints_folder_deleted_changes_nothing(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tiny_recipe(stages=["grpo"], grpo={"save_every": 1})
    assert main(["train", str(recipe), f"output_dir={run}", "--stop-after-steps", "2"]) == 0
    shutil.rmtree(run / "grpo" / "checkpoints")
    one_line_error(capsys, ["resume", str(run)], "checkpoints is missing", "records steps up to 2", watch=run)
