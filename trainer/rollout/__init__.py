"""Rollout engines behind one interface: `generate(rows, n=G) -> RolloutBatch` and `load_weights(state, version=)`.

`rollout.engine: hf` is transformers `generate` (CPU/debug/one GPU).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from trainer.loading import PromptFormatter
from trainer.rollout.hf import HFRollout


def build_rollout(cfg: Any, *, model: PreTrainedModel, tokenizer: Any, formatter: PromptFormatter) -> HFRollout:
    """cfg is trainer.config.RolloutConfig; `model` is the engine's own copy of the policy."""
    return HFRollout(model, tokenizer, formatter, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
