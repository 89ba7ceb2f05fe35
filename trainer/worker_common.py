"""What both worker layouts share (trainer/workers.py's LocalWorkers, trainer/cluster.py's RayWorkers): the failure
an actor call reports, the per-shard sampling seed and an engine's idle clock. A module of its own so that neither layout imports the other."""

from __future__ import annotations

import time
from typing import Any


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


class EngineClock:
    """An engine's idle time: how long it waited for work before each queued call began (not before its first
    call), summed until a generation reports it: `timed(fn, report)` returns (fn(), idle so far) and starts the sum
    again when `report`, else fn()."""

    def __init__(self) -> None:
        self.last_end: float | None = None
        self.idle = 0.0

    def timed(self, fn: Any, report: bool) -> Any:
        start = time.perf_counter()
        if self.last_end is not None:
            self.idle += start - self.last_end
        try:
            out = fn()
        finally:
            self.last_end = time.perf_counter()
        if not report:
            return out
        idle, self.idle = self.idle, 0.0
        return out, idle
