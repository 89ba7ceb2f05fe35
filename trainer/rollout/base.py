"""What every rollout engine shares: weights arrive in buckets (begin_sync, load_bucket..., finish_sync), or, for
partial rollouts (grpo.partial_rollouts), through a mailbox the engine reads between decoding steps."""

from __future__ import annotations

import re
import threading
import time

import torch


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

    def catch_up(self, version: int, timeout_s: float) -> None:
        """Before a generation under partial rollouts: wait until the weights of `version` (or newer) were posted,
        then load the newest (the version a generation queued after that weight sync must start from)."""
        if version > self.version:
            self.mailbox.wait(version, timeout_s)
        self.take_posted()


class VersionTrack:
    """Per-token version stamps of one generate call under partial rollouts: `step()` at each decoding step records
    the engine's version for the token sampled there, then takes posted weights, so the next token is the first of
    the new policy (the KV cache of the tokens before stays, as vLLM's pause with requests kept leaves it)."""

    def __init__(self, engine: BucketedSync) -> None:
        self.engine = engine
        self.versions: list[int] = []

    def step(self) -> None:
        self.versions.append(self.engine.version)
        self.engine.take_posted()

    def stamps(self, response_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] int32: each column's version where sampled, -1 elsewhere."""
        T = response_mask.shape[1]
        cols = torch.tensor((self.versions + [self.engine.version] * T)[:T], dtype=torch.int32)
        return torch.where(response_mask > 0, cols[None, :], torch.tensor(-1, dtype=torch.int32))


_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def weight_group(name: str) -> str:
    """The unit an engine loads at once: a decoder layer ('model.layers.3') or, outside the layers, the module that
    holds the tensor ('model.embed_tokens', 'lm_head'). The learner's sync buckets end on these boundaries."""
    match = _LAYER.match(name)
    return match.group(1) if match else name.rpartition(".")[0]
