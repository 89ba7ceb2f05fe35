"""Cluster mode (`trainer.mode: ray`): Ray actors for the learner ranks and the rollout engines.

- `ray_session` attaches to a cluster (`--ray-address` / `trainer.ray.address`) or starts a local Ray.
- `WorkerGroup` spawns N ranked actors of one class on bundles of a placement group, fans calls out, gathers the
  results with a timeout, and turns a dead or hung actor into `ActorFailed(role, rank, method)`.
- `LearnerWorker` (one DeepSpeed rank of a `trainer.learner.Learner`) and `RolloutWorker` (one rollout engine) are
  thin actor shells around the same classes debug mode calls in-process.
- `RayWorkers` is what a stage loop holds: a `LearnerPool` whose fan-out goes to the learner group, a rollout
  front (`generate` split over the rollout actors, per-shard seeds), weight sync learner rank 0 → every rollout
  actor in size-bounded buckets through the object store, and rollout-actor restarts (`max_restarts`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.errors import ClusterError
from rl.types import RolloutBatch
from trainer.learner import LearnerPool
from trainer.workers import ActorFailed, step_seed

ACTOR_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}


@contextlib.contextmanager
def ray_session(cfg: Any, address: str | None) -> Iterator[None]:
    """Attach to `address` (or trainer.ray.address), or start a local Ray sized by trainer.ray; a Ray this process
    already initialised is reused. Only a Ray started here is shut down on exit."""
    if ray.is_initialized():
        yield
        return
    address = address or cfg.address
    try:
        if address:
            ray.init(address=address, runtime_env={"env_vars": _actor_env()})
        else:
            start_local_ray(num_cpus=cfg.num_cpus or os.cpu_count(), object_store_mb=cfg.object_store_mb)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot {'attach to the Ray cluster at ' + repr(address) if address else 'start a local Ray'}: "
                           f"{e}. Start one with `ray start --head` or leave trainer.ray.address empty") from None
    try:
        yield
    finally:
        ray.shutdown()


def _actor_env() -> dict[str, str]:
    env = dict(ACTOR_ENV)
    env.update({k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS_", "TOKENWISE_"))})
    return env


def start_local_ray(*, num_cpus: int, object_store_mb: int) -> None:
    """A single-node Ray on this machine: no dashboard, a capped object store, actors offline like the driver."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_mb * 2 ** 20,
             runtime_env={"env_vars": _actor_env()}, configure_logging=False)


def _actor_setup(num_cpus: float) -> None:
    """Threads per the CPUs reserved; no per-load progress bars or deprecation chatter in the driver's log."""
    import logging
    import warnings
    import transformers
    torch.set_num_threads(max(1, int(num_cpus)))
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class RolloutWorker:
    """One rollout engine in its own process (trainer.rollout.build_rollout), loaded from the stage's start model."""

    def __init__(self, rollout_cfg: Any, model_dir: str, tokenizer_dir: str, formatter_kwargs: dict, device: str,
                 dtype: str, num_cpus: float, seed: int = 0) -> None:
        _actor_setup(num_cpus)
        from trainer.loading import PromptFormatter, load_tokenizer
        from trainer.rollout import build_rollout
        tok = load_tokenizer(tokenizer_dir)
        self.engine = build_rollout(rollout_cfg, model_dir=model_dir, tokenizer=tok,
                                    formatter=PromptFormatter(tok, **formatter_kwargs), dtype=getattr(torch, dtype),
                                    device=torch.device(device), seed=seed)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, rows: list[dict], n: int, greedy: bool, seed: int | None,
                 adaptive: dict | None = None, temperature: float | None = None) -> RolloutBatch:
        return self.engine.generate(rows, n=n, greedy=greedy, seed=seed, adaptive=adaptive, temperature=temperature)

    def attention_sink(self, rows: list[dict]) -> dict[str, float]:
        return self.engine.attention_sink(rows)

    def begin_sync(self) -> None:
        self.engine.begin_sync()

    def load_bucket(self, tensors: dict[str, torch.Tensor]) -> None:
        self.engine.load_bucket(tensors)

    def finish_sync(self, version: int) -> None:
        self.engine.finish_sync(version)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()


class LearnerWorker:
    """One learner rank: joins the learners' process group, then holds a DeepSpeed-backed Learner."""

    def __init__(self, rank: int, world_size: int, num_cpus: float) -> None:
        _actor_setup(num_cpus)
        self.rank, self.world_size = rank, world_size
        self.learner = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0's rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def pid(self) -> int:
        return os.getpid()

    def setup(self, master: tuple[str, int], learner_kwargs: dict, tokenizer_dir: str, timeout_s: float) -> None:
        from trainer.distributed import init_process_group
        from trainer.learner import Learner
        from trainer.loading import load_tokenizer
        device = learner_kwargs["device"]
        if device.type == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
        init_process_group(rank=self.rank, world_size=self.world_size, master_addr=master[0],
                           master_port=master[1], device=device, timeout_s=timeout_s)
        self.learner = Learner(tokenizer=load_tokenizer(tokenizer_dir), rank=self.rank,
                               world_size=self.world_size, **learner_kwargs)

    def score(self, *args: Any) -> Any:
        return self.learner.score(*args)

    def train(self, *args: Any) -> Any:
        return self.learner.train(*args)

    def sft(self, *args: Any) -> Any:
        return self.learner.sft(*args)

    def save(self, path: Path) -> None:
        self.learner.save(path)

    def load(self, path: Path) -> None:
        self.learner.load(path)

    def save_model(self, path: Path) -> None:
        self.learner.save_model(path)

    def push_weights(self, rollouts: list[Any], version: int, bucket_bytes: int, timeout_s: float) -> dict:
        """Stream the full weights to the rollout actors in buckets (every rank iterates: ZeRO-3 gathers are
        collective; rank 0 sends). Rollout actors that fail are skipped and reported, so the ranks stay in step."""
        failed: dict[int, str] = {}
        alive = dict(enumerate(rollouts)) if self.rank == 0 else {}
        deadline = time.monotonic() + timeout_s  # for the whole sync, so the controller's wait (2x) outlasts it

        def call_all(method: str, *args: Any) -> None:
            refs = {i: getattr(a, method).remote(*args) for i, a in alive.items() if i not in failed}
            for i, ref in refs.items():
                try:
                    ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except Exception as e:  # noqa: BLE001 — any failure of that actor is reported to the controller
                    failed[i] = _describe(e)

        call_all("begin_sync")
        bucket: dict[str, torch.Tensor] = {}
        size = 0
        sent = 0
        for name, tensor in self.learner.full_parameters():
            if self.rank != 0:
                continue
            bucket[name] = tensor.detach().to("cpu", copy=True)
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                call_all("load_bucket", ray.put(bucket))
                sent, bucket, size = sent + 1, {}, 0
        if bucket:
            call_all("load_bucket", ray.put(bucket))
            sent += 1
        call_all("finish_sync", version)
        return {"failed": failed, "buckets": sent}


def _describe(e: BaseException) -> str:
    if isinstance(e, ray.exceptions.GetTimeoutError):
        return "no answer within the call timeout (hung?)"
    if isinstance(e, ray.exceptions.RayActorError):
        return "its process died (killed, out of memory, or crashed)"
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause if getattr(e, "cause", None) is not None else e
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    return f"{type(e).__name__}: {e}"


class WorkerGroup:
    """N ranked actors of `cls`, actor i on bundle `bundles[i]` of placement group `pg`."""

    def __init__(self, cls: type, role: str, *, pg: Any, bundles: list[int], num_cpus: float, num_gpus: float,
                 init_args: Any, timeout_s: float, namespace_prefix: str) -> None:
        self.remote_cls = ray.remote(cls)
        self.role, self.pg, self.bundles = role, pg, bundles
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.init_args = init_args  # rank -> (args tuple)
        self.timeout_s = timeout_s
        self.prefix = namespace_prefix
        self.actors = [self._spawn(rank) for rank in range(len(bundles))]

    def _spawn(self, rank: int) -> Any:
        return self.remote_cls.options(
            name=f"{self.prefix}-{self.role}-{rank}", num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.bundles[rank]),
        ).remote(*self.init_args(rank))

    def __len__(self) -> int:
        return len(self.actors)

    def wait(self, refs: list[Any], method: str, timeout_s: float | None = None) -> list[Any]:
        """Results in rank order; the first failing rank raises ActorFailed (dead, raised, or past the timeout)."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        out = []
        for rank, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except Exception as e:  # noqa: BLE001
                raise ActorFailed(self.role, rank, method, _describe(e)) from None
        return out

    def call(self, method: str, per_rank_args: list[tuple], timeout_s: float | None = None) -> list[Any]:
        refs = [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_rank_args)]
        return self.wait(refs, method, timeout_s)

    def call_all(self, method: str, *args: Any, timeout_s: float | None = None) -> list[Any]:
        return self.call(method, [args] * len(self.actors), timeout_s)

    def ready(self, rank: int, timeout_s: float) -> None:
        """Block until actor `rank` is constructed (its __init__ ran), or raise ActorFailed."""
        try:
            ray.get(self.actors[rank].pid.remote(), timeout=timeout_s)
        except Exception as e:  # noqa: BLE001
            raise ActorFailed(self.role, rank, "__init__", _describe(e)) from None

    def restart(self, rank: int) -> None:
        with contextlib.suppress(Exception):
            ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = self._spawn(rank)

    def kill(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)


class RayWorkers:
    """Learner and rollout actors of one stage, behind the interface the stage loops use (see LocalWorkers)."""

    def __init__(self, env: Any, *, learner_kwargs: dict, micro_batch_size: int, max_tokens: int = 0) -> None:
        r = env.cfg.trainer.ray
        self.cfg, self.env = r, env
        self.restarts_left = r.max_restarts
        self.restarts = 0
        self.bucket_bytes = int(r.sync_bucket_mb * 2 ** 20)
        gpu_split = 2 if r.colocate else 1
        if r.colocate:
            bundles = [{"CPU": r.cpus_per_learner + r.cpus_per_rollout, "GPU": r.gpus_per_learner}
                       for _ in range(r.num_learners)]
            learner_bundles = list(range(r.num_learners))
            rollout_bundles = list(range(r.num_rollout_workers))
        else:
            bundles = [{"CPU": r.cpus_per_learner, "GPU": r.gpus_per_learner} for _ in range(r.num_learners)]
            bundles += [{"CPU": r.cpus_per_rollout, "GPU": r.gpus_per_rollout} for _ in range(r.num_rollout_workers)]
            learner_bundles = list(range(r.num_learners))
            rollout_bundles = list(range(r.num_learners, r.num_learners + r.num_rollout_workers))
        bundles = [{k: v for k, v in b.items() if v} for b in bundles]
        self.pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=r.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise ClusterError(
                f"the cluster cannot place the actors within trainer.ray.start_timeout_s ({r.start_timeout_s:.0f} s): "
                f"they need bundles {bundles}, the cluster has {ray.cluster_resources()}. Lower "
                f"trainer.ray.num_learners / num_rollout_workers / cpus_per_* / gpus_per_*, or add nodes") from None
        prefix = f"tokenwise-{os.getpid()}-{env.stage}"
        device = env.device.type
        self.learners = WorkerGroup(
            LearnerWorker, "learner", pg=self.pg, bundles=learner_bundles, num_cpus=r.cpus_per_learner,
            num_gpus=r.gpus_per_learner / gpu_split, timeout_s=r.call_timeout_s, namespace_prefix=prefix,
            init_args=lambda rank: (rank, r.num_learners, r.cpus_per_learner))
        formatter_kwargs = {"system_prompt": env.cfg.data.system_prompt, "use_chat_template": env.cfg.data.use_chat_template}
        rollout_gpus = r.gpus_per_learner / gpu_split if r.colocate else r.gpus_per_rollout
        self.rollouts = WorkerGroup(
            RolloutWorker, "rollout", pg=self.pg, bundles=rollout_bundles, num_cpus=r.cpus_per_rollout,
            num_gpus=rollout_gpus, timeout_s=r.call_timeout_s, namespace_prefix=prefix,
            init_args=lambda rank: (env.cfg.rollout, str(env.init_dir), str(env.tokenizer_dir), formatter_kwargs,
                                    device, str(env.dtype).removeprefix("torch."), r.cpus_per_rollout,
                                    env.cfg.seed + rank))
        master = self.learners.wait([self.learners.actors[0].address.remote()], "address", r.start_timeout_s)[0]
        self.learners.call_all("setup", master, learner_kwargs, str(env.tokenizer_dir), r.call_timeout_s,
                               timeout_s=r.start_timeout_s)
        self.rollouts.call_all("pid", timeout_s=r.start_timeout_s)  # constructed (model loaded) before any timed call
        self.pool = LearnerPool(self._fanout, world=r.num_learners, micro_batch_size=micro_batch_size,
                                max_tokens_per_micro_batch=max_tokens)
        self.pool.backend = f"deepspeed-zero{r.zero_stage}"

    def _fanout(self, method: str, per_rank_args: list[tuple]) -> list[Any]:
        return self.learners.call(method, per_rank_args)

    # ------------------------------------------------------------------------------------------------ rollout
    def generate(self, rows: list[dict], *, n: int, greedy: bool = False, step: int | None = None,
                 round: int = 0, adaptive: dict | None = None, seed: int | None = None,
                 temperature: float | None = None) -> RolloutBatch:
        """Prompts split into contiguous shards, one per rollout actor; shard k samples with step_seed(.., k, round),
        or with seed + k when an explicit `seed` is given (evaluation)."""
        while True:
            try:
                return self._generate(rows, n, greedy, step, round, adaptive, seed, temperature)
            except ActorFailed as failure:
                self._recover(failure, step)

    def _generate(self, rows: list[dict], n: int, greedy: bool, step: int | None, round: int,
                  adaptive: dict | None, seed: int | None, temperature: float | None) -> RolloutBatch:
        from trainer.rollout.hf import concat_rollouts
        M = min(len(self.rollouts), len(rows))
        shards = [rows[k * len(rows) // M:(k + 1) * len(rows) // M] for k in range(M)]

        def shard_seed(k: int) -> int | None:
            if greedy:
                return None
            if seed is not None:
                return seed + k
            return None if step is None else step_seed(self.env.cfg.seed, step, k, round)
        refs = [self.rollouts.actors[k].generate.remote(shards[k], n, greedy, shard_seed(k), adaptive, temperature)
                for k in range(M)]
        return concat_rollouts(self.rollouts.wait(refs, "generate"), self.env.tokenizer.pad_token_id)

    def attention_sink(self, rows: list[dict]) -> dict[str, float]:
        return self.rollouts.wait([self.rollouts.actors[0].attention_sink.remote(rows)], "attention_sink")[0]

    def sync(self, *, step: int | None = None) -> None:
        """Learner weights → every rollout actor; a failed rollout actor is restarted (if allowed) and re-synced."""
        targets = list(range(len(self.rollouts)))
        while targets:
            refs = [a.push_weights.remote([self.rollouts.actors[i] for i in targets] if rank == 0 else [],
                                          self.pool.version, self.bucket_bytes, self.cfg.call_timeout_s)
                    for rank, a in enumerate(self.learners.actors)]
            result = self.learners.wait(refs, "push_weights", 2 * self.cfg.call_timeout_s)[0]
            self.last_sync_buckets = result["buckets"]
            failed = {targets[i]: cause for i, cause in result["failed"].items()}
            for rank, cause in failed.items():
                self._recover(ActorFailed("rollout", rank, "sync", cause), step, resync=False)
            targets = sorted(failed)

    def _recover(self, failure: ActorFailed, step: int | None, *, resync: bool = True) -> None:
        if failure.role != "rollout" or self.restarts_left <= 0:
            raise failure
        self.restarts_left -= 1
        self.restarts += 1
        from trainer.logging import console
        console.print(f"[yellow]rollout actor {failure.rank} failed at step {step} ({failure.cause}); restarting it "
                      f"({self.restarts_left} restart(s) left) and retrying[/yellow]")
        self.rollouts.restart(failure.rank)
        self.rollouts.ready(failure.rank, self.cfg.start_timeout_s)
        if resync:
            self.sync(step=step)

    def sleep_rollouts(self) -> None:
        if self.cfg.colocate:
            self.rollouts.call_all("sleep")

    def wake_rollouts(self) -> None:
        if self.cfg.colocate:
            self.rollouts.call_all("wake_up")

    def rollout_pids(self) -> list[int]:
        return self.rollouts.call_all("pid")

    def close(self) -> None:
        self.learners.kill()
        self.rollouts.kill()
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)

