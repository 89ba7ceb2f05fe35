"""What every rollout engine shares: weights arrive in buckets (begin_sync, load_bucket..., finish_sync), or, for
partial rollouts (grpo.partial_rollouts), through a mailbox the engine reads between decoding steps."""

from __future__ import annotations

import re
import threading
import time

import torch

CATCH_UP_TIMEOUT_S = 600.0  # partial rollouts: the longest a generation waits for weights posted before it was queued


class WeightMailbox:
    """Partial rollouts: the newest weights another thread posted (a newer post replaces one not taken yet), taken
    by the generating thread between decoding steps."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._posted: tuple[int, dict[str, torch.Tensor]] | None = None
        self.newest = -1  # the newest version ever posted

    def post(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        with self._cv:
            if version > self.newest:
                self._posted, self.newest = (version, tensors), version
                self._cv.notify_all()

    def take(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        with self._cv:
            posted, self._posted = self._posted, None
            return posted

    def wait(self, version: int, timeout_s: float) -> None:
        """Until the weights of `version` (or newer) were posted; TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self.newest < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"partial rollouts: the weights of version {version} did not reach the engine "
                                       f"within {timeout_s:.0f} s (newest posted: {self.newest})")
                self._cv.wait(left)


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

    # partial rollouts: weights posted from another thread, loaded by the generating one between decoding steps
    mailbox: WeightMailbox | None = None

    def open_mailbox(self) -> None:
        """Partial rollouts on: from now on generations take posted weights between decoding steps."""
        if self.mailbox is None:
            self.mailbox = WeightMailbox()

    def post_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.mailbox.post(state_dict, version)

    def take_posted(self) -> bool:
        """Load the weights posted since the last look, if any (the generating thread, between decoding steps)."""
        posted = self.mailbox.take() if self.mailbox is not None else None
        if posted is None:
            return False
        self.load_weights(posted[1], version=posted[0])
        return True

    def catch_up(self, version: int, timeout_s: float = CATCH_UP_TIMEOUT_S) -> None:
        """Before a generation under partial rollouts: wait until the weights of `version` (or newer) were posted,
        then load the newest (the version a generation queued after that weight sync must start from)."""
        if version > self.version:
            self.mailbox.wait(version, timeout_s)
        self.take_posted()


_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def weight_group(name: str) -> str:
    """The unit an engine loads at once: a decoder layer ('model.layers.3') or, outside the layers, the module that
    holds the tensor ('model.embed_tokens', 'lm_head'). The learner's sync buckets end on these boundaries."""
    match = _LAYER.match(name)
    return match.group(1) if match else name.rpartition(".")[0]
