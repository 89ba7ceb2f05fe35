"""Rollout dump and replay.

`rollout.dump_dir` writes each GRPO step's training rollouts (after dynamic sampling) as two files:

    step_000012.safetensors   prompt_ids, prompt_mask, response_ids, response_mask, rollout_logprobs, truncated (uint8),
                              rewards, [temperatures], [prompt_expert_ids, response_expert_ids (MoE routing, int16)],
                              [context_mask, episode_stats (multi-turn episodes)];
                              metadata: group_size, policy_version, the step's reward stats
    step_000012.jsonl         one line per response: prompt, answer, response, reward, truncated

`trainer.replay: DIR` trains from such a dump instead of generating: step N reads step_N's rollouts and rewards, so a
loss can be debugged on fixed data without an engine. Files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tokenwise.rl.errors import ConfigError
from tokenwise.rl.types import RolloutBatch

_TENSORS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "rollout_logprobs", "truncated")
_OPTIONAL = ("temperatures", "prompt_expert_ids", "response_expert_ids", "context_mask", "episode_stats",
             "token_versions")


def _name(step: int) -> str:
    return f"step_{step:06d}"


def dump_rollouts(directory: str | Path, step: int, batch: RolloutBatch, rewards: Tensor, stats: dict) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: getattr(batch, k).contiguous() for k in _TENSORS}
    tensors["truncated"] = tensors["truncated"].to(torch.uint8)
    tensors["rewards"] = rewards.float().contiguous()
    for name in _OPTIONAL:
        if getattr(batch, name) is not None:
            tensors[name] = getattr(batch, name).contiguous()
    meta = {"group_size": str(batch.group_size), "policy_version": str(batch.policy_version),
            "stats": json.dumps({k: float(v) for k, v in stats.items()})}
    tmp = d / f".{_name(step)}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, d / f"{_name(step)}.safetensors")
    lines = [json.dumps({"prompt": p, "answer": a, "response": r, "reward": float(w), "truncated": bool(t)})
             for p, a, r, w, t in zip(batch.prompts, batch.answers, batch.responses, rewards.tolist(),
                                      batch.truncated.tolist())]
    tmp = d / f".{_name(step)}.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, d / f"{_name(step)}.jsonl")


def dumped_steps(directory: str | Path) -> list[int]:
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for f in d.iterdir() if (m := re.fullmatch(r"step_(\d+)\.safetensors", f.name)))


def _span(have: list[int]) -> str:
    return f"steps {have[0]}..{have[-1]}" if have else "no steps"


def check_replay(directory: str | Path, steps: int, *, routing: bool = False) -> None:
    """Before a replayed stage starts: the dump must hold rollouts up to step `steps` (grpo.steps), and with
    `routing` (algorithm.routing_replay) their recorded MoE experts."""
    have = dumped_steps(directory)
    if not have or have[-1] < steps:
        raise ConfigError(f"trainer.replay: '{directory}' holds rollouts of {_span(have)}, grpo.steps is {steps}")
    if routing:
        from safetensors import safe_open
        with safe_open(str(Path(directory) / f"{_name(have[0])}.safetensors"), framework="pt") as f:
            if "response_expert_ids" not in f.keys():
                raise ConfigError(f"algorithm.routing_replay: the rollouts in trainer.replay '{directory}' carry no "
                                  f"recorded MoE experts (dumped from a dense model, or before recording existed); "
                                  f"set algorithm.routing_replay: false")


def load_rollouts(directory: str | Path, step: int) -> tuple[RolloutBatch, Tensor, dict]:
    """(rollouts, rewards, reward stats) of one dumped step."""
    d = Path(directory)
    path = d / f"{_name(step)}.safetensors"
    if not path.exists() or not (d / f"{_name(step)}.jsonl").exists():
        raise ConfigError(f"trainer.replay: '{d}' has no rollouts for step {step} (it has {_span(dumped_steps(d))}); "
                          f"replay at most as many grpo.steps as were dumped")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    rows = [json.loads(line) for line in (d / f"{_name(step)}.jsonl").read_text().splitlines() if line]
    batch = RolloutBatch(
        **{k: t[k] for k in _TENSORS if k != "truncated"}, truncated=t["truncated"].bool(),
        prompts=[r["prompt"] for r in rows], answers=[r["answer"] for r in rows],
        responses=[r["response"] for r in rows], group_size=int(meta["group_size"]),
        policy_version=int(meta["policy_version"]), **{k: t.get(k) for k in _OPTIONAL})
    return batch, t["rewards"], json.loads(meta["stats"])
