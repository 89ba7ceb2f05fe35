"""Order statistics over all of a step's tokens, at any size.

`torch.quantile` refuses inputs of more than 2^24 elements (a step of 4,096 responses x 4,096 tokens has 2^24);
`quantile` here gives the same values (linear interpolation between the two neighbouring order statistics) from one
`torch.sort`, which has no such limit. (Not `torch.kthvalue`: its selection went quadratic on sorted input here —
minutes for the 0.9-quantile of 2^24 descending values.)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def quantile(values: Tensor, q: float | Sequence[float]) -> Tensor:
    """The q-quantile(s) of a 1-D tensor, as torch.quantile(values, q) with interpolation 'linear': a 0-d tensor for
    a float q, a 1-D tensor for a sequence. Raises ValueError on an empty tensor or q outside [0, 1]."""
    x = values.reshape(-1)
    n = x.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    qs = [q] if isinstance(q, (int, float)) else list(q)
    ordered = torch.sort(x).values
    out = []
    for p in qs:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"quantile q must be in [0, 1], got {p}")
        pos = p * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo]))
    result = torch.stack(out)
    return result[0] if isinstance(q, (int, float)) else result
