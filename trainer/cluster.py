"""Cluster mode (`trainer.mode: ray`): Ray actors for the learner ranks and the rollout engines.

- `ray_session` attaches to a cluster (`--ray-address` / `trainer.ray.address`) or starts a local Ray.
- `WorkerGroup` spawns N ranked actors of one class on bundles of a placement group, fans calls out, gathers the
  results with a timeout, and turns a dead or hung actor into `ActorFailed(role, rank, method)`.
- `LearnerWorker` (one DeepSpeed rank of a `trainer.learner.Learner`) and `RolloutWorker` (one rollout engine) are
  thin actor shells around the same classes debug mode calls in-process.
- `RayWorkers` is what a stage loop holds: a `LearnerPool` whose fan-out goes to the learner group, a rollout
  front (`generate` split over the rollout actors, per-shard seeds), weight sync learner rank 0 → every rollout
  actor in size-bounded buckets through the object store or a broadcast in a group of their own
  (`weight_sync: collective`, trainer/weight_sync.py), and rollout-actor restarts (`max_restarts`).
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

from tokenwise.rl.errors import ClusterError
from tokenwise.rl.types import RolloutBatch
from tokenwise.trainer.learner import LearnerPool
from tokenwise.trainer.rollout.base import weight_group
from tokenwise.trainer.worker_common import ActorFailed, EngineClock, step_seed

ACTOR_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}


@contextlib.contextmanager
def ray_session(cfg: Any, address: str | None) -> Iterator[None]:
    """Attach to `address` (or trainer.ray.address), or start a local Ray sized by trainer.ray; a Ray this process
    already initialised is reused. Only a Ray started here is shut down on exit."""
    if ray.is_initialized():
        yield
        return
    # inside `ray job submit` (or with RAY_ADDRESS exported) the cluster is the one Ray names, as for ray.init()
    address = address or cfg.address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            attach(address, timeout_s=cfg.connect_timeout_s)
        else:
            start_local_ray(num_cpus=cfg.num_cpus or os.cpu_count(), object_store_mb=cfg.object_store_mb)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"cannot {'attach to the Ray cluster at ' + repr(address) if address else 'start a local Ray'}: "
                           f"{first}. Start one with `ray start --head` or leave trainer.ray.address empty") from None
    try:
        yield
    finally:
        ray.shutdown()


def attach(address: str, *, timeout_s: float) -> None:
    """ray.init(address) within `timeout_s`: a host:port where nothing listens is refused at once, and a head that
    never answers (wrong node address, firewall) is given up after the timeout instead of retried forever."""
    import logging
    import threading
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # no retry chatter from the core worker while we wait
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "://" not in address:
        try:
            socket.create_connection((host, int(port)), timeout=min(timeout_s, 10.0)).close()
        except OSError as e:
            raise ClusterError(f"cannot attach to the Ray cluster at {address!r}: {e.strerror or e} (nothing answers "
                               f"there). Check the head's address (`ray status` on the head), or start one with "
                               f"`ray start --head`") from None
    token = _authenticate_like_ray()
    outcome: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            ray.init(address=address, runtime_env={"env_vars": _actor_env()}, logging_level=logging.ERROR)
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 — handed to the caller's thread
            outcome["error"] = e
    thread = threading.Thread(target=connect, name="ray-attach", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        raise ClusterError(f"no answer from the Ray cluster at {address!r} within trainer.ray.connect_timeout_s "
                           f"({timeout_s:g} s); the head may be unreachable from this node, or advertise another "
                           f"address (compare `ray status` on the head)")
    if outcome["error"] is not None:
        if isinstance(outcome["error"], ConnectionError) or "authentication" in str(outcome["error"]).lower():
            # the port answered (checked above) but the GCS handshake failed: with Ray >= 2.5x that is most often
            # token authentication, which `ray start --head` turns on whenever the head has a token
            have = ("this process sent the token Ray finds here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                    "~/.ray/auth_token)" if token else "this process found no token")
            raise ClusterError(
                f"cannot attach to the Ray cluster at {address!r}: the head answers but refused the connection; if it "
                f"uses token authentication, {have}: copy the head's token here (`ray get-auth-token` on the head → "
                f"~/.ray/auth_token, or export RAY_AUTH_TOKEN), or start the head with RAY_AUTH_MODE=disabled") from None
        raise outcome["error"]


def _authenticate_like_ray() -> bool:
    """Ray 2.5x's `ray start --head` turns token authentication on when the head has a token (any earlier local
    `ray.init()` writes one to ~/.ray/auth_token). `ray.init(address="auto")` then authenticates with the token it
    finds here, but an explicit host:port does not, and the GCS refuses it. We do for every address what Ray does for
    "auto" (its own function: RAY_AUTH_MODE unset and a token available → token mode). Returns whether Ray's token
    loader finds a token here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) to send."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return False
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication: nothing to do
        return False
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)


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
                 dtype: str, num_cpus: float, seed: int = 0, partial: bool = False) -> None:
        _actor_setup(num_cpus)
        from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
        from tokenwise.trainer.rollout import build_rollout
        tok = load_tokenizer(tokenizer_dir)
        self.engine = build_rollout(rollout_cfg, model_dir=model_dir, tokenizer=tok,
                                    formatter=PromptFormatter(tok, **formatter_kwargs), dtype=getattr(torch, dtype),
                                    device=torch.device(device), seed=seed)
        self.clock = EngineClock()
        if partial:  # grpo.partial_rollouts: weights posted by post_weights (its own thread) between decoding steps
            self.engine.open_mailbox()

    def pid(self) -> int:
        return os.getpid()

    def generate(self, rows: list[dict], n: int, greedy: bool, seed: int | None,
                 adaptive: dict | None = None, temperature: float | None = None) -> RolloutBatch:
        self.engine.take_posted()  # partial rollouts: weights posted since the last generation (the controller waited)
        return self.engine.generate(rows, n=n, greedy=greedy, seed=seed, adaptive=adaptive, temperature=temperature)

    def generate_timed(self, rows: list[dict], n: int, seed: int, adaptive: dict | None,
                       min_version: int | None = None) -> tuple[RolloutBatch, float]:
        """Asynchronous generation: (batch, seconds this actor sat idle since it last reported). Partial rollouts
        (`min_version`): it starts from the weights of that version or newer, posted to the mailbox."""
        def run() -> RolloutBatch:
            if min_version is not None:
                self.engine.catch_up(min_version)
            return self.engine.generate(rows, n=n, seed=seed, adaptive=adaptive)
        return self.clock.timed(run, True)

    def post_weights(self, buckets: list[Any], version: int) -> None:
        """Partial rollouts (run in the actor's `mailbox` concurrency group, beside a generation): the learners'
        buckets, posted to the engine, which loads them between two decoding steps."""
        tensors: dict[str, torch.Tensor] = {}
        for bucket in buckets:
            tensors.update(ray.get(bucket))
        self.engine.post_weights(tensors, version)

    def load_queued(self, buckets: list[Any], version: int) -> None:
        """Asynchronous generation's weight load, queued behind the generations before it: every bucket (object
        references the learner put), then the new version."""
        def load() -> None:
            self.engine.begin_sync()
            for bucket in buckets:
                self.engine.load_bucket(ray.get(bucket))
            self.engine.finish_sync(version)
        self.clock.timed(load, False)

    def attention_sink(self, rows: list[dict]) -> dict[str, float]:
        return self.engine.attention_sink(rows)

    def begin_sync(self) -> None:
        self.engine.begin_sync()

    def load_bucket(self, tensors: dict[str, torch.Tensor]) -> None:
        self.engine.load_bucket(tensors)

    def finish_sync(self, version: int) -> None:
        self.engine.finish_sync(version)

    def join_sync_group(self, host: str, port: int, rank: int, size: int, timeout_s: float) -> None:
        """Join the weight-sync group (trainer/weight_sync.py) as member `rank`, leaving any earlier one."""
        from tokenwise.trainer.weight_sync import rejoin
        self.sync_group = rejoin(getattr(self, "sync_group", None), host, port, rank, size, timeout_s)

    def receive_bucket(self, meta: list, timeout_s: float) -> bool:
        """One bucket by the weight-sync group's broadcast, then loaded; False (and the group left) when the
        broadcast broke off — the sender then sends the bucket through the object store."""
        from tokenwise.trainer.weight_sync import buffer_size, unpack
        buffer = torch.empty(buffer_size(meta), dtype=torch.uint8)
        try:
            self.sync_group.broadcast(buffer, timeout_s)
        except Exception:  # noqa: BLE001 — a member missed the deadline: this one reports it without raising
            self.sync_group.close()
            self.sync_group = None
            return False
        self.engine.load_bucket(unpack(meta, buffer))
        return True

    def weights_digest(self) -> dict[str, str]:
        """sha256 of each weight's bytes as the engine holds them (tests compare sync paths bit for bit)."""
        from tokenwise.trainer.weight_sync import digest
        return digest(self.engine.model.state_dict().items())  # the transformers engine (vLLM keeps its own layout)

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
        from tokenwise.trainer.distributed import init_process_group
        from tokenwise.trainer.learner import Learner
        from tokenwise.trainer.loading import load_tokenizer
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

    def join_sync_group(self, host: str, port: int, size: int, timeout_s: float) -> None:
        """Rank 0: host and join the weight-sync group as its sender (member 0), leaving any earlier one."""
        from tokenwise.trainer.weight_sync import rejoin
        self.sync_group = rejoin(getattr(self, "sync_group", None), host, port, 0, size, timeout_s)

    def weights_digest(self) -> dict[str, str]:
        """sha256 of each full weight's bytes (every rank must call it: ZeRO-3 gathers are collective)."""
        from tokenwise.trainer.weight_sync import digest
        return digest(self.learner.full_parameters())

    def push_weights(self, rollouts: list[Any], version: int, bucket_bytes: int, timeout_s: float,
                     collective: bool = False) -> dict:
        """Stream the full weights to the rollout actors in buckets (every rank iterates: ZeRO-3 gathers are
        collective; rank 0 sends). Each bucket (and the begin / finish calls) has its own deadline of `timeout_s`;
        rollout actors that fail or miss it are skipped and reported, so the ranks stay in step. A bucket goes by
        the object store, or with `collective` by the weight-sync group's broadcast; when that breaks off (a member
        missed the deadline) the bucket and the rest go by the object store to the actors still answering, and the
        group is reported broken. Returns the failures, the bucket count, the slowest bucket's seconds (the
        controller's adaptive timeout) and whether the group broke."""
        failed: dict[int, tuple[str, str, str]] = {}
        alive = dict(enumerate(rollouts)) if self.rank == 0 else {}
        slowest = 0.0
        broken = False

        def call_all(method: str, *args: Any, send: torch.Tensor | None = None) -> dict[int, Any]:
            """`method` on every rollout actor still answering, each within the deadline; with `send`, rank 0
            broadcasts that buffer meanwhile (receive_bucket), and once the broadcast broke off the receivers get
            DEATH_GRACE_S more to say so (they time out when the sender does) before a silent one counts as hung."""
            nonlocal slowest
            t0 = time.monotonic()
            deadline = t0 + timeout_s
            refs = {i: getattr(a, method).remote(*args) for i, a in alive.items() if i not in failed}
            out: dict[int, Any] = {}
            if send is not None:
                try:
                    self.sync_group.broadcast(send, timeout_s)
                except Exception:  # noqa: BLE001 — a member missed the deadline; found below
                    out[-1] = False
                    deadline = max(deadline, time.monotonic() + DEATH_GRACE_S)
            for i, ref in refs.items():
                try:
                    out[i] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except Exception as e:  # noqa: BLE001 — any failure of that actor is reported to the controller
                    failed[i] = _describe(e)
                    out[i] = False
            slowest = max(slowest, time.monotonic() - t0)
            return out

        def deliver(bucket: dict[str, torch.Tensor]) -> None:
            nonlocal broken
            if collective and not broken:
                if not failed:  # a member that already failed leaves the group unable to work
                    from tokenwise.trainer.weight_sync import pack
                    meta, buffer = pack(bucket)
                    if all(call_all("receive_bucket", meta, timeout_s, send=buffer).values()):
                        return
                broken = True  # the group is no more: this bucket and the rest by the object store
                self.sync_group.close()
                self.sync_group = None
            call_all("load_bucket", ray.put(bucket))

        call_all("begin_sync")
        sent = 0
        for bucket in self._weight_buckets(bucket_bytes):
            deliver(bucket)
            sent += 1
        call_all("finish_sync", version)
        return {"failed": failed, "buckets": sent, "slowest_s": slowest, "broken": broken}

    def put_weights(self, bucket_bytes: int) -> list[Any]:
        """The full weights in the object store, in buckets ending on layer boundaries (every rank iterates: ZeRO-3
        gathers are collective; rank 0 puts and returns the references, the others [])."""
        return [ray.put(bucket) for bucket in self._weight_buckets(bucket_bytes)]

    def _weight_buckets(self, bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
        """The full weights as CPU copies in buckets (rank 0 yields them; every rank iterates the parameters, since
        ZeRO-3 gathers are collective). A bucket ends on a layer boundary once it holds bucket_bytes, so the engine
        can load every bucket as it arrives (it loads whole layers only) and never holds more than a bucket."""
        bucket: dict[str, torch.Tensor] = {}
        size, group = 0, None
        for name, tensor in self.learner.full_parameters():
            if self.rank != 0:
                continue
            previous, group = group, weight_group(name)
            if size >= bucket_bytes and group != previous:
                yield bucket
                bucket, size = {}, 0
            bucket[name] = tensor.detach().to("cpu", copy=True)
            size += tensor.numel() * tensor.element_size()
        if bucket:
            yield bucket

FIRST_CALL_TIMEOUT_S = 900.0  # adaptive timeouts: a method's first call (may load a model or compile)
MIN_TIMEOUT_S = 60.0
DEATH_GRACE_S = 5.0  # after one rank raised: how long to look for a rank that died (the likely cause)


def learner_group_timeout(call_timeout_s: float | None) -> float:
    """The learners' own process-group timeout. In a weight sync the other learner ranks wait in the weights'
    all-gather while rank 0 delivers a bucket, which may take a bucket's deadline twice (collective, then the object
    store) plus DEATH_GRACE_S on a hung rollout actor; the group outlasts that, so the actor is named, not rank 1."""
    return 2 * (call_timeout_s or FIRST_CALL_TIMEOUT_S) + DEATH_GRACE_S + 30


class CallTimer:
    """Timeouts per method: trainer.ray.call_timeout_s if set, else adaptive: 10x the slowest earlier call of the
    method per unit of work (rows x samples for generation), at least MIN_TIMEOUT_S, and FIRST_CALL_TIMEOUT_S for
    a method not seen yet. A hung actor on the quick start is so found in about a minute, not 15."""

    def __init__(self, fixed: float | None) -> None:
        self.fixed = fixed
        self.rate: dict[str, float] = {}

    def timeout(self, method: str, work: float = 1.0) -> float:
        if self.fixed:
            return self.fixed
        if method not in self.rate:
            return FIRST_CALL_TIMEOUT_S
        return max(MIN_TIMEOUT_S, 10.0 * self.rate[method] * work)

    def record(self, method: str, seconds: float, work: float = 1.0) -> None:
        self.rate[method] = max(self.rate.get(method, 0.0), seconds / max(work, 1e-9))


def _describe(e: BaseException) -> tuple[str, str, str]:
    """(cause in one line, kind: 'hung' | 'died' | 'raised', remote traceback or '')."""
    if isinstance(e, ray.exceptions.GetTimeoutError):
        return "no answer within the call timeout (hung?)", "hung", ""
    if isinstance(e, ray.exceptions.RayActorError):
        return "its process died (killed, out of memory, or crashed)", "died", ""
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause if getattr(e, "cause", None) is not None else e
        text = str(cause).strip()
        return f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}", "raised", str(e)
    return f"{type(e).__name__}: {e}", "raised", ""


class WorkerGroup:
    """N ranked actors of `cls`, actor i on bundle `bundles[i]` of placement group `pg`."""

    def __init__(self, cls: type, role: str, *, pg: Any, bundles: list[int], num_cpus: float, num_gpus: float,
                 init_args: Any, timer: CallTimer, namespace_prefix: str,
                 concurrency_groups: dict | None = None) -> None:
        # concurrency groups beside the default one (which stays one thread: calls run in the order sent)
        self.remote_cls = (ray.remote(concurrency_groups=concurrency_groups)(cls) if concurrency_groups
                           else ray.remote(cls))
        self.role, self.pg, self.bundles = role, pg, bundles
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.init_args = init_args  # rank -> (args tuple)
        self.timer = timer
        self.prefix = namespace_prefix
        self.actors = [self._spawn(rank) for rank in range(len(bundles))]

    def _spawn(self, rank: int) -> Any:
        return self.remote_cls.options(
            name=f"{self.prefix}-{self.role}-{rank}", num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.bundles[rank]),
        ).remote(*self.init_args(rank))

    def __len__(self) -> int:
        return len(self.actors)

    def wait(self, refs: list[Any], method: str, timeout_s: float | None = None, *, ranks: list[int] | None = None,
             work: float = 1.0) -> list[Any]:
        """Results in rank order. All ranks are waited on together: the first to fail (dead, raised) raises
        ActorFailed with its own rank and remote traceback, even while other ranks block on it in a collective;
        past the timeout the ranks still running are named. `ranks`: the actor rank of each ref (default 0..)."""
        ranks = list(range(len(refs))) if ranks is None else ranks
        limit = timeout_s or self.timer.timeout(method, work)
        t0 = time.monotonic()
        pending = dict(zip(refs, ranks))
        results: dict[int, Any] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, t0 + limit - time.monotonic()))
            if not ready:
                waiting = sorted(pending.values())
                cause = f"no answer within the call timeout ({limit:.0f} s; hung?)"
                if len(waiting) > 1:
                    cause += f"; {self.role} ranks {waiting} were all still running"
                raise ActorFailed(self.role, waiting[0], method, cause, kind="hung")
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except Exception as e:  # noqa: BLE001
                    raise self._root_cause(rank, method, e, pending) from None
        if timeout_s is None:
            self.timer.record(method, time.monotonic() - t0, work)
        return [results[r] for r in ranks]

    def _root_cause(self, rank: int, method: str, error: Exception, pending: dict) -> ActorFailed:
        """The failure to report: when a rank raised (e.g. a collective broke off), a rank whose process died within
        DEATH_GRACE_S is the cause and is named instead; the other rank's error goes into the detail."""
        cause, kind, detail = _describe(error)
        if kind == "raised" and pending:
            deadline = time.monotonic() + DEATH_GRACE_S
            while pending and time.monotonic() < deadline:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                for ref in ready:
                    other = pending.pop(ref)
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001
                        c, k, d = _describe(e)
                        if k == "died":
                            note = f"{self.role} actor {rank} raised meanwhile: {cause}\n{detail}"
                            return ActorFailed(self.role, other, method, c, kind=k, detail=note)
        return ActorFailed(self.role, rank, method, cause, kind=kind, detail=detail)

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
            cause, kind, detail = _describe(e)
            raise ActorFailed(self.role, rank, "__init__", cause, kind=kind, detail=detail) from None

    def restart(self, rank: int) -> None:
        with contextlib.suppress(Exception):
            ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = self._spawn(rank)

    def kill(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)


def _expected_buckets(model_dir: Any, bucket_bytes: int) -> int:
    """Weight-sync buckets of a model directory's weights, for the first sync's overall deadline."""
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else 0
    return max(1, -(-size // bucket_bytes)) + 1


class RayWorkers:
    """Learner and rollout actors of one stage, behind the interface the stage loops use (see LocalWorkers)."""

    def __init__(self, env: Any, *, learner_kwargs: dict, micro_batch_size: int, max_tokens: int = 0) -> None:
        r = env.cfg.trainer.ray
        self.cfg, self.env = r, env
        self.restarts = 0  # over the run: restored from the checkpoint on resume (restore_state)
        self.timer = CallTimer(r.call_timeout_s)
        self.sync_timer = CallTimer(r.call_timeout_s)
        self.sync_buckets = _expected_buckets(env.init_dir, int(r.sync_bucket_mb * 2 ** 20))
        self.bucket_bytes = int(r.sync_bucket_mb * 2 ** 20)
        self.group_ready = False  # weight_sync collective: learner rank 0 and every rollout actor joined a group
        self.queued_loads: list[tuple[list, list, str]] = []  # asynchronous generation: loads queued since a generation
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
            num_gpus=r.gpus_per_learner / gpu_split, timer=self.timer, namespace_prefix=prefix,
            init_args=lambda rank: (rank, r.num_learners, r.cpus_per_learner))
        formatter_kwargs = {"system_prompt": env.cfg.data.system_prompt, "use_chat_template": env.cfg.data.use_chat_template}
        rollout_gpus = r.gpus_per_learner / gpu_split if r.colocate else r.gpus_per_rollout
        self.partial = bool(env.cfg.grpo.partial_rollouts)
        self.posted = 0  # partial rollouts: the newest version posted to the engines' mailboxes
        self.rollouts = WorkerGroup(
            RolloutWorker, "rollout", pg=self.pg, bundles=rollout_bundles, num_cpus=r.cpus_per_rollout,
            num_gpus=rollout_gpus, timer=self.timer, namespace_prefix=prefix,
            concurrency_groups={"mailbox": 1} if self.partial else None,
            init_args=lambda rank: (env.cfg.rollout, str(env.init_dir), str(env.tokenizer_dir), formatter_kwargs,
                                    device, str(env.dtype).removeprefix("torch."), r.cpus_per_rollout,
                                    env.cfg.seed + rank, self.partial))
        if r.colocate:  # the engines size their memory from what is free: they start before the learners load
            self.rollouts.call_all("pid", timeout_s=r.start_timeout_s)
        master = self.learners.wait([self.learners.actors[0].address.remote()], "address", r.start_timeout_s)[0]
        self.learners.call_all("setup", master, learner_kwargs, str(env.tokenizer_dir),
                               learner_group_timeout(r.call_timeout_s), timeout_s=r.start_timeout_s)
        self.rollouts.call_all("pid", timeout_s=r.start_timeout_s)  # constructed (model loaded) before any timed call
        self.pool = LearnerPool(self._fanout, world=r.num_learners, micro_batch_size=micro_batch_size,
                                max_tokens_per_micro_batch=max_tokens, packing=learner_kwargs.get("packing", "none"))
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
                self._check_queued_loads()
                return self._generate(rows, n, greedy, step, round, adaptive, seed, temperature)
            except ActorFailed as failure:
                self._recover(failure, step)

    def _check_queued_loads(self) -> None:
        """Asynchronous generation: weight loads queued since the last submitted generation must have succeeded
        before anything else (an evaluation) reads the engines."""
        loads, self.queued_loads = self.queued_loads, []
        self._wait_loads(loads)

    def _wait_loads(self, loads: list[tuple[list, list, str]]) -> None:
        """Wait for queued weight loads (buckets, [(actor, ref)], the actor method), skipping those of actors
        replaced since: the new actor was synced when it started."""
        for _buckets, targets, method in loads:
            live = [(rank, ref) for rank, (actor, ref) in enumerate(targets) if self.rollouts.actors[rank] is actor]
            if live:
                self.rollouts.wait([ref for _, ref in live], method, ranks=[rank for rank, _ in live])

    def _generate(self, rows: list[dict], n: int, greedy: bool, step: int | None, round: int,
                  adaptive: dict | None, seed: int | None, temperature: float | None) -> RolloutBatch:
        from tokenwise.trainer.rollout.hf import concat_rollouts
        shards = self._shards(rows)
        M = len(shards)

        def shard_seed(k: int) -> int | None:
            if greedy:
                return None
            if seed is not None:
                return seed + k
            return None if step is None else step_seed(self.env.cfg.seed, step, k, round)
        refs = [self.rollouts.actors[k].generate.remote(shards[k], n, greedy, shard_seed(k), adaptive, temperature)
                for k in range(M)]
        work = max(len(sh) for sh in shards) * n  # samples per actor: the adaptive timeout scales with it
        return concat_rollouts(self.rollouts.wait(refs, "generate", work=work), self.env.tokenizer.pad_token_id)

    def _shards(self, rows: list[dict]) -> list[list[dict]]:
        """The prompts in contiguous shards, one per rollout actor (fewer when there are fewer prompts)."""
        M = min(len(self.rollouts), len(rows))
        return [rows[k * len(rows) // M:(k + 1) * len(rows) // M] for k in range(M)]

    def attention_sink(self, rows: list[dict]) -> dict[str, float]:
        return self.rollouts.wait([self.rollouts.actors[0].attention_sink.remote(rows)], "attention_sink")[0]

    # ------------------------------------------------------------------------------------ asynchronous generation
    def submit_generate(self, rows: list[dict], *, n: int, step: int, adaptive: dict | None = None) -> dict:
        """Shards queued on the actors (each runs its calls in order), not awaited; see collect."""
        shards = self._shards(rows)
        actors = list(self.rollouts.actors[:len(shards)])
        min_version = self.posted if self.partial else None
        refs = [a.generate_timed.remote(shards[k], n, step_seed(self.env.cfg.seed, step, k, 0), adaptive, min_version)
                for k, a in enumerate(actors)]
        loads, self.queued_loads = self.queued_loads, []
        return {"rows": rows, "n": n, "step": step, "adaptive": adaptive, "refs": refs, "actors": actors,
                "loads": loads, "work": max(len(sh) for sh in shards) * n}

    def collect(self, handle: dict) -> tuple[RolloutBatch, float]:
        """A queued generation's batch and the longest idle time of its actors before it. The weight loads queued
        before it must have succeeded; when an actor failed, it is restarted (unless it already was: a new actor
        is synced when it starts) and the step's prompts are generated again, now (with newer weights: the bound
        still holds)."""
        from tokenwise.trainer.rollout.hf import concat_rollouts
        try:
            self._wait_loads(handle["loads"])
            parts = self.rollouts.wait(handle["refs"], "generate", work=handle["work"])
        except ActorFailed as failure:
            if handle["actors"][failure.rank] is self.rollouts.actors[failure.rank]:  # not replaced yet
                self._recover(failure, handle["step"])
            batch = self.generate(handle["rows"], n=handle["n"], step=handle["step"], adaptive=handle["adaptive"])
            return batch, 0.0
        return (concat_rollouts([b for b, _ in parts], self.env.tokenizer.pad_token_id),
                max(idle for _, idle in parts))

    def queue_sync(self, *, step: int | None = None) -> None:
        """The learners' weights into the object store now; every actor loads them after its queued generations
        (the object-store path whatever trainer.ray.weight_sync says: a collective would wait for the engines), or,
        with partial rollouts, takes them between two decoding steps of the generation in flight."""
        refs = [a.put_weights.remote(self.bucket_bytes) for a in self.learners.actors]
        buckets = self.learners.wait(refs, "put_weights")[0]
        if self.partial:  # posted beside the generations (the mailbox group); taken between decoding steps
            loads = [(a, a.post_weights.options(concurrency_group="mailbox").remote(buckets, self.pool.version))
                     for a in self.rollouts.actors]
            self.posted = self.pool.version
            method = "post_weights"
        else:
            loads = [(a, a.load_queued.remote(buckets, self.pool.version)) for a in self.rollouts.actors]
            method = "load_queued"
        self.queued_loads.append((buckets, loads, method))

    def sync(self, *, step: int | None = None) -> None:
        """Learner weights → every rollout actor; a failed rollout actor is restarted (if allowed) and re-synced.
        With `weight_sync: collective` a sync to every actor goes through the weight-sync group (built when missing:
        at the first sync, after it broke or an actor was replaced); re-syncing restarted actors goes by the object
        store."""
        targets = list(range(len(self.rollouts)))
        while targets:
            collective = self.cfg.weight_sync == "collective" and len(targets) == len(self.rollouts)
            if collective and not self.group_ready:
                try:
                    self._build_sync_group()
                except ActorFailed as failure:
                    self._recover(failure, step, resync=False)
                    continue
            # each bucket's deadline, inside the learner (within what learner_group_timeout allows for)
            per_bucket = min(self.sync_timer.timeout("bucket"), self.cfg.call_timeout_s or FIRST_CALL_TIMEOUT_S)
            refs = [a.push_weights.remote([self.rollouts.actors[i] for i in targets] if rank == 0 else [],
                                          self.pool.version, self.bucket_bytes, per_bucket, collective)
                    for rank, a in enumerate(self.learners.actors)]
            # the learners' own wait: every bucket plus begin and finish may use its whole deadline (a broken
            # collective bucket twice, and the grace for its receivers)
            budget = per_bucket * (self.sync_buckets + 2) + (per_bucket + DEATH_GRACE_S if collective else 0) + 30
            result = self.learners.wait(refs, "push_weights", budget)[0]
            self.last_sync_buckets = self.sync_buckets = max(1, result["buckets"])
            self.sync_timer.record("bucket", result["slowest_s"])
            if result["broken"]:
                self.group_ready = False
            failed = {targets[i]: cause for i, cause in result["failed"].items()}
            for rank, (cause, kind, detail) in failed.items():
                self._recover(ActorFailed("rollout", rank, "sync", cause, kind=kind, detail=detail), step,
                              resync=False)
            targets = sorted(failed)

    def _build_sync_group(self) -> None:
        """Learner rank 0 hosts a new weight-sync group (trainer/weight_sync.py); every rollout actor joins it."""
        timeout = self.cfg.start_timeout_s
        learner = self.learners.actors[0]
        host, port = self.learners.wait([learner.address.remote()], "address", timeout)[0]
        size = 1 + len(self.rollouts)
        host_ref = learner.join_sync_group.remote(host, port, size, timeout)
        refs = [a.join_sync_group.remote(host, port, k + 1, size, timeout) for k, a in enumerate(self.rollouts.actors)]
        self.rollouts.wait(refs, "join_sync_group", timeout + 30)
        self.learners.wait([host_ref], "join_sync_group", timeout + 30)
        self.group_ready = True

    def _recover(self, failure: ActorFailed, step: int | None, *, resync: bool = True) -> None:
        """Replace a dead or hung rollout actor while the run's restart budget lasts; an error the actor raised
        would only repeat, so it is reported, not retried."""
        if failure.role != "rollout" or failure.kind == "raised" or self.restarts >= self.cfg.max_restarts:
            raise failure
        self.restarts += 1
        from tokenwise.trainer.logging import console
        console.print(f"[yellow]rollout actor {failure.rank} failed at step {step} ({failure.cause}); restarting it "
                      f"({self.cfg.max_restarts - self.restarts} restart(s) left) and retrying[/yellow]")
        self.rollouts.restart(failure.rank)
        self.group_ready = False  # the new actor is not a member of the weight-sync group
        self.rollouts.ready(failure.rank, self.cfg.start_timeout_s)
        if resync:
            self.sync(step=step)

    def sleep_rollouts(self) -> None:
        if self.cfg.colocate:
            self.rollouts.call_all("sleep")

    def wake_rollouts(self) -> None:
        if self.cfg.colocate:
            self.rollouts.call_all("wake_up")

    def state_dict(self) -> dict:
        return {"rollout_restarts": self.restarts}

    def load_state_dict(self, state: dict) -> None:
        self.restarts = int(state.get("rollout_restarts", 0))

    def rollout_pids(self) -> list[int]:
        return self.rollouts.call_all("pid")

    def close(self) -> None:
        self.learners.kill()
        self.rollouts.kill()
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)

