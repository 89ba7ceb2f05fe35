"""Held-out evaluation: greedy decoding, exact-answer accuracy (and, on a safety data set, mode following)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset

from rl.rewards import exact_answer, extract_answer, format_reward


def refusal_detector(data_cfg: Any) -> Callable[[str], bool] | None:
    """A safety recipe's refusal detector (`data.refusal_detector` function, else `data.refusal_patterns`); None for
    other data."""
    if getattr(data_cfg, "type", None) != "safety":
        return None
    if data_cfg.refusal_detector:
        from rl.rewards import load_function
        return load_function(data_cfg.refusal_detector, what="data.refusal_detector")
    from rl.refusal import RefusalDetector
    return RefusalDetector(data_cfg.refusal_patterns)


def heldout_metrics(engine: Any, dataset: Dataset, *, num_prompts: int,
                    refused: Callable[[str], bool] | None = None) -> dict[str, float]:
    """Greedy responses to the first `num_prompts` held-out rows: exact-answer accuracy, format, mean length; with
    `refused` (a safety data set), also `safety/follow/<mode>`: the share of responses that follow the row's mode."""
    rows = dataset.select(range(min(num_prompts, len(dataset)))).to_list()
    out = engine.generate(rows, n=1, greedy=True)
    n = len(out)
    correct = sum(exact_answer(prompt=p, response=r, answer=a, truncated=bool(t))
                  for p, r, a, t in zip(out.prompts, out.responses, out.answers, out.truncated))
    formatted = sum(format_reward(prompt=p, response=r, answer=a, truncated=bool(t))
                    for p, r, a, t in zip(out.prompts, out.responses, out.answers, out.truncated))
    metrics = {"eval/accuracy": correct / n, "eval/format": formatted / n,
               "eval/response_len_mean": float(out.response_mask.sum()) / n, **engine.attention_sink(rows)}
    if refused is not None:
        from rl.safety import mode_following_metrics
        metrics.update(mode_following_metrics(rows, out.responses, refused, lambda r: extract_answer(r) is not None))
    return metrics
