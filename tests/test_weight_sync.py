"""Weight sync as a collective (trainer/weight_sync.py): bucket packing is bit-exact in every dtype, and a member
that misses a broadcast makes the others fail within the deadline instead of hanging."""

from __future__ import annotations

import multiprocessing as mp
import socket
import time

import pytest
import torch

from tokenwise.trainer.weight_sync import SyncGroup, buffer_size, pack, unpack

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.bool]


def _bucket(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(DTYPES):
        shape = [(), (7,), (3, 5), (2, 3, 1)][i % 4]  # odd sizes: slices that start off 8-byte boundaries unless padded
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 100
        out[f"w{i}"] = (x > 0) if dtype == torch.bool else x.to(dtype)
    return out


def test_pack_and_unpack_are_bit_exact_in_every_dtype():
    bucket = _bucket(0)
    meta, buffer = pack(bucket)
    assert buffer.dtype == torch.uint8 and buffer.numel() == buffer_size(meta)
    back = unpack(meta, buffer.clone())
    assert list(back) == list(bucket)
    for name, t in bucket.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _member(rank: int, port: int, timeout_s: float, rounds: int, results) -> None:
    group = SyncGroup("127.0.0.1", port, rank, 3, timeout_s=30)
    meta, _ = pack(_bucket(1))
    for r in range(rounds):
        buffer = torch.empty(buffer_size(meta), dtype=torch.uint8)
        t0 = time.monotonic()
        try:
            group.broadcast(buffer, timeout_s)
            results.put((rank, r, "ok", time.monotonic() - t0, bytes(buffer.numpy())))
        except RuntimeError as e:
            results.put((rank, r, f"error: {e}", time.monotonic() - t0, b""))
            return


def test_a_broadcast_delivers_the_bytes_and_a_silent_member_fails_the_others_within_the_deadline():
    """Round 1: all three members take part; both receivers get the sender's bytes exactly. Round 2: member 2 never
    joins (a hung rollout actor); the sender and member 1 each raise within the 2 s deadline (+ slack), not hang."""
    ctx = mp.get_context("spawn")
    port, timeout_s = _free_port(), 2.0
    results = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(1, port, timeout_s, 2, results)),
             ctx.Process(target=_member, args=(2, port, timeout_s, 1, results))]
    for p in procs:
        p.start()
    try:
        group = SyncGroup("127.0.0.1", port, 0, 3, timeout_s=60)
        meta, buffer = pack(_bucket(1))
        group.broadcast(buffer, timeout_s)
        got = [results.get(timeout=60) for _ in range(2)]
        assert sorted(g[0] for g in got) == [1, 2]
        assert all(status == "ok" and data == bytes(buffer.numpy()) for _, _, status, _, data in got)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError):
            group.broadcast(buffer, timeout_s)
        assert time.monotonic() - t0 < timeout_s + 3
        rank, rnd, status, seconds, _ = results.get(timeout=30)
        assert (rank, rnd) == (1, 1) and status.startswith("error") and seconds < timeout_s + 3
        group.close()
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
