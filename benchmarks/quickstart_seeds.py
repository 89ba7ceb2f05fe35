"""The quick start over seeds and thread counts: does its gain hold beyond one seed's luck?

    python benchmarks/quickstart_seeds.py [--seeds 0 1 2 3 4] [--threads 1 2] [--jobs 1] [--recipe recipes/quickstart.yaml]
                                          [--set key=value ...] [--json PATH]

Runs `tokenwise train <recipe> seed=S` for every seed × OMP_NUM_THREADS value (each run in its own process, the same
command `make quickstart` runs, plus the seed and the thread count), reads each run's summary.json and prints a table:
held-out accuracy after SFT and after GRPO (greedy, with pass@k / mean@k beside it), the GRPO gain and the wall time;
then the median and min–max of each column. Writes benchmarks/results/quickstart_seeds.json. Any recipe with a GRPO
stage works (`--recipe`, with `--set` overrides for every run, e.g. the model path of a GRPO-only recipe).

`--jobs 2` runs two single-thread runs side by side (the thread-count-2 runs always run alone); their wall times are
then measured on a shared machine, which the JSON records.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.kernels._common import write_json  # noqa: E402

QUIET = ["logging.progress=false", "logging.tensorboard=false"]


def cpu_model() -> str:
    """The CPU's model name (floating-point results differ between models, so every number names it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train_process(args: list[str], threads: int) -> float:
    """`tokenwise train ARGS` in its own process with `threads` CPU threads, offline; returns its wall time (s)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tokenwise.trainer", "train", *args, f"trainer.threads={threads}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({threads} threads): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return time.time() - t0


def run_one(recipe: Path, seed: int, threads: int, work: Path, overrides: list[str] = ()) -> dict:
    out = work / f"seed{seed}-threads{threads}"
    seconds = train_process([str(recipe), f"seed={seed}", f"output_dir={out}", *QUIET, *overrides], threads)
    stages = json.loads((out / "summary.json").read_text())["stages"]
    sft, grpo = stages.get("sft"), stages["grpo"]
    row = {"seed": seed, "threads": threads, "seconds": round(seconds, 1),
           "after_sft": grpo["accuracy_before"], "after_grpo": grpo["accuracy_after"],
           "gain_points": 100 * (grpo["accuracy_after"] - grpo["accuracy_before"]),
           "sampled_before": {k: v for k, v in grpo["eval_before"].items() if "@" in k},
           "sampled_after": {k: v for k, v in grpo["eval_after"].items() if "@" in k}}
    if sft is not None:
        row["before_sft"] = sft["accuracy_before"]
    print(f"  seed {seed}, {threads} thread(s): after SFT {row['after_sft']:.3f} → after GRPO {row['after_grpo']:.3f} "
          f"({row['gain_points']:+.1f} points) in {seconds / 60:.1f} min", flush=True)
    return row


def _spread(xs: list[float], fmt: str) -> str:
    return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)} – {format(max(xs), fmt)})"


def table(rows: list[dict]) -> str:
    keys = [k for k in rows[0]["sampled_after"] if k.startswith("eval/pass@")][-1:]  # the largest k
    lines = ["| seed | threads | after SFT | after GRPO | gain (points) | "
             + "".join(f"{k.removeprefix('eval/')} after SFT → GRPO | " for k in keys) + "wall time |",
             "|---:|---:|---:|---:|---:|" + "---:|" * len(keys) + "---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['threads']} | {r['after_sft']:.3f} | {r['after_grpo']:.3f} | "
                     f"{r['gain_points']:+.1f} | "
                     + "".join(f"{r['sampled_before'][k]:.3f} → {r['sampled_after'][k]:.3f} | " for k in keys)
                     + f"{r['seconds'] / 60:.1f} min |")
    lines.append(f"| median (min – max) | | {_spread([r['after_sft'] for r in rows], '.3f')} | "
                 f"{_spread([r['after_grpo'] for r in rows], '.3f')} | {_spread([r['gain_points'] for r in rows], '+.1f')} | "
                 + "".join(f"{_spread([r['sampled_after'][k] for r in rows], '.3f')} | " for k in keys)
                 + f"{_spread([r['seconds'] / 60 for r in rows], '.1f')} min |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="single-thread runs side by side (default 1: each run alone)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for every run")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "quickstart_seeds.json"))
    args = ap.parse_args()
    print(f"quick start over seeds {args.seeds} x OMP_NUM_THREADS {args.threads} on {cpu_model()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows: list[dict] = []
        for threads in args.threads:
            jobs = args.jobs if threads == 1 else 1
            with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
                rows += list(pool.map(lambda s, t=threads: run_one(Path(args.recipe), s, t, work, args.set),
                                      args.seeds))
    text = table(rows)
    print(text)
    write_json(args.json, rows, cpu=cpu_model(), recipe=str(Path(args.recipe).resolve().relative_to(ROOT)),
               overrides=args.set, jobs=args.jobs, min_gain_points=min(r["gain_points"] for r in rows))


if __name__ == "__main__":
    main()
