"""Tokenwise decoder: one readable single-device model family with the options our research needs.

- attention: GQA, RoPE (optionally partial), optional per-head q/k RMSNorm (Qwen3), optional q/k/v bias (Qwen2), and an
  output gate Y ⊙ σ(G) after SDPA (ALGORITHMS.md §6): `attn_gate` none | headwise (one scalar per head) | elementwise
  (one per channel). The gate comes from the q projection, laid out per head as [q_h | g_h] (Qwen3-Next's layout);
  q-norm touches only q_h, RoPE never touches the gate.
- feed-forward: dense SwiGLU, or MoE (§7) with SwiGLU experts held as 3-D weights [E, 2F, H] / [E, H, F], top-k
  routing in fp32 with optional renormalisation and capacity, an optional shared expert behind a sigmoid gate, and
  load-balance / router-z losses (`TokenwiseForCausalLM.moe_loss()`).
- RMSNorm with a weight offset (Qwen3-Next stores w and scales by 1 + w), tied embeddings optional.

Registered with AutoConfig / AutoModelForCausalLM (model_type "tokenwise"); models/adapters.py maps Llama, Qwen2, Qwen3,
Qwen2-MoE and Qwen3-Next (full-attention layers) weights both ways.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from tokenwise.kernels.attention_gate import attention_gate
from tokenwise.kernels.moe import Routing, moe_ffn

ATTN_GATES = ("none", "headwise", "elementwise")
FFNS = ("dense", "moe")


class TokenwiseConfig(PretrainedConfig):
    model_type = "tokenwise"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 256, hidden_size: int = 64, intermediate_size: int = 128,
                 num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int | None = None,
                 head_dim: int | None = None, max_position_embeddings: int = 512, rope_theta: float = 10000.0,
                 partial_rotary_factor: float = 1.0, rms_norm_eps: float = 1e-6, norm_weight_offset: float = 0.0,
                 attention_bias: bool = False, qk_norm: bool = False, attn_gate: str = "none", ffn: str = "dense",
                 num_experts: int = 8, num_experts_per_tok: int = 2, moe_intermediate_size: int | None = None,
                 norm_topk_prob: bool = True, shared_expert_intermediate_size: int = 0,
                 capacity_factor: float | None = None, router_aux_loss_coef: float = 1e-3,
                 router_z_loss_coef: float = 1e-3, tie_word_embeddings: bool = False,
                 initializer_range: float = 0.02, **kwargs) -> None:
        if attn_gate not in ATTN_GATES:
            raise ValueError(f"attn_gate must be one of {ATTN_GATES}, got {attn_gate!r}")
        if ffn not in FFNS:
            raise ValueError(f"ffn must be one of {FFNS}, got {ffn!r}")
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings, self.rope_theta = max_position_embeddings, rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.rms_norm_eps, self.norm_weight_offset = rms_norm_eps, norm_weight_offset
        self.attention_bias, self.qk_norm, self.attn_gate, self.ffn = attention_bias, qk_norm, attn_gate, ffn
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.norm_topk_prob, self.shared_expert_intermediate_size = norm_topk_prob, shared_expert_intermediate_size
        self.capacity_factor = capacity_factor
        self.router_aux_loss_coef, self.router_z_loss_coef = router_aux_loss_coef, router_z_loss_coef
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def gate_dim(self) -> int:
        """Gate outputs per head in the q projection: 0, 1 (headwise) or head_dim (elementwise)."""
        return {"none": 0, "headwise": 1, "elementwise": self.head_dim}[self.attn_gate]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))
        self.eps, self.offset = eps, offset

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((self.weight.float() + self.offset) * h).to(x.dtype) if self.offset else self.weight * h.to(x.dtype)


def rope(positions: Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, S, dim] for the rotary part of each head (rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, S, Dh]; rotates the first cos.shape[-1] channels, passes the rest."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    x1, x2 = rot[..., : d // 2], rot[..., d // 2:]
    rotated = rot * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]
    return torch.cat([rotated, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: TokenwiseConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim, self.gate_dim = (c.num_attention_heads, c.num_key_value_heads,
                                                                    c.head_dim, c.gate_dim)
        self.q_proj = nn.Linear(c.hidden_size, self.heads * (self.head_dim + self.gate_dim), bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, c.norm_weight_offset)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, c.norm_weight_offset)
        self.qk_norm = c.qk_norm
        self.gate_mean: Tensor | None = None  # mean σ(gate) of the last forward (gate-sparsity metric)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Cache | None,
                return_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        B, S, _ = x.shape
        qg = self.q_proj(x).view(B, S, self.heads, self.head_dim + self.gate_dim)
        q, gate = qg[..., :self.head_dim], qg[..., self.head_dim:]
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        probs = None
        if return_probs:  # explicit softmax, for attention-mass metrics
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)
            y = probs @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2)  # [B, S, heads, Dh]
        if self.gate_dim:
            g = gate.squeeze(-1) if self.gate_dim == 1 else gate
            y = attention_gate(y, g)
            self.gate_mean = torch.sigmoid(g.detach().float()).mean()
        return self.o_proj(y.reshape(B, S, -1)), probs


class DenseFFN(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFFN(nn.Module):
    def __init__(self, c: TokenwiseConfig) -> None:
        super().__init__()
        E, H, Fm = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.top_k, self.renormalize, self.capacity_factor = c.num_experts_per_tok, c.norm_topk_prob, c.capacity_factor
        self.router = nn.Linear(H, E, bias=False)
        self.experts_gate_up = nn.Parameter(torch.empty(E, 2 * Fm, H))
        self.experts_down = nn.Parameter(torch.empty(E, H, Fm))
        if c.shared_expert_intermediate_size:
            self.shared_expert = DenseFFN(H, c.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)
        self.routing: Routing | None = None  # of the last forward: losses and load metrics
        self.shape: tuple[int, int] = (0, 0)  # (B, S) of the last forward

    def forward(self, x: Tensor, replay: Tensor | None = None) -> Tensor:
        """`replay` [B, S, k] int64: route each token through these experts (-1 rows: its own top-k)."""
        flat = x.reshape(-1, x.shape[-1])
        self.shape = (x.shape[0], x.shape[1])
        # under ZeRO-3, reading the router's weight here (not calling the router) makes DeepSpeed gather it as an
        # external parameter of this block for the forward and backward (tests/test_cluster.py checks ZeRO-3 MoE)
        out, self.routing = moe_ffn(flat, self.router.weight, self.experts_gate_up, self.experts_down,
                                    top_k=self.top_k, renormalize=self.renormalize,
                                    capacity_factor=self.capacity_factor,
                                    replay=replay.reshape(-1, self.top_k) if replay is not None else None)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view_as(x)


def routes_experts(model: nn.Module) -> bool:
    """Whether `model` is our decoder with MoE layers (or a peft model around one): what reports routed_experts()."""
    return getattr(getattr(model, "config", None), "ffn", None) == "moe" and hasattr(model, "routed_experts")


def moe_block(module: nn.Module) -> MoEFFN | None:
    """The MoE block a layer's feed-forward is, also under adapters (peft wraps a block whose expert tensors it
    adapts in ParamWrapper layers), or None for a dense one."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base if isinstance(base, MoEFFN) else None


class DecoderLayer(nn.Module):
    def __init__(self, c: TokenwiseConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_weight_offset)
        self.self_attn = Attention(c, layer_idx)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_weight_offset)
        self.mlp = MoEFFN(c) if c.ffn == "moe" else DenseFFN(c.hidden_size, c.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Cache | None,
                return_probs: bool = False, replay: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        a, probs = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, return_probs)
        x = x + a
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, replay) if replay is not None else self.mlp(h)), probs


class TokenwisePreTrainedModel(PreTrainedModel):
    config_class = TokenwiseConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MoEFFN):
            nn.init.normal_(module.experts_gate_up, mean=0.0, std=std)
            nn.init.normal_(module.experts_down, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.constant_(module.weight, 1.0 - module.offset)


class TokenwiseModel(TokenwisePreTrainedModel):
    def __init__(self, config: TokenwiseConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weight_offset)
        self.rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        self.post_init()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                expert_ids: Tensor | None = None,
                **kwargs) -> tuple[Tensor, Cache | None, tuple | None, tuple | None]:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = x.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=x.device)[None].expand(B, -1)
        total = past + S
        if attention_mask is None:
            attention_mask = torch.ones(B, total, dtype=torch.long, device=x.device)
        # bool [B, 1, S, total]: causal within the cache-extended sequence and not a padding key (or the caller's own
        # 4-D mask); a query row with no allowed key (left padding) attends everywhere so SDPA returns finite values
        # (they are never used)
        if attention_mask.dim() == 4:  # a prepared bool mask [B, 1, S, total] (packed rows: trainer/packing.py)
            mask = attention_mask.bool()
        else:
            q_pos = torch.arange(past, total, device=x.device)
            mask = (torch.arange(total, device=x.device)[None, :] <= q_pos[:, None])[None, None]
            mask = mask & attention_mask[:, None, None, -total:].bool()
        mask = mask | ~mask.any(-1, keepdim=True)
        cos, sin = rope(position_ids, self.rotary_dim, self.config.rope_theta, x.dtype)
        hidden, attns = ((x,) if output_hidden_states else None), (() if output_attentions else None)
        replays: list[Tensor | None] = [None] * len(self.layers)  # per layer: its replayed experts [B, S, k]
        if expert_ids is not None:
            moe = [i for i, layer in enumerate(self.layers) if moe_block(layer.mlp) is not None]
            if expert_ids.shape[:3] != (B, S, len(moe)):
                raise ValueError(f"expert_ids must be [batch, seq, MoE layers, top_k] = [{B}, {S}, {len(moe)}, k], "
                                 f"got {tuple(expert_ids.shape)}")
            for j, i in enumerate(moe):
                replays[i] = expert_ids[:, :, j]
        for layer, replay in zip(self.layers, replays):
            x, probs = layer(x, cos, sin, mask, past_key_values if use_cache else None, output_attentions, replay)
            if output_hidden_states:
                hidden += (x,)
            if output_attentions:
                attns += (probs,)
        x = self.norm(x)
        if output_hidden_states:
            hidden = hidden[:-1] + (x,)  # the last entry is after the final norm, as in transformers
        return x, past_key_values if use_cache else None, hidden, attns


class TokenwiseForCausalLM(TokenwisePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TokenwiseConfig) -> None:
        super().__init__(config)
        self.model = TokenwiseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | Tensor = 0, output_hidden_states: bool = False,
                output_attentions: bool = False, expert_ids: Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """`expert_ids` [B, S, MoE layers, top_k] int64 (routing replay): route each token of each MoE layer through
        these experts, -1 rows routing by the router's own top-k (`routed_experts()` returns what a forward chose)."""
        x, cache, hidden, attns = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                             use_cache, output_hidden_states, output_attentions, expert_ids)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(x[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache, hidden_states=hidden,
                                      attentions=attns)

    def routed_experts(self, own: bool = False) -> Tensor | None:
        """The experts each token of the last forward went through: [B, S, MoE layers, top_k] int64 (None for a dense
        model) — what a rollout engine records and the learner replays. `own`: the router's own top-k instead (the
        same unless the forward replayed experts)."""
        moes = [m for m in (moe_block(layer.mlp) for layer in self.model.layers) if m is not None]
        if not moes or moes[0].routing is None:
            return None
        return torch.stack([(m.routing.own_idx if own else m.routing.expert_idx).view(*m.shape, -1) for m in moes],
                           dim=2)

    def moe_loss(self) -> Tensor | None:
        """router_aux_loss_coef · Σ_layers L_aux + router_z_loss_coef · Σ_layers L_z of the last forward (None for a
        dense model)."""
        routings = [m.routing for m in (moe_block(layer.mlp) for layer in self.model.layers) if m is not None]
        if not routings or routings[0] is None:
            return None
        c = self.config
        return sum(c.router_aux_loss_coef * r.aux_loss + c.router_z_loss_coef * r.z_loss for r in routings)

    def routing_metrics(self) -> dict[str, float]:
        """Of the last forward: MoE aux / z losses, dropped share, expert load (share x E, so 1 is uniform; max and
        min over experts, mean over layers, and per layer), and the mean attention gate per layer."""
        out: dict[str, float] = {}
        moes = [(i, m.routing) for i, m in enumerate(moe_block(layer.mlp) for layer in self.model.layers)
                if m is not None and m.routing is not None]
        if moes:
            loads = torch.stack([r.expert_load for _, r in moes]).float() * self.config.num_experts
            out.update({"moe/aux_loss": float(sum(r.aux_loss.detach() for _, r in moes)) / len(moes),
                        "moe/z_loss": float(sum(r.z_loss.detach() for _, r in moes)) / len(moes),
                        "moe/dropped_frac": sum(r.dropped_frac for _, r in moes) / len(moes),
                        "moe/expert_load_max": float(loads.max(1).values.mean()),
                        "moe/expert_load_min": float(loads.min(1).values.mean())})
            out.update({f"moe/layer{i}/expert_load_max": float(loads[j].max()) for j, (i, _) in enumerate(moes)})
        gates = [(i, layer.self_attn.gate_mean) for i, layer in enumerate(self.model.layers)
                 if layer.self_attn.gate_mean is not None]
        if gates:
            out["gate/mean"] = float(sum(g for _, g in gates)) / len(gates)
            out.update({f"gate/layer{i}/mean": float(g) for i, g in gates})
        return out


AutoConfig.register("tokenwise", TokenwiseConfig)
AutoModelForCausalLM.register(TokenwiseConfig, TokenwiseForCausalLM)


def retrofit_gates(model: TokenwiseForCausalLM, mode: str) -> TokenwiseForCausalLM:
    """A copy of an ungated model with `mode` ('headwise' | 'elementwise') attention output gates that computes the
    same function: the gate rows of q_proj start at zero (σ = 0.5 everywhere) and o_proj is doubled to compensate.
    Training then moves the gates away from 0.5."""
    c = model.config
    if c.attn_gate != "none":
        raise ValueError(f"the model already has {c.attn_gate!r} attention gates")
    if mode not in ATTN_GATES[1:]:
        raise ValueError(f"retrofit mode must be 'headwise' or 'elementwise', got {mode!r}")
    new = TokenwiseForCausalLM(TokenwiseConfig(**{**c.to_diff_dict(), "attn_gate": mode})).to(model.dtype)
    state = model.state_dict()
    for i, layer in enumerate(new.model.layers):
        attn, pre = layer.self_attn, f"model.layers.{i}.self_attn."
        H, Dh, G = attn.heads, attn.head_dim, attn.gate_dim
        w = state[pre + "q_proj.weight"].view(H, Dh, -1)
        state[pre + "q_proj.weight"] = torch.cat([w, w.new_zeros(H, G, w.shape[-1])], dim=1).reshape(H * (Dh + G), -1)
        if pre + "q_proj.bias" in state:
            b = state[pre + "q_proj.bias"].view(H, Dh)
            state[pre + "q_proj.bias"] = torch.cat([b, b.new_zeros(H, G)], dim=1).reshape(-1)
        state[pre + "o_proj.weight"] = state[pre + "o_proj.weight"] * 2
    new.load_state_dict(state, strict=True)
    return new
