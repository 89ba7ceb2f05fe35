"""MoE routing replay (`algorithm.routing_replay`): how far the learner's old-policy log-probs are from the rollout
engine's, with and without replaying the engine's recorded experts, when engine and learner disagree on routing.

Setting: our gated MoE decoder (recipes/moe_gated_tiny.yaml's model: 4 experts, top-2) after a short SFT on the
built-in sort task; the rollout engine samples in bfloat16, the learner scores in float32 (the usual split on GPUs,
where engines run bf16 and learners keep fp32 masters). Per seed: one batch of prompts x G samples; the learner
scores it once routing by itself, once replaying the recorded experts. Reported per seed and as a range:
  moe/routing_agreement   share of response token x MoE layer top-k sets the fp32 router picks like the bf16 engine
  rollout/logprob_abs_diff   mean |log p_learner - log p_engine| over response tokens (as the GRPO loop logs it)
  flipped-token share     tokens whose log-prob differs by > 0.05

    .venv/bin/python benchmarks/routing_replay.py [--seeds 0 1 2 3 4] [--engine hf|vllm] [--sft-steps 150]

Prints a table and writes benchmarks/results/routing_replay.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sft_model(seed: int, steps: int, out: Path, experts: int, top_k: int) -> Path:
    """recipes/moe_gated_tiny.yaml's SFT stage, `steps` steps, seed `seed`, with `experts` experts of which `top_k`
    route each token (their width scaled to keep the active parameters): its final model directory."""
    width = 128 * 2 // top_k
    subprocess.run([sys.executable, "-m", "tokenwise.trainer", "train", str(ROOT / "recipes" / "moe_gated_tiny.yaml"),
                    "stages=[sft]", f"sft.steps={steps}", "sft.eval_every=0", f"seed={seed}", f"output_dir={out}",
                    f"model.num_experts={experts}", f"model.experts_per_token={top_k}",
                    f"model.moe_intermediate_size={width}"], check=True, stdout=subprocess.DEVNULL)
    return out / "sft" / "final"


def measure(model_dir: Path, *, seed: int, engine: str, prompts: int, group: int, device: str) -> dict:
    from tokenwise.rl.algorithm import Algorithm
    from tokenwise.rl.types import TrainBatch
    from tokenwise.trainer.config import AlgorithmConfig, OptimConfig, RolloutConfig, SortData
    from tokenwise.trainer.learner import Learner, local_pool
    from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
    from tokenwise.trainer.rollout import build_rollout
    from tokenwise.trainer.run import load_task
    cpu = torch.device(device)
    tok = load_tokenizer(model_dir)
    fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
    rows = list(load_task(SortData(min_length=3, max_length=5, num_heldout=prompts, seed=seed))["heldout"])
    rollout = build_rollout(RolloutConfig(engine=engine, max_new_tokens=8, temperature=1.0), model_dir=model_dir,
                            tokenizer=tok, formatter=fmt, dtype=torch.bfloat16, device=cpu, seed=seed)
    batch = TrainBatch.from_rollouts(rollout.generate(rows, n=group, seed=seed))
    del rollout
    out = {"seed": seed, "tokens": int(batch.response_mask.sum())}
    for replay in (False, True):
        learner = Learner(model_dir, tok, optim=OptimConfig(), total_updates=1, device=cpu, dtype=torch.float32,
                          algorithm=Algorithm(AlgorithmConfig(), max_response_len=8), routing_replay=replay)
        pool = local_pool(learner, micro_batch_size=64)
        scored = pool.score(batch)
        mask = batch.response_mask > 0
        diff = (scored.old_logprobs - batch.rollout_logprobs).abs()[mask]
        learner._tally = tally = [0, 0]  # agreement of the learner's own routing, from a forward over the batch
        learner._forward(learner.model, batch)
        learner._tally = None
        key = "replay" if replay else "own"
        out[key] = {"logprob_abs_diff": float(diff.mean()), "flipped_frac": float((diff > 0.05).float().mean()),
                    "logprob_abs_diff_max": float(diff.max()), "routing_agreement": tally[0] / max(1, tally[1])}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--experts", type=int, default=4, help="experts per MoE layer (the recipe's: 4)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (the recipe's: 2)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (vLLM's own routed-experts output on GPU)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "routing_replay.json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            t0 = time.perf_counter()
            model = sft_model(seed, args.sft_steps, Path(tmp) / f"seed{seed}", args.experts, args.top_k)
            runs.append(measure(model, seed=seed, engine=args.engine, prompts=args.prompts, group=args.group,
                                device=args.device))
            runs[-1]["seconds"] = time.perf_counter() - t0
            r = runs[-1]
            print(f"seed {seed}: agreement {r['own']['routing_agreement']:.4f}  |dlogp| own {r['own']['logprob_abs_diff']:.5f}"
                  f" -> replay {r['replay']['logprob_abs_diff']:.5f}  ({r['seconds']:.0f} s)", flush=True)
    rng = lambda k, f: (min(r[k][f] for r in runs), max(r[k][f] for r in runs))  # noqa: E731
    ratio = [r["replay"]["logprob_abs_diff"] / r["own"]["logprob_abs_diff"] for r in runs]
    print(f"\nrouting replay, {args.engine} engine in bf16, fp32 learner, {len(runs)} seeds ({args.experts} experts, "
          f"top-{args.top_k}; {args.prompts} prompts x {args.group}, SFT {args.sft_steps} steps)")
    print(f"{'':28s}{'own routing':>22s}{'replayed':>22s}")
    for f, name in (("routing_agreement", "routing agreement"), ("logprob_abs_diff", "|dlogp| mean"),
                    ("logprob_abs_diff_max", "|dlogp| max"), ("flipped_frac", "tokens |dlogp| > 0.05")):
        a, b = rng("own", f), rng("replay", f)
        replayed = f"{b[0]:>10.5f}–{b[1]:<11.5f}" if f != "routing_agreement" else f"{'(replayed)':>15s}"
        print(f"{name:28s}{a[0]:>10.5f}–{a[1]:<11.5f}{replayed}")
    print(f"{'replay / own |dlogp|':28s}{min(ratio):>10.3f}–{max(ratio):<11.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "engine": args.engine,
                                    "device": args.device, "engine_dtype": "bfloat16", "learner_dtype": "float32",
                                    "sft_steps": args.sft_steps, "experts": args.experts, "top_k": args.top_k, "prompts": args.prompts, "group": args.group,
                                    "runs": runs, "replay_over_own": ratio}, indent=1) + "\n")
    print(f"wrote {args.out}")
    print(json.dumps({"routing_agreement_min": rng("own", "routing_agreement")[0],
                      "logprob_abs_diff_own": rng("own", "logprob_abs_diff")[1],
                      "logprob_abs_diff_replay": rng("replay", "logprob_abs_diff")[1]}))  # gpu_check.sh's summary


if __name__ == "__main__":
    main()
