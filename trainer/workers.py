"""The learner and rollout workers a stage loop holds, in either process layout, behind one interface:

    workers.pool                      LearnerPool: score / train_step / sft_step / save / load / save_model / version
    workers.generate(rows, n=, greedy=, step=, round=, adaptive=, seed=, temperature=)   RolloutBatch; sampling
                                      seeded by (seed, step, shard, round), or by an explicit `seed` (+ shard);
                                      adaptive = HAPO adaptive temperature {tau, stats} or None; `temperature`
                                      overrides rollout.temperature (evaluation)
    workers.sync(step=)               learner weights → rollout engine(s), stamped with pool.version
    workers.attention_sink(rows)      eval metrics of attention mass on the first token (our decoder only)
    workers.sleep_rollouts() / wake_rollouts()   colocated engines give the GPU to the learners while they train
    workers.restarts                  rollout actors replaced so far (cluster mode)
    workers.close()

Asynchronous generation (grpo.max_staleness >= 1, trainer/async_rollouts.py) queues work on the engines, which run
it in order — a generation thread beside the learner here, the actors' own task queues in cluster mode:

    workers.submit_generate(rows, n=, step=, adaptive=)  a handle; the engine generates once the work queued before
                                      it is done, with the weights of the last weight load queued before it
    workers.collect(handle)           (RolloutBatch, seconds the engine sat idle before it started)
    workers.queue_sync(step=)         the learner's weights now (pool.version), loaded after the queued generations;
                                      with grpo.partial_rollouts posted to the engine's mailbox instead, taken by the
                                      generation in flight between two decoding steps (or by the next one)

`LocalWorkers` is debug mode (one process); trainer/cluster.py's `RayWorkers` is cluster mode.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from tokenwise.rl.types import RolloutBatch
from tokenwise.trainer.learner import Learner, local_pool
from tokenwise.trainer.rollout import build_rollout
from tokenwise.trainer.worker_common import EngineClock, step_seed


class LocalWorkers:
    """Debug mode: one in-process learner rank and one rollout engine (its own model copy, or with
    `share_model` the learner's model itself under the transformers backend, so syncing is free)."""

    restarts = 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __init__(self, env: Any, *, learner_kwargs: dict, micro_batch_size: int, max_tokens: int = 0,
                 share_model: bool = False) -> None:
        self.env = env
        self.learner = Learner(tokenizer=env.tokenizer, **learner_kwargs)
        self.pool = local_pool(self.learner, micro_batch_size=micro_batch_size, max_tokens_per_micro_batch=max_tokens)
        self.shared = share_model
        self.engine = build_rollout(env.cfg.rollout, model_dir=env.init_dir, tokenizer=env.tokenizer,
                                    formatter=env.formatter, dtype=env.dtype, device=env.device, seed=env.cfg.seed,
                                    model=self.learner.model if share_model else None)
        self.thread: concurrent.futures.ThreadPoolExecutor | None = None  # asynchronous generation
        self.clock, self.loads = EngineClock(), []
        self.partial = bool(env.cfg.grpo.partial_rollouts)
        self.posted = 0  # partial rollouts: the newest version posted to the engine's mailbox
        if self.partial:
            self.engine.open_mailbox()

    def generate(self, rows: list[dict], *, n: int, greedy: bool = False, step: int | None = None,
                 round: int = 0, adaptive: dict | None = None, seed: int | None = None,
                 temperature: float | None = None) -> RolloutBatch:
        if seed is None and not greedy and step is not None:
            seed = step_seed(self.env.cfg.seed, step, 0, round)
        return self._engine_call(lambda: self.engine.generate(
            rows, n=n, greedy=greedy, seed=None if greedy else seed, adaptive=adaptive, temperature=temperature))

    def attention_sink(self, rows: list[dict]) -> dict[str, float]:
        return self._engine_call(lambda: self.engine.attention_sink(rows))

    def _engine_call(self, fn: Any) -> Any:
        """Now, or with a generation thread (asynchronous generation) in its queue: after the generations and weight
        loads queued before (an evaluation so sees the weights the learners have now)."""
        if self.thread is None:
            return fn()
        out = self._queue(self._caught_up(fn), False).result()
        for load in self.loads:  # the weight loads queued before it: done, and must not have failed
            load.result()
        self.loads = []
        return out

    def sync(self, *, step: int | None = None) -> None:
        if self.shared:
            self.engine.version = self.pool.version
        else:
            self.engine.load_weights(dict(self.learner.full_parameters()), version=self.pool.version)

    # ------------------------------------------------------------------------- asynchronous generation (a thread)
    def _queue(self, fn: Any, report: bool) -> concurrent.futures.Future:
        if self.thread is None:
            self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenwise-rollout")
        return self.thread.submit(self.clock.timed, fn, report)

    def _caught_up(self, fn: Any) -> Any:
        """Partial rollouts: fn after the engine took the weights posted before it was queued."""
        if not self.partial:
            return fn
        version = self.posted

        def run() -> Any:
            self.engine.catch_up(version)
            return fn()
        return run

    def submit_generate(self, rows: list[dict], *, n: int, step: int, adaptive: dict | None = None) -> Any:
        seed = step_seed(self.env.cfg.seed, step, 0, 0)
        return self._queue(self._caught_up(
            lambda: self.engine.generate(rows, n=n, greedy=False, seed=seed, adaptive=adaptive)), True)

    def collect(self, handle: Any) -> tuple[RolloutBatch, float]:
        out = handle.result()
        for load in [f for f in self.loads if f.done()]:  # weight loads queued before it: done, and must not fail
            self.loads.remove(load)
            load.result()
        return out

    def queue_sync(self, *, step: int | None = None) -> None:
        if self.shared:
            raise RuntimeError("asynchronous generation cannot share the learner's model")
        snapshot = {k: v.detach().clone() for k, v in self.learner.full_parameters()}  # the learner trains on
        version = self.pool.version
        if self.partial:  # taken by the generation in flight at its next decoding step, or by the next one
            self.engine.post_weights(snapshot, version)
            self.posted = version
            return
        self.loads.append(self._queue(lambda: self.engine.load_weights(snapshot, version=version), False))

    def sleep_rollouts(self) -> None:
        pass

    def wake_rollouts(self) -> None:
        pass

    def close(self) -> None:
        if self.thread is not None:
            self.thread.shutdown(wait=True, cancel_futures=True)
            self.thread = None


def build_workers(env: Any, *, learner_kwargs: dict, micro_batch_size: int, max_tokens: int = 0,
                  share_model: bool = False) -> Any:
    """LocalWorkers for trainer.mode 'local', RayWorkers for 'ray' (learner_kwargs: trainer.learner.Learner's)."""
    if env.cfg.trainer.mode == "ray":
        from tokenwise.trainer.cluster import RayWorkers
        from tokenwise.trainer.distributed import DeepSpeedSpec
        r = env.cfg.trainer.ray
        learner_kwargs = dict(learner_kwargs, distributed=DeepSpeedSpec(r.zero_stage, r.offload_optimizer))
        return RayWorkers(env, learner_kwargs=learner_kwargs, micro_batch_size=micro_batch_size, max_tokens=max_tokens)
    return LocalWorkers(env, learner_kwargs=learner_kwargs, micro_batch_size=micro_batch_size, max_tokens=max_tokens,
                        share_model=share_model)
