"""Asynchronous generation (grpo.max_staleness = k >= 1): the rollout engines generate up to k steps ahead of the
learners, through the engines' own queues (workers.submit_generate / queue_sync / collect, trainer/workers.py).

The schedule is fixed, so a run is as reproducible as a synchronous one and the bound holds by construction:

    before step 1      queue generation for steps 1 .. 1+k, all with the start weights (version 0)
    step s             take step s's batch (wait for it if the engines are behind: timing/learner_idle),
                       train (the learners go from version s-1 to s), queue version s's weights behind the
                       generations already queued, then queue generation for step s+1+k: it is sampled by
                       version s and trained on at step s+1+k, from version s+k — exactly k versions old.

Steps 2 .. k run on batches 1 .. k-1 versions old (all from the start weights). Every token carries the version
that sampled it (RolloutBatch.token_versions); `async/staleness_*` are read from those stamps, never assumed, and
`check_bound` refuses a batch with a token older than the bound. The rollout correction (algorithm.correction)
weighs each token by pi_old / pi_rollout, as it does for the engines' numerical drift.

Checkpoints and resume: the prompt cursor a checkpoint records is the one before the draws whose rollouts were not
trained on yet (QueuedStream), so `tokenwise resume` draws those prompts again and regenerates them — same
prompts and sampling seeds (seed, step, shard), the resumed weights — so no rollout is lost or trained twice.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch

from tokenwise.rl.types import RolloutBatch
from tokenwise.trainer.ping import rollout_rows


class QueuedStream:
    """A PromptStream whose checkpointed cursor stays before the draws not yet trained on."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.marks: deque[tuple[int, dict]] = deque()  # (step, cursor before its draw)

    def draw(self, step: int, n: int) -> list[dict]:
        self.marks.append((step, self.stream.state_dict()))
        return self.stream.next_batch(n)

    def consumed(self, step: int) -> None:
        while self.marks and self.marks[0][0] <= step:
            self.marks.popleft()

    def state_dict(self) -> dict:
        return self.marks[0][1] if self.marks else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
        self.marks.clear()


class StalenessError(RuntimeError):
    pass


def staleness(batch: RolloutBatch, learner_version: int) -> torch.Tensor:
    """[sampled tokens] how many versions each sampled token is behind the policy the update starts from."""
    versions = batch.token_versions[batch.response_mask > 0].long()
    return learner_version - versions


def check_bound(batch: RolloutBatch, learner_version: int, bound: int, step: int) -> dict[str, float]:
    """async/staleness_mean|max of a batch the learners (at `learner_version`) are about to train on; raises when a
    token is older than the bound or newer than the learners (a broken schedule, never a tolerance)."""
    lag = staleness(batch, learner_version)
    if lag.numel() and (int(lag.max()) > bound or int(lag.min()) < 0):
        raise StalenessError(f"step {step}: the batch holds tokens sampled by policy versions "
                             f"{int(learner_version - lag.max())}..{int(learner_version - lag.min())}, the learners "
                             f"are at version {learner_version}, grpo.max_staleness is {bound}")
    sampled = batch.response_mask > 0
    newest = batch.token_versions.masked_fill(~sampled, -1).amax(1)
    oldest = batch.token_versions.masked_fill(~sampled, torch.iinfo(torch.int32).max).amin(1)
    return {"async/staleness_mean": lag.double().mean().item() if lag.numel() else 0.0,
            "async/staleness_max": float(lag.max()) if lag.numel() else 0.0,
            # partial rollouts: the share of responses sampled by more than one policy version
            "async/mixed_frac": float((newest > oldest).float().mean()) if len(batch) else 0.0}


class AsyncRollouts:
    """Generation queued ahead of the learners (see the module's docstring)."""

    def __init__(self, env: Any, workers: Any, algo: Any, stream: QueuedStream, *, bound: int,
                 total_steps: int) -> None:
        self.env, self.workers, self.algo, self.stream = env, workers, algo, stream
        self.bound, self.total_steps = bound, total_steps
        self.pending: deque[tuple[int, Any]] = deque()
        self.next_step: int | None = None

    def fill(self, step: int) -> None:
        """Queue generation for every step up to step + bound (and the stage's last) not queued yet."""
        g = self.env.cfg.grpo
        if self.next_step is None:
            self.next_step = step
        while self.next_step <= min(step + self.bound, self.total_steps):
            rows = rollout_rows(self.stream.draw(self.next_step, g.prompts_per_step), self.env.cfg.rollout.ping_prefix,
                                self.env.cfg.rollout.ping_kinds)
            handle = self.workers.submit_generate(rows, n=g.group_size, step=self.next_step,
                                                  adaptive=self.algo.sampling())
            self.pending.append((self.next_step, handle))
            self.next_step += 1

    def take(self, step: int) -> tuple[RolloutBatch, float, float]:
        """Step `step`'s rollouts, the seconds the learners waited for them and the engines' idle seconds before."""
        self.fill(step)
        queued, handle = self.pending.popleft()
        assert queued == step, (queued, step)
        t0 = time.perf_counter()
        batch, rollout_idle = self.workers.collect(handle)
        self.stream.consumed(step)
        return batch, time.perf_counter() - t0, rollout_idle

    @property
    def depth(self) -> int:
        return len(self.pending)
