"""Weight sync in cluster mode: seconds per 100 MB through the Ray object store vs the collective (a gloo group of
learner rank 0 and the rollout actors), measured side by side in one run.

    python benchmarks/weight_sync_speed.py [--steps 4] [--hidden 1024] [--layers 2] [--rollouts 1]
                                           [--json benchmarks/results/weight_sync_speed.json]

Each path runs a short GRPO stage (the quick-start task, 4 prompts x 2 samples, so training is short) on a built-in
model made wide enough to weigh ~100 MB in fp32, with one learner and --rollouts rollout actors on a local Ray;
timing/sync of every step but the first (warm-up) is averaged and scaled to seconds per 100 MB of weights. The
engines end bit for bit equal by both paths (tests/test_cluster.py); this measures only speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
from benchmarks.kernels._common import write_json  # noqa: E402
from benchmarks.quickstart_seeds import cpu_model  # noqa: E402
from tokenwise.trainer.logging import read_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "weight_sync_speed.json"))
    args = ap.parse_args()
    from tokenwise.trainer.cli import main as tokenwise
    model = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", "model.num_heads=8",
             "model.num_kv_heads=8", f"model.intermediate_size={4 * args.hidden}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("object_store", "collective"):
            out = Path(tmp) / path
            code = tokenwise(["train", str(ROOT / "recipes" / "quickstart.yaml"), "stages=[grpo]",
                              f"grpo.steps={args.steps}", "grpo.prompts_per_step=4", "grpo.group_size=2",
                              "grpo.mini_batches=1", "grpo.eval_every=0", "eval.num_prompts=4", "eval.k=0",
                              "logging.progress=false", "logging.plot=false", "logging.tensorboard=false",
                              "trainer.mode=ray", "trainer.ray.num_learners=1",
                              f"trainer.ray.num_rollout_workers={args.rollouts}", "trainer.ray.cpus_per_learner=1",
                              "trainer.ray.cpus_per_rollout=0.5", f"trainer.ray.weight_sync={path}", *model,
                              f"output_dir={out}"])
            if code != 0:
                raise SystemExit(f"{path}: run failed")
            size = sum(f.stat().st_size for f in (out / "grpo" / "final").glob("*.safetensors"))
            steps = read_metrics(out, "grpo")
            sync = [r["timing/sync"] for r in steps if "timing/sync" in r][1:]
            mean = statistics.mean(sync)
            rows.append({"path": path, "model_mb": round(size / 2 ** 20, 1), "sync_s": round(mean, 3),
                         "s_per_100mb": round(mean * 100 * 2 ** 20 / size, 3), "steps_averaged": len(sync)})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["s_per_100mb"]
    print(f"{'path':<14} {'model MB':>8} {'sync s':>7} {'s / 100 MB':>10} {'vs object store':>15}")
    for r in rows:
        print(f"{r['path']:<14} {r['model_mb']:>8.1f} {r['sync_s']:>7.3f} {r['s_per_100mb']:>10.3f} "
              f"{r['s_per_100mb'] / base:>15.2f}")
    write_json(args.json, rows, cpu=cpu_model(), rollouts=args.rollouts, hidden=args.hidden, layers=args.layers)


if __name__ == "__main__":
    main()
