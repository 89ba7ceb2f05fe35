"""LoRA training (`model.lora`, trainer/lora.py): merged weights equal peft's own merge, only adapters train, the
reference is the base model, runs save the merged model plus the adapter and resume exactly, and the weight sync to
the rollout engine carries the merged weights (debug and cluster mode)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import read_metrics
from tokenwise.rl.errors import ConfigError
from tokenwise.trainer.cli import main
from tokenwise.trainer.config import LoraSpec, OptimConfig

MOE_GATED = {"arch": "tokenwise", "attn_gate": "headwise", "ffn": "moe", "num_experts": 4, "experts_per_token": 2,
             "moe_intermediate_size": 32}
LORA = {"r": 4, "alpha": 8.0, "target_parameters": ["experts_gate_up", "experts_down"]}


def _randomise_adapters(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_merged_state_equals_peft_merge_on_gated_moe_decoder():
    from tokenwise.models.decoder import TokenwiseConfig, TokenwiseForCausalLM
    from tokenwise.trainer.lora import add_adapters, merged_state
    torch.manual_seed(0)
    base = TokenwiseForCausalLM(TokenwiseConfig(vocab_size=64, hidden_size=32, num_attention_heads=2,
                                                num_key_value_heads=1, attn_gate="headwise", ffn="moe", num_experts=4,
                                                moe_intermediate_size=16, tie_word_embeddings=True))
    names = set(base.state_dict())
    model = add_adapters(base, LoraSpec(**LORA), seed=0)
    _randomise_adapters(model, seed=1)
    merged = dict(merged_state(model))
    assert set(merged) == names
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    for k in names:
        torch.testing.assert_close(merged[k], reference[k], atol=1e-6, rtol=1e-6)
    # the merged weights compute what the adapted model computes, and differ from the base where adapted
    plain = TokenwiseForCausalLM(base.config)
    plain.load_state_dict(merged)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    frozen = model.get_base_model().state_dict()
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           frozen["model.layers.0.self_attn.q_proj.base_layer.weight"])


def test_merged_state_makes_each_delta_when_its_weight_is_yielded(monkeypatch):
    """A sync or save of a LoRA policy holds one weight-sized delta at a time: by the k-th adapted weight yielded,
    at most k deltas have been made (the old code made every layer's before yielding the first)."""
    from peft.tuners.lora import LoraLayer
    from tokenwise.models.decoder import TokenwiseConfig, TokenwiseForCausalLM
    from tokenwise.trainer.lora import add_adapters, merged_state
    torch.manual_seed(0)
    base = TokenwiseForCausalLM(TokenwiseConfig(vocab_size=64, hidden_size=32, num_attention_heads=2,
                                                num_key_value_heads=1, num_hidden_layers=3))
    model = add_adapters(base, LoraSpec(r=4, alpha=8.0), seed=0)
    _randomise_adapters(model, seed=1)
    made = []
    for cls in {type(m) for m in model.modules() if isinstance(m, LoraLayer)}:
        original = cls.get_delta_weight
        monkeypatch.setattr(cls, "get_delta_weight", lambda self, adapter, _f=original: made.append(1) or _f(self, adapter))
    adapted_seen = 0
    frozen = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items()}
    for name, tensor in merged_state(model):
        if not torch.equal(tensor, frozen[name]):
            adapted_seen += 1
            assert len(made) <= adapted_seen, (name, len(made), adapted_seen)
    assert adapted_seen >= 3 * 2 and len(made) == adapted_seen  # q and v of 3 layers at least, each made once


def test_lora_learner_trains_only_adapters_and_its_reference_is_the_base(tmp_path):
    from tokenwise.models.builtin import save_builtin
    from tokenwise.trainer.learner import Learner, local_pool
    from tokenwise.trainer.loading import PromptFormatter, load_causal_lm, load_tokenizer
    from tokenwise.trainer.sft import sft_batch
    d = save_builtin(tmp_path / "m", seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     intermediate_size=64, max_position_embeddings=64)
    tok = load_tokenizer(d)
    fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
    learner = Learner(d, tok, optim=OptimConfig(lr=1e-2, warmup_steps=0), total_updates=5, device=torch.device("cpu"),
                      dtype=torch.float32, reference_dir=d, lora=LoraSpec(r=4))
    trainable = [p for group in learner.opt.optimizer.param_groups for p in group["params"]]
    lora_params = [p for n, p in learner.model.named_parameters() if "lora_" in n]
    assert len(trainable) == len(lora_params) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    base = load_causal_lm(d, dtype=torch.float32, device=torch.device("cpu"))
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(8)]
    pool = local_pool(learner, micro_batch_size=8)
    for _ in range(3):
        pool.sft_step(sft_batch(rows, tok, fmt))
    merged = dict(learner.full_parameters())
    assert set(merged) == set(base.state_dict())
    frozen = {k.replace(".base_layer", ""): v for k, v in learner.model.get_base_model().state_dict().items()
              if "lora_" not in k}
    assert all(torch.equal(frozen[k], v) for k, v in base.state_dict().items())  # the base never moves
    assert not torch.equal(merged["model.layers.0.mlp.down_proj.weight"], base.state_dict()["model.layers.0.mlp.down_proj.weight"])
    # the reference (adapters off) scores exactly as the base model does; the policy does not
    batch = sft_batch(rows, tok, fmt)
    with torch.no_grad():
        ref = learner.reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        want = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        policy = learner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ref, want, atol=1e-6, rtol=1e-6)
    assert (policy - want).abs().max() > 1e-3
    out = tmp_path / "saved"
    learner.save_model(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(reloaded[k], merged[k]) for k in merged)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_config_errors(tiny_recipe, tmp_path, capsys):
    with pytest.raises(ConfigError, match="zero_stage 3"):
        from tokenwise.trainer.config import load_config
        load_config(tiny_recipe(model={"lora": {"r": 4}}, trainer={"mode": "ray", "ray": {"zero_stage": 3}}))
    path = tiny_recipe(model={"lora": {"r": 4, "target_modules": ["qkv"]}})
    assert main(["train", str(path), f"output_dir={tmp_path / 'run'}"]) != 0
    err = capsys.readouterr().err
    assert "model.lora" in err and "q_proj" in err and "Traceback" not in err


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(("perf/", "timing/"))} for r in records]


def _digit_reward(tmp_path) -> dict:
    """A reward with spread even for an untrained model (the share of digits in the response): GRPO's adapters move."""
    path = tmp_path / "digits.py"
    path.write_text("def digits(*, prompt, response, answer, truncated):\n"
                    "    return sum(c.isdigit() for c in response) / max(1, len(response))\n")
    return {"type": "python", "function": f"{path}:digits", "weight": 1.0}


def test_lora_run_of_gated_moe_model_saves_merged_model_and_resumes_exactly(tiny_recipe, tmp_path):
    """Debug mode, SFT then GRPO with adapters on attention, dense and expert weights: each stage's final directory
    is the merged model (transformers loads it) with the adapter beside it; the rollout engine, synced with the merged
    weights, scores like the learner; a run stopped mid-GRPO and resumed ends with the same weights and metrics."""
    recipe = tiny_recipe(model={**MOE_GATED, "lora": {**LORA, "target_modules": ["q_proj", "o_proj"]}},
                         sft={"optim": {"lr": 3e-2}}, grpo={"optim": {"lr": 3e-2}}, rewards=[_digit_reward(tmp_path)])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", str(recipe), f"output_dir={straight}"]) == 0
    for stage in ("sft", "grpo"):
        final = straight / stage / "final"
        assert type(AutoModelForCausalLM.from_pretrained(final)).__name__ == "TokenwiseForCausalLM"
        assert (final / "adapter" / "adapter_config.json").is_file()
    steps = [r for r in read_metrics(straight, "grpo") if "actor/loss" in r]
    assert all(r["actor/grad_norm"] > 0 for r in steps)  # the adapters move, and each step syncs merged weights
    assert max(r["rollout/logprob_abs_diff"] for r in steps) < 1e-4
    sft = [r["sft/loss"] for r in read_metrics(straight, "sft") if "sft/loss" in r]
    assert sft[-1] < sft[0]
    assert main(["train", str(recipe), f"output_dir={resumed}", "--stop-after-steps", "8"]) == 0
    assert main(["resume", str(resumed)]) == 0
    for stage in ("sft", "grpo"):
        assert _comparable(read_metrics(straight, stage)) == _comparable(read_metrics(resumed, stage)), stage
    wa = AutoModelForCausalLM.from_pretrained(straight / "grpo" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed / "grpo" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_lora_in_cluster_mode_syncs_merged_weights(tiny_recipe, tmp_path):
    """One DeepSpeed ZeRO-2 learner actor with adapters and one rollout actor: the rollout engine receives merged
    weights every step (its log-probs equal the learner's) and the final model is merged."""
    recipe = tiny_recipe(stages=["grpo"], model={"lora": {"r": 4}}, grpo={"steps": 3, "optim": {"lr": 3e-2}},
                         rewards=[_digit_reward(tmp_path)],
                         trainer={"mode": "ray", "ray": {"num_cpus": 2, "num_learners": 1, "num_rollout_workers": 1,
                                                         "cpus_per_learner": 1, "cpus_per_rollout": 1,
                                                         "zero_stage": 2}})
    run = tmp_path / "run"
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    steps = [r for r in read_metrics(run, "grpo") if "actor/loss" in r]
    assert len(steps) == 3 and all(r["actor/grad_norm"] > 0 for r in steps)
    assert max(r["rollout/logprob_abs_diff"] for r in steps) < 1e-4
    assert (run / "grpo" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(run / "grpo" / "final")
