"""Weight sync as a collective (`trainer.ray.weight_sync: collective`): learner rank 0 and every rollout actor join a
torch.distributed group of their own (not the learners' DeepSpeed group: its members are other processes), and each
weight bucket travels as one broadcast of its raw bytes from rank 0, then a one-number all-reduce that every member
must join (the acknowledgement: a broadcast of a small bucket can complete on the sender before a hung receiver took
it). Every wait has the bucket's deadline; a member that misses it breaks the group, which the caller then rebuilds.

Bytes, not values: a bucket's tensors are packed into one uint8 buffer and unpacked as views of it with their own
dtype and shape, so the engine receives bit for bit what the object-store path would hand it, in any dtype.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

ALIGN = 8  # bytes: every tensor's slice of a bucket buffer starts at a multiple of this


def pack(bucket: dict[str, torch.Tensor]) -> tuple[list[tuple[str, str, tuple[int, ...], int, int]], torch.Tensor]:
    """(meta, buffer): the tensors' bytes back to back in one uint8 buffer, each starting at a multiple of 8 bytes
    (so every dtype can view its slice); meta = (name, dtype, shape, offset, nbytes) per tensor."""
    meta, parts, offset = [], [], 0
    for name, tensor in bucket.items():
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        meta.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, raw.numel()))
        pad = -raw.numel() % ALIGN
        parts += [raw, torch.zeros(pad, dtype=torch.uint8)] if pad else [raw]
        offset += raw.numel() + pad
    return meta, torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def unpack(meta: list[tuple[str, str, tuple[int, ...], int, int]], buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """The bucket `pack` made: each tensor a view of `buffer` with its dtype and shape."""
    return {name: buffer[offset:offset + nbytes].view(getattr(torch, dtype)).view(shape)
            for name, dtype, shape, offset, nbytes in meta}


def buffer_size(meta: list[tuple[str, str, tuple[int, ...], int, int]]) -> int:
    """Bytes of the buffer `pack` made for this meta."""
    return max((offset + nbytes + (-nbytes % ALIGN) for _, _, _, offset, nbytes in meta), default=0)


class SyncGroup:
    """One member of a weight-sync group: rank 0 sends (learner rank 0), ranks 1..size-1 receive (rollout actors).
    Rank 0 hosts the group's TCP store at (host, port); every member must join within `timeout_s`."""

    def __init__(self, host: str, port: int, rank: int, size: int, timeout_s: float) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.size = rank, size
        self.store = dist.TCPStore(host, port, size, rank == 0, timeout=timeout)
        self.group = dist.ProcessGroupGloo(self.store, rank, size, timeout)

    def broadcast(self, buffer: torch.Tensor, timeout_s: float) -> None:
        """Rank 0's buffer into every member's `buffer` (same size), then the acknowledgement; raises RuntimeError
        when a member misses the deadline (the group is then broken: close it and build a new one)."""
        deadline = datetime.timedelta(seconds=timeout_s)
        # the group's own timeout too: work that broke off then ends by itself, and dropping the group does not
        # wait out the (longer) rendezvous timeout it was built with
        self.group.set_timeout(deadline)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        if buffer.numel():
            self.group.broadcast([buffer], opts).wait(deadline)
        ack = torch.ones(1)
        self.group.allreduce([ack]).wait(deadline)
        if int(ack.item()) != self.size:
            raise RuntimeError(f"weight sync: {int(ack.item())} of {self.size} members acknowledged the bucket")

    def close(self) -> None:
        """Leave the group (drop it: its operations carry the last deadline, so nothing is waited out)."""
        self.group = self.store = None


def rejoin(previous: "SyncGroup | None", host: str, port: int, rank: int, size: int,
           timeout_s: float) -> SyncGroup:
    """Leave `previous` (if any) and join a new group as member `rank` (learner rank 0 and rollout actors alike)."""
    if previous is not None:
        previous.close()
    return SyncGroup(host, port, rank, size, timeout_s)


def digest(named: Any) -> dict[str, str]:
    """sha256 of each (name, tensor)'s bytes: weights compared bit for bit across processes."""
    import hashlib
    return {name: hashlib.sha256(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            .hexdigest() for name, t in named}
