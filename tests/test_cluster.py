"""Cluster mode on a real local Ray (num_cpus=2) with real DeepSpeed ZeRO engines over gloo: 2 learner actors and
1 rollout actor must reproduce debug mode, sync weights exactly, resume, and survive or report a dead actor."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml

from conftest import TINY, _merge, read_metrics, stage_env
from tokenwise.trainer.cli import main
from tokenwise.trainer.config import load_config

pytestmark = pytest.mark.distributed

RAY = {"num_learners": 2, "num_rollout_workers": 1, "cpus_per_learner": 0.5, "cpus_per_rollout": 0.5}
# A run whose losses do not cancel out: responses of varied length (a random model meets its end-of-turn token
# at random within 12 tokens) and a reward tied to that length, so advantages and token counts both vary.
REWARD_FILE = "def parity(*, prompt, response, answer, truncated):\n" \
              "    return float(len(response) % 2) + 0.1 * response.count('1')\n"


@pytest.fixture(scope="module")
def local_ray():
    from tokenwise.trainer.cluster import start_local_ray
    start_local_ray(num_cpus=2, object_store_mb=256)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def recipe_for(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    (root / "parity.py").write_text(REWARD_FILE)

    def write(name: str, mode: str, **sections) -> Path:
        base = _merge(TINY, {"stages": ["grpo"], "rewards": [{"type": "python", "function": f"{root}/parity.py:parity"}],
                             "rollout": {"max_new_tokens": 12},
                             "grpo": {"steps": 3, "micro_batch_size": 4, "mini_batches": 2, "save_every": 1},
                             "trainer": {"mode": mode, "ray": RAY},
                             # the rollout actor computes its log-probs with another thread count than debug mode's
                             # engine (~1e-7 apart); rollout correction would feed that into the update, which Adam
                             # amplifies on near-zero gradients. These tests compare the learners, so it is off.
                             "algorithm": {"rollout_correction": {"level": "none"}}})
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_merge(base, sections)))
        return path
    return write


@pytest.fixture(scope="module")
def debug_run(recipe_for, tmp_path_factory):
    run = tmp_path_factory.mktemp("debug") / "run"
    assert main(["train", str(recipe_for("debug", "local")), f"output_dir={run}"]) == 0
    return run


def _steps(run: Path) -> list[dict]:
    return [r for r in read_metrics(run, "grpo") if "actor/loss" in r]


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_learners_match_debug_mode(local_ray, recipe_for, debug_run, tmp_path, zero_stage):
    """ZeRO-2 runs colocated (the rollout actor on learner 0's bundle, started before the learners load), ZeRO-3
    on bundles of its own: the placement changes nothing in the numbers."""
    run = tmp_path / "run"
    recipe = recipe_for(f"zero{zero_stage}", "ray", trainer={"ray": {"zero_stage": zero_stage,
                                                                     "colocate": zero_stage == 2}})
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    ours, ref = _steps(run), _steps(debug_run)
    assert [r["step"] for r in ours] == [1, 2, 3]
    assert [r["reward/mean"] for r in ours] == [r["reward/mean"] for r in ref]  # the same samples were drawn
    for a, b in zip(ours, ref):
        assert abs(a["actor/loss"]) > 1e-3  # a loss that does not cancel to ~0, so the relative check means something
        for key in ("actor/loss", "actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm"):
            assert _close(a[key], b[key]), (a["step"], key, a[key], b[key])
        for key in ("timing/generate", "timing/reward", "timing/logprob", "timing/train", "timing/sync"):
            assert a[key] > 0
    # the consolidated final weights (gathered from the shards) equal debug mode's
    from transformers import AutoModelForCausalLM
    wa = AutoModelForCausalLM.from_pretrained(run / "grpo" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(debug_run / "grpo" / "final").state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=0, msg=k)


def _ray_and_local(recipe_for, tmp_path: Path, name: str, **sections) -> tuple[list[dict], list[dict]]:
    """The same recipe run in cluster mode and in debug mode: their step records."""
    runs = {}
    for mode in ("local", "ray"):
        runs[mode] = tmp_path / mode
        assert main(["train", str(recipe_for(f"{name}-{mode}", mode, **sections)), f"output_dir={runs[mode]}"]) == 0
    return _steps(runs["ray"]), _steps(runs["local"])


TOKEN_LEVEL = {"advantage": {"type": "hapo"}, "policy_loss": {"type": "hapo"},
               "adaptive_temperature": {"tau": 0.3},
               "token_shapers": [{"type": "hapo_entropy"}, {"type": "thr", "p": 0.5},
                                 {"type": "d3s_token", "k_init": 0.5, "denominator": "kept"}]}


def test_token_level_shapers_in_cluster_mode_match_debug_mode(local_ray, recipe_for, tmp_path):
    """THR's hidden states and probabilities come back from two learner ranks, adaptive-temperature statistics go
    out to the rollout actor, and D³S narrows the loss mask: the same samples and losses as in one process."""
    ours, ref = _ray_and_local(recipe_for, tmp_path, "token-level", algorithm=TOKEN_LEVEL)
    assert [r["reward/mean"] for r in ours] == [r["reward/mean"] for r in ref]
    assert "sampling/temperature_mean" not in ours[0] and ours[-1]["sampling/temperature_std"] > 0
    assert any(r["thr/selected_frac"] > 0 for r in ours)
    for a, b in zip(ours, ref):
        for key in ("actor/loss", "actor/pg_loss", "thr/selected_frac", "sampling/entropy_pivot"):
            assert _close(a[key], b[key]), (a["step"], key, a[key], b[key])


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_gated_moe_model_in_cluster_mode_matches_debug_mode(local_ray, recipe_for, tmp_path, zero_stage):
    """Our decoder with attention gates and MoE layers (router losses in the loss) under 2 ZeRO-2 or ZeRO-3
    learners: the same samples, losses and MoE statistics as in one process. Under ZeRO-3 the MoE block reads its
    router's weight without calling the router; DeepSpeed gathers it as an external parameter of the block. The
    ZeRO-3 run makes one update per step, so it takes the old log-probs from the training forward of both ranks.
    Routing replay is on: the rollout actor's recorded experts travel to both ranks and are replayed there."""
    from test_e2e import MOE_GATED
    ours, ref = _ray_and_local(recipe_for, tmp_path, f"moe{zero_stage}", model=MOE_GATED,
                               trainer={"ray": {"zero_stage": zero_stage}}, algorithm={"routing_replay": True},
                               grpo={"mini_batches": 1 if zero_stage == 3 else 2})
    assert all(r["moe/routing_agreement"] > 0.99 for r in ours + ref)
    assert [r["reward/mean"] for r in ours] == [r["reward/mean"] for r in ref]
    # the load-balance loss is computed per micro-batch (f and P of its own tokens, as in Megatron), and the
    # micro-batches differ between 1 and 2 ranks: agreement to 2e-3 rather than 1e-4
    for a, b in zip(ours, ref):
        for key in ("actor/loss", "actor/grad_norm", "moe/aux_loss", "gate/mean", "entropy/p50"):
            assert _close(a[key], b[key], rel=2e-3), (a["step"], key, a[key], b[key])
        # the old log-probs the step reports (from the training forward under ZeRO-3) vs the sampler's: ~1e-7 apart
        assert a["rollout/logprob_abs_diff"] < 1e-5 and b["rollout/logprob_abs_diff"] < 1e-5


def test_after_sync_rollout_generates_like_the_learners_weights(local_ray, recipe_for, tmp_path):
    """Bucketed sync (buckets far smaller than the model) under ZeRO-3: the rollout actor's greedy generations equal
    those of an HF model holding the learners' consolidated weights, and differ from the starting model's."""
    from tokenwise.trainer.rollout import build_rollout
    env, algo, workers = _ray_workers(recipe_for, tmp_path, "sync", num_rollout_workers=1)
    try:
        rows = env.data["heldout"].to_list()[:8]
        before = workers.generate(rows, n=1, greedy=True)
        _train_away(workers, env, algo, updates=3)
        workers.sync()
        assert workers.last_sync_buckets > 3
        after = workers.generate(rows, n=1, greedy=True)
        workers.pool.save_model(tmp_path / "consolidated")
    finally:
        workers.close()
    engine = build_rollout(env.cfg.rollout, model_dir=tmp_path / "consolidated", tokenizer=env.tokenizer,
                           formatter=env.formatter, dtype=torch.float32, device=env.device)
    expected = engine.generate(rows, n=1, greedy=True)
    assert after.policy_version == 3 and before.policy_version == 0
    assert torch.equal(after.response_ids, expected.response_ids)
    assert not torch.equal(after.response_ids, before.response_ids)


def test_resume_in_cluster_mode_continues_with_the_same_loss(local_ray, recipe_for, tmp_path, capsys):
    recipe = recipe_for("resume", "ray")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", str(recipe), f"output_dir={straight}"]) == 0
    assert main(["train", str(recipe), f"output_dir={resumed}", "--stop-after-steps", "2"]) == 0
    ckpt = resumed / "grpo" / "checkpoints" / "step_00000002"
    assert (ckpt / "deepspeed").is_dir() and json.loads((ckpt / "learner.json").read_text())["world_size"] == 2
    assert main(["resume", str(resumed)]) == 0
    a, b = _steps(straight), _steps(resumed)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert b[2]["actor/loss"] == pytest.approx(a[2]["actor/loss"], rel=1e-6, abs=0)
    assert b[2]["reward/mean"] == a[2]["reward/mean"]

    # resuming those sharded optimizer states on one learner is refused with a way forward
    cfg = yaml.safe_load((resumed / "config.yaml").read_text())
    cfg["trainer"]["ray"]["num_learners"] = 1
    (resumed / "config.yaml").write_text(yaml.safe_dump(cfg))
    (resumed / "grpo" / "final").rename(resumed / "grpo" / "final.old")  # make the stage unfinished again
    capsys.readouterr()
    assert main(["resume", str(resumed)]) == 2
    err = capsys.readouterr().err
    assert "2 learner rank(s)" in err and "num_learners" in err and "model.path=" in err


KILLER = """
import os, signal, ray
_done = []
def kill_at_step_2(*, prompt, response, answer, truncated):
    # called once per response; the second step's first call SIGKILLs (or SIGSTOPs) the actor's process
    _done.append(1)
    if len(_done) == 1 + {per_step}:
        actor = ray.get_actor("tokenwise-{pid}-grpo-{actor}".format(pid=os.getpid()))
        os.kill(ray.get(actor.pid.remote()), getattr(signal, os.environ.get("TOKENWISE_TEST_SIGNAL", "SIGKILL")))
    return float(len(response) % 2)
"""


def _killer_recipe(recipe_for, tmp_path, name, actor="rollout-0", **ray_cfg):
    per_step = TINY["grpo"]["prompts_per_step"] * TINY["grpo"]["group_size"]
    (tmp_path / "killer.py").write_text(KILLER.replace("{per_step}", str(per_step)).replace("{actor}", actor))
    # in the driver process (isolated: false): the reward reaches the actor through the driver's Ray session
    return recipe_for(name, "ray", rewards=[{"type": "python", "function": f"{tmp_path}/killer.py:kill_at_step_2",
                                             "isolated": False}],
                      trainer={"ray": ray_cfg})


def test_killed_rollout_actor_is_restarted_and_the_step_retried(local_ray, recipe_for, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(_killer_recipe(recipe_for, tmp_path, "restart", max_restarts=1)), f"output_dir={run}"]) == 0
    steps = _steps(run)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["rollout/actor_restarts"] for r in steps] == [0.0, 1.0, 1.0]
    assert steps[2]["rollout/policy_lag"] == 0.0  # the new actor got the current weights before step 3 sampled


def test_asynchronous_cluster_mode_matches_debug_mode(local_ray, recipe_for, tmp_path):
    """grpo.max_staleness 1: the rollout actor generates the next step while the learners train (queued on its task
    queue, weights through the object store behind it). The schedule is the debug mode's, so the same samples are
    drawn and the same updates made; the stamps show the lag."""
    ours, ref = _ray_and_local(recipe_for, tmp_path, "async", grpo={"max_staleness": 1})
    assert [r["step"] for r in ours] == [1, 2, 3]
    assert [r["async/staleness_max"] for r in ours] == [r["async/staleness_max"] for r in ref] == [0.0, 1.0, 1.0]
    assert [r["reward/mean"] for r in ours] == [r["reward/mean"] for r in ref]
    for a, b in zip(ours, ref):
        for key in ("actor/loss", "actor/kl", "actor/grad_norm"):
            assert _close(a[key], b[key]), (a["step"], key, a[key], b[key])


def test_partial_rollouts_in_cluster_mode_take_weights_beside_the_generation(local_ray, recipe_for, tmp_path):
    """grpo.partial_rollouts: the learners' weights are posted to the rollout actor's mailbox (its own concurrency
    group, beside a generation in flight) and taken between decoding steps. Long, one-prompt-at-a-time generation
    makes the engine the slow side, so responses switch policy mid-way; the stamps only rise along a response and
    no trained token is older than the bound."""
    from safetensors.torch import load_file
    recipe = recipe_for("partial", "ray", grpo={"steps": 4, "max_staleness": 1, "partial_rollouts": True},
                        rollout={"max_new_tokens": 40, "batch_size": 4, "dump_dir": "dump"})
    run = tmp_path / "run"
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    steps = _steps(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    mixed = 0
    for r in steps:
        stamps = load_file(str(run / "dump" / f"step_{r['step']:06d}.safetensors"))["token_versions"]
        for row in stamps:
            v = row[row >= 0]
            assert bool((v[1:] >= v[:-1]).all()) and r["step"] - 1 - int(v.min()) <= 1 and int(v.max()) < r["step"]
            mixed += int(v.max() > v.min())
    assert mixed > 0 and max(r["async/mixed_frac"] for r in steps) > 0


def test_killed_rollout_actor_in_asynchronous_mode_is_restarted(local_ray, recipe_for, tmp_path):
    """The actor dies during step 2 with later work queued on it (step 3's generation, unless it finished before,
    then version 2's weight load and step 4's generation): what it had not delivered is lost with it; the actor is
    restarted once, synced, the lost step generated again, and the bound still holds."""
    recipe = _killer_recipe(recipe_for, tmp_path, "async-restart", max_restarts=1)
    cfg = yaml.safe_load(recipe.read_text())
    cfg["grpo"].update(max_staleness=1, steps=4)
    recipe.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    steps = _steps(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    restarts = [r["rollout/actor_restarts"] for r in steps]
    assert restarts[:2] == [0.0, 0.0] and restarts[-1] == 1.0 and restarts == sorted(restarts)
    assert all(r["async/staleness_max"] <= 1 for r in steps)


def test_killed_rollout_actor_without_restarts_is_a_clear_error(local_ray, recipe_for, tmp_path, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    t0 = time.monotonic()
    assert main(["train", str(_killer_recipe(recipe_for, tmp_path, "fatal", max_restarts=0)), f"output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 120
    assert "rollout actor 0" in err and "during step 2" in err and "died" in err
    assert "step_00000001" in err and "tokenwise resume" in err and "max_restarts" in err
    assert (run / "grpo" / "checkpoints" / "latest").read_text() == "step_00000001"


def test_hung_rollout_actor_times_out_instead_of_hanging(local_ray, recipe_for, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TOKENWISE_TEST_SIGNAL", "SIGSTOP")
    run = tmp_path / "run"
    capsys.readouterr()
    t0 = time.monotonic()
    recipe = _killer_recipe(recipe_for, tmp_path, "hang", max_restarts=0, call_timeout_s=8)
    assert main(["train", str(recipe), f"output_dir={run}"]) == 2
    assert time.monotonic() - t0 < 120
    err = capsys.readouterr().err
    assert "rollout actor 0" in err and "call timeout" in err and "during step 2" in err


def test_actors_that_do_not_fit_the_cluster_are_a_clear_error(local_ray, recipe_for, tmp_path, capsys):
    recipe = recipe_for("too-big", "ray", trainer={"ray": {"num_learners": 4, "cpus_per_learner": 1.0,
                                                           "start_timeout_s": 3}})
    capsys.readouterr()
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'run'}"]) == 2
    # our error is one line; Ray's own daemons may forward log lines of theirs to the driver (e.g. the raylet's
    # disk-space monitor on a full /tmp), which are not ours to count
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if "(raylet)" not in line)
    assert len(err.splitlines()) == 1 and "cannot place the actors" in err and "num_learners" in err
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 2  # the placement group was given back


def test_dead_learner_rank_is_named_with_its_own_rank(local_ray, recipe_for, tmp_path, capsys):
    # learner rank 1 is SIGKILLed at step 2; under ZeRO-3 rank 0 then waits for it in the scoring forward's all-gather
    recipe = _killer_recipe(recipe_for, tmp_path, "learner-kill", actor="learner-1", zero_stage=3, call_timeout_s=300)
    run = tmp_path / "run"
    capsys.readouterr()
    t0 = time.monotonic()
    assert main(["train", str(recipe), f"output_dir={run}"]) == 2
    assert time.monotonic() - t0 < 120  # well inside the 300 s call timeout: found by its death, not by a timeout
    err = capsys.readouterr().err
    assert "learner actor 1" in err and "died" in err and "during step 2" in err, err
    assert "max_restarts" not in err  # learners are not restarted; no hint about rollout restarts
    assert (run / "error.log").is_file()


def test_restart_budget_is_counted_over_the_run_across_resume(local_ray, recipe_for, tmp_path):
    run = tmp_path / "run"
    recipe = _killer_recipe(recipe_for, tmp_path, "budget", max_restarts=1)
    assert main(["train", str(recipe), f"output_dir={run}", "--stop-after-steps", "2"]) == 0
    assert main(["resume", str(run)]) == 0
    assert [r["rollout/actor_restarts"] for r in _steps(run)] == [0.0, 1.0, 1.0]  # step 3 ran after the resume
    state = json.loads((run / "grpo" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["workers"] == {"rollout_restarts": 1}


def test_an_error_raised_in_a_rollout_actor_is_reported_not_retried(local_ray):
    from ray.util.placement_group import placement_group, remove_placement_group
    from tokenwise.trainer.cluster import CallTimer, LearnerWorker, RayWorkers, WorkerGroup
    from tokenwise.trainer.config import RayConfig
    from tokenwise.trainer.worker_common import ActorFailed
    pg = placement_group([{"CPU": 0.5}])
    ray.get(pg.ready(), timeout=60)
    # an actor shell whose engine was never set up: every score() call raises the same AttributeError
    group = WorkerGroup(LearnerWorker, "rollout", pg=pg, bundles=[0], num_cpus=0.5, num_gpus=0,
                        init_args=lambda r: (0, 1, 0.5), timer=CallTimer(None), namespace_prefix=f"test-{os.getpid()}")
    try:
        with pytest.raises(ActorFailed) as info:
            group.call_all("score", None)
        assert info.value.kind == "raised" and "AttributeError" in info.value.cause
        assert "self.learner.score(*args)" in info.value.detail  # the remote traceback, for error.log
        workers = RayWorkers.__new__(RayWorkers)  # only the restart decision: no stage, no learners
        workers.cfg, workers.restarts, workers.rollouts = RayConfig(max_restarts=3), 0, group
        with pytest.raises(ActorFailed):
            workers._recover(info.value, step=1)
        assert workers.restarts == 0  # the budget is untouched: a raised error would only repeat
        assert group.call_all("pid") == [ray.get(group.actors[0].pid.remote())]  # the same actor, not replaced
    finally:
        group.kill()
        remove_placement_group(pg)


def _ray_workers(recipe_for, tmp_path, name: str, zero_stage: int = 3, **ray_cfg):
    """(env, algorithm, RayWorkers) of a tiny model: 2 ZeRO-3 (or `zero_stage`) learners, 2 rollout actors (unless
    ray_cfg says otherwise), weight-sync buckets far smaller than the model, lr 0.05."""
    from tokenwise.rl.algorithm import Algorithm
    from tokenwise.trainer.cluster import RayWorkers
    from tokenwise.trainer.distributed import DeepSpeedSpec
    recipe = recipe_for(name, "ray", grpo={"optim": {"lr": 0.05}},
                        trainer={"ray": {"zero_stage": zero_stage, "sync_bucket_mb": 0.002,
                                         "num_rollout_workers": 2, **ray_cfg}})
    env = stage_env(load_config(recipe), tmp_path / "run")
    algo = Algorithm(env.cfg.algorithm)
    workers = RayWorkers(env, micro_batch_size=4, learner_kwargs=dict(
        model_dir=env.init_dir, optim=env.cfg.grpo.optim, device=env.device, dtype=env.dtype, total_updates=10,
        temperature=1.0, algorithm=algo, reference_dir=env.init_dir, distributed=DeepSpeedSpec(zero_stage)))
    return env, algo, workers


def _train_away(workers, env, algo, updates: int):
    """`updates` learner steps on one sampled batch: the learners' weights move away from the engines'."""
    out = workers.generate(env.data["train"].to_list()[:4], n=4, step=1)
    batch = workers.pool.score(algo.make_batch(out, torch.arange(16, dtype=torch.float32) % 3))
    for _ in range(updates):
        workers.pool.train_step(batch, ppo_epochs=1, mini_batches=1)
    return batch


def _sync_workers(recipe_for, tmp_path, name: str, zero_stage: int = 3, **ray_cfg):
    """RayWorkers as _ray_workers makes them, with the learners 2 updates away from the rollout actors."""
    env, algo, workers = _ray_workers(recipe_for, tmp_path, name, zero_stage, **ray_cfg)
    return workers, _train_away(workers, env, algo, updates=2)


def _digests(workers) -> tuple[dict, list[dict]]:
    """(the learners' full weights, each rollout actor's engine weights) as sha256 per weight."""
    return workers.learners.call_all("weights_digest")[0], workers.rollouts.call_all("weights_digest")


def test_collective_weight_sync_leaves_the_engines_bitwise_where_the_object_store_does(local_ray, recipe_for,
                                                                                       tmp_path):
    """weight_sync collective: both rollout actors join learner rank 0's gloo group and every bucket is a broadcast;
    their weights are then bit for bit the learners' — as they are after the object store's sync of the next
    update (same check, other path)."""
    import dataclasses
    workers, batch = _sync_workers(recipe_for, tmp_path, "collective", weight_sync="collective")
    try:
        learner, before = _digests(workers)
        assert all(d.keys() == learner.keys() and d != learner for d in before)
        workers.sync()
        assert workers.group_ready and workers.last_sync_buckets > 3
        learner, collective = _digests(workers)
        assert collective == [learner, learner]
        workers.pool.train_step(batch, ppo_epochs=1, mini_batches=1)
        workers.cfg = dataclasses.replace(workers.cfg, weight_sync="object_store")
        workers.sync()
        learner2, store = _digests(workers)
        assert learner2 != learner and store == [learner2, learner2]
    finally:
        workers.close()


def test_a_member_that_misses_a_collective_bucket_breaks_the_group_within_the_deadline(local_ray, recipe_for,
                                                                                       tmp_path):
    """A group member that never takes part in a bucket's broadcast (rollout actor 1, left out of the push) makes
    the broadcast fail within the bucket deadline; rollout actor 0, which took part, is not blamed, gets that bucket
    and the rest through the object store, and ends with the learners' weights. The next sync builds a new group."""
    workers, _ = _sync_workers(recipe_for, tmp_path, "broken", weight_sync="collective")
    try:
        workers.sync()  # builds the group (both actors members)
        assert workers.group_ready
        deadline = 3.0
        t0 = time.monotonic()
        refs = [a.push_weights.remote([workers.rollouts.actors[0]] if rank == 0 else [], workers.pool.version,
                                      workers.bucket_bytes, deadline, True)
                for rank, a in enumerate(workers.learners.actors)]
        result = ray.get(refs, timeout=120)[0]
        elapsed = time.monotonic() - t0
        assert result["broken"] and result["failed"] == {}
        assert elapsed < deadline + 5.0 + 0.5 * result["buckets"] + 10  # one broken bucket, the grace, the rest
        learner, engines = _digests(workers)
        assert engines[0] == learner
        workers.group_ready = False  # what sync() does on a broken result
        workers.sync()
        assert workers.group_ready and _digests(workers)[1] == [learner, learner]
    finally:
        workers.close()


def test_a_hung_rollout_actor_in_a_collective_sync_is_restarted_and_resynced(local_ray, recipe_for, tmp_path):
    """A SIGSTOPped rollout actor: the collective sync names it hung within its deadlines instead of hanging; with
    a restart allowed it is replaced, synced through the object store, and the next sync rebuilds the group.
    Under ZeRO-3 learner rank 1 waits in the weights' all-gather meanwhile; the learners' group timeout outlasts the
    actor's deadlines (learner_group_timeout), so the actor is named, not rank 1 (with the call timeout as the group's,
    rank 1's gloo send timed out first in CI)."""
    workers, _ = _sync_workers(recipe_for, tmp_path, "hung", zero_stage=3, weight_sync="collective",
                               call_timeout_s=4, max_restarts=1)
    try:
        workers.sync()
        pid = workers.rollouts.call_all("pid")[1]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        workers.sync()
        assert time.monotonic() - t0 < 90 and workers.restarts == 1 and not workers.group_ready
        learner, engines = _digests(workers)
        assert engines == [learner, learner]
        workers.sync()
        assert workers.group_ready
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        workers.close()
