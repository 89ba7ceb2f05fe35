"""Our decoder against transformers' own forward for Llama, Qwen2, Qwen3, Qwen2-MoE and Qwen3-Next (full attention):
tiny random checkpoints saved locally, logits within 1e-5 (fp32), exact weight round trips, generation with a cache."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tokenwise.models.adapters import AdapterError, from_hf, load_as_tokenwise, to_hf
from tokenwise.models.decoder import TokenwiseConfig, TokenwiseForCausalLM

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
           decoder_sparse_step=1, mlp_only_layers=[])
CONFIGS = {
    "llama": dict(BASE),
    "qwen2": dict(BASE),
    "qwen3": dict(BASE, head_dim=16),  # head_dim != hidden / heads
    "qwen2_moe": dict(BASE, **MOE, norm_topk_prob=False),
    "qwen3_next": dict(BASE, **MOE, head_dim=16, layer_types=["full_attention"] * 2, norm_topk_prob=True),
}


def _hf_model(arch: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **{**CONFIGS[arch], **extra}))
    with torch.no_grad():  # move every weight off its special init (ones, zeros) so each mapping is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    return ids, mask


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_logits_match_transformers_and_round_trip_is_exact(arch, tmp_path):
    hf = _hf_model(arch)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_as_tokenwise(tmp_path / "hf").eval()
    ids, mask = _inputs()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    valid = mask.bool()
    torch.testing.assert_close(b[valid], a[valid], atol=1e-5, rtol=0)
    back = from_hf(to_hf(ours, arch))  # ours -> transformers -> ours
    sa, sb = ours.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    to_hf(ours, arch).save_pretrained(tmp_path / "export")  # what transformers loads as the original architecture
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(again) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask, position_ids=pos).logits, a,
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3_next"])
def test_greedy_generation_with_cache_matches_transformers(arch):
    hf = _hf_model(arch, seed=2)
    ours = from_hf(hf).eval()
    ids, mask = _inputs(seed=3)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(**kw), hf.generate(**kw))


def test_our_checkpoints_load_through_auto_classes(tmp_path):
    model = TokenwiseForCausalLM(TokenwiseConfig(vocab_size=50, hidden_size=32, num_attention_heads=4,
                                                 attn_gate="headwise", ffn="moe", num_experts=4,
                                                 shared_expert_intermediate_size=16))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again, TokenwiseForCausalLM)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_unsupported_checkpoints_are_refused_with_a_reason():
    with pytest.raises(AdapterError, match="full_attention"):
        from_hf(_hf_model("qwen3_next", layer_types=["linear_attention", "full_attention"]))
    with pytest.raises(AdapterError, match="cannot be exported as llama"):
        to_hf(TokenwiseForCausalLM(TokenwiseConfig(attn_gate="headwise")), "llama")


@pytest.mark.parametrize("mode", ["headwise", "elementwise"])
def test_retrofitted_gates_keep_the_function_and_open_gates_are_ungated(mode):
    from tokenwise.models.decoder import retrofit_gates
    dense = from_hf(_hf_model("qwen2", seed=4)).eval()  # q/k/v biases: the gate rows get a bias too
    gated = retrofit_gates(dense, mode).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        a = dense(input_ids=ids, attention_mask=mask).logits
        b = gated(input_ids=ids, attention_mask=mask).logits
    assert gated.config.attn_gate == mode
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    # gates forced open (σ = 1 through a large gate bias) with the original o_proj: exactly ungated attention
    with torch.no_grad():
        for layer, orig in zip(gated.model.layers, dense.model.layers):
            attn = layer.self_attn
            bias = attn.q_proj.bias.view(attn.heads, attn.head_dim + attn.gate_dim)
            bias[:, attn.head_dim:] = 40.0
            attn.o_proj.weight.copy_(orig.self_attn.o_proj.weight)
        c = gated(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(c, a, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="already has"):
        retrofit_gates(gated, mode)


def test_checkpoint_converted_into_our_code_with_gates_then_exported_back(tmp_path):
    """model.code tokenwise + retrofit_gate through the run's base-model preparation, and `tokenwise export`."""
    from types import SimpleNamespace
    from tokenwise.trainer.cli import main
    from tokenwise.trainer.run import convert_pretrained
    from tokenwise.models.builtin import build_tokenizer
    hf = _hf_model("qwen3", seed=5)
    hf.save_pretrained(tmp_path / "qwen3")
    build_tokenizer().save_pretrained(tmp_path / "qwen3")
    m = SimpleNamespace(path=str(tmp_path / "qwen3"), tokenizer_path=None, retrofit_gate="none")
    convert_pretrained(m, tmp_path / "ours")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert isinstance(ours, TokenwiseForCausalLM) and ours.config.qk_norm
    assert main(["export", str(tmp_path / "ours"), "--arch", "qwen3", "--out", str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert type(back) is type(hf)
    sa, sb = hf.state_dict(), back.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    m.retrofit_gate = "headwise"
    convert_pretrained(m, tmp_path / "gated")
    gated = AutoModelForCausalLM.from_pretrained(tmp_path / "gated")
    ids, mask = _inputs()
    valid = mask.bool()  # padding positions hold garbage in both
    with torch.no_grad():
        torch.testing.assert_close(gated(input_ids=ids, attention_mask=mask).logits[valid],
                                   hf(input_ids=ids, attention_mask=mask).logits[valid], atol=1e-5, rtol=0)
    assert main(["export", str(tmp_path / "gated"), "--arch", "qwen3", "--out", str(tmp_path / "no")]) == 2


def test_lora_from_peft_wraps_gates_and_experts_and_merges_back():
    """peft LoRA on our decoder: q_proj (which holds the gate rows), o_proj and the 3-D expert weights
    (target_parameters); only adapters train, and merging gives the adapted function as a plain model."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = TokenwiseForCausalLM(TokenwiseConfig(vocab_size=50, hidden_size=32, num_attention_heads=4,
                                                num_hidden_layers=2, attn_gate="elementwise", ffn="moe",
                                                num_experts=4, moe_intermediate_size=16))
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                           target_parameters=["experts_gate_up", "experts_down"], init_lora_weights=False))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    assert any(".mlp." in n for n in trainable) and any("q_proj" in n for n in trainable)  # experts: on the MoE module
    out = lora(input_ids=ids).logits
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if p.requires_grad)
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
        assert not torch.allclose(adapted, before)  # non-zero adapters change the function
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
    assert isinstance(merged, TokenwiseForCausalLM)


def test_retrofit_recipe_starts_from_the_dense_models_function_and_trains_the_gates(tiny_recipe, tmp_path):
    """recipes/retrofit_gates.yaml's route on a tiny dense SFT model: the GRPO stage's base is our decoder with
    headwise gates, its step-0 greedy evaluation equals the dense model's final SFT evaluation, and GRPO moves the
    gates (their mean sigma leaves 0.5)."""
    import yaml
    from conftest import ROOT, read_metrics
    from tokenwise.trainer.cli import main
    from transformers import AutoModelForCausalLM
    dense = tmp_path / "dense"
    assert main(["train", str(tiny_recipe(stages=["sft"], sft={"steps": 20})), f"output_dir={dense}"]) == 0
    recipe = yaml.safe_load((ROOT / "recipes" / "retrofit_gates.yaml").read_text())
    tiny = yaml.safe_load(tiny_recipe(name="tiny.yaml").read_text())
    recipe.update({k: tiny[k] for k in ("data", "rollout", "eval", "logging")})
    recipe["grpo"] = {**tiny["grpo"], "steps": 4, "optim": {"lr": 3e-2}}
    recipe["model"]["path"] = str(dense / "sft" / "final")
    path = tmp_path / "retrofit.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["train", str(path), f"output_dir={run}"]) == 0
    base = AutoModelForCausalLM.from_pretrained(run / "base_model")
    assert type(base).__name__ == "TokenwiseForCausalLM" and base.config.attn_gate == "headwise"
    sft_final = [r for r in read_metrics(dense, "sft") if "eval/accuracy" in r][-1]
    grpo = read_metrics(run, "grpo")
    start = next(r for r in grpo if r["step"] == 0 and "eval/accuracy" in r)
    for key in ("eval/accuracy", "eval/format", "eval/response_len_mean"):
        assert start[key] == sft_final[key], key
    gates = [r["gate/mean"] for r in grpo if "gate/mean" in r]
    assert gates and abs(gates[0] - 0.5) < 1e-6 and abs(gates[-1] - 0.5) > 1e-4
