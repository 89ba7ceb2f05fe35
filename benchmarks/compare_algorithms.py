"""Every GRPO-family recipe side by side on a built-in task harder than the quick start's, over several seeds.

    python benchmarks/compare_algorithms.py [--seeds 0 1 2 3 4] [--grpo-steps 60] [--recipes grpo dapo ...] [--jobs 2]
    python benchmarks/compare_algorithms.py --report-only --jobs 2     # rewrite the report from the saved JSON

For each seed one SFT stage runs on the comparison task (sorting 8-12 digits: answers of up to 13 tokens, a perfect
teacher and a short SFT, so the start is far from solved and its errors are spread over many tokens); every recipe's
GRPO stage then starts from that model (`model.type: pretrained`) with the recipe's own algorithm section and the
task, budget and evaluation below (one learning rate for all, 1e-4: the recipes' 3e-4 is tuned for the quick start
and destabilises the first steps here), so differences come from the algorithms. Runs use today's defaults, rollout
correction (TIS) included. Writes docs/results.md: per recipe the held-out accuracy after GRPO (greedy), its gain
over the shared SFT start, pass@8, the mean reward of the last 10 steps, each as mean ± 95% confidence interval
(Student t over seeds), and the gain's paired difference from `grpo` on the same seeds (the SFT start is shared, so
pairing removes its seed-to-seed spread); docs/results_reward.png and docs/results_entropy.png (curves averaged over
seeds); benchmarks/results/compare_algorithms.json with every run.

`--jobs 2` runs two single-thread runs side by side (both cores busy; results do not depend on it, wall times do).
All SFT stages run first, then the recipes' GRPO stages of every seed share the jobs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.quickstart_seeds import cpu_model, train_process as _train  # noqa: E402
from tokenwise.trainer.logging import read_metrics  # noqa: E402

RECIPES = ["grpo", "dr_grpo", "rloo", "dapo", "gspo", "forking_tokens", "hapo", "d3s", "thr"]
QUIET = ["logging.progress=false", "logging.plot=false", "logging.tensorboard=false"]
# The comparison task: longer answers than the quick start's, a perfect teacher, a short SFT.
MIN_LEN, MAX_LEN, SFT_STEPS, PROMPTS, LR = 8, 12, 150, 16, 1e-4
TASK = [f"data={{type: sort, min_length: {MIN_LEN}, max_length: {MAX_LEN}}}", f"rollout.max_new_tokens={MAX_LEN + 4}",
        "eval.k=8"]
SFT = [f"sft.steps={SFT_STEPS}", "sft.eval_every=0"]
GRPO = [f"grpo.prompts_per_step={PROMPTS}", f"grpo.optim.lr={LR}"]
# Student t quantiles t_{0.975, df} for 95% intervals over a handful of seeds (df = seeds - 1).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def ci95(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval of the mean, Student t)."""
    if len(xs) < 2:
        return statistics.mean(xs), float("nan")
    df = len(xs) - 1
    t = T975.get(df) or T975[max(k for k in T975 if k <= df)]
    return statistics.mean(xs), t * statistics.stdev(xs) / math.sqrt(len(xs))


def run_sft(seed: int, work: Path, threads: int) -> Path:
    """The seed's shared SFT start; returns its model directory."""
    sft = work / f"sft-{seed}"
    _train([str(ROOT / "recipes" / "quickstart.yaml"), "stages=[sft]", f"seed={seed}", f"output_dir={sft}",
            *TASK, *SFT, *QUIET], threads)
    return sft / "sft" / "final"


def run_grpo(name: str, seed: int, model: Path, steps: int, work: Path, threads: int) -> dict:
    """One recipe's GRPO stage from the seed's SFT model: accuracies, pass@8, reward and entropy curves."""
    run = work / f"{name}-{seed}"
    seconds = _train([str(ROOT / "recipes" / f"{name}.yaml"), "stages=[grpo]", f"seed={seed}", f"output_dir={run}",
                      f"model={{type: pretrained, path: {model}}}", f"grpo.steps={steps}", f"grpo.eval_every={steps}",
                      *TASK, *GRPO, *QUIET], threads)
    rows = read_metrics(run, "grpo")
    steps_rows = [r for r in rows if "reward/mean" in r]
    out = {"seed": seed, "accuracy_before": rows[0]["eval/accuracy"], "accuracy_after": rows[-1]["eval/accuracy"],
           "pass8_before": rows[0]["eval/pass@8"], "pass8_after": rows[-1]["eval/pass@8"],
           "reward_last10": statistics.mean(r["reward/mean"] for r in steps_rows[-10:]),
           "generated_tokens": sum(r.get("rollout/generated_tokens", 0.0) for r in steps_rows),
           "seconds": seconds,
           "reward_curve": [r["reward/mean"] for r in steps_rows],
           "entropy_curve": [r["actor/entropy"] for r in steps_rows]}
    print(f"  seed {seed} {name}: {out['accuracy_before']:.3f} → {out['accuracy_after']:.3f} ({seconds:.0f} s)",
          flush=True)
    return out


def run_all(seeds: list[int], recipes: list[str], steps: int, work: Path, jobs: int) -> dict[str, list[dict]]:
    threads = 1 if jobs > 1 else max(1, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        models = dict(zip(seeds, pool.map(lambda s: run_sft(s, work, threads), seeds)))
        runs = [(name, seed) for seed in seeds for name in recipes]
        done = list(pool.map(lambda r: run_grpo(r[0], r[1], models[r[1]], steps, work, threads), runs))
    return {name: [d for (n, _), d in zip(runs, done) if n == name] for name in recipes}


def _fmt(xs: list[float], digits: int = 3, sign: bool = False) -> str:
    """mean ± 95% half-width."""
    mean, half = ci95(xs)
    return f"{mean:{'+' if sign else ''}.{digits}f} ± {half:.{digits}f}"


def write_report(results: dict, seeds: list[int], steps: int, jobs: int, out_md: Path, date: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    command = (f"python benchmarks/compare_algorithms.py --seeds {' '.join(map(str, seeds))} --grpo-steps {steps}"
               + (f" --jobs {jobs}" if jobs > 1 else ""))
    gains = {n: [100 * (r["accuracy_after"] - r["accuracy_before"]) for r in runs] for n, runs in results.items()}
    lines = [
        "# Algorithm comparison on a built-in task", "",
        f"Generated by `{command}` on {date or datetime.date.today().isoformat()} ({cpu_model()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, "
        f"{'GPU: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}).", "",
        f"Task: sorting {MIN_LEN}–{MAX_LEN} digits (up to {MAX_LEN + 1} answer tokens with the end token, "
        f"max_new_tokens {MAX_LEN + 4}). Each seed: one SFT stage of {SFT_STEPS} steps on correct demonstrations (the "
        "quick start's model and SFT optimizer; short on purpose, so the start is far from solved), then every "
        f"recipe's GRPO stage for {steps} steps from that model ({PROMPTS} prompts × 8 samples, lr {LR:g} for all, "
        "exact-answer + format rewards, the recipe's own `algorithm:` section and today's defaults, rollout "
        "correction on). Held-out accuracy: greedy exact match on "
        "256 held-out lists; pass@8 from 8 samples at T = 1. ± is the 95% confidence interval of the mean over "
        f"{len(seeds)} seeds (Student t); *vs grpo* is the mean paired difference of the gain from `grpo` on the same "
        "seeds (same SFT start), with its 95% interval: an interval that excludes 0 separates the two.", "",
        "| recipe | accuracy after SFT | accuracy after GRPO | gain (points) | vs grpo (points) | pass@8 after GRPO | "
        "reward, last 10 steps | generated tokens | GRPO wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    # the gain's paired difference from grpo on the same seeds (same SFT start)
    paired = {n: [a - b for a, b in zip(gs, gains["grpo"])] for n, gs in gains.items() if "grpo" in gains and n != "grpo"}
    for name, runs in results.items():
        diff = paired.get(name)
        lines.append(
            f"| `{name}` | {statistics.mean(r['accuracy_before'] for r in runs):.3f} | "
            f"{_fmt([r['accuracy_after'] for r in runs])} | {_fmt(gains[name], 1, sign=True)} | "
            f"{_fmt(diff, 1, sign=True) if diff else '—'} | {_fmt([r['pass8_after'] for r in runs])} | "
            f"{_fmt([r['reward_last10'] for r in runs])} | "
            f"{statistics.mean(r['generated_tokens'] for r in runs) / 1e3:.0f}k | "
            f"{statistics.mean(r['seconds'] for r in runs):.0f} s |")
    separated = {n: ci95(d) for n, d in paired.items() if len(d) > 1}
    above = [f"`{n}` ({m:+.1f} ± {h:.1f})" for n, (m, h) in separated.items() if m - h > 0]
    below = [f"`{n}` ({m:+.1f} ± {h:.1f})" for n, (m, h) in separated.items() if m + h < 0]
    if separated:
        lines += ["", "Separated from `grpo` at 95% (paired interval of the gain excludes 0): "
                  + (", ".join(above) + " above" if above else "none above")
                  + ("; " + ", ".join(below) + " below" if below else "; none below")
                  + f". With {len(separated)} comparisons at 95% each, about {0.05 * len(separated):.1f} would "
                  "exclude 0 by chance alone; all other differences are within seed-to-seed noise at this budget."]
    lines += ["", "Gain per seed (points): " + "; ".join(
        f"`{n}` " + " / ".join(f"{g:+.1f}" for g in gs) for n, gs in gains.items()) + ".", "",
        "![reward](results_reward.png)", "", "![entropy](results_entropy.png)", ""]
    old = out_md.read_text() if out_md.exists() else ""
    keep = old[old.index("<!-- BEGIN "):] if "<!-- BEGIN " in old else ""  # other scripts' sections
    out_md.write_text("\n".join(lines) + ("\n" + keep if keep else ""))
    for key, title, fname in (("reward_curve", "mean reward", "results_reward.png"),
                              ("entropy_curve", "token entropy", "results_entropy.png")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, runs in results.items():
            n = min(len(r[key]) for r in runs)
            curve = [statistics.mean(r[key][i] for r in runs) for i in range(n)]
            ax.plot(range(1, n + 1), curve, label=name)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs step (mean over seeds {', '.join(map(str, seeds))})")
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out_md.parent / fname, dpi=110)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--recipes", nargs="+", default=RECIPES, choices=RECIPES)
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "compare_algorithms.json"))
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite docs/results.md and the plots from the JSON of an earlier run, without training")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads(Path(args.json).read_text())
        write_report(saved["results"], saved["seeds"], saved["grpo_steps"], args.jobs, Path(args.out), saved["date"])
        print(Path(args.out).read_text())
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(args.seeds, args.recipes, args.grpo_steps, Path(tmp), args.jobs)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"date": datetime.date.today().isoformat(), "cpu": cpu_model(),
                                           "seeds": args.seeds, "grpo_steps": args.grpo_steps, "task": TASK + SFT + GRPO,
                                           "results": results}))
    write_report(results, args.seeds, args.grpo_steps, args.jobs, Path(args.out))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
