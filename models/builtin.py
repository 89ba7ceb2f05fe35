"""The embedded default model: a tiny Llama-architecture decoder and a character-level tokenizer.

Both are written with `save_pretrained`, so the trainer only ever loads a directory through `AutoTokenizer` /
`AutoModelForCausalLM`, the path a user with a real local model takes. The tokenizer is saved as a plain
`TokenizersBackend` under a Llama config: transformers 5 forces its own tokenizer class on `qwen2` directories, which
would silently drop the spaces of a character-level vocabulary (see shared/STACK_NOTES.md).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

PAD, END, UNK = "<|pad|>", "<|end|>", "<|unk|>"
ROLES = ("system", "user", "assistant")

# One token per role marker, so a character-level prompt stays short: '<|user|>12+34=<|end|><|assistant|>'.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (plus newline and tab), the role markers and pad/end/unk."""
    chars = list(string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", ""))
    roles = [f"<|{r}|>" for r in ROLES]
    vocab = {tok: i for i, tok in enumerate([PAD, END, UNK, *roles] + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=END, unk_token=UNK)
    tok.add_special_tokens({"additional_special_tokens": roles})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int, num_layers: int, num_heads: int,
                num_kv_heads: int, intermediate_size: int, max_position_embeddings: int, seed: int,
                arch: str = "llama", **decoder: Any) -> PreTrainedModel:
    """arch 'llama': transformers' Llama; 'tokenwise': our decoder, with `decoder` = the recipe's attention-gate and
    MoE keys (attn_gate, ffn, num_experts, experts_per_token, moe_intermediate_size, shared_expert_size,
    renormalize, capacity_factor, router_aux_loss_coef, router_z_loss_coef)."""
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=None, initializer_range=0.02)
    if arch == "llama":
        if any(v not in ("none", "dense") for k, v in decoder.items() if k in ("attn_gate", "ffn")):
            raise ValueError("attention gates and MoE layers need arch 'tokenwise'")
        make = lambda: LlamaForCausalLM(LlamaConfig(rope_theta=10000.0, **common))  # noqa: E731
    else:
        from tokenwise.models.decoder import TokenwiseConfig, TokenwiseForCausalLM
        d = dict(decoder)
        config = TokenwiseConfig(
            rope_theta=10000.0, attn_gate=d.pop("attn_gate", "none"), ffn=d.pop("ffn", "dense"),
            num_experts=d.pop("num_experts", 8), num_experts_per_tok=d.pop("experts_per_token", 2),
            moe_intermediate_size=d.pop("moe_intermediate_size", None),
            shared_expert_intermediate_size=d.pop("shared_expert_size", 0), norm_topk_prob=d.pop("renormalize", True),
            capacity_factor=d.pop("capacity_factor", None), router_aux_loss_coef=d.pop("router_aux_loss_coef", 1e-3),
            router_z_loss_coef=d.pop("router_z_loss_coef", 1e-3), **common)
        if d:
            raise ValueError(f"unknown decoder options {sorted(d)}")
        make = lambda: TokenwiseForCausalLM(config)  # noqa: E731
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_builtin(out_dir: str | Path, *, seed: int, extra_special_tokens: list[str] | None = None,
                 **model_kwargs: int) -> Path:
    """Build the tokenizer (plus `extra_special_tokens`, one id each, e.g. safety magic tokens) and a freshly
    initialised model of that vocabulary, and save both into `out_dir`."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    if extra_special_tokens:
        tokenizer.add_tokens(list(extra_special_tokens), special_tokens=True)
    model = build_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
