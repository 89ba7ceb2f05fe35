"""Reward functions: registered by name, called once per response, returning a float.

A reward has the signature `fn(*, prompt: str, response: str, answer: str, truncated: bool) -> float`. The recipe's
`rewards:` list names them with weights; `compute_rewards` sums them. A reward that raises fails the step with a
`RewardError` naming the reward and the prompt.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from rl.errors import RewardError
from rl.registry import Registry

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


def load_function(spec: str, *, what: str) -> RewardFn:
    """'package.module:function' or 'path/to/file.py:function' → the function. `what` names the recipe key."""
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise FileNotFoundError(f"file '{path}' does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"tokenwise_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except Exception as e:  # import errors of user code come in every type
        raise RewardError(f"{what}: cannot load {spec!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          ) from None
    if not callable(fn):
        raise RewardError(f"{what}: {spec!r} is not callable")
    return fn


def compute_rewards(specs: Sequence[tuple[str, float, RewardFn]], *, prompts: Sequence[str],
                    responses: Sequence[str], answers: Sequence[str],
                    truncated: Sequence[bool]) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of rewards per response → ([B] float32, {'reward/<name>': mean of the raw reward}).
    `specs` lists (name, weight, function)."""
    total = torch.zeros(len(responses), dtype=torch.float32)
    means = {}
    for name, weight, fn in specs:
        values = []
        for prompt, response, answer, trunc in zip(prompts, responses, answers, truncated):
            try:
                value = float(fn(prompt=prompt, response=response, answer=answer, truncated=bool(trunc)))
            except Exception as e:  # a user's reward may raise anything; report which one and on what
                detail = str(e).splitlines()[0] if str(e) else ""
                raise RewardError(f"reward '{name}' raised {type(e).__name__}: {detail} on prompt {prompt!r} "
                                  f"(response {response!r})") from e
            values.append(value)
        raw = torch.tensor(values, dtype=torch.float32)
        total += weight * raw
        means[f"reward/{name}"] = raw.mean().item()
    return total, means


def reward_specs(configs: Sequence) -> list[tuple[str, float, RewardFn]]:
    """The recipe's `rewards:` entries (trainer.config reward dataclasses, duck-typed) → (name, weight, function)."""
    specs = []
    for i, cfg in enumerate(configs):
        if cfg.type == "python":
            name = cfg.function.rpartition(":")[2]
            specs.append((name, cfg.weight, load_function(cfg.function, what=f"rewards[{i}].function")))
        else:
            specs.append((cfg.type, cfg.weight, REWARDS.get(cfg.type)))
    return specs
