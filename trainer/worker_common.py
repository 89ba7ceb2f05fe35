"""What both worker layouts share (trainer/workers.py's LocalWorkers, trainer/cluster.py's RayWorkers): the failure
an actor call reports and the per-shard sampling seed. A module of its own so that neither layout imports the other."""

from __future__ import annotations


class ActorFailed(Exception):
    """A call on one actor raised (`kind` 'raised': a deterministic error, reported and never retried), the actor
    process died ('died') or the call outlived its timeout ('hung'); `detail` holds the remote traceback if any."""

    def __init__(self, role: str, rank: int, method: str, cause: str, *, kind: str = "died", detail: str = "") -> None:
        super().__init__(f"{role} actor {rank} failed in {method}(): {cause}")
        self.role, self.rank, self.method, self.cause = role, rank, method, cause
        self.kind, self.detail = kind, detail


def step_seed(seed: int, step: int, shard: int, round: int = 0) -> int:
    """The sampling seed of rollout shard `shard` at `step` (generation round `round` under dynamic sampling): the
    same in debug and cluster mode, so a retried step (or a run on one rollout actor) draws the same samples."""
    return (seed * 1_000_003 + step) * 1_009 + shard + round * 7_919_000_003
