"""State-dict and config adapters between transformers' Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-Next (full-attention
layers only) and our decoder (models/decoder.py), both ways.

Loading goes through transformers itself (`from_pretrained` of the original class), so every on-disk layout it reads
(legacy per-expert MoE keys included) works; then names map onto ours. Exporting builds the original class from the
mapped config and loads our weights into it, so `save_pretrained` writes a directory transformers loads as that
architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from tokenwise.models.decoder import TokenwiseConfig, TokenwiseForCausalLM

ARCHS = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_next")
_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
           "bos_token_id", "eos_token_id", "pad_token_id")
_MOE = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
        "shared_expert_intermediate_size")
# ours <- theirs, for the MoE feed-forward; every other name is the same on both sides
_RENAMES = {"mlp.router.weight": "mlp.gate.weight", "mlp.experts_gate_up": "mlp.experts.gate_up_proj",
            "mlp.experts_down": "mlp.experts.down_proj"}


class AdapterError(ValueError):
    pass


def _rope(hf: PretrainedConfig) -> tuple[float, float]:
    params = getattr(hf, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise AdapterError(f"{hf.model_type}: rope_type {params['rope_type']!r} is not supported (only 'default')")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    return float(theta), float(params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0))


def config_from_hf(hf: PretrainedConfig) -> TokenwiseConfig:
    """Our config for a transformers config of one of ARCHS; refuses what our model cannot reproduce."""
    arch = hf.model_type
    if arch not in ARCHS:
        raise AdapterError(f"model_type {arch!r} has no adapter; supported: {', '.join(ARCHS)}")
    theta, partial = _rope(hf)
    kw = {k: getattr(hf, k) for k in _COMMON}
    kw.update(head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads, rope_theta=theta,
              partial_rotary_factor=partial, attention_bias=bool(getattr(hf, "attention_bias", False)))
    if arch == "llama" and getattr(hf, "mlp_bias", False):
        raise AdapterError("llama: mlp_bias=True is not supported")
    if arch in ("qwen2", "qwen2_moe"):
        kw["attention_bias"] = bool(getattr(hf, "qkv_bias", True))
    if arch in ("qwen3", "qwen3_next"):
        kw["qk_norm"] = True
    if arch == "qwen3_next":
        if any(t != "full_attention" for t in hf.layer_types):
            raise AdapterError("qwen3_next: only configs whose layer_types are all 'full_attention' are supported "
                               "(linear-attention layers are not part of our model)")
        kw.update(attn_gate="elementwise", norm_weight_offset=1.0)
    if arch in ("qwen2_moe", "qwen3_next"):
        if hf.decoder_sparse_step != 1 or hf.mlp_only_layers:
            raise AdapterError(f"{arch}: mixed dense/MoE layers (decoder_sparse_step, mlp_only_layers) are not "
                               "supported; every layer must be MoE")
        kw.update(ffn="moe", **{k: getattr(hf, k) for k in _MOE},
                  router_aux_loss_coef=getattr(hf, "router_aux_loss_coef", 1e-3))
    if getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", False):
        raise AdapterError(f"{arch}: sliding-window attention is not supported")
    return TokenwiseConfig(**kw)


def config_to_hf(c: TokenwiseConfig, arch: str) -> PretrainedConfig:
    if arch not in ARCHS:
        raise AdapterError(f"arch must be one of {ARCHS}, got {arch!r}")
    want = {"llama": dict(attn_gate="none", ffn="dense", qk_norm=False, norm_weight_offset=0.0),
            "qwen2": dict(attn_gate="none", ffn="dense", qk_norm=False, norm_weight_offset=0.0),
            "qwen3": dict(attn_gate="none", ffn="dense", qk_norm=True, norm_weight_offset=0.0),
            "qwen2_moe": dict(attn_gate="none", ffn="moe", qk_norm=False, norm_weight_offset=0.0),
            "qwen3_next": dict(attn_gate="elementwise", ffn="moe", qk_norm=True, norm_weight_offset=1.0)}[arch]
    wrong = {k: getattr(c, k) for k, v in want.items() if getattr(c, k) != v}
    if wrong:
        raise AdapterError(f"this model cannot be exported as {arch}: it has {wrong}, {arch} needs "
                           f"{ {k: want[k] for k in wrong} }")
    kw = {k: getattr(c, k) for k in _COMMON}
    kw["head_dim"] = c.head_dim
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = c.partial_rotary_factor
    kw["rope_parameters"] = rope
    if arch == "llama":
        kw["attention_bias"] = c.attention_bias
    elif arch in ("qwen2", "qwen2_moe"):
        if not c.attention_bias:
            raise AdapterError(f"{arch} has q/k/v biases; this model has attention_bias=False")
    else:
        kw["attention_bias"] = c.attention_bias
    if c.ffn == "moe":
        kw.update({k: getattr(c, k) for k in _MOE}, decoder_sparse_step=1, mlp_only_layers=[],
                  router_aux_loss_coef=c.router_aux_loss_coef)
    if arch == "qwen3_next":
        kw["layer_types"] = ["full_attention"] * c.num_hidden_layers
    return AutoConfig.for_model(arch, **kw)


def _ours(name: str) -> str:
    for mine, theirs in _RENAMES.items():
        name = name.replace(theirs, mine)
    return name


def _theirs(name: str) -> str:
    for mine, theirs in _RENAMES.items():
        name = name.replace(mine, theirs)
    return name


def from_hf(hf_model: PreTrainedModel) -> TokenwiseForCausalLM:
    """Our model with the weights of a transformers model of one of ARCHS (same dtype)."""
    model = TokenwiseForCausalLM(config_from_hf(hf_model.config)).to(hf_model.dtype)
    state = {_ours(k): v for k, v in hf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise AdapterError(f"{hf_model.config.model_type}: weights do not map: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model


def to_hf(model: TokenwiseForCausalLM, arch: str) -> PreTrainedModel:
    """A transformers model of `arch` holding our weights."""
    hf = AutoModelForCausalLM.from_config(config_to_hf(model.config, arch)).to(model.dtype)
    state = {_theirs(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise AdapterError(f"{arch}: weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf


def load_as_tokenwise(path: str | Path, *, dtype: torch.dtype = torch.float32) -> TokenwiseForCausalLM:
    """A local checkpoint of one of ARCHS (or one of ours) as our model."""
    config = AutoConfig.from_pretrained(path)
    if isinstance(config, TokenwiseConfig):
        return TokenwiseForCausalLM.from_pretrained(path, dtype=dtype)
    return from_hf(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
