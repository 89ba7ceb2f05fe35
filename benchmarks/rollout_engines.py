"""Rollout throughput: the vLLM engine vs the transformers backend on the same prompts, side by side in one run.

    python benchmarks/rollout_engines.py [--model DIR | --moe-gated] [--prompts 64] [--n 8] [--max-new-tokens 32]

Both engines go through trainer.rollout.build_rollout, as a run builds them (fp32 on CPU, the recipe's dtype rule on
CUDA), and generate G samples per prompt at temperature 1 with log-probs. Without --model the quick-start's built-in
model (1.6M parameters; with --moe-gated as our
gated MoE decoder, served on vLLM by models/vllm_decoder.py) is built freshly: untrained, so its responses run to max_new_tokens and both engines
generate the same number of tokens. Prints a table and writes benchmarks/results/rollout_engines.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "kernels"))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (save_pretrained layout); default: the built-in model")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--hidden-size", type=int, help="built-in model: width (default: the quick start's)")
    ap.add_argument("--num-layers", type=int, help="built-in model: layers (default: the quick start's)")
    ap.add_argument("--moe-gated", action="store_true",
                    help="built-in model as our decoder with headwise gates and 4 experts, top-2 (moe_gated_tiny)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout_engines.json"))
    args = ap.parse_args()

    import torch
    from _common import write_json
    from tokenwise.models.builtin import save_builtin
    from tokenwise.trainer.config import ArithmeticData, BuiltinModel, RolloutConfig
    from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
    from tokenwise.trainer.rollout import build_rollout
    from tokenwise.trainer.run import load_task

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model
    if model_dir is None:
        m = BuiltinModel()
        hidden = args.hidden_size or m.hidden_size
        model_dir = save_builtin(Path(tmp.name) / "model", seed=0, hidden_size=hidden,
                                 num_layers=args.num_layers or m.num_layers, num_heads=m.num_heads,
                                 num_kv_heads=m.num_kv_heads, intermediate_size=hidden * 8 // 3,
                                 max_position_embeddings=m.max_position_embeddings,
                                 **(dict(arch="tokenwise", attn_gate="headwise", ffn="moe", num_experts=4,
                                         experts_per_token=2, moe_intermediate_size=128) if args.moe_gated else {}))
    tok = load_tokenizer(model_dir)
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model_dir)
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_config(c).parameters())
    fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
    rows = list(load_task(ArithmeticData(min_digits=1, max_digits=2, num_heldout=args.prompts))["heldout"])
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"

    results = []
    for name in args.engines.split(","):
        cfg = RolloutConfig(engine=name, max_new_tokens=args.max_new_tokens, batch_size=args.prompts * args.n)
        t0 = time.perf_counter()
        engine = build_rollout(cfg, model_dir=model_dir, tokenizer=tok, formatter=fmt, dtype=dtype, device=device)
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.generate(rows, n=args.n, seed=0)  # warm-up (vLLM compiles its CPU kernels on the first call)
        first = time.perf_counter() - t0
        speeds = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            batch = engine.generate(rows, n=args.n, seed=r + 1)
            seconds = time.perf_counter() - t0
            speeds.append(float(batch.response_mask.sum()) / seconds)
        results.append({"engine": name, "model": c.model_type, "device": where, "params_m": round(params / 1e6, 1), "dtype": str(dtype).removeprefix("torch."),
                        "sequences": args.prompts * args.n, "max_new_tokens": args.max_new_tokens,
                        "start_s": round(start, 1), "first_call_s": round(first, 1),
                        "tokens_per_s": round(statistics.median(speeds)), "tokens_per_s_all": [round(s) for s in speeds]})
        del engine
    base = next((r["tokens_per_s"] for r in results if r["engine"] == "hf"), None)
    print(f"\nrollout throughput, {args.prompts} prompts x {args.n} samples, up to {args.max_new_tokens} new tokens, "
          f"{where}\n")
    print("| params | engine | device | dtype | start s | first call s | tokens/s (median of %d) | vs hf |" % args.repeats)
    print("|---:|---|---|---|---:|---:|---:|---:|")
    for r in results:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        r["vs_hf"] = round(r["tokens_per_s"] / base, 2) if base else None
        print(f"| {r['params_m']}M | {r['engine']} | {r['device']} | {r['dtype']} | {r['start_s']} | {r['first_call_s']} | "
              f"{r['tokens_per_s']:,} | {ratio} |")
    write_json(args.out, results, prompts=args.prompts, n=args.n, max_new_tokens=args.max_new_tokens)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
