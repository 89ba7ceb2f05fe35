"""vLLM implementation of our decoder (`TokenwiseForCausalLM`, models/decoder.py), registered out of tree.

The same computation as the transformers model, written with vLLM's layers so the rollout engine can serve gated and
MoE variants: tensor-parallel linears, vLLM's paged `Attention` (its KV cache and kernels), `get_rope`, `FusedMoE`
experts. Sizes are per tensor-parallel rank; the gate and the q rows stay together because q_proj is laid out per
head ([q_h | g_h]) and column parallelism splits whole heads.

- attention gate (ALGORITHMS.md §6): y ⊙ σ(g) after attention, g from the q projection; headwise (one per head) or
  elementwise (one per channel). q-norm touches q only, RoPE never touches the gate.
- MoE (§7): fp32-softmax top-k routing with optional renormalisation through vLLM's fused experts (the checkpoint's
  3-D [E, 2F, H] / [E, H, F] tensors are split per expert into its w13 / w2), plus the optional shared expert behind
  a sigmoid gate. Serving is dropless: a model with a capacity factor (batch-dependent token dropping) is not served
  here (trainer/rollout/vllm.py falls back to the transformers backend and says why).

Loaded through `models.vllm_plugin.register` (vLLM's `vllm.general_plugins` entry point, and the rollout engine).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from tokenwise.models.decoder import TokenwiseConfig


class RMSNorm(nn.Module):
    """As models.decoder.RMSNorm: normalise in fp32, scale by (weight + offset)."""

    def __init__(self, dim: int, eps: float, offset: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((self.weight.float() + self.offset) * h).to(x.dtype) if self.offset else self.weight * h.to(x.dtype)


class GatedAttention(nn.Module):
    def __init__(self, c: TokenwiseConfig, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        if c.num_attention_heads % tp or c.num_key_value_heads % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide the attention heads ({c.num_attention_heads}) "
                             f"and the key/value heads ({c.num_key_value_heads})")
        self.heads, self.kv_heads = c.num_attention_heads // tp, c.num_key_value_heads // tp
        self.head_dim, self.gate_dim = c.head_dim, c.gate_dim
        H, Dh = c.hidden_size, c.head_dim
        self.q_proj = ColumnParallelLinear(H, c.num_attention_heads * (Dh + self.gate_dim), bias=c.attention_bias,
                                           quant_config=quant_config, prefix=f"{prefix}.q_proj")
        self.k_proj = ColumnParallelLinear(H, c.num_key_value_heads * Dh, bias=c.attention_bias,
                                           quant_config=quant_config, prefix=f"{prefix}.k_proj")
        self.v_proj = ColumnParallelLinear(H, c.num_key_value_heads * Dh, bias=c.attention_bias,
                                           quant_config=quant_config, prefix=f"{prefix}.v_proj")
        self.o_proj = RowParallelLinear(c.num_attention_heads * Dh, H, bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.qk_norm = c.qk_norm
        if c.qk_norm:
            self.q_norm = RMSNorm(Dh, c.rms_norm_eps, c.norm_weight_offset)
            self.k_norm = RMSNorm(Dh, c.rms_norm_eps, c.norm_weight_offset)
        self.rotary_emb = get_rope(Dh, max_position=c.max_position_embeddings, is_neox_style=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                                                    "partial_rotary_factor": c.partial_rotary_factor})
        self.attn = Attention(self.heads, Dh, Dh ** -0.5, num_kv_heads=self.kv_heads, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        T, Dh = x.shape[0], self.head_dim
        qg = self.q_proj(x)[0].view(T, self.heads, Dh + self.gate_dim)
        q, gate = qg[..., :Dh], qg[..., Dh:]
        k, v = self.k_proj(x)[0], self.v_proj(x)[0]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k.view(T, self.kv_heads, Dh))
        q, k = self.rotary_emb(positions, q.reshape(T, -1), k.reshape(T, -1))
        y = self.attn(q, k, v)
        if self.gate_dim:  # [T, heads, 1] (headwise) or [T, heads, Dh] (elementwise) broadcasts over the channels
            y = (y.view(T, self.heads, Dh) * torch.sigmoid(gate)).reshape(T, -1)
        return self.o_proj(y)[0]


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int, quant_config, prefix: str) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, inner, bias=False, quant_config=quant_config,
                                              prefix=f"{prefix}.gate_proj")
        self.up_proj = ColumnParallelLinear(hidden, inner, bias=False, quant_config=quant_config,
                                            prefix=f"{prefix}.up_proj")
        self.down_proj = RowParallelLinear(inner, hidden, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)[0]) * self.up_proj(x)[0])[0]


class MoE(nn.Module):
    def __init__(self, c: TokenwiseConfig, quant_config, prefix: str) -> None:
        super().__init__()
        self.router = ReplicatedLinear(c.hidden_size, c.num_experts, bias=False, quant_config=None,
                                       prefix=f"{prefix}.router")
        self.experts = FusedMoEFactory(num_experts=c.num_experts, top_k=c.num_experts_per_tok, hidden_size=c.hidden_size,
                                       intermediate_size=c.moe_intermediate_size, renormalize=c.norm_topk_prob,
                                       quant_config=quant_config, prefix=f"{prefix}.experts")
        self.shared = bool(c.shared_expert_intermediate_size)
        if self.shared:
            self.shared_expert = SwiGLU(c.hidden_size, c.shared_expert_intermediate_size, quant_config,
                                        f"{prefix}.shared_expert")
            self.shared_expert_gate = ReplicatedLinear(c.hidden_size, 1, bias=False, quant_config=None,
                                                       prefix=f"{prefix}.shared_expert_gate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)[0].float()  # vLLM's top-k softmax runs in fp32, as our router does
        out = self.experts(hidden_states=x, router_logits=logits)
        if self.shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)[0]) * self.shared_expert(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, c: TokenwiseConfig, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_weight_offset)
        self.self_attn = GatedAttention(c, cache_config, quant_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_weight_offset)
        self.mlp = (MoE(c, quant_config, f"{prefix}.mlp") if c.ffn == "moe"
                    else SwiGLU(c.hidden_size, c.intermediate_size, quant_config, f"{prefix}.mlp"))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                          "inputs_embeds": 0})
class TokenwiseModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        c = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            DecoderLayer(c, vllm_config.cache_config, vllm_config.quant_config, f"{prefix}.layers.{i}")
            for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_weight_offset)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


class TokenwiseForCausalLM(nn.Module):
    """vLLM's entry point for architecture "TokenwiseForCausalLM" (config.json of a models.decoder checkpoint)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        c = vllm_config.model_config.hf_config
        if getattr(c, "capacity_factor", None) is not None:
            raise ValueError("vLLM serves MoE models dropless; this checkpoint has capacity_factor "
                             f"{c.capacity_factor} (use the transformers rollout backend)")
        self.config = c
        self.model = TokenwiseModel(vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        self.lm_head = ParallelLMHead(c.vocab_size, c.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}.lm_head" if prefix else "lm_head")
        if c.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(c.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint (HF-format) names → parameters. The MoE's 3-D expert tensors go to the fused experts one
        expert and one shard at a time (w1 = gate rows, w3 = up rows, w2 = down), so tensor parallelism slices them."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the head is the embedding
            if name.endswith(("mlp.experts_gate_up", "mlp.experts_down")):
                layer = name.rsplit(".", 1)[0]
                gate_up = name.endswith("experts_gate_up")
                pname = next(n for n in params if n.startswith(f"{layer}.experts.")
                             and n.endswith("w13_weight" if gate_up else "w2_weight"))
                param = params[pname]
                inner = tensor.shape[1] // 2
                for e in range(tensor.shape[0]):
                    shards = ([("w1", tensor[e, :inner]), ("w3", tensor[e, inner:])] if gate_up
                              else [("w2", tensor[e])])
                    for shard_id, w in shards:
                        param.weight_loader(param, w, pname, shard_id=shard_id, expert_id=e)
            else:
                if name not in params:
                    raise KeyError(f"the vLLM Tokenwise model has no parameter {name!r}")
                pname, param = name, params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(pname)
        return loaded
