"""The two ways the README launches on a cluster you already have, against a real head made by `ray start --head`
(with a token, as Ray 2.5x sets it up: token authentication on): attach with `--ray-address`, and `ray job submit
--working-dir`. The head runs in a process group of its own and only its processes are stopped, by id."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import TINY, _merge, read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BIN = Path(sys.executable).parent
RECIPE = _merge(TINY, {"stages": ["grpo"], "grpo": {"steps": 2},
                       "trainer": {"mode": "ray", "ray": {"num_learners": 1, "num_rollout_workers": 1,
                                                          "cpus_per_learner": 0.5, "cpus_per_rollout": 0.5}}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    """The user's shell on that machine: their HOME (where Ray keeps ~/.ray/auth_token), our venv first on PATH, no
    Ray settings inherited from whoever runs the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


def _stop(proc: subprocess.Popen, family: list[psutil.Process]) -> None:
    """SIGTERM to the head's process group (`ray start --block` then stops what it started), then SIGKILL to any
    process of the recorded family still alive: only processes this test started."""
    with_group = [proc.pid]
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        with_group = []
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    family = family + [p for pid in with_group for p in _descendants(pid)]
    _gone, alive = psutil.wait_procs([p for p in family if p.is_running()], timeout=15)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=15)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --node-ip-address 127.0.0.1` with a token in the user's ~/.ray (as any earlier local
    `ray.init()` leaves one), so the head turns token authentication on; the dashboard takes job submissions."""
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(generate_new_authentication_token())
    temp_dir = Path(tempfile.mkdtemp(prefix="tw-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    port, dashboard_port, client_port = _free_port(), _free_port(), _free_port()
    log = open(home / "head.log", "w")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port),
           "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while True:
            family = list({p.pid: p for p in family + _descendants(proc.pid)}.values())
            assert proc.poll() is None, f"ray start --head exited {proc.returncode}:\n{(home / 'head.log').read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=5).close()
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): up
                break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the head's dashboard never answered:\n{(home / 'head.log').read_text()[-3000:]}"
            time.sleep(1)
        assert "Token authentication is enabled" in (home / "head.log").read_text()
        yield {"home": home, "address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    finally:
        family = list({p.pid: p for p in family + _descendants(proc.pid)}.values())
        _stop(proc, family)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _recipe(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def _finished_two_steps(run: Path) -> None:
    assert [r["step"] for r in read_metrics(run, "grpo") if "actor/loss" in r] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert Path(summary["final_model"]).is_dir()


def test_attach_with_ray_address_to_a_token_authenticated_head(ray_head, tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([str(BIN / "tokenwise"), "train", str(_recipe(tmp_path)), f"output_dir={run}",
                          "--ray-address", ray_head["address"]],
                         env=_env(ray_head["home"]), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    _finished_two_steps(run)


def test_attach_without_the_token_says_what_to_copy_in_one_line(ray_head, tmp_path):
    elsewhere = tmp_path / "home"  # a machine where the head's token was never copied
    elsewhere.mkdir()
    out = subprocess.run([str(BIN / "tokenwise"), "train", str(_recipe(tmp_path)), f"output_dir={tmp_path / 'run'}",
                          "--ray-address", ray_head["address"]],
                         env=_env(elsewhere, RAY_NUM_REDIS_GET_RETRIES="2"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("tokenwise: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "token" in errors[0] and "ray get-auth-token" in errors[0] and "no token" in errors[0]
    assert not (tmp_path / "run").exists()


def test_ray_job_submit_with_working_dir(ray_head, tmp_path):
    """The README's job command: the driver runs on the head in the job's working directory (a copy of ours, so
    the recipe is named relative to it) and attaches with `--ray-address auto`. Ray's own `ray job submit` sends the
    token only with RAY_AUTH_MODE=token (the README says so)."""
    work = tmp_path / "work"
    _recipe(work)
    run = tmp_path / "run"
    out = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir",
                          str(work), "--", "tokenwise", "train", "recipe.yaml", f"output_dir={run}", "--ray-address",
                          "auto"],
                         env=_env(ray_head["home"], RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "succeeded" in out.stdout
    _finished_two_steps(run)


def test_sigkill_during_an_asynchronous_run_then_resume(ray_head, tmp_path):
    """grpo.max_staleness 1 on the head: the driver is SIGKILLed after step 3 (with later generations queued on
    the rollout actor); `tokenwise resume` attaches again and finishes. Every step is trained once, and the prompts
    of the 6 steps are exactly the data stream's first 6 batches, in order: nothing lost, nothing trained twice
    (the checkpoint's cursor is before the prompts whose rollouts were in flight; they are generated again)."""
    from tokenwise.rl.data import PromptStream
    from tokenwise.trainer.config import load_config
    from tokenwise.trainer.run import load_task
    recipe = _merge(RECIPE, {"grpo": {"steps": 6, "max_staleness": 1, "save_every": 1},
                             "rollout": {"dump_dir": "dump"}, "eval": {"num_prompts": 4, "k": 0}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen([str(BIN / "tokenwise"), "train", str(path), f"output_dir={run}", "--ray-address",
                             ray_head["address"]], env=_env(ray_head["home"]), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    metrics = run / "grpo" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and any(json.loads(line).get("step") == 3 and "actor/loss" in line
                                             for line in metrics.read_text().splitlines() if line.strip())):
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's own process group: only what this test started
        proc.wait(timeout=30)
        log.close()
    assert not (run / "grpo" / "final").exists()
    out = subprocess.run([str(BIN / "tokenwise"), "resume", str(run), "--ray-address", ray_head["address"]],
                         env=_env(ray_head["home"]), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    rows = read_metrics(run, "grpo")
    assert [r["step"] for r in rows if "actor/loss" in r] == [1, 2, 3, 4, 5, 6]
    cfg = load_config(run / "config.yaml")
    stream = PromptStream(load_task(cfg.data)["train"], seed=cfg.seed)
    G, n = cfg.grpo.group_size, cfg.grpo.prompts_per_step
    for step in range(1, 7):
        dumped = [json.loads(line)["prompt"] for line in
                  (run / "dump" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        assert dumped[::G] == [r["prompt"] for r in stream.next_batch(n)], step
