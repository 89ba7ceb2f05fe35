"""Shared fixtures: offline Hugging Face libraries, a tiny recipe, and the CLI run in-process."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


HAS_CUDA = _has_cuda()
if not HAS_CUDA:  # Triton kernels run in its CPU interpreter; must be set before any @triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenwise.trainer.logging import read_metrics  # noqa: E402,F401  (the tests import it from here)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for a test: 1-layer 32-wide model, a handful of steps.
TINY = {
    "name": "tiny",
    "seed": 0,
    "model": {"type": "builtin", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
              "intermediate_size": 64, "max_position_embeddings": 64},
    "data": {"type": "arithmetic", "num_train": 64, "num_heldout": 16, "min_digits": 1, "max_digits": 1},
    "rollout": {"max_new_tokens": 4, "batch_size": 64},
    "sft": {"steps": 4, "batch_size": 8, "micro_batch_size": 8},
    "grpo": {"steps": 6, "prompts_per_step": 4, "group_size": 4, "micro_batch_size": 8},
    "algorithm": {"kl": {"coef": 0.01}},
    "eval": {"num_prompts": 8},
    "logging": {"progress": False, "plot": False},
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def tiny_recipe(tmp_path):
    """write(**sections) → path of a recipe file: TINY with the given sections merged in."""
    def write(name: str = "recipe.yaml", **sections) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(_merge(TINY, sections)))
        return path
    return write


def builtin_model_dir(tmp_path_factory, name: str, *, num_heads: int = 2, num_kv_heads: int = 1) -> Path:
    """A saved built-in model directory, 2 layers, 32 wide: what the learner-level tests load."""
    from tokenwise.models.builtin import save_builtin
    d = tmp_path_factory.mktemp(name)
    save_builtin(d, seed=0, hidden_size=32, num_layers=2, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 intermediate_size=64, max_position_embeddings=64)
    return d


def stage_env(cfg, run_dir: Path, stage: str = "grpo"):
    """The StageEnv trainer/run.py builds for `cfg` (a RunConfig) on CPU, rewards included."""
    import torch
    from tokenwise.trainer.reward_process import reward_specs
    from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
    from tokenwise.trainer.run import load_task, prepare_base_model
    from tokenwise.trainer.stage import StageEnv
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir, tok_dir = prepare_base_model(cfg, run_dir)
    tok = load_tokenizer(tok_dir)
    return StageEnv(cfg=cfg, run_dir=run_dir, stage=stage, init_dir=Path(model_dir), tokenizer_dir=Path(tok_dir),
                    tokenizer=tok, formatter=PromptFormatter(tok, system_prompt=None, use_chat_template=True),
                    data=load_task(cfg.data), device=torch.device("cpu"), dtype=torch.float32,
                    rewards=reward_specs(cfg.rewards))


def rollout_batch(lengths: list[int], group_size: int, prompt_len: int = 2):
    """A RolloutBatch of len(lengths) responses with those valid lengths (prompt i is the text str(i)), for tests of
    batch-level pieces that never look at token ids."""
    import torch
    from tokenwise.rl.types import RolloutBatch
    B, T = len(lengths), max(lengths)
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return RolloutBatch(
        prompt_ids=torch.ones(B, prompt_len, dtype=torch.long), prompt_mask=torch.ones(B, prompt_len, dtype=torch.long),
        response_ids=torch.ones(B, T, dtype=torch.long), response_mask=mask, rollout_logprobs=torch.zeros(B, T),
        truncated=torch.zeros(B, dtype=torch.bool), prompts=[str(i) for i in range(B)], answers=["a"] * B,
        responses=["r"] * B, group_size=group_size, policy_version=0)


def perturbed_model(model_dir, scale: float, seed: int = 1):
    """The model at `model_dir` with Gaussian noise of std `scale` added to every weight (eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def switched_logprobs(old, new, prompt, response, first_new: int):
    """Partial rollouts' reference, by hand: the log-probs of `response` (1-D ids after 1-D `prompt`) when the
    weights switch from `old` to `new` after token first_new - 1 was sampled: tokens before first_new are scored by
    `old`; later ones by `new` reading old's KV cache of the prompt and tokens 0 .. first_new - 2 (the forward that
    feeds token first_new - 1 already runs on the new weights)."""
    import torch
    full = torch.cat([prompt, response])[None]
    P, L = prompt.numel(), response.numel()
    with torch.no_grad():
        lp_old = old(full).logits[0].log_softmax(-1)
        past = old(full[:, :P + first_new - 1], use_cache=True).past_key_values
        lp_new = new(full[:, P + first_new - 1:], past_key_values=past, use_cache=True).logits[0].log_softmax(-1)
    return torch.stack([lp_old[P - 1 + j, response[j]] for j in range(first_new)]
                       + [lp_new[i, response[first_new + i]] for i in range(L - first_new)])
