"""Held-out evaluation: greedy decoding, exact-answer accuracy (and, on a safety data set, mode following)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset

from rl.rewards import exact_answer, extract_answer, format_reward


def engine_for(model_dir: str, *, cfg: Any = None, kind: str = "hf", max_new_tokens: int | None = None,
               system_prompt: str | None = None, serving_prefix: bool = True, what: str = "model") -> Any:
    """A rollout engine on `model_dir` built as a run builds it: the run's rollout, data and device settings (`cfg`,
    else the defaults), backend `kind`, and the model's serving.json prefix unless `serving_prefix` is false."""
    from trainer.config import RolloutConfig
    from trainer.loading import PromptFormatter, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
    from trainer.ping import read_serving
    from trainer.rollout import build_rollout
    device = resolve_device(cfg.trainer.device if cfg else "auto")
    dtype = resolve_dtype(cfg.model.dtype if cfg else "auto", device)
    tokenizer = load_tokenizer(model_dir, what=what)
    model = (load_causal_lm(model_dir, dtype=dtype, device=device, what=what).eval() if kind == "hf"
             else None)  # the vllm engine loads the directory itself
    rollout = RolloutConfig(**{**(vars(cfg.rollout) if cfg else {}), "engine": kind,
                               **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})})
    formatter = PromptFormatter(
        tokenizer, system_prompt=system_prompt if system_prompt is not None else (cfg.data.system_prompt if cfg else None),
        use_chat_template=cfg.data.use_chat_template if cfg else True,
        assistant_prefix=read_serving(model_dir).get("assistant_prefix", "") if serving_prefix else "")
    return build_rollout(rollout, model_dir=model_dir, tokenizer=tokenizer, formatter=formatter, dtype=dtype,
                         device=device, seed=cfg.seed if cfg else 0, model=model)


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
