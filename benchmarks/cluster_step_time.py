"""Step-time breakdown of GRPO in cluster mode with 1 vs 2 learner ranks (and debug mode as the baseline), measured
side by side in one run on one local Ray.

    python benchmarks/cluster_step_time.py [--steps 6] [--out benchmarks/results/cluster_step_time.json]

Each configuration runs the quick-start GRPO stage (built-in model, 32 prompts x 8 samples, 2 mini-batches) from
the same SFT-free start for --steps steps; the first step is dropped as warm-up and the rest averaged. Prints a table
of seconds per step phase (timing/generate, reward, logprob, train, sync) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

PHASES = ["generate", "reward", "logprob", "train", "sync", "step"]


def run(label: str, overrides: list[str], steps: int, workdir: Path) -> dict:
    from tokenwise.trainer.cli import main
    from tokenwise.trainer.logging import read_metrics
    out = workdir / "".join(c if c.isalnum() else "-" for c in label)
    args = ["train", str(ROOT / "recipes" / "quickstart.yaml"), "stages=[grpo]", f"grpo.steps={steps}",
            "grpo.eval_every=0", "eval.num_prompts=16", "logging.progress=false", "logging.plot=false",
            "logging.tensorboard=false", f"output_dir={out}", *overrides]
    if main(args) != 0:
        raise SystemExit(f"{label}: run failed")
    rows = read_metrics(out, "grpo")
    rows = [r for r in rows if "timing/step" in r][1:]  # drop the warm-up step
    return {"label": label, "steps_averaged": len(rows),
            **{p: sum(r[f"timing/{p}"] for r in rows) / len(rows) for p in PHASES},
            "loss_last": rows[-1]["actor/loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cluster_step_time.json"))
    args = ap.parse_args()
    import ray
    import torch
    from tokenwise.trainer.cluster import start_local_ray
    start_local_ray(num_cpus=os.cpu_count() or 2, object_store_mb=512)
    ray_common = ["trainer.mode=ray", "trainer.ray.cpus_per_learner=0.5", "trainer.ray.cpus_per_rollout=0.5"]
    configs = [
        ("debug (1 process)", ["trainer.mode=local"]),
        ("ray, 1 learner ZeRO-2", [*ray_common, "trainer.ray.num_learners=1", "trainer.ray.zero_stage=2"]),
        ("ray, 2 learners ZeRO-2", [*ray_common, "trainer.ray.num_learners=2", "trainer.ray.zero_stage=2"]),
        ("ray, 2 learners ZeRO-3", [*ray_common, "trainer.ray.num_learners=2", "trainer.ray.zero_stage=3"]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(label, ov, args.steps, Path(tmp)) for label, ov in configs]
    ray.shutdown()
    header = f"{'configuration':<26}" + "".join(f"{p:>10}" for p in PHASES) + f"{'vs debug':>10}"
    print(header)
    print("-" * len(header))
    base = results[0]["step"]
    for r in results:
        print(f"{r['label']:<26}" + "".join(f"{r[p]:>10.3f}" for p in PHASES) + f"{r['step'] / base:>9.2f}x")
    print("(seconds per step, mean over steps 2..N)")
    report = {"benchmark": "cluster_step_time", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, no GPU"
              if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
              "steps": args.steps, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
