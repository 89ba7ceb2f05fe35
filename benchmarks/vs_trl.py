"""Tokenwise against TRL's GRPOTrainer on the same work: seconds per step and completions per second.

    pip install -e ".[trl]"          # TRL 1.16.0, optional: not a tokenwise dependency
    python benchmarks/vs_trl.py [--model DIR] [--threads 1 2] [--steps 12] [--warmup 2] [--repeats 1]
                                [--set KEY=VALUE ...] [--json benchmarks/results/vs_trl.json]

Both sides train the same Hugging Face model directory (default: the quick start's SFT model, made first by
`tokenwise train recipes/quickstart.yaml stages=[sft]`) on the same prompts (the quick start's sort task, training
split, through the tokenizer's chat template) with the same work per step: 32 prompts x 8 completions of at most 8
new tokens at T = 1, the exact-answer reward, the k3 KL to the starting model with coefficient 0.01, PPO-clip 0.2,
token-mean loss, one AdamW step per rollout batch (lr 3e-4), fp32, on the CPU with the same number of torch threads
(OMP_NUM_THREADS, torch.set_num_threads). Each side runs in its own process, one after the other, never side by
side. Seconds per step are wall-clock differences between consecutive step ends (TRL: a callback's on_step_end;
tokenwise: the `time` of consecutive metrics.jsonl rows), after `--warmup` steps; everything a step does is inside.
Generation on both sides is transformers' `generate` (TRL without vLLM; tokenwise's `hf` engine).

Prints a table and writes JSON with the versions and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.kernels._common import write_json  # noqa: E402
from benchmarks.quickstart_seeds import cpu_model  # noqa: E402
from tokenwise.trainer.logging import read_metrics  # noqa: E402

PROMPTS, GROUP, MAX_NEW, KL, LR, CLIP = 32, 8, 8, 0.01, 3e-4, 0.2
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _threads_env(threads: int) -> dict:
    return {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _step_seconds(ends: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(ends, ends[1:])][warmup:]
    if not gaps:
        raise SystemExit(f"too few steps to time: {len(ends)} step ends, warm-up {warmup}")
    return statistics.median(gaps)


def _sort_data():
    from tokenwise.rl.data import sort_task
    return sort_task(num_train=20000, num_heldout=256, min_length=3, max_length=5, seed=0, teacher_error=0.6)["train"]


# ---------------------------------------------------------------------------------------------------------- sides
def run_trl(model: str, threads: int, steps: int, warmup: int, work: Path) -> dict:
    import torch
    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tokenwise.rl.rewards import exact_answer
    data = _sort_data()
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in data["prompt"]],
                                 "answer": list(data["answer"])})

    def reward(prompts, completions, answer, **_):
        return [exact_answer(prompt="", response=c[0]["content"], answer=a, truncated=False)
                for c, a in zip(completions, answer)]

    args = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
        max_completion_length=MAX_NEW, temperature=1.0, beta=KL, epsilon=CLIP, loss_type="dapo",
        learning_rate=LR, num_iterations=1, steps_per_generation=1, gradient_accumulation_steps=1, use_cpu=True,
        bf16=False, fp16=False, report_to="none", logging_steps=1, save_strategy="no", max_steps=steps, seed=0,
        disable_tqdm=True, log_completions=False)
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model), callbacks=[StepEnds()])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"s_per_step": _step_seconds(ends, warmup), "steps": len(ends),
            "completion_len_mean": statistics.mean(lengths)}


def run_tokenwise(model: str, threads: int, steps: int, warmup: int, work: Path, overrides: list[str] = ()) -> dict:
    out = work / f"tokenwise-{threads}"
    cmd = [sys.executable, "-m", "tokenwise.trainer", "train", str(ROOT / "recipes" / "quickstart.yaml"),
           "stages=[grpo]", "model.type=pretrained", f"model.path={model}", f"output_dir={out}",
           f"trainer.threads={threads}", f"grpo.steps={steps}", f"grpo.prompts_per_step={PROMPTS}",
           f"grpo.group_size={GROUP}", "grpo.mini_batches=1", "grpo.ppo_epochs=1", f"grpo.micro_batch_size={PROMPTS * GROUP}",
           f"grpo.optim.lr={LR}", "grpo.eval_every=0", "eval.num_prompts=8", "eval.k=0",
           f"rollout.max_new_tokens={MAX_NEW}", "rollout.temperature=1.0", "rollout.engine=hf",
           "rewards=[{type: exact_answer, weight: 1.0}]", f"algorithm.kl.coef={KL}", "algorithm.kl.estimator=k3",
           f"algorithm.policy_loss.clip_low={CLIP}", f"algorithm.policy_loss.clip_high={CLIP}",
           "logging.progress=false", "logging.tensorboard=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=_threads_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"tokenwise failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = read_metrics(out, "grpo")
    rows = [r for r in rows if "timing/step" in r]
    return {"s_per_step": _step_seconds([r["time"] for r in rows], warmup), "steps": len(rows),
            "completion_len_mean": statistics.mean(r["rollout/response_len_mean"] for r in rows)}


def side_process(side: str, model: str, threads: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    """One side in a fresh process with `threads` threads; its result is the last line it prints."""
    cmd = [sys.executable, __file__, "--side", side, "--model", model, "--threads", str(threads),
           "--steps", str(steps), "--warmup", str(warmup), "--set", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=_threads_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} ({threads} threads) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sft_model(work: Path) -> str:
    """The quick start's SFT stage (its recipe, its 400 steps): the model both sides start from."""
    out = work / "sft"
    print("building the quick start's SFT model (about 2 minutes)", flush=True)
    proc = subprocess.run([sys.executable, "-m", "tokenwise.trainer", "train", str(ROOT / "recipes" / "quickstart.yaml"),
                           "stages=[sft]", f"output_dir={out}", "logging.progress=false",
                           "logging.tensorboard=false"], cwd=ROOT, env={**os.environ, **OFFLINE},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"SFT failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return str(out / "sft" / "final")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model directory both sides train (default: build the quick start's SFT model)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="step gaps left out of the timing")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each side per thread count (alternating)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="tokenwise recipe overrides (e.g. trainer.packing=none, to see what a piece contributes)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "vs_trl.json"))
    ap.add_argument("--side", choices=["trl", "tokenwise"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:  # a child process: one side, one thread count; the result is the last line printed
        with tempfile.TemporaryDirectory() as tmp:
            if args.side == "trl":
                result = run_trl(args.model, args.threads[0], args.steps, args.warmup, Path(tmp))
            else:
                result = run_tokenwise(args.model, args.threads[0], args.steps, args.warmup, Path(tmp), args.set)
            print(json.dumps(result))
        return
    try:
        import trl
    except ImportError:
        raise SystemExit('benchmarks/vs_trl.py needs TRL, an optional install: pip install -e ".[trl]" (trl==1.16.0)') from None
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or sft_model(Path(tmp))
        rows = []
        for threads in args.threads:
            for rep in range(args.repeats):
                for side in (("tokenwise", "trl") if rep % 2 == 0 else ("trl", "tokenwise")):
                    r = side_process(side, model, threads, args.steps, args.warmup, args.set)
                    r.update(side=side, threads=threads, repeat=rep,
                             completions_per_s=PROMPTS * GROUP / r["s_per_step"])
                    print(f"  {side:9s} {threads} thread(s): {r['s_per_step']:.3f} s/step, "
                          f"{r['completions_per_s']:.0f} completions/s (mean length {r['completion_len_mean']:.2f})",
                          flush=True)
                    rows.append(r)
    ratios = {}
    lines = ["| threads | TRL s/step | tokenwise s/step | TRL completions/s | tokenwise completions/s | ratio |",
             "|---:|---:|---:|---:|---:|---:|"]
    for threads in args.threads:
        t = statistics.median(r["s_per_step"] for r in rows if r["side"] == "trl" and r["threads"] == threads)
        w = statistics.median(r["s_per_step"] for r in rows if r["side"] == "tokenwise" and r["threads"] == threads)
        ratios[threads] = t / w
        lines.append(f"| {threads} | {t:.3f} | {w:.3f} | {PROMPTS * GROUP / t:.0f} | {PROMPTS * GROUP / w:.0f} | "
                     f"{t / w:.2f}x |")
    print("\n".join(lines))
    write_json(args.json, rows, cpu=cpu_model(), trl=trl.__version__, transformers=transformers.__version__,
               model="the quick start's SFT model" if not args.model else Path(args.model).name,
               command=" ".join("DIR" if a == args.model else a for a in sys.argv), tokenwise_overrides=args.set,
               ratios={str(k): round(v, 3) for k, v in ratios.items()},
               work={"prompts": PROMPTS, "group": GROUP, "max_new_tokens": MAX_NEW, "kl_k3": KL, "lr": LR,
                     "clip": CLIP, "dtype": "float32", "steps": args.steps, "warmup": args.warmup})


if __name__ == "__main__":
    main()
