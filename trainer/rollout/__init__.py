"""Rollout engines behind one interface: `generate(rows, n=G) -> RolloutBatch` and `load_weights(state, version=)`
(or begin_sync / load_bucket / finish_sync for buckets), `sleep` / `wake_up`, `attention_sink(rows)`.

`rollout.engine: hf` is transformers `generate` (CPU/debug/one GPU); `vllm` is trainer/rollout/vllm.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from tokenwise.trainer.loading import PromptFormatter, load_causal_lm, model_eos_ids
from tokenwise.trainer.rollout.hf import HFRollout


def build_rollout(cfg: Any, *, model_dir: str | Path, tokenizer: Any, formatter: PromptFormatter, dtype: torch.dtype,
                  device: torch.device, seed: int = 0, model: PreTrainedModel | None = None) -> Any:
    """cfg is trainer.config.RolloutConfig. The engine loads its own copy of the policy from `model_dir`; the hf
    engine may instead be handed `model` (debug mode shares the learner's model object). With `rollout.env` the
    engine runs multi-turn episodes (trainer/rollout/multiturn.py)."""
    engine = _engine(cfg, model_dir=model_dir, tokenizer=tokenizer, formatter=formatter, dtype=dtype, device=device,
                     seed=seed, model=model)
    env = getattr(cfg, "env", None)
    if env is None or env.type == "none":
        return engine
    from tokenwise.trainer.rollout.multiturn import MultiTurnRollout
    return MultiTurnRollout(engine, tokenizer=tokenizer, formatter=formatter, cfg=env)


def _engine(cfg: Any, *, model_dir: str | Path, tokenizer: Any, formatter: PromptFormatter, dtype: torch.dtype,
            device: torch.device, seed: int, model: PreTrainedModel | None) -> Any:
    if cfg.engine == "vllm" and model is None:
        from tokenwise.trainer.rollout.vllm import VLLMRollout, unsupported_reason
        reason = unsupported_reason(model_dir)
        if reason is None:
            return VLLMRollout(model_dir, tokenizer, formatter, cfg=cfg, eos_ids=model_eos_ids(model_dir, tokenizer),
                               dtype=dtype, device=device, seed=seed)
        from tokenwise.trainer.logging import console
        console.print(f"[yellow]rollout.engine vllm: {reason}; this engine generates with the transformers backend "
                      f"instead[/]")
    if model is None:
        model = load_causal_lm(model_dir, dtype=dtype, device=device)
    return HFRollout(model, tokenizer, formatter, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, stop=cfg.stop)
