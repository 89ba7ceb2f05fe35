"""Reward functions: registered by name, called once per response, returning a float.

A reward has the signature `fn(*, prompt: str, response: str, answer: str, truncated: bool) -> float`. The recipe's
`rewards:` list names them with weights; `compute_rewards` sums them. A reward that raises fails the step with a
`RewardError` naming the reward and the prompt; one that returns NaN or an infinity with a `NonFiniteError`. Your
own (`python`) rewards run in a process of their own with a timeout per call (trainer/reward_process.py).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch
from torch import Tensor

from tokenwise.rl.errors import NonFiniteError, RewardCallFailed, RewardError
from tokenwise.rl.importing import first_line, import_function
from tokenwise.rl.registry import Registry

RewardFn = Callable[..., float]
REWARDS: Registry[RewardFn] = Registry("reward")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def normalize_answer(text: str) -> str:
    """Strip spaces, thousands separators and a trailing period; write integral numbers without decimals."""
    text = text.strip().replace(",", "").rstrip(".").strip()
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() and "e" not in text.lower() else text


def extract_answer(response: str) -> str | None:
    """The final answer of a response: after the last '####', else the last \\boxed{...}, else the last number."""
    if "####" in response:
        tail = response.rsplit("####", 1)[1].strip().splitlines()
        return normalize_answer(tail[0]) if tail and tail[0].strip() else None
    boxed = _BOXED.findall(response)
    if boxed:
        return normalize_answer(boxed[-1])
    numbers = _NUMBER.findall(response)
    if numbers:
        return normalize_answer(numbers[-1])
    return None


@REWARDS.register("exact_answer")
def exact_answer(*, prompt: str, response: str, answer: str, truncated: bool) -> float:
    """1.0 when the extracted answer equals the normalised reference answer, else 0.0."""
    got = extract_answer(response)
    return float(got is not None and got == normalize_answer(answer))


@REWARDS.register("format")
def format_reward(*, prompt: str, response: str, answer: str, truncated: bool) -> float:
    """1.0 when the response was closed by the end-of-turn token and holds an extractable answer, else 0.0."""
    return float(not truncated and extract_answer(response) is not None)


@REWARDS.register("math_verify")
def math_verify_reward(*, prompt: str, response: str, answer: str, truncated: bool) -> float:
    """1.0 when Hugging Face's math-verify finds the response's final answer mathematically equal to the reference
    (LaTeX or plain: \\frac{1}{2} = 0.5 = 50\\%, \\boxed{}, units and degrees dropped, 2\\sqrt{2} = \\sqrt{8}), else
    0.0. The reference is read as LaTeX (wrapped in $...$ unless it has its own delimiters or \\boxed)."""
    import threading
    from math_verify import parse, verify
    # math-verify bounds parsing and comparison with SIGALRM, which only the main thread may use
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_text = answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"
    gold = parse(gold_text, parsing_timeout=timeout) or parse(answer, parsing_timeout=timeout)
    pred = parse(response, parsing_timeout=timeout)
    return float(bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=timeout))


def load_function(spec: str, *, what: str) -> RewardFn:
    """'package.module:function' or 'path/to/file.py:function' → the function, imported in this process (refusal
    detectors, tests). `what` names the recipe key in errors."""
    try:
        fn = import_function(spec)
    except Exception as e:  # import errors of user code come in every type
        raise RewardError(f"{what}: cannot load {spec!r}: {first_line(e)}") from None
    if not callable(fn):
        raise RewardError(f"{what}: {spec!r} is not callable")
    return fn


def _failure(name: str, what: str, prompt: str, response: str) -> str:
    return f"reward '{name}' {what} on prompt {prompt!r} (response {response!r})"


def compute_rewards(specs: Sequence[tuple[str, float, RewardFn]], *, prompts: Sequence[str],
                    responses: Sequence[str], answers: Sequence[str],
                    truncated: Sequence[bool]) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of rewards per response → ([B] float32, {'reward/<name>': mean of the raw reward}).
    `specs` lists (name, weight, function). A reward that raises, times out or ends its process raises RewardError;
    one that returns NaN or an infinity raises NonFiniteError; both name the reward, the prompt and the response."""
    total = torch.zeros(len(responses), dtype=torch.float32)
    means = {}
    items = [dict(prompt=p, response=r, answer=a, truncated=bool(t))
             for p, r, a, t in zip(prompts, responses, answers, truncated)]
    for name, weight, fn in specs:
        if hasattr(fn, "batch"):  # a reward living elsewhere (trainer/reward_process.py): one round trip a batch
            try:
                values = fn.batch(items)
            except RewardCallFailed as e:
                item = items[e.index]
                error = RewardError(_failure(name, e.reason, item["prompt"], item["response"]))
                error.detail = e.detail
                raise error from None
        else:
            values = []
            for item in items:
                try:
                    values.append(float(fn(**item)))
                except Exception as e:  # a user's reward may raise anything; report which one and on what
                    raise RewardError(_failure(name, f"raised {first_line(e)}", item["prompt"], item["response"])) from e
        for item, value in zip(items, values):
            if not math.isfinite(value):
                raise NonFiniteError(_failure(name, f"returned {value}", item["prompt"], item["response"]) +
                                     "; rewards must be finite numbers")
        raw = torch.tensor(values, dtype=torch.float32)
        total += weight * raw
        means[f"reward/{name}"] = raw.mean().item()
        if hasattr(fn, "take_stats"):  # e.g. the sandbox's counts of failed runs (trainer/sandbox.py)
            means.update(fn.take_stats())
    return total, means
