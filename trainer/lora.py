"""LoRA training (`model.lora`, peft): adapters on a frozen base, in debug and cluster mode (ZeRO-1/2).

- `add_adapters` wraps the loaded policy with peft (targets checked against the model, with a clear error);
  only the adapters require grad, so the optimizers get only them.
- `merged_state` is what leaves a learner: every weight under the checkpoint's own name, adapter deltas
  (alpha / r · B A, computed by peft per wrapped layer) added to the base weights, never merged in place (an
  in-place merge/unmerge per sync would let rounding drift the frozen base).
- `AdaptersOff` is the reference policy: the same model with its adapters switched off, i.e. the stage's start model.
- `load_adapter`: the adapter alone (peft's `adapter_model.safetensors` + `adapter_config.json`, written by
  `Learner.save_model` beside the merged model), for resuming.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tokenwise.rl.errors import CheckpointError, ConfigError

ADAPTER = "default"


def add_adapters(model: torch.nn.Module, spec: Any, *, seed: int) -> torch.nn.Module:
    """The model wrapped with fresh adapters (B = 0, so it computes what it did; A drawn from `seed`, so every run
    and every learner rank starts from the same adapters)."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules) or None,
                        target_parameters=list(spec.target_parameters) or None)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, config)
    except ValueError as e:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        params = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.dim() == 3})
        raise ConfigError(f"model.lora: {e} — this model's linear layers: {linears}; its 3-D parameters "
                          f"(target_parameters): {params or 'none'}") from None


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


def _clean(name: str) -> str:
    return name.replace(".base_layer", "")


@torch.no_grad()
def merged_state(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, weight with the adapters' deltas added) for every tensor of the base model. Each delta
    (B·A, the size of its weight) is made when its weight is yielded, so a weight sync or save holds one at a time."""
    from peft.tuners.lora import LoraLayer
    base = model.get_base_model()
    adapted: dict[str, list[Any]] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A and not module.disable_adapters:
            target = getattr(module, "parameter_name", None) or "weight"  # ParamWrapper adapts a named parameter
            adapted.setdefault(f"{_clean(name)}.{target}", []).append(module)
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        key = _clean(name)
        if key not in adapted:
            yield key, tensor.detach()
            continue
        merged = tensor.detach().clone()
        for module in adapted[key]:
            merged += module.get_delta_weight(ADAPTER).to(tensor.dtype)
        yield key, merged


class AdaptersOff:
    """The reference policy of a LoRA run: the policy's own modules with the adapters switched off."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, **kwargs: Any) -> Any:
        with self.model.disable_adapter():
            return self.model(**kwargs)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()


def load_adapter(model: torch.nn.Module, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"LoRA checkpoint: no adapter at {file}")
    result = set_peft_model_state_dict(model, load_file(str(file)))
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"LoRA checkpoint {file} does not fit this model's adapters: missing {missing[:3]}, "
                              f"unexpected {list(result.unexpected_keys)[:3]}")
