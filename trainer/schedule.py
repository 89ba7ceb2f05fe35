"""The learning-rate schedule both optimizers use (torch AdamW in debug mode, DeepSpeed in cluster mode)."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """lr multiplier: linear warm-up over `warmup` updates, then cosine from 1 to min_ratio at `total`."""
    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / warmup
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor
