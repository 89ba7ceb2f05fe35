"""Learning that holds on any machine: the quick start's design, at test size, on two seeds.

Floating-point results differ between CPUs (and thread counts), so a run's trajectory is one draw; a test that asserts
learning must hold with a margin on every draw, not on one seed's luck. The quick start's design gives such a margin:
SFT converges to the sloppy teacher's plateau (the longest lists cut short), and GRPO with the verifier lifts greedy
accuracy to what sampling already reaches. These settings (a 0.2M-parameter model, lists of 3-4 digits, ~45 s a seed
on 2 cores) were measured on seeds 0-4 (AMD EPYC, 1 thread; seeds 0-1 also with 2 threads, same numbers):
after SFT 0.516 / 0.500 / 0.773 / 0.539 / 0.492, after GRPO 0.992 / 0.969 / 0.984 / 0.969 / 0.977 (gains +21 to
+49 points). The test asks for half of the smallest gain.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tokenwise.trainer.cli import main

pytestmark = pytest.mark.slow

GUARD = {
    "name": "guard", "stages": ["sft", "grpo"],
    "model": {"type": "builtin", "hidden_size": 96, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 256, "max_position_embeddings": 64},
    "data": {"type": "sort", "min_length": 3, "max_length": 4, "teacher_error": 0.6},
    "rollout": {"max_new_tokens": 8},
    "sft": {"steps": 300, "batch_size": 64, "optim": {"lr": 3.0e-3, "warmup_steps": 20}},
    "grpo": {"steps": 15, "prompts_per_step": 32, "group_size": 8, "mini_batches": 2, "micro_batch_size": 256,
             "optim": {"lr": 3.0e-4}},
    "algorithm": {"kl": {"coef": 0.01}},
    "eval": {"num_prompts": 128, "k": 0},
    "logging": {"progress": False, "plot": False, "tensorboard": False},
}


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_goes_beyond_the_sloppy_teacher_on_every_seed(seed, tmp_path):
    path = tmp_path / "guard.yaml"
    path.write_text(yaml.safe_dump({**GUARD, "seed": seed}))
    assert main(["train", str(path), f"output_dir={tmp_path / 'run'}"]) == 0
    stages = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    after_sft, after_grpo = stages["grpo"]["accuracy_before"], stages["grpo"]["accuracy_after"]
    # SFT learned to sort and the teacher's habit: three-digit lists right, most four-digit lists cut short
    assert 0.35 <= after_sft <= 0.9, after_sft
    assert after_grpo >= after_sft + 0.10, (after_sft, after_grpo)
