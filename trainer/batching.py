"""How one step's batch is cut for N learner ranks: rows (or, packing whole prompt groups, groups) balanced by token
count, then micro-batches bounded by rows and tokens (padded, or packed: trainer/packing.py), padded with zero-weight
micro-batches so that every rank runs the same number of forward
and backward passes (ZeRO-2/3 reduce and gather inside them: unequal counts would deadlock the group).

Debug mode uses the same plans with one rank, so both modes compute the same sums in the same order per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Micro:
    rows: list[int]      # row indices into the step's batch
    weight: float = 1.0  # 0.0: a padding pass (keeps collectives in step); its loss is multiplied by 0


@dataclass
class Update:
    """One optimizer step as seen by one rank: its micro-batches and the token count of the whole mini-batch
    (over all ranks), which token-mean divides by."""
    micros: list[Micro]
    num_tokens: int
    num_seqs: int = 1  # responses in the whole mini-batch (the seq-mean aggregations divide by it)


def row_tokens(batch: Any) -> list[int]:
    """Valid tokens per row (prompt + response for rollouts; attention mask for SFT batches)."""
    if hasattr(batch, "response_mask"):
        return (batch.prompt_mask.sum(1) + batch.present_mask.sum(1)).long().tolist()
    return batch.attention_mask.sum(1).long().tolist()


def balance(rows: list[int], tokens: list[int], parts: int) -> list[list[int]]:
    """Split rows into `parts` lists of near-equal token totals (longest first onto the lightest part); each list
    keeps the rows' original order. With one part: all rows, in order."""
    if parts == 1:
        return [list(rows)]
    loads = [0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for r in sorted(rows, key=lambda r: (-tokens[r], r)):
        k = min(range(parts), key=lambda i: (loads[i], len(out[i]), i))
        out[k].append(r)
        loads[k] += tokens[r]
    return [sorted(o) for o in out]


def micro_split(rows: list[int], tokens: list[int], *, max_rows: int, max_tokens: int = 0) -> list[list[int]]:
    """Consecutive chunks of at most max_rows rows and (if max_tokens) at most max_tokens padded tokens
    (rows x longest row); a single row longer than the budget goes alone."""
    return [[r for u in c for r in u] for c in _split_units([[r] for r in rows], tokens, tokens, max_rows=max_rows,
                                                             max_tokens=max_tokens, packed=False)]


def _split_units(units: list[list[int]], cost: list[int], tokens: list[int], *, max_rows: int, max_tokens: int,
                 packed: bool) -> list[list[list[int]]]:
    """Consecutive chunks of units (lists of rows; unit i costs cost[i] tokens when packed), each of at most
    max_rows rows and, if max_tokens, at most max_tokens tokens: packed tokens (the units' costs) or padded ones
    (rows x longest row). A unit over a budget goes alone."""
    chunks: list[list[list[int]]] = []
    cur: list[list[int]] = []
    n_rows = longest = load = 0
    for i, unit in enumerate(units):
        new_longest = max([longest] + [tokens[r] for r in unit])
        size = load + cost[i] if packed else (n_rows + len(unit)) * new_longest
        if cur and (n_rows + len(unit) > max_rows or (max_tokens and size > max_tokens)):
            chunks.append(cur)
            cur, n_rows, load, new_longest = [], 0, 0, max(tokens[r] for r in unit)
        cur.append(unit)
        n_rows, load, longest = n_rows + len(unit), load + cost[i], new_longest
    if cur:
        chunks.append(cur)
    return chunks


def _equalize(per_rank: list[list[list[int]]], filler: int) -> list[list[Micro]]:
    """Pad every rank's list of chunks to the longest with zero-weight one-row passes over row `filler`."""
    n = max(1, max(len(c) for c in per_rank))
    return [[Micro(c) for c in chunks] + [Micro([filler], 0.0)] * (n - len(chunks)) for chunks in per_rank]


def plan_rows(rows: list[int], tokens: list[int], *, world: int, max_rows: int, max_tokens: int = 0,
              packing: str = "none", prompt_tokens: list[int] | None = None,
              group_size: int = 1) -> list[list[Micro]]:
    """Per rank, the micro-batches covering its token-balanced share of `rows`; equal counts across ranks.

    `packing` (trainer/packing.py) changes what a micro-batch costs: 'none' pads (rows x longest), 'rows' and
    'groups' count real tokens, and 'groups' keeps the rows of a prompt group (rows [gG, (g+1)G), G = group_size)
    together, on one rank and in one micro-batch where max_rows allows, costing their prompt once."""
    if packing == "groups" and prompt_tokens is not None and group_size > 1:
        runs: dict[int, list[int]] = {}
        for r in rows:
            runs.setdefault(r // group_size, []).append(r)
        units = [run[i:i + max_rows] for run in runs.values() for i in range(0, len(run), max_rows)]
        cost = [prompt_tokens[u[0]] + sum(tokens[r] - prompt_tokens[r] for r in u) for u in units]
    else:
        units, cost = [[r] for r in rows], [tokens[r] for r in rows]
    shares = balance(list(range(len(units))), cost, world)
    per_rank = [[[r for u in chunk for r in u]
                 for chunk in _split_units([units[i] for i in share], [cost[i] for i in share], tokens,
                                           max_rows=max_rows, max_tokens=max_tokens, packed=packing != "none")]
                for share in shares]
    return _equalize(per_rank, filler=rows[0])


def plan_updates(batch: Any, *, world: int, ppo_epochs: int, mini_batches: int, max_rows: int,
                 max_tokens: int = 0, packing: str = "none") -> list[list[Update]]:
    """GRPO: per rank, the optimizer steps of `ppo_epochs` passes, each pass splitting the batch by prompt groups
    into `mini_batches` steps. Every rank gets the same number of updates and, per update, of micro-batches."""
    G = batch.group_size
    groups = len(batch) // G
    tokens = row_tokens(batch)
    prompt_tokens = batch.prompt_mask.sum(1).long().tolist()
    loss_tokens = batch.loss_tokens.sum(1).long().tolist()  # the token-mean denominator
    plans: list[list[Update]] = [[] for _ in range(world)]
    for _ in range(ppo_epochs):
        for m in range(mini_batches):
            lo, hi = m * groups // mini_batches, (m + 1) * groups // mini_batches
            rows = list(range(lo * G, hi * G))
            num_tokens = max(1, sum(loss_tokens[r] for r in rows))
            for rank, micros in enumerate(plan_rows(rows, tokens, world=world, max_rows=max_rows,
                                                    max_tokens=max_tokens, packing=packing,
                                                    prompt_tokens=prompt_tokens, group_size=G)):
                plans[rank].append(Update(micros, num_tokens, len(rows)))
    return plans


def plan_sft(batch: Any, *, world: int, max_rows: int) -> list[Update]:
    """SFT: one optimizer step; per rank its micro-batches and the global count of target tokens."""
    num_tokens = max(1, int(batch.loss_mask[:, 1:].sum()))
    tokens = row_tokens(batch)
    micros = plan_rows(list(range(len(batch))), tokens, world=world, max_rows=max_rows)
    return [Update(m, num_tokens) for m in micros]


def gather_rows(parts: list[tuple[list[int], torch.Tensor]], num_rows: int) -> torch.Tensor:
    """Reassemble per-rank row results [(rows, tensor[len(rows), ...]), ...] into one tensor in row order."""
    first = parts[0][1]
    out = torch.zeros((num_rows, *first.shape[1:]), dtype=first.dtype)
    for rows, values in parts:
        out[torch.as_tensor(rows, dtype=torch.long)] = values
    return out
