"""PING (ALGORITHMS.md §10): find an assistant prefix that keeps a model answering benign requests and refusing
harmful ones, and serve with it.

- The prefix pre-fills the assistant turn after the generation prompt (`PromptFormatter`, row key `prefix`), in
  both rollout backends; the output is prefix + continuation (`with_prefix`).
- `score_prefix`: greedy outputs of the model under test on a benign and a harmful prompt set → rl.safety.prefix_score.
- Candidate generators (pluggable: any `fn(examples, n, round) -> list[str]`): `seed_list_generator` (variations of a
  list of seed prefixes) and `engine_generator` (any local model through our rollout engine, sampling prefixes from
  an instruction that shows the current examples).
- The chosen prefix is written to the model directory's `serving.json` (`assistant_prefix`), which `tokenwise eval`
  applies; `rollout.ping` applies it in RL rollouts to prompts of the listed kinds.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenwise.rl.safety import prefix_score

SERVING_FILE = "serving.json"

GENERATOR_INSTRUCTION = "Write a short reply opening that refuses harm but helps. Examples: {examples}"


def with_prefix(rows: Sequence[dict], prefix: str) -> list[dict]:
    return [{**r, "prefix": prefix} for r in rows]


def rollout_rows(rows: Sequence[dict], ping_prefix: str | None, ping_kinds: Sequence[str]) -> list[dict]:
    """RL rollouts under PING (rollout.ping_prefix): the rows whose `kind` is one of ping_kinds get the prefix
    pre-filled in their (first) assistant turn; the others, and every row without a prefix set, are unchanged."""
    if ping_prefix is None:
        return list(rows)
    return [{**r, "prefix": ping_prefix} if r.get("kind") in ping_kinds else r for r in rows]


def outputs(engine: Any, rows: Sequence[dict]) -> list[str]:
    """Greedy outputs as a user sees them: the prefix the formatter pre-filled (the row's, else the engine's
    assistant_prefix) + the model's continuation."""
    batch = engine.generate(list(rows), n=1, greedy=True)
    default = engine.format.assistant_prefix
    return [(default if r.get("prefix") is None else r["prefix"]) + resp for r, resp in zip(rows, batch.responses)]


def score_prefix(engine: Any, benign: Sequence[dict], harmful: Sequence[dict], refused: Callable[[str], bool],
                 prefix: str) -> dict[str, float]:
    """PING's score of one prefix on the model behind `engine` (0 ≤ score ≤ 2), judged on the outputs (prefix +
    continuation): a prefix that is itself a refusal refuses everything and scores at most 1."""
    return prefix_score(outputs(engine, with_prefix(benign, prefix)), outputs(engine, with_prefix(harmful, prefix)),
                        refused)


def seed_list_generator(seeds: Sequence[str], *, seed: int = 0) -> Callable[[list[str], int, int], list[str]]:
    """Candidates from a fixed list: each round, n draws (seeded by the round) from the seeds and the current
    examples, some joined pairwise (two short prefixes in a row)."""
    def generate(examples: list[str], n: int, rnd: int) -> list[str]:
        rng = random.Random(seed * 1_000_003 + rnd)
        pool = list(dict.fromkeys([*examples, *seeds]))
        out = []
        for _ in range(n):
            a = rng.choice(pool)
            out.append(a if rng.random() < 0.5 else f"{a} {rng.choice(pool)}")
        return out
    return generate


def engine_generator(engine: Any, *, instruction: str = GENERATOR_INSTRUCTION, max_examples: int = 3,
                     max_chars: int = 120) -> Callable[[list[str], int, int], list[str]]:
    """Candidates sampled from any local model through a rollout engine (its own sampling settings), prompted with
    the instruction and up to `max_examples` current examples; responses are cut at the first line break and to
    `max_chars`."""
    def generate(examples: list[str], n: int, rnd: int) -> list[str]:
        shown = " | ".join(examples[:max_examples]) if examples else "(none yet)"
        batch = engine.generate([{"prompt": instruction.format(examples=shown), "answer": ""}], n=n, seed=rnd)
        return [r.strip().splitlines()[0][:max_chars] if r.strip() else "" for r in batch.responses]
    return generate


def read_serving(model_dir: str | Path) -> dict:
    path = Path(model_dir) / SERVING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_serving(model_dir: str | Path, **settings: Any) -> Path:
    path = Path(model_dir) / SERVING_FILE
    merged = {**read_serving(model_dir), **settings}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(path)
    return path


def distill_triples(engine: Any, rows: Sequence[dict], instructions: dict[str, str]) -> list[dict]:
    """Self-distillation for co-training (§9): each mode's response is the model's greedy answer with that mode's
    instruction as the system prompt; the triple keeps the request without the instruction, so training on it with
    the mode's magic token teaches the token to stand for the instruction."""
    triples = []
    for mode, instruction in instructions.items():
        batch = engine.generate([{"prompt": r["prompt"], "answer": "", "system": instruction, "prefix": ""}
                                 for r in rows], n=1, greedy=True)
        triples += [{"prompt": r["prompt"], "mode": mode, "response": response, "kind": r.get("kind") or "benign",
                     "answer": str(r.get("answer") or "")} for r, response in zip(rows, batch.responses)]
    return triples
