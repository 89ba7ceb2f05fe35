"""Asynchronous GRPO in cluster mode: synchronous vs grpo.max_staleness 1 and 2, measured side by side in one run.

    python benchmarks/async_speedup.py [--seeds 0 1 2] [--staleness 0 1 2] [--steps 24] [--work DIR]
                                       [--json benchmarks/results/async_speedup.json]
    python benchmarks/async_speedup.py --ablation --steps 48 --seeds 0 1 2 3 4
                                       [--json benchmarks/results/async_staleness_ablation.json]

Workload: the sort task with lists of 8-12 digits (responses of up to 16 tokens, twice the quick start's), one
learner and one rollout actor with 1 CPU each on a local Ray, 32 prompts x 8 samples per step, GRPO at lr 5e-5
without the KL-to-reference term (see GRPO below). All runs start from
one SFT model (the recipe's SFT stage, run once, seed 0); each seed is a GRPO run per staleness bound. For every
run: completions per second (responses trained on / GRPO wall time from the first step's start to the last's end,
the step-0 evaluation excluded), the share of the synchronous step spent generating (timing/generate over
timing/step), reward per generated sample (mean reward over all samples of the run and over its last quarter),
held-out greedy accuracy at the end, and the version lag the stamps recorded. Prints a table per seed and bound
and the speed-up over the synchronous run of the same seed, and writes the JSON.

--ablation: what closes the reward gap of staleness 1? For each variant in ABLATION (at lr 1e-4: the rollout
correction's level and cap, none at all, a learning-rate warmup; and lr 5e-5) a synchronous and a staleness-1 run
per seed; per seed, the gap in reward per sample (sync minus staleness 1) over the run and version-matched
(staleness 1's batches of steps 2..N, sampled by the same policy versions 1..N-1 as the synchronous batches of steps
1..N-1: the lag itself taken out). Variants that only change the rollout correction reuse the first variant's
synchronous runs: on a synchronous batch the engine's and the learner's log-probs agree to ~1e-6, so the weights are
1 and the variants do not differ there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

RECIPE = ROOT / "recipes" / "quickstart.yaml"
TASK = ["data.min_length=8", "data.max_length=12", "rollout.max_new_tokens=16", "eval.num_prompts=64", "eval.k=0",
        "logging.progress=false", "logging.tensorboard=false", "logging.plot=false"]
# GRPO at a sixth of the quick start's learning rate: at 3e-4 one step moves this tiny policy by a KL of ~0.06, and a
# batch one such step old lost reward in a probe (0.66 vs 0.79 per sample, 6 steps); at 1e-4 staleness 1 still cost
# 0.013-0.021 reward per sample over 48 steps in every seed, at 5e-5 0.001-0.008 (--ablation), while the synchronous
# runs reached the same reward per sample at both. No KL-to-reference pass, so generation is about half of the
# synchronous step
GRPO = ["grpo.optim.lr=5e-5", "algorithm.kl.coef=0"]
CLUSTER = ["trainer.mode=ray", "trainer.ray.num_learners=1", "trainer.ray.num_rollout_workers=1",
           "trainer.ray.cpus_per_learner=1", "trainer.ray.cpus_per_rollout=1"]
# --ablation, at lr 1e-4 unless a variant sets it: name -> (overrides, whether the variant needs its own synchronous
# runs; the others reuse the first variant's)
ABLATION_LR = "grpo.optim.lr=1e-4"
ABLATION = {
    "lr 1e-4, token TIS cap 2": ([], True),
    "lr 1e-4, no correction": (["algorithm.rollout_correction.level=none"], False),
    "lr 1e-4, token TIS cap 10": (["algorithm.rollout_correction.cap=10"], False),
    "lr 1e-4, sequence TIS cap 2": (["algorithm.rollout_correction.level=sequence"], False),
    "lr 1e-4, sequence TIS cap 10": (["algorithm.rollout_correction.level=sequence",
                                      "algorithm.rollout_correction.cap=10"], False),
    "lr 1e-4, warmup 8 steps": (["grpo.optim.warmup_steps=8"], True),
    "lr 5e-5, token TIS cap 2": (["grpo.optim.lr=5e-5"], True),
}


def train(args: list[str]) -> None:
    from tokenwise.trainer.cli import main
    if main(["train", *args]) != 0:
        raise SystemExit(f"run failed: tokenwise train {' '.join(args)}")


def read(run: Path) -> dict:
    rows = read_metrics(run, "grpo")
    steps = [r for r in rows if "timing/step" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    wall = steps[-1]["time"] - (steps[0]["time"] - steps[0]["timing/step"])
    completions = sum(r["rollout/completions"] for r in steps)
    rewards = [r["reward/mean"] for r in steps]
    quarter = max(1, len(rewards) // 4)
    return {"steps": len(steps), "wall_s": round(wall, 1), "completions_per_s": completions / wall,
            "generate_share": statistics.mean(r["timing/generate"] / r["timing/step"] for r in steps[1:]),
            "learner_idle_s": statistics.mean(r["timing/learner_idle"] for r in steps[1:]),
            "rollout_idle_s": statistics.mean(r["timing/rollout_idle"] for r in steps[1:]),
            "reward_per_sample": statistics.mean(rewards), "reward_last_quarter": statistics.mean(rewards[-quarter:]),
            "rewards": rewards, "staleness_max": max(r["async/staleness_max"] for r in steps),
            "accuracy_end": evals[-1]["eval/accuracy"]}


def run_set(work: Path, start: Path, seeds: list[int], bounds: list[int], steps: int, overrides: list[str]) -> list:
    """One GRPO run per seed and staleness bound under `work` (runs already there are read, not repeated)."""
    rows = []
    for seed in seeds:
        for k in bounds:
            run = work / f"seed{seed}-staleness{k}"
            if not (run / "grpo" / "final").is_dir():
                train([str(RECIPE), "stages=[grpo]", "model.type=pretrained", f"model.path={start / 'sft' / 'final'}",
                       f"seed={seed}", f"grpo.steps={steps}", f"grpo.max_staleness={k}", "grpo.eval_every=0", *TASK,
                       *GRPO, *CLUSTER, *overrides, f"output_dir={run}"])
            row = {"seed": seed, "max_staleness": k, **read(run)}
            rows.append(row)
            print(json.dumps({key: v for key, v in row.items() if key != "rewards"}), flush=True)
    return rows


def speed_table(rows: list[dict], bounds: list[int]) -> str:
    sync = {r["seed"]: r for r in rows if r["max_staleness"] == 0}
    for r in rows:
        base = sync.get(r["seed"])
        r["speedup"] = r["completions_per_s"] / base["completions_per_s"] if base else None
        if base and r["max_staleness"] > 0:
            r.update(gaps(base, r, r["max_staleness"]))
    head = (f"{'seed':>4} {'k':>2} {'compl/s':>8} {'speed-up':>8} {'gen share':>9} {'learner idle':>12} "
            f"{'rollout idle':>12} {'reward/sample':>13} {'last 1/4':>8} {'lag max':>7} {'acc end':>7}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['seed']:>4} {r['max_staleness']:>2} {r['completions_per_s']:>8.1f} "
                     f"{r['speedup'] or 0:>8.2f} {r['generate_share']:>9.2f} {r['learner_idle_s']:>12.2f} "
                     f"{r['rollout_idle_s']:>12.2f} {r['reward_per_sample']:>13.3f} {r['reward_last_quarter']:>8.3f} "
                     f"{r['staleness_max']:>7.0f} {r['accuracy_end']:>7.3f}")
    for k in bounds:
        ks = [r for r in rows if r["max_staleness"] == k]
        sp = [r["speedup"] for r in ks if r["speedup"]]
        rw = [r["reward_per_sample"] for r in ks]
        speed = f"speed-up {min(sp):.2f}-{max(sp):.2f}, " if sp else ""  # no synchronous run to compare with
        gap = ""
        if k > 0 and all("gap" in r for r in ks):
            g, v = [r["gap"] for r in ks], [r["gap_version_matched"] for r in ks]
            gap = f", below sync {min(g):+.3f} to {max(g):+.3f} (version-matched {min(v):+.3f} to {max(v):+.3f})"
        lines.append(f"k={k}: {speed}reward/sample {min(rw):.3f}-{max(rw):.3f}{gap}")
    return "\n".join(lines)


def gaps(sync: dict, stale: dict, lag: int) -> dict:
    """Sync minus a run at staleness `lag`, reward per sample: over the run, and version-matched (stale steps
    lag+1..N vs sync 1..N-lag: the same policy versions sampled both)."""
    a, b = sync["rewards"], stale["rewards"]
    return {"gap": statistics.mean(a) - statistics.mean(b),
            "gap_version_matched": statistics.mean(a[:-lag]) - statistics.mean(b[lag:])}


def ablation(work: Path, start: Path, seeds: list[int], steps: int) -> tuple[list[dict], str]:
    rows, default_sync = [], {}
    for name, (overrides, own_sync) in ABLATION.items():
        folder = work / re.sub("[^a-z0-9]+", "-", name.lower()).strip("-")
        runs = run_set(folder, start, seeds, [0, 1] if own_sync else [1], steps, [ABLATION_LR, *overrides])
        sync = {r["seed"]: r for r in runs if r["max_staleness"] == 0} or default_sync
        default_sync = default_sync or sync
        for r in runs:
            if r["max_staleness"] == 1:
                rows.append({"variant": name, "overrides": overrides, "seed": r["seed"],
                             "reward_sync": sync[r["seed"]]["reward_per_sample"],
                             "reward_stale1": r["reward_per_sample"], **gaps(sync[r["seed"]], r, 1),
                             "accuracy_end_sync": sync[r["seed"]]["accuracy_end"], "accuracy_end_stale1":
                             r["accuracy_end"]})
    lines = [f"{'variant':<30} {'sync reward/sample':>18} {'staleness 1':>16} {'gap':>16} {'version-matched':>16}"]
    for name in ABLATION:
        vs = [r for r in rows if r["variant"] == name]

        def span(key: str, fmt: str = ".3f") -> str:
            xs = [r[key] for r in vs]
            return f"{min(xs):{fmt}} to {max(xs):{fmt}}"
        lines.append(f"{name:<30} {span('reward_sync'):>18} {span('reward_stale1'):>16} {span('gap', '+.3f'):>16} "
                     f"{span('gap_version_matched', '+.3f'):>16}")
    return rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--ablation", action="store_true", help="the reward-gap ablation (ABLATION) instead")
    ap.add_argument("--work", default=None, help="keep the runs here")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for the GRPO runs")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/async_speedup.json, or "
                                                 "async_staleness_ablation.json with --ablation")
    args = ap.parse_args()
    results = ROOT / "benchmarks" / "results"
    out = args.json or str(results / ("async_staleness_ablation.json" if args.ablation else "async_speedup.json"))
    from tokenwise.trainer.cluster import start_local_ray
    import ray
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        start = work / "sft"
        if not (start / "sft" / "final").is_dir():
            train([str(RECIPE), "stages=[sft]", f"sft.steps={args.sft_steps}", "sft.eval_every=0", *TASK,
                   f"output_dir={start}"])
        start_local_ray(num_cpus=2, object_store_mb=512)
        try:
            if args.ablation:
                rows, table = ablation(work, start, args.seeds, args.steps)
            else:
                rows = run_set(work, start, args.seeds, args.staleness, args.steps, args.set)
                table = speed_table(rows, args.staleness)
        finally:
            ray.shutdown()
    print(table)
    extra = {"ablation_lr": ABLATION_LR} if args.ablation else {"overrides": args.set}
    write_json(out, rows, cpu=cpu_model(), steps=args.steps, sft_steps=args.sft_steps, task=TASK, grpo=GRPO,
               cluster=CLUSTER, **extra)


if __name__ == "__main__":
    main()
