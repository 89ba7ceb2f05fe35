"""DeepSpeed ZeRO for the learner ranks of cluster mode: process group, engine, reference, full weights, checkpoints.

Each learner actor calls `init_process_group` (env:// rendezvous at rank 0's address), then builds a `Learner` whose
optimizer is a `DeepSpeedOptimizer`. Gradient accumulation is ours: gradient_accumulation_steps is 1 (no loss
scaling) and the accumulation boundary is set by hand before each backward, True only for an update's last
micro-batch (DeepSpeed 0.19.8's `managed_gradient_accumulation: false` loses all but the last micro-batch's
gradients under ZeRO-3; measured). DeepSpeed averages
gradients over ranks; the learner multiplies each loss by world_size so the average is the sum token-mean needs.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

TAG = "state"


@dataclass
class DeepSpeedSpec:
    zero_stage: int = 2
    offload_optimizer: bool = False


def init_process_group(*, rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device,
                       timeout_s: float) -> None:
    """Join the learners' torch.distributed group: NCCL on GPU, gloo on CPU."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        # DeepSpeed compiles a shared-memory all-reduce op on first init (~45 s); gloo does not need it.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import torch._dynamo  # noqa: F401  (ZeRO-3 partitioning trips over dynamo if it is imported later)
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl", auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s), verbose=False)


def _config(spec: DeepSpeedSpec, dtype: torch.dtype, grad_clip: float) -> dict:
    zero: dict[str, Any] = {"stage": spec.zero_stage, "stage3_param_persistence_threshold": 0}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip, "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
    }


class _WeightsOnlyCheckpoints:
    """DeepSpeed's torch checkpoint engine, reading back with `weights_only=True` (its own loader unpickles
    arbitrary objects). The few DeepSpeed classes its files hold are allow-listed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        from deepspeed.utils.tensor_fragment import fragment_address
        try:
            from deepspeed.runtime.zero.config import ZeroStageEnum
            extra = [ZeroStageEnum]
        except ImportError:  # pragma: no cover
            extra = []
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, fragment_address, *extra]):
            return torch.load(path, map_location=map_location, weights_only=True)


class DeepSpeedOptimizer:
    """The same surface as trainer.learner.TorchOptimizer, on a DeepSpeed ZeRO engine."""

    def __init__(self, model: torch.nn.Module, optim: Any, total_updates: int, *, spec: DeepSpeedSpec,
                 dtype: torch.dtype) -> None:
        import deepspeed
        from tokenwise.trainer.schedule import warmup_cosine
        self.spec = spec
        base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=optim.lr,
                                 betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        scheduler = LambdaLR(base, warmup_cosine(optim.warmup_steps, total_updates, optim.min_lr_ratio))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=base, lr_scheduler=scheduler, config=_config(spec, dtype, optim.grad_clip))
        self.engine.checkpoint_engine = _WeightsOnlyCheckpoints(self.engine.checkpoint_engine)
        self.module = self.engine.module
        # forwards must go through the engine: its forward() advances ZeRO's micro-step counter, without which
        # ZeRO-3 overwrites instead of accumulating the gradients of an update's earlier micro-batches (measured)
        self.forward_module = self.engine

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return full_parameters(self.module, zero3=self.spec.zero_stage == 3)

    def save(self, path: Path, *, rank: int) -> None:
        self.engine.save_checkpoint(str(path / "deepspeed"), tag=TAG, save_latest=False)

    def load(self, path: Path, *, device: torch.device, dtype: torch.dtype) -> None:
        load_path, _ = self.engine.load_checkpoint(str(path / "deepspeed"), tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            from tokenwise.rl.errors import CheckpointError
            raise CheckpointError(f"checkpoint {path}: no DeepSpeed state under {path / 'deepspeed' / TAG}")


def full_parameters(module: torch.nn.Module, *, zero3: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict name, full tensor) one parameter at a time: under ZeRO-3 each is all-gathered just before it is
    yielded and released after, so the whole model is never materialised; the caller copies what it keeps."""
    if not zero3:
        yield from ((k, v.detach()) for k, v in module.state_dict().items())
        return
    import deepspeed
    names: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    for key, p in params.items():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            for name in names[key]:
                yield name, p.data.detach()
    for prefix_mod, buf_name, buf in _persistent_buffers(module):
        yield f"{prefix_mod}{buf_name}", buf.detach()


def _persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    for mod_name, mod in module.named_modules():
        for buf_name, buf in mod.named_buffers(recurse=False):
            if buf is not None and buf_name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}." if mod_name else ""), buf_name, buf


def frozen_reference(model: torch.nn.Module, *, spec: DeepSpeedSpec, dtype: torch.dtype) -> torch.nn.Module:
    """The reference policy: partitioned by ZeRO-3 inference when the learners run ZeRO-3, else a full copy."""
    if spec.zero_stage != 3:
        return model
    import deepspeed
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": dtype == torch.bfloat16},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine.module
