"""MoE feed-forward: the per-expert loop against the sorted/permuted fast path (grouped GEMM: a torch loop over
expert segments on CPU, the Triton kernel on CUDA), forward + backward time, side by side in one run.

    python benchmarks/kernels/moe.py [--tokens 4096] [--hidden 512] [--ffn 1024] [--experts 8 32] [--top-k 2]

Prints a table and writes JSON (benchmarks/results/moe.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def measure(fn, repeats: int, cuda: bool) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            import torch
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    import torch
    from tokenwise.kernels.moe import moe_ffn, moe_ffn_reference, route
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "moe.json"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    rows = []
    for E in args.experts:
        torch.manual_seed(0)
        x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
        router = (torch.randn(E, args.hidden, device=device) * 0.02).to(dtype).requires_grad_()
        w1 = (torch.randn(E, 2 * args.ffn, args.hidden, device=device) * 0.02).to(dtype).requires_grad_()
        w2 = (torch.randn(E, args.hidden, args.ffn, device=device) * 0.02).to(dtype).requires_grad_()
        leaves = (x, router, w1, w2)

        def fast() -> None:
            for t in leaves:
                t.grad = None
            out, r = moe_ffn(x, router, w1, w2, top_k=args.top_k)
            (out.float().square().mean() + 1e-3 * r.aux_loss).backward()

        def loop() -> None:
            for t in leaves:
                t.grad = None
            r = route(x, router, top_k=args.top_k)
            out = moe_ffn_reference(x, w1, w2, r)
            (out.float().square().mean() + 1e-3 * r.aux_loss).backward()

        t_loop, t_fast = measure(loop, args.repeats, cuda), measure(fast, args.repeats, cuda)
        rows.append({"tokens": args.tokens, "hidden": args.hidden, "ffn": args.ffn, "experts": E, "top_k": args.top_k,
                     "device": torch.cuda.get_device_name(0) if cuda else "cpu", "dtype": str(dtype)[6:],
                     "per_expert_loop_s": t_loop, "fast_path_s": t_fast})
        print(f"E={E}: per-expert loop {t_loop:.3f} s, fast path {t_fast:.3f} s ({t_loop / t_fast:.2f}x)", flush=True)
    print()
    print("| tokens | hidden | ffn | experts | top-k | device | dtype | per-expert loop s | fast path s | speed-up |")
    print("|---:|---:|---:|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['hidden']} | {r['ffn']} | {r['experts']} | {r['top_k']} | {r['device']} | "
              f"{r['dtype']} | {r['per_expert_loop_s']:.3f} | {r['fast_path_s']:.3f} | "
              f"{r['per_expert_loop_s'] / r['fast_path_s']:.2f}x |")
    from benchmarks.kernels._common import write_json
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
