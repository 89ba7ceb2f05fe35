"""Held-out evaluation: greedy decoding, exact-answer accuracy."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from rl.rewards import exact_answer, format_reward


def heldout_metrics(engine: Any, dataset: Dataset, *, num_prompts: int) -> dict[str, float]:
    rows = dataset.select(range(min(num_prompts, len(dataset)))).to_list()
    out = engine.generate(rows, n=1, greedy=True)
    n = len(out)
    correct = sum(exact_answer(prompt=p, response=r, answer=a, truncated=bool(t))
                  for p, r, a, t in zip(out.prompts, out.responses, out.answers, out.truncated))
    formatted = sum(format_reward(prompt=p, response=r, answer=a, truncated=bool(t))
                    for p, r, a, t in zip(out.prompts, out.responses, out.answers, out.truncated))
    return {"eval/accuracy": correct / n, "eval/format": formatted / n,
            "eval/response_len_mean": float(out.response_mask.sum()) / n, **engine.attention_sink(rows)}
