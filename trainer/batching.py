"""How one step's batch is cut for N learner ranks: rows balanced by token count, then micro-batches bounded by
rows and padded tokens, padded with zero-weight micro-batches so that every rank runs the same number of forward
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
        return (batch.prompt_mask.sum(1) + batch.response_mask.sum(1)).long().tolist()
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
    chunks: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for r in rows:
        new_longest = max(longest, tokens[r])
        if cur and (len(cur) >= max_rows or (max_tokens and (len(cur) + 1) * new_longest > max_tokens)):
            chunks.append(cur)
            cur, new_longest = [], tokens[r]
        cur.append(r)
        longest = new_longest
    if cur:
        chunks.append(cur)
    return chunks


def _equalize(per_rank: list[list[list[int]]], filler: int) -> list[list[Micro]]:
    """Pad every rank's list of chunks to the longest with zero-weight one-row passes over row `filler`."""
    n = max(1, max(len(c) for c in per_rank))
    return [[Micro(c) for c in chunks] + [Micro([filler], 0.0)] * (n - len(chunks)) for chunks in per_rank]


def plan_rows(rows: list[int], tokens: list[int], *, world: int, max_rows: int,
              max_tokens: int = 0) -> list[list[Micro]]:
    """Per rank, the micro-batches covering its token-balanced share of `rows`; equal counts across ranks."""
    shares = balance(rows, tokens, world)
    per_rank = [micro_split(s, tokens, max_rows=max_rows, max_tokens=max_tokens) for s in shares]
    return _equalize(per_rank, filler=rows[0])


def plan_updates(batch: Any, *, world: int, ppo_epochs: int, mini_batches: int, max_rows: int,
                 max_tokens: int = 0) -> list[list[Update]]:
    """GRPO: per rank, the optimizer steps of `ppo_epochs` passes, each pass splitting the batch by prompt groups
    into `mini_batches` steps. Every rank gets the same number of updates and, per update, of micro-batches."""
    G = batch.group_size
    groups = len(batch) // G
    tokens = row_tokens(batch)
    loss_tokens = batch.loss_tokens.sum(1).long().tolist()  # the token-mean denominator
    plans: list[list[Update]] = [[] for _ in range(world)]
    for _ in range(ppo_epochs):
        for m in range(mini_batches):
            lo, hi = m * groups // mini_batches, (m + 1) * groups // mini_batches
            rows = list(range(lo * G, hi * G))
            num_tokens = max(1, sum(loss_tokens[r] for r in rows))
            for rank, micros in enumerate(plan_rows(rows, tokens, world=world, max_rows=max_rows,
                                                    max_tokens=max_tokens)):
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
