"""The calculator tool task over seeds: does GRPO's gain over the SFT start hold beyond one seed's luck?

    python benchmarks/tool_task_seeds.py [--seeds 0 1 2 3 4] [--jobs 2] [--work DIR] [--set key=value ...]
                                         [--json PATH] [--plot PNG]

Runs `tokenwise train recipes/tool_calculator.yaml seed=S` for every seed (each in its own single-thread process,
`--jobs` side by side), then reads each run: held-out accuracy (greedy, with the calculator) after SFT and after GRPO,
the share of episodes that called the tool and the share of tool calls that failed (malformed, unknown tool, bad
arguments) from the run's summary.json, and held-out accuracy *without* the tool (the same evaluation, single turn:
what `tokenwise eval RUN --no-env` prints) of both stages' final models. Prints a table with the median and min–max of
each column and writes benchmarks/results/tool_task_seeds.json.

`--plot PNG` draws each seed's GRPO curves: held-out accuracy (greedy, with the calculator) at every evaluation and
the training reward per step (docs/results_tool_task.png).

`--work DIR` keeps the run folders (DIR/seedS) and reuses any that already finished, so a table can be rebuilt
without training again; wall time is read from the runs' own metrics (first to last step, both stages).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.kernels._common import write_json  # noqa: E402
from benchmarks.quickstart_seeds import QUIET, _spread, cpu_model, train_process  # noqa: E402
from tokenwise.trainer.logging import read_metrics  # noqa: E402

RECIPE = ROOT / "recipes" / "tool_calculator.yaml"


def accuracy_without_tools(run: Path, model_dir: Path) -> float:
    """Greedy held-out accuracy of `model_dir` with the run's settings but no environment (single turn)."""
    from tokenwise.trainer.config import EnvConfig, load_config
    from tokenwise.trainer.evaluate import engine_for, run_heldout_eval
    from tokenwise.trainer.cli import RESOLVED_CONFIG
    from tokenwise.trainer.run import load_task
    cfg = load_config(run / RESOLVED_CONFIG)
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, env=EnvConfig()))
    engine = engine_for(str(model_dir), cfg=cfg, kind=cfg.rollout.engine)
    return run_heldout_eval(engine, cfg, load_task(cfg.data)["heldout"])["eval/accuracy"]


def wall_minutes(run: Path) -> float:
    """First to last logged step over the run's stages (from metrics.jsonl timestamps)."""
    times = [row["time"] for stage in ("sft", "grpo") for row in read_metrics(run, stage)]
    return (max(times) - min(times)) / 60


def train_one(seed: int, work: Path, overrides: list[str]) -> None:
    run = work / f"seed{seed}"
    if not (run / "summary.json").is_file():
        train_process([str(RECIPE), f"seed={seed}", f"output_dir={run}", *QUIET, *overrides], 1)


def read_one(seed: int, work: Path) -> dict:
    """One finished run's row (its evaluations without the tool run here, one model at a time: loading models
    from several threads at once is not safe in transformers)."""
    run = work / f"seed{seed}"
    stages = json.loads((run / "summary.json").read_text())["stages"]
    sft, grpo = stages["grpo"]["eval_before"], stages["grpo"]["eval_after"]
    row = {"seed": seed, "minutes": round(wall_minutes(run), 1),
           "after_sft": sft["eval/accuracy"], "after_grpo": grpo["eval/accuracy"],
           "gain_points": 100 * (grpo["eval/accuracy"] - sft["eval/accuracy"]),
           "tool_use_sft": sft["eval/tool_use_frac"], "tool_use_grpo": grpo["eval/tool_use_frac"],
           "tool_error_sft": sft["eval/tool_error_frac"], "tool_error_grpo": grpo["eval/tool_error_frac"],
           "no_tools_sft": accuracy_without_tools(run, run / "sft" / "final"),
           "no_tools_grpo": accuracy_without_tools(run, run / "grpo" / "final")}
    print(f"  seed {seed}: with the calculator {row['after_sft']:.3f} → {row['after_grpo']:.3f} "
          f"({row['gain_points']:+.1f} points), tool use {row['tool_use_sft']:.2f} → {row['tool_use_grpo']:.2f}, "
          f"without it {row['no_tools_sft']:.3f} → {row['no_tools_grpo']:.3f}", flush=True)
    return row


COLUMNS = [("after_sft", "accuracy after SFT", ".3f"), ("after_grpo", "accuracy after GRPO", ".3f"),
           ("gain_points", "gain (points)", "+.1f"), ("tool_use_sft", "tool use after SFT", ".2f"),
           ("tool_use_grpo", "tool use after GRPO", ".2f"), ("tool_error_grpo", "failed calls after GRPO", ".3f"),
           ("no_tools_sft", "no tool: after SFT", ".3f"), ("no_tools_grpo", "no tool: after GRPO", ".3f"),
           ("minutes", "wall time (min)", ".1f")]


def table(rows: list[dict]) -> str:
    lines = ["| seed | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---:|" + "---:|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(format(r[key], fmt) for key, _, fmt in COLUMNS) + " |")
    lines.append("| median (min – max) | " + " | ".join(_spread([r[key] for r in rows], fmt) for key, _, fmt in COLUMNS)
                 + " |")
    return "\n".join(lines)


def grpo_curves(run: Path) -> dict[str, list]:
    """One run's GRPO stage from its metrics.jsonl: (step, held-out accuracy) at every evaluation and the mean reward
    of every step's episodes."""
    rows = read_metrics(run, "grpo")
    return {"eval": [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r],
            "reward": [(r["step"], r["reward/mean"]) for r in rows if "reward/mean" in r]}


def plot(work: Path, seeds: list[int], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for seed in seeds:
        curves = grpo_curves(work / f"seed{seed}")
        line, = left.plot(*zip(*curves["eval"]), marker="o", ms=3, label=f"seed {seed}")
        right.plot(*zip(*curves["reward"]), color=line.get_color(), lw=1)
    left.set(xlabel="GRPO step", ylabel="held-out accuracy (with the calculator)", ylim=(0, 1))
    right.set(xlabel="GRPO step", ylabel="mean reward of the step's episodes", ylim=(0, 1))
    left.legend(fontsize=8)
    fig.suptitle("Calculator tool task: GRPO from the SFT start, per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--jobs", type=int, default=2, help="single-thread runs side by side")
    ap.add_argument("--work", default=None, help="keep run folders here (DIR/seedS) and reuse finished ones")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for every run")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "tool_task_seeds.json"))
    ap.add_argument("--plot", default=None, metavar="PNG", help="also draw the GRPO curves of every seed here")
    args = ap.parse_args()
    print(f"tool task over seeds {args.seeds} on {cpu_model()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda s: train_one(s, work, args.set), args.seeds))
        rows = [read_one(s, work) for s in args.seeds]
        if args.plot:
            plot(work, args.seeds, args.plot)
    print(table(rows))
    write_json(args.json, rows, cpu=cpu_model(), recipe=str(RECIPE.relative_to(ROOT)), overrides=args.set,
               jobs=args.jobs, min_gain_points=min(r["gain_points"] for r in rows))


if __name__ == "__main__":
    main()
