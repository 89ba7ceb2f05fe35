"""Held-out evaluation: greedy exact-answer accuracy, pass@k and mean@k from k sampled responses per prompt (and, on
a safety data set, mode following)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset

from tokenwise.rl.rewards import exact_answer, extract_answer, format_reward


def engine_for(model_dir: str, *, cfg: Any = None, kind: str = "hf", max_new_tokens: int | None = None,
               system_prompt: str | None = None, serving_prefix: bool = True, what: str = "model") -> Any:
    """A rollout engine on `model_dir` built as a run builds it: the run's rollout, data and device settings (`cfg`,
    else the defaults), backend `kind`, and the model's serving.json prefix unless `serving_prefix` is false."""
    from tokenwise.trainer.config import RolloutConfig
    from tokenwise.trainer.loading import PromptFormatter, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
    from tokenwise.trainer.ping import read_serving
    from tokenwise.trainer.rollout import build_rollout
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
        from tokenwise.rl.rewards import load_function
        return load_function(data_cfg.refusal_detector, what="data.refusal_detector")
    from tokenwise.rl.refusal import RefusalDetector
    return RefusalDetector(data_cfg.refusal_patterns)


# The curves.png panel of held-out accuracy: greedy, and the sampled mean@k / pass@j when eval.k > 0.
EVAL_PANEL = ("eval/accuracy", "eval/mean@*", "eval/pass@*")


def headline_sampled(metrics: dict) -> list[str]:
    """The sampled metrics worth a line on the terminal: mean@k and pass@k for the largest k logged."""
    passes = [k for k in metrics if k.startswith("eval/pass@")]
    return [k for k in metrics if k.startswith("eval/mean@")] + passes[-1:]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), written as a product so that it never forms large binomials."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(k: int) -> list[int]:
    """The j's of pass@j reported from k samples per prompt: the powers of two from 2 below k, and k (pass@1 is
    mean@k, logged under that name)."""
    return sorted({2 ** i for i in range(1, k.bit_length()) if 2 ** i < k} | {k})


def _correct(out: Any) -> list[float]:
    return [exact_answer(prompt=p, response=r, answer=a, truncated=bool(t))
            for p, r, a, t in zip(out.prompts, out.responses, out.answers, out.truncated)]


def sampled_metrics(engine: Any, rows: list[dict], *, k: int, temperature: float, seed: int) -> dict[str, float]:
    """k responses per row sampled at `temperature` (seeded, so every evaluation draws the same way): `eval/mean@k`
    (the mean accuracy of the samples, = pass@1) and `eval/pass@j` for j in pass_ks(k), the unbiased estimator
    averaged over rows."""
    out = engine.generate(rows, n=k, seed=seed, temperature=temperature)
    correct = _correct(out)
    counts = [int(sum(correct[i * k:(i + 1) * k])) for i in range(len(rows))]
    metrics = {f"eval/mean@{k}": sum(counts) / (k * len(rows))}
    for j in pass_ks(k):
        metrics[f"eval/pass@{j}"] = sum(pass_at_k(k, c, j) for c in counts) / len(rows)
    return metrics


def heldout_metrics(engine: Any, dataset: Dataset, *, num_prompts: int, refused: Callable[[str], bool] | None = None,
                    k: int = 0, temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Greedy responses to the first `num_prompts` held-out rows: exact-answer accuracy, format, mean length; with
    k > 0 also pass@j / mean@k from k samples per row (`sampled_metrics`); with `refused` (a safety data set), also
    `safety/follow/<mode>`: the share of responses that follow the row's mode."""
    rows = dataset.select(range(min(num_prompts, len(dataset)))).to_list()
    out = engine.generate(rows, n=1, greedy=True)
    n = len(out)
    correct = sum(_correct(out))
    formatted = sum(format_reward(prompt=p, response=r, answer=a, truncated=bool(t))
                    for p, r, a, t in zip(out.prompts, out.responses, out.answers, out.truncated))
    metrics = {"eval/accuracy": correct / n, "eval/format": formatted / n,
               "eval/response_len_mean": float(out.response_mask.sum()) / n, **engine.attention_sink(rows)}
    if out.episode_stats is not None:  # multi-turn episodes: turns, tool use and tool errors of the greedy episodes
        from tokenwise.trainer.rollout.multiturn import episode_metrics
        episodes = episode_metrics(out, torch.tensor(_correct(out)))
        metrics.update({"eval/" + k.removeprefix("env/"): v for k, v in episodes.items()
                        if k in ("env/turns_mean", "env/tool_use_frac", "env/tool_calls_mean", "env/tool_error_frac",
                                 "env/cut_frac")})
    if k:
        metrics.update(sampled_metrics(engine, rows, k=k, temperature=temperature, seed=seed))
    if refused is not None:
        from tokenwise.rl.safety import mode_following_metrics
        metrics.update(mode_following_metrics(rows, out.responses, refused, lambda r: extract_answer(r) is not None))
    return metrics


def run_heldout_eval(engine: Any, cfg: Any, dataset: Dataset, *, num_prompts: int | None = None) -> dict[str, float]:
    """heldout_metrics with the run's settings (`cfg` a RunConfig): eval.num_prompts (unless given), eval.k,
    eval.temperature, the run seed for sampling, and the safety refusal detector."""
    e = cfg.eval
    return heldout_metrics(engine, dataset, num_prompts=num_prompts or e.num_prompts, refused=refusal_detector(cfg.data),
                           k=e.k, temperature=e.temperature, seed=cfg.seed)
