"""Time and peak extra memory of token log-prob + entropy from hidden states and the output head, side by side:

    (a) naive      full [N, V] fp32 logits, log_softmax, softmax (what a learner does with model(...).logits)
    (b) chunked    kernels/logprob_entropy's torch reference: chunks of tokens, backward recomputes each chunk
    (c) triton     the fused kernel (CUDA only)
    (d) compiled   torch.compile of (a) (CUDA only)

    python benchmarks/kernels/logprob_entropy.py [--n 4096] [--d 896 2048] [--v 151936] [--repeats 3]

Forward + backward of log p and entropy (random output gradients for both). Every measurement runs in a fresh
child process: on CPU peak extra memory = peak RSS during the call minus RSS just before it (the kernel resets the
peak through /proc/self/clear_refs); on CUDA torch.cuda.max_memory_allocated above what was allocated before. The
fwd+bwd figure leaves out the gradients of hidden and weight themselves (outputs every method must produce). Inputs: hidden and
weight in fp32 on CPU, bf16 on CUDA. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _external(impl: str):
    """(h, w, y) → (log p, 0): Liger's or cut-cross-entropy's fused linear cross-entropy per token (reduction none),
    for comparison; they compute no entropy, so theirs is the smaller job. ImportError when not installed."""
    import torch
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def fn(h, w, y):
            nll = liger_fused_linear_cross_entropy(h, w, y, reduction="none")
            return -nll, torch.zeros_like(nll)
    else:
        from cut_cross_entropy import linear_cross_entropy

        def fn(h, w, y):
            nll = linear_cross_entropy(h, w, y, reduction="none")
            return -nll, torch.zeros_like(nll)
    return fn


def measure(impl: str, n: int, d: int, v: int, repeats: int) -> dict:
    """One implementation in this process: median fwd+bwd seconds over `repeats` (after one warm-up), peak extra
    bytes of the first timed call."""
    import torch
    from tokenwise.kernels.logprob_entropy import logprob_entropy
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    hidden = (torch.randn(n, d, device=device) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device=device) * 0.02).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    g_lp, g_ent = torch.randn(n, device=device), torch.randn(n, device=device)
    fn = lambda h, w, y: logprob_entropy(h, w, y, temperature=1.0, impl=impl)  # noqa: E731
    if impl == "compiled":
        naive = lambda h, w, y: logprob_entropy(h, w, y, temperature=1.0, impl="naive")  # noqa: E731
        fn = torch.compile(naive)
    elif impl in ("liger", "cce"):  # other projects' fused linear cross-entropy: log p only (no entropy)
        fn = _external(impl)

    def call(backward: bool = True) -> None:
        hidden.grad = weight.grad = None
        logp, ent = fn(hidden, weight, labels)
        if backward:
            (logp * g_lp + ent * g_ent).sum().backward()
        if cuda:
            torch.cuda.synchronize()

    def peak_of(run) -> int:
        """Peak bytes above what was held before `run`."""
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            return torch.cuda.max_memory_allocated() - before
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _rss("VmRSS")
        run()
        return _rss("VmHWM") - before

    call()  # warm-up (compilation, allocator)
    hidden.grad = weight.grad = None
    grads = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    peak_fwd = peak_of(lambda: call(backward=False))
    hidden.grad = weight.grad = None
    peak = peak_of(call) - grads  # the gradients themselves are outputs every method must produce
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"impl": impl, "n": n, "d": d, "v": v, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "seconds": times[len(times) // 2],
            "peak_extra_forward_bytes": peak_fwd, "peak_extra_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, nargs="+", default=[896, 2048])
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", nargs="+", default=None, help="default: naive chunked (+ triton compiled on CUDA)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "logprob_entropy.json"))
    ap.add_argument("--one", nargs=4, metavar=("IMPL", "N", "D", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        impl, n, d, v = args.one
        print(json.dumps(measure(impl, int(n), int(d), int(v), args.repeats)))
        return
    import torch
    impls = args.impls or (["naive", "chunked", "triton", "compiled"] if torch.cuda.is_available()
                           else ["naive", "chunked"])
    rows = []
    for d in args.d:
        for impl in impls:
            out = subprocess.run([sys.executable, __file__, "--one", impl, str(args.n), str(d), str(args.v),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True)
            if out.returncode != 0:
                last = (out.stderr.strip().splitlines() or ["?"])[-1]
                if impl in ("liger", "cce") and ("ModuleNotFoundError" in last or "ImportError" in last):
                    print(f"{impl}: not installed, skipped ({last})", flush=True)
                    continue
                raise SystemExit(f"{impl} N={args.n} D={d} V={args.v} failed: {out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"N={r['n']} D={r['d']} V={r['v']} {impl:>9}: {r['seconds']:.3f} s  forward "
                  f"{r['peak_extra_forward_bytes'] / 2**20:,.0f} MiB, fwd+bwd {r['peak_extra_bytes'] / 2**20:,.0f} MiB",
                  flush=True)
    print()
    print("| N | D | V | impl | device | dtype | fwd+bwd s | time vs naive | peak extra MiB, fwd | fwd+bwd | "
          "memory vs naive (fwd+bwd) |")
    print("|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(x for x in rows if x["d"] == r["d"] and x["impl"] == "naive")
        print(f"| {r['n']} | {r['d']} | {r['v']} | {r['impl']} | {r['device']} | {r['dtype']} | {r['seconds']:.3f} | "
              f"{r['seconds'] / base['seconds']:.2f}x | {r['peak_extra_forward_bytes'] / 2**20:,.0f} | "
              f"{r['peak_extra_bytes'] / 2**20:,.0f} | "
              f"{base['peak_extra_bytes'] / max(1, r['peak_extra_bytes']):.1f}x less |")
    from benchmarks.kernels._common import write_json
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
