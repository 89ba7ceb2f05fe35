"""Padding-free packing of rollout rows for the learner's forward passes (`trainer.packing`).

A padded micro-batch is [rows, longest prompt + longest response]: every row pays for the longest row, and every one
of a group's G responses recomputes the same prompt. A packed micro-batch lays the rows' real tokens end to end in a
few sequences ("bins") with per-row position ids and an attention mask that never lets a token see another row:

- `rows`: each row (prompt + response) is a segment; segments are packed first-fit-decreasing into bins.
- `groups`: the rows that share a prompt (a GRPO group, or the part of it in this micro-batch) become one segment,
  the prompt once and then each response: a response token attends to the prompt and to its own earlier tokens, with
  the position ids it has in its own row (the shared-prefix layout of Prefix Grouper, arXiv 2506.05433). The
  prompt's gradient is the sum over its responses, as it is when each row holds a copy.

Either way each response token's log-prob is computed from the same context as in the padded layout, so log-probs,
losses and gradients equal the padded ones up to floating-point summation order (tests/test_packing.py). The mask
is a 4-D boolean [bins, 1, L, L] (True: may attend), which both transformers models (SDPA / eager) and our decoder
take as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("none", "rows", "groups")
MIN_BIN = 64  # tokens: bins are at least this long, so short rows share one (attention per bin is quadratic)
MAX_SEGMENT = 2048  # tokens: a shared-prompt segment grows no longer (its dense mask is quadratic in its length)


@dataclass
class Packed:
    input_ids: Tensor     # [N, L] int64, bins of segments, right-padded with `pad_id`
    position_ids: Tensor  # [N, L] int64, each token's position in its own row
    mask: Tensor | None   # [N, 1, L, L] bool, True where query token may attend to key token (None: varlen, the
                          # attention finds the rows from the position ids)
    src: Tensor           # [K] int64, flat index into [N * L] of the hidden state that predicts each valid response
                          # token (the token before it), in row-major order of the response mask
    valid: Tensor         # [b, T] bool, the response tokens `src` lists (the response mask)
    tokens: int           # real (non-padding) tokens in the bins
    origin: Tensor | None = None  # [N, L] int64, flat index into the padded rows [b * (P + T)] (prompt columns, then
                                  # response columns) of each token (a shared prompt: its first row's); -1 padding

    def to(self, device: torch.device) -> "Packed":
        return Packed(self.input_ids.to(device), self.position_ids.to(device),
                      self.mask.to(device) if self.mask is not None else None,
                      self.src.to(device), self.valid.to(device), self.tokens,
                      self.origin.to(device) if self.origin is not None else None)

    def gather(self, values: Tensor, fill: int | float = 0) -> Tensor:
        """Per-token values of the padded rows [b, P + T, ...] laid out like the bins: [N, L, ...], `fill` on
        padding (e.g. a rollout's recorded MoE experts, trainer/learner.py)."""
        return _lay_out(values, self.origin, fill)


def _lay_out(values: Tensor, origin: Tensor, fill: int | float) -> Tensor:
    """values [b, P + T, ...] at each bin slot's origin [N, L] (-1: `fill`) → [N, L, ...]."""
    flat = values.reshape(-1, *values.shape[2:])[origin.clamp(min=0)]
    return flat.masked_fill((origin < 0).view(*origin.shape, *[1] * (values.dim() - 2)), fill)


def _segments(prompts: list[list[int]], responses: list[list[int]], share: bool,
              max_segment: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, rows) per segment: one row each, or (share) the rows with an identical prompt together, in the
    order their first row appears, as long as the segment stays within max_segment tokens (then a new one starts,
    with its own copy of the prompt)."""
    if not share:
        return [(p, [r]) for r, p in enumerate(prompts)]
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for r, p in enumerate(prompts):
        by_prompt.setdefault(tuple(p), []).append(r)
    out: list[tuple[list[int], list[int]]] = []
    for p, rows in by_prompt.items():
        cur: list[int] = []
        size = len(p)
        for r in rows:
            if cur and size + len(responses[r]) > max_segment:
                out.append((list(p), cur))
                cur, size = [], len(p)
            cur.append(r)
            size += len(responses[r])
        out.append((list(p), cur))
    return out


def _bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: segment indices per bin, each bin's total length at most `capacity` (a longer segment
    goes alone)."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for s in sorted(range(len(lengths)), key=lambda s: (-lengths[s], s)):
        for b, load in enumerate(loads):
            if load + lengths[s] <= capacity:
                bins[b].append(s)
                loads[b] += lengths[s]
                break
        else:
            bins.append([s])
            loads.append(lengths[s])
    return bins


def pack(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor, *, mode: str,
         pad_id: int = 0, min_bin: int = MIN_BIN, max_segment: int = MAX_SEGMENT, varlen: bool = False) -> Packed:
    """Pack b rows (left-padded prompts [b, P], right-padded responses [b, T] whose mask is a prefix of ones) in
    `mode` 'rows' or 'groups'. `varlen` ('rows' only): every row in one sequence and no mask; variable-length
    attention (flash-attention's varlen kernel under transformers' flash_attention_2, or transformers' own packed-
    sequence mask under SDPA) finds the rows where the position ids restart at 0."""
    if varlen and mode != "rows":
        raise ValueError("varlen packing lays out rows only (a shared prompt needs a mask)")
    if mode not in MODES[1:]:
        raise ValueError(f"packing mode must be 'rows' or 'groups', got {mode!r}")
    pm, rm = prompt_mask.bool().cpu(), response_mask.bool().cpu()
    n_resp = rm.sum(1).tolist()
    if not torch.equal(rm, torch.arange(rm.shape[1]) < rm.sum(1, keepdim=True)):
        raise ValueError("packing needs each response mask to be a prefix of ones (right-padded responses); "
                         "set trainer.packing: none for batches with masked tokens inside a response")
    prompts = [row[m].tolist() for row, m in zip(prompt_ids.cpu(), pm)]
    if not all(prompts):
        raise ValueError("packing needs at least one prompt token per row (the first response token is predicted "
                         "from the prompt's last); set trainer.packing: none")
    responses = [row[:n].tolist() for row, n in zip(response_ids.cpu(), n_resp)]
    segments = _segments(prompts, responses, mode == "groups", max_segment)
    lengths = [len(p) + sum(len(responses[r]) for r in rows) for p, rows in segments]
    bins = [list(range(len(segments)))] if varlen else _bins(lengths, max(max(lengths), min_bin))
    L = max(sum(lengths[s] for s in b) for b in bins)
    N = len(bins)
    seg = torch.full((N, L), -1, dtype=torch.long)     # segment of each token (-1: padding)
    branch = torch.full((N, L), -1, dtype=torch.long)  # response (row) a token belongs to (-1: the prompt)
    # every real token's flat slot, origin, segment and branch, gathered as Python ints and written at once
    slot: list[int] = []
    segl: list[int] = []
    brl: list[int] = []
    org: list[int] = []  # each token's flat index in the padded rows [b, P + T]
    width, P_pad = prompt_ids.shape[1] + response_ids.shape[1], prompt_ids.shape[1]
    pred: list[int] = []  # per valid response token, in row-major order of the mask: its predecessor's flat slot
    pred_of: dict[int, list[int]] = {}
    for b, members in enumerate(bins):
        at = b * L
        for s in members:
            p, rows = segments[s]
            P = len(p)
            slot += range(at, at + P)
            segl += [s] * P
            brl += [-1] * P
            org += range(rows[0] * width + P_pad - P, rows[0] * width + P_pad)
            last_prompt = at + P - 1
            at += P
            for r in rows:
                n = len(responses[r])
                slot += range(at, at + n)
                segl += [s] * n
                brl += [r] * n
                org += range(r * width + P_pad, r * width + P_pad + n)
                pred_of[r] = [last_prompt, *range(at, at + n - 1)] if n else []
                at += n
    for r in range(len(prompts)):
        pred += pred_of[r]
    flat = torch.tensor(slot, dtype=torch.long)
    seg.view(-1)[flat] = torch.tensor(segl, dtype=torch.long)
    branch.view(-1)[flat] = torch.tensor(brl, dtype=torch.long)
    src = torch.tensor(pred, dtype=torch.long)
    origin = torch.full((N, L), -1, dtype=torch.long)
    origin.view(-1)[flat] = torch.tensor(org, dtype=torch.long)
    # ids and positions are the padded rows' own, laid out by origin (a response token's position follows its
    # row's real prompt tokens)
    ids = _lay_out(torch.cat([prompt_ids.cpu(), response_ids.cpu()], 1), origin, pad_id)
    pos = _lay_out(torch.cat([pm.long().cumsum(1) - 1, pm.sum(1, keepdim=True) + torch.arange(rm.shape[1])], 1),
                   origin, 0)
    if varlen:
        return Packed(ids, pos, None, src, rm, len(slot), origin)
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    same_branch = (branch.unsqueeze(1) == -1) | (branch.unsqueeze(1) == branch.unsqueeze(2))
    mask = (q == k) & (q >= 0) & causal & same_branch
    mask |= torch.eye(L, dtype=torch.bool)  # a padding token sees itself only (finite SDPA output, never used)
    return Packed(ids, pos, mask.unsqueeze(1), src, rm, len(slot), origin)


def unpack(values: Tensor, valid: Tensor) -> Tensor:
    """Per-token values of the valid response tokens [K] → [b, T] with zeros elsewhere (differentiable)."""
    out = values.new_zeros(valid.shape)
    return out.masked_scatter(valid, values)
