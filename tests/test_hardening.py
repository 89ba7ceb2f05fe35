"""Nothing lost, nothing hangs: non-finite guards, rewards that hang or end their process, bad input as one line.

Each bad input must end with exit status 2, at most 3 lines on the terminal, no traceback, and nothing on disk
changed; the full traceback of an error goes to <run>/error.log when there is a run folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import read_metrics
from tokenwise.trainer.cli import main


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
    from tokenwise.trainer.config import OptimConfig
    from tokenwise.trainer.learner import TorchOptimizer
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
    from tokenwise.rl.errors import NonFiniteError
    from conftest import TINY
    from tokenwise.trainer.config import config_from_dict
    from tokenwise.trainer.learner import Learner
    from tokenwise.trainer.loading import load_tokenizer
    from tokenwise.trainer.run import prepare_base_model
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
    from tokenwise.rl.rewards import compute_rewards
    from tokenwise.trainer.reward_process import close_rewards, reward_specs
    from tokenwise.trainer.config import PythonReward
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


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A pretrained-layout model directory (64 positions) for the model.path cases."""
    from tokenwise.models.builtin import save_builtin
    out = tmp_path_factory.mktemp("model")
    save_builtin(out, seed=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                 max_position_embeddings=64)
    return out


def _local(tmp_path: Path, rows: list, name: str = "train.jsonl") -> dict:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"type": "local", "train_files": [str(path)], "heldout_size": 2}


GOOD_ROWS = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]


def _case_empty_jsonl(tmp_path, small_model):
    (tmp_path / "empty.jsonl").write_text("")
    return {"data": {"type": "local", "train_files": [str(tmp_path / "empty.jsonl")]}}, [], ["empty.jsonl"]


def _case_null_prompt(tmp_path, small_model):
    rows = GOOD_ROWS[:3] + [{"prompt": None, "answer": "3"}] + GOOD_ROWS[3:]
    return {"data": _local(tmp_path, rows)}, [], ["column 'prompt'", "empty or null in 1 row(s), first at row 3"]


def _case_null_answer(tmp_path, small_model):
    rows = GOOD_ROWS + [{"prompt": "9+1=", "answer": None}]
    return {"data": _local(tmp_path, rows)}, [], ["column 'answer'", "row 8"]


def _case_truncated_weights(tmp_path, small_model):
    copy = tmp_path / "model"
    shutil.copytree(small_model, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"model": {"type": "pretrained", "path": str(copy)}}, [], ["model.path", "model.safetensors", "cut short"]


def _case_output_dir_is_a_file(tmp_path, small_model):
    (tmp_path / "afile").write_text("x")
    return {}, [f"output_dir={tmp_path / 'afile'}"], ["is a file"]


def _case_output_dir_under_a_file(tmp_path, small_model):
    (tmp_path / "afile").write_text("x")
    return {}, [f"output_dir={tmp_path / 'afile' / 'run'}"], ["is a file, so no folder can be made under it"]


def _case_long_prompt(tmp_path, small_model):
    rows = GOOD_ROWS + [{"prompt": "1+" * 5000 + "1=", "answer": "5001"}]
    return ({"data": _local(tmp_path, rows), "model": {"type": "pretrained", "path": str(small_model)}}, [],
            ["prompt", "tokens", "max_position_embeddings 64"])


def _case_max_new_tokens_past_positions(tmp_path, small_model):
    return ({"model": {"type": "pretrained", "path": str(small_model)}, "rollout": {"max_new_tokens": 512}}, [],
            ["rollout.max_new_tokens (512)", "max_position_embeddings 64"])


def _case_no_rewards(tmp_path, small_model):
    return {"rewards": []}, [], ["rewards is empty"]


def _case_negative_stop(tmp_path, small_model):
    return {}, ["--stop-after-steps", "-3"], ["--stop-after-steps", ">= 1"]


def _case_ray_address_in_local_mode(tmp_path, small_model):
    return {}, ["--ray-address", "127.0.0.1:6379"], ["--ray-address", "trainer.mode: local", "trainer.mode=ray"]


BAD_INPUTS = [_case_empty_jsonl, _case_null_prompt, _case_null_answer, _case_truncated_weights,
              _case_output_dir_is_a_file, _case_output_dir_under_a_file, _case_long_prompt,
              _case_max_new_tokens_past_positions, _case_no_rewards, _case_negative_stop,
              _case_ray_address_in_local_mode]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.__name__.removeprefix("_case_") for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_leaves_disk_unchanged(case, tiny_recipe, tmp_path, small_model, capsys):
    sections, args, fragments = case(tmp_path, small_model)
    recipe = recipe_with(tiny_recipe, **sections)
    run = tmp_path / "run"
    if not any(a.startswith("output_dir=") for a in args):
        args = [f"output_dir={run}", *args]
    one_line_error(capsys, ["train", str(recipe), *args], *fragments, watch=tmp_path)
    assert not run.exists()  # a failed start leaves no folder that would block the corrected rerun


def recipe_with(tiny_recipe, name: str = "recipe.yaml", **sections) -> Path:
    """TINY with `sections` merged in, except that a model or data section replaces TINY's (another variant)."""
    path = tiny_recipe(name, **{k: v for k, v in sections.items() if k not in ("model", "data")})
    tree = yaml.safe_load(path.read_text())
    tree.update({k: v for k, v in sections.items() if k in ("model", "data")})
    path.write_text(yaml.safe_dump(tree))
    return path


def test_empty_recipe_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    one_line_error(capsys, ["train", str(tmp_path / "empty.yaml")], "empty.yaml is empty", "recipes/quickstart.yaml")


def test_unwritable_output_parent_is_one_line(tiny_recipe, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))  # root ignores modes
    one_line_error(capsys, ["train", str(tiny_recipe()), f"output_dir={locked / 'run'}"],
                   "no permission to write in", str(locked), watch=tmp_path)


def test_a_failed_start_does_not_block_the_corrected_rerun(tiny_recipe, tmp_path, small_model, capsys):
    run = tmp_path / "run"
    model = {"type": "pretrained", "path": str(small_model)}
    bad = recipe_with(tiny_recipe, stages=["grpo"], model=model, rollout={"max_new_tokens": 200})
    one_line_error(capsys, ["train", str(bad), f"output_dir={run}"], "rollout.max_new_tokens (200)")
    good = recipe_with(tiny_recipe, "good.yaml", stages=["grpo"], model=model, grpo={"steps": 1})
    assert main(["train", str(good), f"output_dir={run}"]) == 0
    assert (run / "grpo" / "final").is_dir()


# ---------------------------------------------------------------------------------------------- README examples
def _fenced(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def _unfenced(text: str) -> list[str]:
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            out.append(line)
    return out


def _readme_commands() -> list[list[str]]:
    """Every `tokenwise train|check RECIPE overrides` the README shows (code blocks with their line continuations,
    and inline code), as argument lists without flags and placeholders."""
    import re
    import shlex
    from conftest import ROOT
    text = (ROOT / "README.md").read_text()
    sources = [b.replace("\\\n", " ") for lang, b in _fenced(text) if lang in ("", "bash")]
    prose = "\n".join(line for line in _unfenced(text))
    sources += re.findall(r"`(tokenwise (?:train|check) [^`]+)`", prose)
    commands = []
    for source in sources:
        for line in source.splitlines():
            match = re.search(r"tokenwise (?:train|check) (.*)", line)
            if not match:
                continue
            words = shlex.split(match.group(1).split("#")[0])
            if not words or words[0].isupper():  # the synopsis line: tokenwise train RECIPE [key.sub=value ...]
                continue
            args, skip = [], False
            for w in words:
                if skip:
                    skip = False
                elif w.startswith("--"):
                    skip = w in ("--ray-address", "--stop-after-steps")
                else:
                    args.append(w)
            commands.append(args)
    return commands


def test_readme_commands_and_overrides_pass_check(capsys):
    import re
    from conftest import ROOT
    commands = _readme_commands()
    assert len(commands) >= 6 and any("rollout.engine=vllm" in c for c in commands)
    inline = re.search(r"Overrides use dotted keys and YAML values: (.*?)--stop-after-steps", (ROOT / "README.md").read_text(), re.S)
    overrides = re.findall(r"`([^`]+=[^`]+)`", inline.group(1))
    assert len(overrides) >= 3
    commands += [["recipes/quickstart.yaml", o] for o in overrides]
    commands += [[str(r.relative_to(ROOT)), "data.type=arithmetic", "data.max_digits=3"] for r in (ROOT / "recipes").glob("*.yaml")
                 if yaml.safe_load(r.read_text()).get("data", {}).get("type") == "sort"]
    for args in commands:
        old = os.getcwd()
        os.chdir(ROOT)
        try:
            code = main(["check", *args])
        finally:
            os.chdir(old)
        assert code == 0, (args, capsys.readouterr().err)


def test_readme_recipe_blocks_are_valid_recipes():
    import re
    from conftest import ROOT
    from tokenwise.trainer.config import config_from_dict
    blocks = [yaml.safe_load(b) for lang, b in _fenced((ROOT / "README.md").read_text()) if lang == "yaml"]
    full = [b for b in blocks if isinstance(b, dict) and "model" in b and ("data" in b or "stages" in b)]
    assert full
    for tree in full:
        config_from_dict(tree, source="README.md")


# ----------------------------------------------------------------------------------------------- cluster attach
def _cli(args: list[str], cwd: Path) -> "subprocess.CompletedProcess":
    import subprocess
    import sys
    exe = Path(sys.executable).parent / "tokenwise"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _attach_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tokenwise: error:")]
    assert len(errors) == 1, proc.stderr
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if line.strip() and not line.startswith("run folder:")]
    assert len(ours) <= 3, ours  # our line, plus at most Ray's own last retry notice from its connecting thread
    for f in fragments:
        assert f in errors[0], errors[0]


@pytest.mark.parametrize("listening", [False, True], ids=["refused", "silent"])
def test_attaching_to_an_address_that_does_not_answer_ends_in_time(tiny_recipe, tmp_path, listening):
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if listening:
        server.listen(8)  # accepts TCP connections but never speaks Ray's protocol (a wrong port, a firewall box)
    else:
        server.close()  # nothing listens: refused at once
    recipe = tiny_recipe(trainer={"mode": "ray", "ray": {"connect_timeout_s": 5}})
    t0 = time.monotonic()
    try:
        proc = _cli(["train", str(recipe), f"output_dir={tmp_path / 'run'}", "--ray-address", f"127.0.0.1:{port}"],
                    cwd=tmp_path)
    finally:
        server.close()
    assert time.monotonic() - t0 < 90
    _attach_error(proc, f"127.0.0.1:{port}", *(["connect_timeout_s (5 s)"] if listening else ["nothing answers"]))
    assert not (tmp_path / "run").exists()


def test_adaptive_call_timeout_follows_the_slowest_call_per_unit_of_work():
    from tokenwise.trainer.cluster import FIRST_CALL_TIMEOUT_S, MIN_TIMEOUT_S, CallTimer
    timer = CallTimer(None)
    assert timer.timeout("generate", work=256) == FIRST_CALL_TIMEOUT_S  # first call: may load or compile
    timer.record("generate", 2.0, work=256)
    assert timer.timeout("generate", work=256) == MIN_TIMEOUT_S  # 10 x 2 s < the floor
    assert timer.timeout("generate", work=256 * 8) == pytest.approx(160.0)  # 8x the samples (sampled eval)
    timer.record("generate", 1.0, work=256)  # a faster call does not lower it
    assert timer.timeout("generate", work=256 * 8) == pytest.approx(160.0)
    assert timer.timeout("train") == FIRST_CALL_TIMEOUT_S
    assert CallTimer(8.0).timeout("generate", work=10 ** 6) == 8.0  # trainer.ray.call_timeout_s: fixed


@pytest.mark.parametrize("max_restarts, kind, expected", [
    (0, "died", "Set trainer.ray.max_restarts > 0"),
    (1, "died", "All 1 rollout-actor restart(s) of trainer.ray.max_restarts were used"),
    (2, "raised", "not retried"),
])
def test_actor_failure_hint_matches_the_restart_budget(tmp_path, max_restarts, kind, expected):
    from tokenwise.trainer.config import config_from_dict
    from tokenwise.trainer.stage import StageEnv, stage_failure
    from tokenwise.trainer.worker_common import ActorFailed
    from conftest import TINY
    cfg = config_from_dict({**TINY, "trainer": {"mode": "ray", "ray": {"max_restarts": max_restarts}}})
    env = StageEnv(cfg=cfg, run_dir=tmp_path, stage="grpo", init_dir=tmp_path, tokenizer_dir=tmp_path, tokenizer=None,
                   formatter=None, data={}, device=torch.device("cpu"), dtype=torch.float32, rewards=[])
    error = stage_failure(env, ActorFailed("rollout", 0, "generate", "boom", kind=kind, detail="remote tb"), None)
    assert expected in str(error) and "rollout actor 0" in str(error) and error.detail == "remote tb"
    if max_restarts == 1:
        assert "> 0" not in str(error)


HUGE = """
def r(*, prompt, response, answer, truncated):
    return 1e38 if len(response) % 2 else -1e38   # finite, and so are the advantages; the gradients overflow
"""


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_overflowing_loss_never_reaches_the_weights(tiny_recipe, tmp_path, capsys, mode):
    run = tmp_path / "run"
    recipe = tiny_recipe(stages=["grpo"], grpo={"steps": 2, "save_every": 1}, trainer={"on_nonfinite": mode},
                         algorithm={"advantage": {"type": "dr_grpo"}, "kl": {"coef": 0.0}},
                         rewards=[{"type": "python", "function": python_reward(tmp_path, HUGE)}])
    if mode == "stop":
        one_line_error(capsys, ["train", str(recipe), f"output_dir={run}"], "grpo step 1",
                       "gradient norm was not finite", "were not applied")
        assert not list((run / "grpo" / "checkpoints").glob("step_*"))
        return
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    steps = [r for r in read_metrics(run, "grpo") if r["step"] > 0]
    assert all(r["nonfinite/skipped_updates"] == r["actor/updates"] == 1 for r in steps)
    start = load_file(run / "base_model" / "model.safetensors")
    final = load_file(run / "grpo" / "final" / "model.safetensors")
    assert all(torch.equal(start[k], final[k]) for k in start)  # every update was refused


def test_reward_past_its_memory_limit_fails_that_call(tmp_path):
    from tokenwise.rl.errors import RewardError
    from tokenwise.rl.rewards import compute_rewards
    from tokenwise.trainer.reward_process import close_rewards, reward_specs
    from tokenwise.trainer.config import PythonReward
    spec = python_reward(tmp_path, "def r(*, prompt, response, answer, truncated):\n"
                                   "    return float(len(bytearray(4 << 30)))\n")  # 4 GiB under a 512 MiB limit
    specs = reward_specs([PythonReward(function=spec, memory_mb=512)])
    try:
        with pytest.raises(RewardError, match="reward 'r' raised MemoryError on prompt 'p'"):
            compute_rewards(specs, prompts=["p"], responses=["x"], answers=["1"], truncated=[False])
    finally:
        close_rewards(specs)


def test_progress_is_plain_whole_lines_when_stdout_is_not_a_terminal(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe(stages=["grpo"], logging={"progress": True, "progress_every": 2})
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("grpo step ")]
    assert [line.split()[2] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all("| reward " in line and "elapsed, eta" in line and "…" not in line for line in lines)
    assert "━" not in out  # no bar drawn into a log
