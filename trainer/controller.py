"""Stage `grpo`: the RL loop, top to bottom on one screen.

generate → reward → advantages → score (old/ref log-probs) → update → sync weights → evaluate → log → checkpoint.
"""

from __future__ import annotations

import time

from rl.algorithm import Algorithm
from rl.data import PromptStream
from rl.rewards import compute_rewards
from trainer.evaluate import heldout_metrics
from trainer.learner import Learner
from trainer.loading import load_causal_lm
from trainer.rollout import build_rollout
from trainer.stage import StageEnv, StageResult, StageState

PANELS = [("reward/mean", "reward"), ("rollout/response_len_mean", "response length (tokens)"),
          ("actor/entropy", "entropy"), ("actor/kl", "KL to reference"), ("eval/accuracy", "held-out accuracy")]


def run_grpo(env: StageEnv) -> StageResult:
    cfg, g = env.cfg, env.cfg.grpo
    algo = Algorithm(cfg.algorithm)
    learner = Learner(env.init_dir, env.tokenizer, optim=g.optim, total_updates=g.steps * g.ppo_epochs * g.mini_batches,
                      device=env.device, dtype=env.dtype, micro_batch_size=g.micro_batch_size,
                      temperature=cfg.rollout.temperature, algorithm=algo,
                      reference_dir=env.init_dir if algo.needs_reference else None)
    rollout = build_rollout(cfg.rollout, model=load_causal_lm(env.init_dir, dtype=env.dtype, device=env.device),
                            tokenizer=env.tokenizer, formatter=env.formatter)
    data = PromptStream(env.data["train"], seed=cfg.seed)
    state = StageState(env, learner=learner, stream=data, algorithm=algo, total_steps=g.steps,
                       eval_every=g.eval_every, save_every=g.save_every, evaluate=lambda: heldout_metrics(
                           rollout, env.data["heldout"], num_prompts=cfg.eval.num_prompts))
    rollout.load_weights(learner.weights(), version=learner.version)
    state.begin()
    while state.step < g.steps:
        state.step += 1
        t0 = time.perf_counter()
        prompts = data.next_batch(g.prompts_per_step)
        rollouts = rollout.generate(prompts, n=g.group_size)
        t_gen = time.perf_counter()
        rewards, reward_stats = compute_rewards(env.rewards, prompts=rollouts.prompts, responses=rollouts.responses,
                                                answers=rollouts.answers, truncated=rollouts.truncated.tolist())
        batch = learner.score(algo.make_batch(rollouts, rewards))
        t_score = time.perf_counter()
        metrics = learner.train_step(batch, ppo_epochs=g.ppo_epochs, mini_batches=g.mini_batches)
        t_train = time.perf_counter()
        rollout.load_weights(learner.weights(), version=learner.version)
        t_sync = time.perf_counter()
        mask = batch.response_mask
        n_tokens = float(mask.sum() + batch.prompt_mask.sum())
        metrics.update(reward_stats)
        metrics.update({
            "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "advantage/abs_mean": (batch.advantages.abs().sum() / mask.sum()).item(),
            "rollout/response_len_mean": mask.sum(1).mean().item(),
            "rollout/truncated_frac": rollouts.truncated.float().mean().item(),
            "rollout/logprob_diff": ((batch.old_logprobs - batch.rollout_logprobs).abs().sum() / mask.sum()).item(),
            "rollout/policy_lag": float(learner.version - 1 - rollouts.policy_version),
            "perf/generate_s": t_gen - t0, "perf/score_s": t_score - t_gen, "perf/train_s": t_train - t_score,
            "perf/sync_s": t_sync - t_train, "perf/tokens_per_s": n_tokens / (t_sync - t0),
        })
        info = f"reward {metrics['reward/mean']:.3f}  loss {metrics['actor/loss']:+.4f}  " \
               f"{metrics['perf/tokens_per_s']:.0f} tok/s"
        if state.end_step(metrics, info):
            return state.stop_here()
    return state.finish(PANELS)
