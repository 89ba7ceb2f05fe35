"""What every stage loop (SFT, GRPO) shares: where it writes, how it resumes, how it ends."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tokenwise.rl.errors import CheckpointError
from tokenwise.trainer.checkpoint import CheckpointManager, load_training_state, publish_dir, save_training_state
from tokenwise.trainer.config import RunConfig, to_dict
from tokenwise.trainer.evaluate import headline_sampled
from tokenwise.trainer.logging import MetricsLogger, StepProgress, console, plot_curves, read_metrics

RESULT_FILE = "result.json"


class StepBudget:
    """Optimizer/rollout steps this invocation may still run (`--stop-after-steps`); None means no limit."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def take(self) -> None:
        if self.left is not None:
            self.left -= 1

    @property
    def exhausted(self) -> bool:
        return self.left is not None and self.left <= 0


@dataclass
class StageEnv:
    cfg: RunConfig
    run_dir: Path
    stage: str                 # 'sft' | 'grpo'
    init_dir: Path             # HF model directory the stage starts from
    tokenizer_dir: Path        # where actors load the tokenizer from
    tokenizer: Any
    formatter: Any             # trainer.loading.PromptFormatter
    data: dict                 # {'train': Dataset, 'heldout': Dataset}
    device: torch.device
    dtype: torch.dtype
    rewards: list              # [(name, weight, function)] from trainer.reward_process.reward_specs
    budget: StepBudget = field(default_factory=lambda: StepBudget(None))

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage


@dataclass
class StageResult:
    stopped: bool   # the step budget ran out before the stage finished; else <stage>/final/ holds its model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StageState:
    """Checkpoints, resume, evaluation schedule, metrics and progress for one stage.

    On construction it restores the latest checkpoint (learner, data cursor, algorithm state, RNG, metric history)
    or seeds a fresh start. A loop then reads: `begin()`; per step `step += 1`, compute metrics, `end_step(...)`;
    `finish(...)`."""

    def __init__(self, env: StageEnv, *, learner: Any, stream: Any, evaluate: Callable[[], dict], total_steps: int,
                 eval_every: int, save_every: int, algorithm: Any = None) -> None:
        self.env, self.learner, self.stream, self.algorithm = env, learner, stream, algorithm
        self.evaluate, self.total_steps = evaluate, total_steps
        self.eval_every, self.save_every = eval_every, save_every
        root = env.stage_dir / "checkpoints"
        if not root.is_dir() and (env.stage_dir / "metrics.jsonl").is_file():
            steps = [row.get("step", 0) for row in read_metrics(env.run_dir, env.stage)]
            if max(steps, default=0) > 0:
                raise CheckpointError(f"{root} is missing, but {env.stage_dir / 'metrics.jsonl'} records steps up to "
                                      f"{max(steps)}: the checkpoints were moved or deleted. Put them back to resume, "
                                      f"or remove {env.stage_dir} to run the {env.stage} stage again from its start")
        self.ckpt = CheckpointManager(root, keep_last=env.cfg.checkpoint.keep_last)
        latest = self.ckpt.resume_point(log=lambda text: console.print(f"{env.stage}: {text}"))
        history: list[dict] = []
        self.step = 0
        self.workers: Any = None      # set by run_stage; its state (rollout restarts used) is checkpointed
        self.workers_state: dict = {}
        if latest is not None:
            learner.load(latest)
            state = load_training_state(latest)
            stream.load_state_dict(state["data"])
            if algorithm is not None:
                algorithm.load_state_dict(state["algorithm"])
            self.step, history = state["step"], state["history"]
            self.workers_state = state.get("workers", {})
            console.print(f"{env.stage}: resuming from {latest} (step {self.step})")
        else:
            seed_everything(env.cfg.seed)
        self.log = MetricsLogger(env.stage_dir, env.cfg.logging, run_name=env.cfg.name, stage=env.stage,
                                 history=history, config=to_dict(env.cfg))
        self.bar = StepProgress(enabled=env.cfg.logging.progress, description=env.stage, total=total_steps,
                                completed=self.step, every=env.cfg.logging.progress_every)

    def begin(self) -> None:
        """Evaluate the starting point (logged as step 0) on a fresh start, and start the progress bar."""
        if self.step == 0:
            self.log.log(0, self.evaluate())
        console.print(f"{self.env.stage}: held-out accuracy before {self.env.stage.upper()}: "
                      f"{self.log.history[0]['eval/accuracy']:.3f}")
        self.bar.start()

    def end_step(self, metrics: dict[str, float], info: str) -> bool:
        """Evaluate if due, log, advance the bar, checkpoint if due. True when the step budget says stop now."""
        last = self.step == self.total_steps
        if last or (self.eval_every and self.step % self.eval_every == 0):
            metrics.update(self.evaluate())
        self.log.log(self.step, metrics)
        self.bar.update(self.step, info)
        self.env.budget.take()
        if not last and self.save_every and self.step % self.save_every == 0:
            self.save()
        return not last and self.env.budget.exhausted

    def save(self) -> Path:
        def write(path: Path) -> None:
            self.learner.save(path)
            save_training_state(path, {
                "stage": self.env.stage, "step": self.step, "data": self.stream.state_dict(),
                "algorithm": self.algorithm.state_dict() if self.algorithm is not None else {},
                "workers": self.workers.state_dict() if self.workers is not None else {},
                "history": self.log.history,
            })
        return self.ckpt.save(self.step, write)

    def stop_here(self) -> StageResult:
        """The step budget ran out: checkpoint and hand back."""
        self.bar.stop()
        self.save()
        self.log.close()
        return StageResult(stopped=True)

    def finish(self, panels: list[tuple[str, str]]) -> StageResult:
        """Last checkpoint, the stage's model as an HF directory (atomically) with result.json, the curves PNG."""
        self.bar.stop()
        first = {k: v for k, v in self.log.history[0].items() if k.startswith("eval/")}
        last = {k: v for k, v in next(r for r in reversed(self.log.history) if "eval/accuracy" in r).items()
                if k.startswith("eval/")}
        before, after = first["eval/accuracy"], last["eval/accuracy"]
        console.print(f"{self.env.stage}: held-out accuracy after {self.env.stage.upper()}: {after:.3f} "
                      f"(before: {before:.3f})")
        sampled = [k for k in headline_sampled(last) if k in first]
        if sampled:
            e = self.env.cfg.eval
            console.print(f"{self.env.stage}: sampled (k={e.k}, T={e.temperature:g}): " + ", ".join(
                f"{k.removeprefix('eval/')} {first[k]:.3f} → {last[k]:.3f}" for k in sampled))
        metrics = {"accuracy_before": before, "accuracy_after": after, "eval_before": first, "eval_after": last}
        self.save()

        def write(path: Path) -> None:
            self.learner.save_model(path)
            (path / RESULT_FILE).write_text(json.dumps(metrics, indent=1))
        publish_dir(write, self.env.stage_dir / "final")
        if self.env.cfg.logging.plot:
            plot_curves(self.log.history, self.env.stage_dir / "curves.png", panels,
                        f"{self.env.cfg.name} — {self.env.stage}")
        self.log.close()
        return StageResult(stopped=False)


def run_stage(env: StageEnv, *, make_workers: Callable[[], Any], make_state: Callable[[Any], "StageState"],
              step: Callable[[Any, int], tuple[dict, str]], panels: list[tuple[str, str]]) -> StageResult:
    """The frame of every stage loop: start the workers, restore or start the state, bring the rollout engines
    to the learner's weights, then `step(workers, n) -> (metrics, progress text)` until done or out of budget.
    A failed actor becomes one paragraph naming it and the step; the workers are always shut down."""
    from tokenwise.rl.errors import NonFiniteError
    from tokenwise.trainer.worker_common import ActorFailed
    workers = state = None
    try:
        workers = make_workers()
        state = make_state(workers)
        state.workers = workers
        workers.load_state_dict(state.workers_state)  # the restart budget is per run, not per invocation
        workers.sync(step=state.step)
        state.begin()
        while state.step < state.total_steps:
            state.step += 1
            metrics, info = step(workers, state.step)
            if state.end_step(metrics, info):
                return state.stop_here()
        return state.finish(panels)
    except ActorFailed as failure:
        raise stage_failure(env, failure, state) from None
    except NonFiniteError as e:
        raise nonfinite_failure(env, e, state) from None
    finally:
        if workers is not None:
            workers.close()


def _kept(state: "StageState | None") -> str:
    """What of the stage is safe, for a failure message (never raises: it is already reporting an error)."""
    from tokenwise.rl.errors import CheckpointError
    try:
        latest = state.ckpt.latest() if state is not None else None
    except CheckpointError:  # `latest` names a missing folder: resume picks the newest intact one
        done = state.ckpt.complete()
        latest = done[-1] if done else None
    return f"the last good checkpoint {latest} is intact" if latest else "no checkpoint of this stage was written yet"


def nonfinite_failure(env: StageEnv, error: Exception, state: "StageState | None") -> Exception:
    """A NaN or infinity stopped the step before the optimizer and before any checkpoint: what, where, what is safe."""
    from tokenwise.rl.errors import NonFiniteError
    step = f"step {state.step}" if state is not None else "start-up"
    out = NonFiniteError(f"{env.stage} {step}: {error}. The run stopped before the optimizer step; {_kept(state)}. "
                         f"Fix the cause and `tokenwise resume {env.run_dir}`, or set trainer.on_nonfinite: skip")
    out.detail = getattr(error, "detail", None)
    return out


def stage_failure(env: StageEnv, failure: Any, state: "StageState | None") -> Exception:
    """The one-paragraph error for a dead or hung actor (a trainer.workers.ActorFailed): who, when, and what of the
    run is safe."""
    from tokenwise.rl.errors import ClusterError
    step = f"step {state.step}" if state is not None else "start-up"
    kept = _kept(state)
    limit = env.cfg.trainer.ray.max_restarts
    if failure.kind == "raised":
        hint = " The actor raised an error (not retried: it would only repeat); its traceback is in the error log."
    elif failure.role != "rollout":
        hint = ""
    elif limit == 0:
        hint = " Set trainer.ray.max_restarts > 0 to replace a dead rollout actor and retry its step."
    else:
        hint = (f" All {limit} rollout-actor restart(s) of trainer.ray.max_restarts were used (counted over the run); "
                f"raise it to replace more.")
    error = ClusterError(f"{env.stage}: {failure} during {step}. The run stopped; {kept}; continue with "
                         f"`tokenwise resume {env.run_dir}`.{hint}")
    error.detail = failure.detail
    return error
