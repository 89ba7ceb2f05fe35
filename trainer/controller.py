"""Stage `grpo`: the RL loop, top to bottom on one screen, the same in debug and cluster mode.

generate → reward → advantages → score (old/ref log-probs) → update → sync weights → evaluate → log → checkpoint.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from tokenwise.rl.advantages import informative_groups
from tokenwise.rl.algorithm import Algorithm
from tokenwise.rl.data import PromptStream
from tokenwise.rl.errors import NonFiniteError
from tokenwise.rl.rewards import compute_rewards
from tokenwise.rl.stats import quantile
from tokenwise.rl.types import EPISODE_STATS, RolloutBatch
from tokenwise.trainer.async_rollouts import AsyncRollouts, QueuedStream, check_bound
from tokenwise.trainer.dump import check_replay, dump_rollouts, load_rollouts
from tokenwise.trainer.rollout.hf import concat_rollouts
from tokenwise.trainer.rollout.multiturn import episode_metrics
from tokenwise.trainer.evaluate import EVAL_PANEL, run_heldout_eval
from tokenwise.trainer.logging import console
from tokenwise.trainer.ping import rollout_rows
from tokenwise.trainer.stage import StageEnv, StageResult, StageState, run_stage
from tokenwise.trainer.workers import build_workers

PIPELINE_FROM = 1  # the smallest grpo.max_staleness that queues generation (tests set 0: the queue, no lag)
PANELS = [("reward/mean", "reward"), ("rollout/response_len_mean", "response length (tokens)"),
          ("actor/entropy", "entropy"), ("actor/kl", "KL to reference"), (EVAL_PANEL, "held-out accuracy"),
          ("async/staleness_max", "staleness (policy versions)")]


def run_grpo(env: StageEnv) -> StageResult:
    cfg, g = env.cfg, env.cfg.grpo
    # the longest response: one turn, or an episode's token budget (its sampled tokens are at most that)
    longest = cfg.rollout.env.max_tokens if cfg.rollout.env.type != "none" else cfg.rollout.max_new_tokens
    algo = Algorithm(cfg.algorithm, max_response_len=longest)
    data = PromptStream(env.data["train"], seed=cfg.seed)
    # asynchronous generation: its checkpointed cursor stays before the draws not trained on yet
    queued = QueuedStream(data) if g.max_staleness >= PIPELINE_FROM else None
    pipeline: list[AsyncRollouts] = []  # made with the workers (a new one when they are)
    if cfg.trainer.replay is not None:
        check_replay(cfg.trainer.replay, g.steps, routing=cfg.algorithm.routing_replay)

    def step(workers, n: int) -> tuple[dict, str]:
        if queued is not None and (not pipeline or pipeline[0].workers is not workers):
            pipeline[:] = [AsyncRollouts(env, workers, algo, queued, bound=g.max_staleness, total_steps=g.steps)]
        return grpo_step(env, workers, algo, data, step=n, pipeline=pipeline[0] if pipeline else None)
    return run_stage(
        env, panels=PANELS,
        make_workers=lambda: build_workers(
            env, micro_batch_size=g.micro_batch_size, max_tokens=g.max_tokens_per_micro_batch,
            share_model=cfg.trainer.replay is not None, learner_kwargs=dict(
                model_dir=env.init_dir, optim=g.optim, device=env.device, dtype=env.dtype,
                total_updates=g.steps * g.ppo_epochs * g.mini_batches, temperature=cfg.rollout.temperature,
                algorithm=algo, reference_dir=env.init_dir if algo.needs_reference else None,
                logprobs=cfg.trainer.logprobs, lora=cfg.model.lora, seed=cfg.seed,
                packing=cfg.trainer.packing, routing_replay=cfg.algorithm.routing_replay)),
        make_state=lambda workers: StageState(
            env, learner=workers.pool, stream=queued or data, algorithm=algo, total_steps=g.steps, eval_every=g.eval_every,
            save_every=g.save_every, evaluate=lambda: run_heldout_eval(workers, cfg, env.data["heldout"])),
        step=step)


def grpo_step(env: StageEnv, workers, algo: Algorithm, data: PromptStream, *, step: int,
              pipeline: AsyncRollouts | None = None) -> tuple[dict, str]:
    g, learner = env.cfg.grpo, workers.pool
    t0 = time.perf_counter()
    try:
        if env.cfg.trainer.replay is not None:
            rollouts, rewards, metrics = load_rollouts(env.cfg.trainer.replay, step)
            if not torch.isfinite(rewards).all():
                raise NonFiniteError(f"the replayed rewards of step {step} ({env.cfg.trainer.replay}) are not finite")
            t_gen = rollout_idle = 0.0
        elif pipeline is not None:  # asynchronous: generated while the learners trained on earlier steps
            rollouts, t_gen, rollout_idle = pipeline.take(step)
            metrics_depth = float(pipeline.depth)  # steps generated or generating ahead while this one trains
            rewards, metrics = score_rollouts(env, rollouts)
            metrics.update({"rollout/generated_tokens": float(rollouts.response_mask.sum()),
                            "reward/mean": rewards.mean().item(),
                            "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0})
        else:
            rollouts, rewards, metrics, t_gen = sample(env, workers, algo, data, step=step)
            rollout_idle = None  # the engines waited for everything after generation: set below
    except NonFiniteError as e:
        return nonfinite_step(env, step, str(e))
    metrics.update(check_bound(rollouts, learner.version, g.max_staleness, step))
    if env.cfg.rollout.dump_dir is not None:
        dump_rollouts(env.run_dir / env.cfg.rollout.dump_dir, step, rollouts, rewards, metrics)
    t_reward = time.perf_counter()
    progress = (step - 1) / max(1, g.steps - 1)  # drives shaping schedules: 0 at the first step, 1 at the last
    made = algo.make_batch(rollouts, rewards)
    if algo.overlong.buffer:
        metrics["reward/overlong_penalty"] = (made.rewards - rewards).mean().item()
    batch, shaping_stats = algo.filter(made, progress=progress)
    mini_batches = min(g.mini_batches, len(batch) // batch.group_size)
    # one on-policy update whose old log-probs nothing reads beforehand: no separate old-policy pass, the training
    # forward's own (detached) values are the old policy's
    old_pass = algo.needs_old_pass(ppo_epochs=g.ppo_epochs, mini_batches=mini_batches)
    if old_pass or algo.needs_reference:
        batch = learner.score(batch, old=old_pass)
    if old_pass:
        batch, token_stats = algo.shape(batch, progress=progress)
        shaping_stats.update(token_stats)
    bad = ~torch.isfinite(batch.advantages) & (batch.response_mask > 0)
    if bad.any():
        row = int(bad.any(1).nonzero()[0])
        return nonfinite_step(env, step, f"{int(bad.sum())} token advantages are not finite (after the "
                                         f"{env.cfg.algorithm.advantage.type} advantage and token shaping), first on "
                                         f"prompt {batch.prompts[row]!r}")
    t_score = time.perf_counter()
    workers.sleep_rollouts()
    train_metrics, batch = learner.train_step(batch, ppo_epochs=g.ppo_epochs, mini_batches=mini_batches)
    metrics.update(train_metrics)
    workers.wake_rollouts()
    if not old_pass:  # the metrics shaping reports, from the old-policy values the update produced
        shaping_stats.update(algo.shape(batch, progress=progress)[1])
    if metrics["nonfinite/skipped_updates"]:
        check_updates(env, step, metrics)
    t_train = time.perf_counter()
    if pipeline is not None:  # the new weights go behind the queued generations, then the next step's is queued
        workers.queue_sync(step=step)
        pipeline.fill(step + 1)
    else:
        workers.sync(step=step)
    t_sync = time.perf_counter()
    mask = batch.response_mask
    n_tokens = float(mask.sum() + batch.prompt_mask.sum())
    metrics.update(shaping_stats)
    valid = mask > 0
    q10, q50, q90 = quantile(batch.old_entropy[valid].double(), [0.1, 0.5, 0.9])
    metrics.update({"entropy/p10": q10.item(), "entropy/p50": q50.item(), "entropy/p90": q90.item(),
                    "advantage/std": batch.advantages[valid].std().item() if int(valid.sum()) > 1 else 0.0})
    metrics.update({
        "nonfinite/skipped_steps": 0.0,
        "advantage/abs_mean": (batch.advantages.abs().sum() / mask.sum()).item(),
        "rollout/response_len_mean": mask.sum(1).mean().item(),
        "rollout/truncated_frac": rollouts.truncated.float().mean().item(),
        "rollout/policy_lag": float(learner.version - 1 - rollouts.policy_version),
        **temperature_stats(batch),
        "rollout/actor_restarts": float(workers.restarts),
        "timing/generate": t_gen, "timing/reward": t_reward - t0 - t_gen, "timing/logprob": t_score - t_reward,
        "timing/train": t_train - t_score, "timing/sync": t_sync - t_train, "timing/step": t_sync - t0,
        "perf/tokens_per_s": n_tokens / (t_sync - t0),
        # the learners waited for generation; the engines waited for the learners (sync: all but generating)
        "timing/learner_idle": t_gen,
        "timing/rollout_idle": (t_sync - t0 - t_gen) if rollout_idle is None else rollout_idle,
        "async/queue_depth": metrics_depth if pipeline is not None else 0.0,
        "rollout/completions": float(len(rollouts)), "perf/completions_per_s": len(rollouts) / (t_sync - t0),
    })
    info = (f"reward {metrics['reward/mean']:.3f} | gen {t_gen:.1f} lp {t_score - t_reward:.1f} "
            f"train {t_train - t_score:.1f} sync {t_sync - t_train:.2f} s")
    return metrics, info


def nonfinite_step(env: StageEnv, step: int, reason: str) -> tuple[dict, str]:
    """A non-finite reward or advantage: stop the run (trainer.on_nonfinite: stop) or skip this step's update."""
    if env.cfg.trainer.on_nonfinite == "stop":
        raise NonFiniteError(reason)
    console.print(f"{env.stage} step {step}: skipped (trainer.on_nonfinite: skip): {reason}")
    return {"nonfinite/skipped_steps": 1.0, "nonfinite/skipped_updates": 0.0}, "skipped: non-finite values"


def check_updates(env: StageEnv, step: int, metrics: dict) -> None:
    """The learners refused one or more optimizer steps because the gradient norm was not finite (the weights did
    not change): stop the run, or (trainer.on_nonfinite: skip) say so and go on."""
    n = int(metrics["nonfinite/skipped_updates"])
    reason = (f"the gradient norm was not finite in {n} of {int(metrics['actor/updates'])} optimizer steps (loss "
              f"{metrics.get('actor/loss', float('nan')):.4g}); those updates were not applied")
    if env.cfg.trainer.on_nonfinite == "stop":
        raise NonFiniteError(reason)
    console.print(f"{env.stage} step {step}: {reason} (trainer.on_nonfinite: skip)")


def sample(env: StageEnv, workers, algo: Algorithm, data: PromptStream, *,
           step: int) -> tuple[RolloutBatch, Tensor, dict, float]:
    """Rollouts and rewards for one step: one generation round, or under dynamic sampling rounds of fresh prompts
    until prompts_per_step groups with unequal rewards are collected (or max_rounds ran; then the informative groups
    found, or the last round whole if there were none). Returns (rollouts, rewards, stats, seconds generating)."""
    g, ds = env.cfg.grpo, env.cfg.algorithm.dynamic_sampling
    parts, rewards_parts, reward_stats, seconds, informative, drawn, generated = [], [], [], 0.0, 0, [], 0.0
    for round in range(max(1, ds.max_rounds)):
        t0 = time.perf_counter()
        rows = rollout_rows(data.next_batch(g.prompts_per_step), env.cfg.rollout.ping_prefix,
                            env.cfg.rollout.ping_kinds)
        rollouts = workers.generate(rows, n=g.group_size, step=step, round=round, adaptive=algo.sampling())
        seconds += time.perf_counter() - t0
        rewards, stats = score_rollouts(env, rollouts)
        reward_stats.append(stats)
        drawn.append(rewards)
        generated += float(rollouts.response_mask.sum())
        if ds.max_rounds:
            keep = informative_groups(rewards, g.group_size)
            informative += int(keep.sum())
            rows = keep.repeat_interleave(g.group_size).nonzero().squeeze(1).tolist()
            if rows:
                parts.append(rollouts.select(rows))
                rewards_parts.append(rewards[rows])
            if informative >= g.prompts_per_step:
                break
    if not parts:  # dynamic sampling off, or nothing informative found: the (last) round whole
        parts, rewards_parts = [rollouts], [rewards]
    batch = concat_rollouts(parts, env.tokenizer.pad_token_id)
    rewards = torch.cat(rewards_parts)
    if len(batch) > g.prompts_per_step * g.group_size:  # dynamic sampling collected more groups than a step needs
        rows = g.prompts_per_step * g.group_size
        batch, rewards = batch.select(slice(0, rows)), rewards[:rows]
    stats = {k: sum(s[k] for s in reward_stats) / len(reward_stats) for k in reward_stats[0]}
    everything = torch.cat(drawn)  # reward statistics of all responses drawn, not only of those trained on
    stats.update({"rollout/generated_tokens": generated, "reward/mean": everything.mean().item(),
                  "reward/std": everything.std().item() if len(everything) > 1 else 0.0})
    if ds.max_rounds:
        stats.update({"sampling/rounds": float(len(reward_stats)),
                      "sampling/informative_frac": informative * g.group_size / len(everything)})
    return batch, rewards, stats, seconds


def score_rollouts(env: StageEnv, rollouts: RolloutBatch) -> tuple[Tensor, dict]:
    """Rewards of a generation round and their statistics (per reward; per episode with an environment)."""
    rewards, stats = compute_rewards(env.rewards, prompts=rollouts.prompts, responses=rollouts.responses,
                                     answers=rollouts.answers, truncated=rollouts.truncated.tolist())
    if rollouts.episode_stats is not None:  # multi-turn: the environment's return adds to the recipe's rewards
        rewards = rewards + rollouts.episode_stats[:, EPISODE_STATS.index("env_reward")]
        stats.update(episode_metrics(rollouts, rewards))
    return rewards, stats


def temperature_stats(batch: RolloutBatch) -> dict[str, float]:
    """Per-token sampling temperature over valid tokens (adaptive temperature only): mean, std, min, max."""
    if batch.temperatures is None:
        return {}
    t = batch.temperatures[batch.response_mask > 0].double()
    return {"sampling/temperature_mean": t.mean().item(), "sampling/temperature_std": t.std().item() if len(t) > 1
            else 0.0, "sampling/temperature_min": t.min().item(), "sampling/temperature_max": t.max().item()}
