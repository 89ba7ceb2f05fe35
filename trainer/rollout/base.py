"""What every rollout engine shares: weights arrive in buckets (begin_sync, load_bucket..., finish_sync)."""

from __future__ import annotations

import re

import torch


class BucketedSync:
    """load_weights(state_dict, version) as one bucket; engines implement begin_sync / load_bucket / finish_sync."""

    def begin_sync(self) -> None:
        raise NotImplementedError

    def load_bucket(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def finish_sync(self, version: int) -> None:
        raise NotImplementedError

    def load_weights(self, state_dict: dict[str, torch.Tensor], *, version: int) -> None:
        self.begin_sync()
        self.load_bucket(state_dict)
        self.finish_sync(version)


_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def weight_group(name: str) -> str:
    """The unit an engine loads at once: a decoder layer ('model.layers.3') or, outside the layers, the module that
    holds the tensor ('model.embed_tokens', 'lm_head'). The learner's sync buckets end on these boundaries."""
    match = _LAYER.match(name)
    return match.group(1) if match else name.rpartition(".")[0]
