"""Stop strings, the same for every rollout backend: a response ends with the token that completes the first
occurrence of any stop string. Applied to the engine's output, so both backends give identical results (the engines
may generate a few tokens past the stop; they are masked out and never trained on)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tokenwise.rl.types import RolloutBatch


def apply_stop_strings(batch: RolloutBatch, stop: list[str], tokenizer: Any) -> RolloutBatch:
    """Mask every token after the one completing a stop string; the text loses the stop string and what follows;
    such a response counts as ended (not truncated). Tokens up to and including the completing one stay valid."""
    if not stop:
        return batch
    mask, truncated = batch.response_mask.clone(), batch.truncated.clone()
    responses = list(batch.responses)
    for b in range(len(batch)):
        n = int(batch.response_mask[b].sum())
        ids = batch.response_ids[b, :n].tolist()

        def holds_stop(k: int) -> bool:
            return any(s in tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stop)

        if not holds_stop(n):
            continue
        lo, hi = 1, n  # the shortest prefix whose text holds a stop string (prefix texts only grow)
        while lo < hi:
            mid = (lo + hi) // 2
            if holds_stop(mid):
                hi = mid
            else:
                lo = mid + 1
        text = tokenizer.decode(ids[:lo], skip_special_tokens=True)
        mask[b, lo:] = 0.0
        truncated[b] = False
        responses[b] = text[:min(text.find(s) for s in stop if s in text)]
    return dataclasses.replace(batch, response_mask=mask, truncated=truncated, responses=responses,
                               rollout_logprobs=batch.rollout_logprobs * mask,
                               temperatures=None if batch.temperatures is None
                               else batch.temperatures * mask + (1 - mask),
                               token_versions=batch.token_versions.masked_fill(mask == 0, -1))
