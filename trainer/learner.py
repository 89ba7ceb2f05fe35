"""The learner: a policy under an optimizer, plus an optional frozen reference.

`Learner` is one rank: it runs the micro-batches a plan (trainer/batching.py) gives it and returns token sums.
Its optimizer is `TorchOptimizer` in debug mode (AdamW in-process) or trainer/distributed.py's DeepSpeed engine in
cluster mode. `LearnerPool` is what the stage loops call (STYLE.md §4 coarse interface: `score`, `train_step`,
`sft_step`, `save` / `load`, `save_model`, `version`): it plans the batch for N ranks, fans the work out through a
`fanout(method, per_rank_args)` callable (in-process for one local rank, a Ray WorkerGroup in cluster mode), and
combines the sums into metrics.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import pickle
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from tokenwise.kernels.logprob_entropy import logprob_entropy
from tokenwise.models.decoder import routes_experts
from tokenwise.rl.errors import CheckpointError, ConfigError, NonFiniteError
from tokenwise.rl.types import RolloutBatch, SFTBatch, TrainBatch
from tokenwise.trainer.batching import Micro, Update, gather_rows, plan_rows, plan_sft, plan_updates, row_tokens
from tokenwise.trainer.loading import load_causal_lm
from tokenwise.trainer.packing import pack, unpack
from tokenwise.trainer.lora import AdaptersOff, add_adapters, is_lora, load_adapter, merged_state
from tokenwise.trainer.schedule import warmup_cosine


def token_logprobs_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) and entropy H = logsumexp(z) - sum p z per position, from (temperature-scaled) logits."""
    logz_BT = torch.logsumexp(logits_BTV, dim=-1)
    logp_BT = logits_BTV.gather(-1, labels_BT.unsqueeze(-1)).squeeze(-1) - logz_BT
    entropy_BT = logz_BT - (torch.softmax(logits_BTV, dim=-1) * logits_BTV).sum(-1)
    return logp_BT, entropy_BT


PER_ROW = {"group_vocab", "episode_stats"}  # [B, V] and [B, K] fields that are not per token (never trimmed)


def trim(batch: RolloutBatch) -> RolloutBatch:
    """Drop prompt columns that are padding in every row and response columns past the longest response."""
    p0 = int(batch.prompt_mask.any(0).long().argmax())
    present = batch.present_mask
    t1 = max(1, int(present.any(0).nonzero().max()) + 1) if present.any() else 1
    T = batch.response_ids.shape[1]
    out = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if f.name.startswith("prompt_") and isinstance(v, torch.Tensor):
            v = v[:, p0:]
        elif isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == T and f.name not in PER_ROW:
            v = v[:, :t1]
        out[f.name] = v
    return type(batch)(**out)


class TorchOptimizer:
    """Debug mode: AdamW + warm-up/cosine schedule + global grad-norm clipping on an in-process model.

    A model held in bf16/fp16 (`model.dtype: auto` on one GPU) trains through fp32 master weights, as DeepSpeed's
    bf16 optimizer does: each micro-batch's gradients are added into fp32 gradients of the masters, AdamW steps the
    masters, and the model gets their rounding. Without them an update below the weight's last bf16 bit (lr 1e-6 on
    a weight of 0.02: bf16 keeps 8 bits) would round away and the model would not learn."""

    def __init__(self, model: torch.nn.Module, optim: Any, total_updates: int) -> None:
        self.module = self.forward_module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = None
        if any(p.dtype != torch.float32 for p in self.params):
            self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
        self.optimizer = torch.optim.AdamW(self.master or self.params, lr=optim.lr,
                                           betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, warmup_cosine(optim.warmup_steps, total_updates, optim.min_lr_ratio))
        self.grad_clip = optim.grad_clip

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        loss.backward()
        if self.master is not None:  # accumulate in fp32, not in the model's dtype
            for p, m in zip(self.params, self.master):
                if p.grad is not None:
                    m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
                    p.grad = None

    def step(self) -> float:
        """Clip and step; a non-finite gradient norm skips the step (weights, moments and schedule unchanged), as
        DeepSpeed's ZeRO optimizers do, and is returned for the caller to report."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.master or self.params, max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            with torch.no_grad():
                for p, m in zip(self.params, self.master):
                    p.copy_(m)
        return grad_norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from ((k, v.detach()) for k, v in self.module.state_dict().items())

    def save(self, path: Path, *, rank: int) -> None:
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), path / "scheduler.pt")
        if self.master is not None:  # the model directory holds their bf16 rounding; resume needs them whole
            torch.save([m.detach() for m in self.master], path / "master_weights.pt")

    def load(self, path: Path, *, device: torch.device, dtype: torch.dtype) -> None:
        if is_lora(self.module):  # the base is the stage's start model, already loaded: only the adapters come back
            load_adapter(self.module, path / "model" / "adapter")
        else:
            saved = load_causal_lm(path / "model", dtype=dtype, device=device, what=f"checkpoint {path}")
            self.module.load_state_dict(saved.state_dict(), strict=True)
            del saved
        try:
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
            self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
            if self.master is not None:
                self._load_master(path, device)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # truncated / damaged
            raise CheckpointError(f"checkpoint {path}: cannot read the optimizer state: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def _load_master(self, path: Path, device: torch.device) -> None:
        """The fp32 masters of a checkpoint written with them; one written without (an fp32 run) starts them from
        the model's weights, as a fresh run does."""
        if not (path / "master_weights.pt").exists():
            saved = [p.detach().float() for p in self.params]
        else:
            saved = torch.load(path / "master_weights.pt", map_location=device, weights_only=True)
            if len(saved) != len(self.master) or any(a.shape != b.shape for a, b in zip(saved, self.master)):
                raise CheckpointError(f"checkpoint {path}: master_weights.pt does not match this model's trainable "
                                      f"parameters ({len(saved)} tensors saved, {len(self.master)} here)")
        with torch.no_grad():
            for m, w in zip(self.master, saved):
                m.copy_(w)


class Learner:
    """One rank's policy, optimizer and reference. `world_size` > 1 means its gradients are averaged over the
    ranks (DeepSpeed), so each loss is multiplied by world_size to make the average a sum."""

    def __init__(self, model_dir: str | Path, tokenizer: Any, *, optim: Any, total_updates: int,
                 device: torch.device, dtype: torch.dtype, temperature: float = 1.0, algorithm: Any = None,
                 reference_dir: str | Path | None = None, rank: int = 0, world_size: int = 1,
                 distributed: Any = None, logprobs: str = "fused", lora: Any = None,
                 seed: int = 0, packing: str = "none", routing_replay: bool = False) -> None:
        """`distributed`: None for debug mode, else a trainer.distributed.DeepSpeedSpec (ZeRO stage, offload).
        `logprobs`: 'fused' (kernels/logprob_entropy where the model allows it) or 'naive' (the model's logits).
        `lora`: a trainer.config.LoraSpec; with r > 0 only adapters train (trainer/lora.py), initialised from `seed`.
        `packing`: 'none' (padded rows), 'rows' or 'groups' (trainer/packing.py) for the log-prob forwards.
        `routing_replay`: the policy's forwards route each token through the experts the rollout engine recorded."""
        model = load_causal_lm(model_dir, dtype=dtype, device=device)
        # MoE routing: the rollouts' recorded experts are compared with the policy's own choice (and replayed)
        self._moe = routes_experts(model)
        if routing_replay and not self._moe:
            raise ConfigError("algorithm.routing_replay: true replays recorded MoE routing, and this model has no MoE "
                              "layers of ours (model.arch: tokenwise with model.ffn: moe); set it to false")
        self.routing_replay = routing_replay
        self._tally: list[int] | None = None  # [agreeing, recorded] response token x MoE layer top-k sets
        self.lora = bool(lora is not None and lora.r)
        if self.lora:
            model = add_adapters(model, lora, seed=seed)
        model.train()
        self.tokenizer = tokenizer
        self.device, self.dtype = device, dtype
        self.temperature = temperature
        self.algorithm = algorithm
        self.rank, self.world_size = rank, world_size
        reference = None
        # a LoRA policy starts as its base, so the reference is the policy with its adapters off (no second copy)
        adapters_off = self.lora and reference_dir is not None and Path(reference_dir).resolve() == Path(model_dir).resolve()
        if reference_dir is not None and not adapters_off:
            reference = load_causal_lm(reference_dir, dtype=dtype, device=device).eval().requires_grad_(False)
        if distributed is None:
            self.opt = TorchOptimizer(model, optim, total_updates)
            self.reference = reference
        else:
            from tokenwise.trainer.distributed import DeepSpeedOptimizer, frozen_reference
            self.opt = DeepSpeedOptimizer(model, optim, total_updates, spec=distributed, dtype=dtype)
            self.reference = frozen_reference(reference, spec=distributed, dtype=dtype) if reference is not None else None
        if adapters_off:
            self.reference = AdaptersOff(self.opt.module)
        inner = model.get_base_model() if self.lora else model  # peft passes extra keyword arguments through
        self._keep_arg = "logits_to_keep" in inspect.signature(inner.forward).parameters
        self.fused = logprobs == "fused" and self._fused_supported(model, distributed)
        self.packing = self._packing_supported(inner, packing)

    @property
    def model(self) -> torch.nn.Module:
        return self.opt.module

    def _fused_supported(self, model: torch.nn.Module, distributed: Any) -> bool:
        """The fused op needs the head as a plain bias-free linear map of the last hidden state, held whole."""
        head = model.get_output_embeddings()
        reasons = []
        if distributed is not None and distributed.zero_stage == 3:
            reasons.append("ZeRO-3 partitions the output head")
        if not self._keep_arg:
            reasons.append("the model's forward has no logits_to_keep")
        if not isinstance(head, torch.nn.Linear) or head.bias is not None:
            reasons.append("the output head is not a bias-free nn.Linear")
        if any(getattr(model.config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale")):
            reasons.append("the model rescales its logits")
        if reasons and self.rank == 0:
            print(f"learner: trainer.logprobs 'fused' falls back to 'naive': {'; '.join(reasons)}")
        return not reasons

    def _packing_supported(self, model: torch.nn.Module, packing: str) -> str:
        """`packing` if the model's attention takes our 4-D mask (SDPA or eager transformers attention, our decoder);
        under transformers' flash attention 'rows' as one variable-length sequence (a shared prompt needs a mask, so
        'groups' becomes 'rows'); else 'none'. A change is printed with its reason."""
        self._additive_mask = self._varlen = False
        if packing == "none":
            return packing
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        ours = model.config.model_type == "tokenwise"
        if not ours and impl.startswith("flash_attention"):
            self._varlen = True
            if packing == "groups" and self.rank == 0:
                print(f"learner: trainer.packing 'groups' packs 'rows' under {impl} (variable-length attention "
                      f"takes no mask, and a shared prompt needs one)")
            return "rows"
        if not ours and impl not in ("sdpa", "eager"):
            if self.rank == 0:
                print(f"learner: trainer.packing {packing!r} falls back to 'none': attention implementation "
                      f"{impl!r} takes no 4-D mask (use attn_implementation sdpa, eager or flash_attention_2)")
            return "none"
        self._additive_mask = impl == "eager" and not ours
        return packing

    # ------------------------------------------------------------------------------------------------ forward
    def _forward(self, model: torch.nn.Module, batch: RolloutBatch, *, features: bool = False,
                 policy: bool = True) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """log-probs and entropies [B, T] of the response tokens at the temperature each was sampled with (the
        rollout's per-token temperatures if it recorded them, else rollout.temperature). With `features` (THR), also
        (last-layer hidden states [B, T, d], probabilities of the row's group_vocab ids [B, T, V]). A `policy`
        forward replays the rollout's recorded MoE routing under routing_replay (the reference routes itself)."""
        if self.packing != "none" and not features:
            return (*self._forward_packed(model, batch, policy), None)
        T = batch.response_ids.shape[1]
        ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1).to(self.device)
        attn = torch.cat([batch.prompt_mask, batch.present_mask.long()], dim=1).to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        fused = self.fused and not features
        # fused: the model computes logits for one position only; log-probs come from its last hidden states
        kwargs = {"logits_to_keep": 1 if fused else T + 1} if self._keep_arg else {}
        recorded = self._recorded(batch) if policy else None
        if recorded is not None and self.routing_replay:
            kwargs["expert_ids"] = recorded
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                    output_hidden_states=features or fused, **kwargs)
        if recorded is not None and self._tally is not None:
            response = torch.zeros(ids.shape, dtype=torch.bool, device=self.device)
            response[:, -T:] = True
            self._count_routing(recorded, response)
        temps = batch.temperatures.to(self.device) if batch.temperatures is not None else self.temperature
        labels = batch.response_ids.to(self.device)
        if fused:  # the fused op skips -100 labels (padding)
            labels = labels.masked_fill(batch.response_mask.to(self.device) == 0, -100)
        window = lambda t: t[:, -(T + 1):-1]  # the positions that predict the response tokens
        logp, ent, logits = self._scores(model, out, window, labels, temps, fused=fused)
        if not features:
            return logp, ent, None
        hidden = window(out.hidden_states[-1]).float()
        vocab = batch.group_vocab.to(self.device)
        probs = torch.softmax(logits, -1).gather(-1, vocab.clamp(min=0).unsqueeze(1).expand(-1, T, -1))
        return logp, ent, (hidden, probs * (vocab >= 0).unsqueeze(1))

    @staticmethod
    def _scores(model: torch.nn.Module, out: Any, pick: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                temps: torch.Tensor | float, *, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probs and entropies of `labels` from the forward `out` at the positions `pick` takes from its
        [..., S, d] outputs, each at its sampling temperature (`temps` shaped like labels, or one number). Fused: from
        the last hidden states and the output head (never the logits; -100 labels skipped); else from the model's
        logits, which are returned too (temperature-scaled, float32)."""
        if fused:
            hidden = pick(out.hidden_states[-1])
            head = getattr(model, "module", model).get_output_embeddings().weight  # unwrap a DeepSpeed engine
            logp, ent = logprob_entropy(hidden.reshape(-1, hidden.shape[-1]), head, labels.reshape(-1),
                                        temperature=temps.reshape(-1) if isinstance(temps, torch.Tensor) else temps)
            return logp.view(labels.shape), ent.view(labels.shape), None
        logits = pick(out.logits).float()
        logits = logits / (temps.unsqueeze(-1) if isinstance(temps, torch.Tensor) else temps)
        return (*token_logprobs_entropy(logits, labels), logits)

    def _recorded(self, batch: RolloutBatch) -> torch.Tensor | None:
        """The rollout's recorded experts [B, P + T, MoE layers, k] int64 (-1: not recorded), or None."""
        if not self._moe or batch.response_expert_ids is None or batch.prompt_expert_ids is None:
            if self.routing_replay:
                raise ConfigError("algorithm.routing_replay: these rollouts carry no recorded MoE experts (an engine "
                                  "that could not record them says why when it starts); set it to false")
            return None
        return torch.cat([batch.prompt_expert_ids, batch.response_expert_ids], dim=1).to(self.device, torch.long)

    def _count_routing(self, recorded: torch.Tensor, response: torch.Tensor) -> None:
        """Add the last forward's agreement with the engine: of the response tokens' recorded (token, MoE layer)
        top-k sets, how many the policy's router picks itself (as sets; under replay, its own top-k given the
        replayed layers below)."""
        own = self.model.routed_experts(own=True).sort(-1).values
        counted = response.unsqueeze(-1) & (recorded[..., 0] >= 0)  # [.., M]
        agree = (own == recorded.sort(-1).values).all(-1) & counted
        self._tally[0] += int(agree.sum())
        self._tally[1] += int(counted.sum())

    def _forward_packed(self, model: torch.nn.Module, batch: RolloutBatch,
                        policy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """`_forward` over a padding-free packing of the rows (trainer/packing.py): the same values [B, T]."""
        packed = pack(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.present_mask, mode=self.packing,
                      pad_id=self.tokenizer.pad_token_id or 0, varlen=self._varlen).to(self.device)
        mask = packed.mask
        if self._additive_mask:  # eager attention adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~mask, torch.finfo(self.dtype).min)
        src = packed.src
        kwargs = {}
        if self._keep_arg and self.fused:
            kwargs = {"logits_to_keep": 1}
        elif self._keep_arg:  # logits at the positions some bin predicts from (never at a prompt's earlier tokens)
            keep, at = torch.unique(src % packed.input_ids.shape[1], return_inverse=True)
            kwargs = {"logits_to_keep": keep}
            src = src // packed.input_ids.shape[1] * len(keep) + at
        recorded = self._recorded(batch) if policy else None
        if recorded is not None:
            recorded = packed.gather(recorded, fill=-1)
            if self.routing_replay:
                kwargs["expert_ids"] = recorded
        out = model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                    use_cache=False, output_hidden_states=self.fused, **kwargs)
        if recorded is not None and self._tally is not None:
            width, P = batch.prompt_ids.shape[1] + batch.response_ids.shape[1], batch.prompt_ids.shape[1]
            self._count_routing(recorded, (packed.origin >= 0) & (packed.origin % width >= P))
        valid = packed.valid
        labels = batch.response_ids.to(self.device)[valid]
        temps = batch.temperatures.to(self.device)[valid] if batch.temperatures is not None else self.temperature
        logp, ent, _ = self._scores(model, out, lambda t: t.reshape(-1, t.shape[-1])[src], labels, temps,
                                    fused=self.fused)
        return unpack(logp, valid), unpack(ent, valid)

    @torch.no_grad()
    def _no_grad_pass(self, model: torch.nn.Module, batch: RolloutBatch, micros: list[Micro], *,
                      features: bool = False, policy: bool = True) -> dict[str, torch.Tensor]:
        """{logprobs, entropy [, hidden, vocab_probs]} for the rows of the weight-1 micro-batches (in order), masked;
        padding passes run and are dropped."""
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        T = batch.response_ids.shape[1]
        for micro in micros:
            part = batch.select(micro.rows)
            logp, ent, extra = self._forward(model, trim(part), features=features, policy=policy)
            if not micro.weight:
                continue
            m = part.response_mask
            parts["logprobs"].append(_full_width(logp, m))
            parts["entropy"].append(_full_width(ent, m))
            if extra is not None:
                pad = T - logp.shape[1]
                for name, v in zip(("hidden", "vocab_probs"), extra):
                    parts[name].append(F.pad(v.cpu(), (0, 0, 0, pad)) * m.unsqueeze(-1))
        if not parts:
            return {"logprobs": torch.zeros(0, T), "entropy": torch.zeros(0, T)}
        return {k: torch.cat(v) for k, v in parts.items()}

    def score(self, batch: TrainBatch, micros: list[Micro], old: bool = True) -> dict[str, torch.Tensor | None]:
        """Old-policy log-probs/entropies (unless `old` is False: a one-update step takes them from its training
        forward) and reference log-probs for the rows of `micros` (in their order); when the batch carries
        group_vocab (THR), also the old policy's hidden states and group-vocabulary probabilities."""
        out: dict[str, torch.Tensor | None] = {}
        if old:
            was_training = self.model.training
            self.model.eval()
            features = getattr(batch, "group_vocab", None) is not None
            scored = self._no_grad_pass(self.opt.forward_module, batch, micros, features=features)
            self.model.train(was_training)
            out = {"old_logprobs": scored["logprobs"], "old_entropy": scored["entropy"],
                   "old_hidden": scored.get("hidden"), "old_vocab_probs": scored.get("vocab_probs")}
        out["ref_logprobs"] = (self._no_grad_pass(self.reference, batch, micros, policy=False)["logprobs"]
                               if self.reference is not None else None)
        return out

    # ------------------------------------------------------------------------------------------------ updates
    def train(self, batch: TrainBatch, updates: list[Update]) -> dict[str, Any]:
        """Run this rank's share of a GRPO step: per update, forward/backward each micro-batch (loss already divided
        by the mini-batch's global token count), then one optimizer step. Returns token sums, grad norms, lrs."""
        self.model.train()
        sums: dict[str, float] = defaultdict(float)
        grad_norms, lrs, model_stats = [], [], []
        seen: dict[str, list[torch.Tensor]] = defaultdict(list)  # one-update step: the old policy's values, per row
        tally = [0, 0]  # routing agreement with the engine, over the first update (the policy before this step)
        for u, update in enumerate(updates):
            lrs.append(self.opt.lr())
            for i, micro in enumerate(update.micros):
                part = trim(batch.select(micro.rows)).to(self.device)
                self._tally = tally if u == 0 and micro.weight else None
                try:
                    logp, ent, _ = self._forward(self.opt.forward_module, part)
                finally:
                    self._tally = None
                if batch.old_logprobs is None and micro.weight:
                    m = batch.response_mask[micro.rows]  # the untrimmed rows' mask: the step's full width
                    seen["old_logprobs"].append(_full_width(logp, m))
                    seen["old_entropy"].append(_full_width(ent, m))
                loss, stats = self.algorithm.loss(logp, ent, part, num_tokens=update.num_tokens,
                                                  num_seqs=update.num_seqs)
                moe = self.model.moe_loss() if hasattr(self.model, "moe_loss") else None
                if moe is not None:  # MoE load-balance + z losses, each micro-batch weighted by its share of rows
                    loss = loss + moe * (len(micro.rows) / update.num_seqs)
                self.opt.backward(loss * (micro.weight * self.world_size), last=i == len(update.micros) - 1)
                if micro.weight:
                    for k, v in stats.items():
                        sums[k] += float(v)
                    sums["actor/loss"] += float(loss.detach()) * update.num_tokens
                    if hasattr(self.model, "routing_metrics"):
                        model_stats.append(self.model.routing_metrics())
            grad_norms.append(self.opt.step())
        return {"sums": dict(sums), "grad_norms": grad_norms, "lrs": lrs, "model": _mean_dicts(model_stats),
                "routing": tally, **{k: torch.cat(v) for k, v in seen.items()}}

    def sft(self, batch: SFTBatch, update: Update) -> dict[str, Any]:
        """This rank's share of one SFT step: token-mean NLL over the global target-token count."""
        self.model.train()
        total = 0.0
        lr = self.opt.lr()
        for i, micro in enumerate(update.micros):
            part = batch.select(micro.rows)
            ids, attn = part.input_ids.to(self.device), part.attention_mask.to(self.device)
            targets = part.loss_mask[:, 1:].to(self.device)
            logits = self.opt.forward_module(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
            loss = (nll * targets).sum() / update.num_tokens
            moe = self.model.moe_loss() if hasattr(self.model, "moe_loss") else None
            if moe is not None:  # weighted by this micro-batch's share of the step's target tokens
                loss = loss + moe * (float(targets.sum()) / update.num_tokens)
            self.opt.backward(loss * (micro.weight * self.world_size), last=i == len(update.micros) - 1)
            total += float(loss.detach()) * micro.weight
        return {"loss": total, "grad_norm": self.opt.step(), "lr": lr}

    # ------------------------------------------------------------------------------------------------- state
    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for every weight of the policy (LoRA: merged, under the checkpoint's names); under
        ZeRO-3 every rank must iterate together."""
        return merged_state(self.model) if self.lora else self.opt.full_parameters()

    def save_model(self, path: Path) -> None:
        """A Hugging Face directory (safetensors + config + tokenizer) that `from_pretrained` loads; collective under
        ZeRO-3, written by rank 0."""
        state = {}
        for k, v in self.full_parameters():  # every rank iterates (ZeRO-3 gathers are collective); rank 0 keeps
            if self.rank == 0:
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise NonFiniteError(f"refusing to save {path}: weight '{k}' holds NaN or infinite values")
                state[k] = v.cpu().clone() if self.world_size > 1 else v
        if self.rank == 0:
            if self.lora:  # the merged model, loadable as is, and the adapter alone beside it
                self.model.get_base_model().save_pretrained(path, state_dict=state)
                self.model.save_pretrained(path / "adapter")  # peft: adapter weights + adapter_config.json
            else:
                self.model.save_pretrained(path, state_dict=state)
            self.tokenizer.save_pretrained(path)

    def save(self, path: Path) -> None:
        self.save_model(path / "model")
        self.opt.save(path, rank=self.rank)

    def load(self, path: Path) -> None:
        self.opt.load(path, device=self.device, dtype=self.dtype)


def _full_width(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values of trimmed rows ([b, T'], any device) → float32 on the CPU at the mask's full width [b, T],
    zero where the mask is."""
    return F.pad(values.detach().float().cpu(), (0, mask.shape[1] - values.shape[1])) * mask


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over the dicts that have the key."""
    keys = {k for d in dicts for k in d}
    return {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}


def _localize(batch: Any, micros: list[Micro]) -> tuple[Any, list[Micro]]:
    """The rows a rank needs, and its micro-batches re-indexed into them (what travels to an actor)."""
    rows = sorted({r for m in micros for r in m.rows})
    where = {r: i for i, r in enumerate(rows)}
    return batch.select(rows), [Micro([where[r] for r in m.rows], m.weight) for m in micros]


class LearnerPool:
    """The learner ranks as one: plans each batch for `world` ranks, calls them through `fanout`, merges."""

    def __init__(self, fanout: Callable[[str, list[tuple]], list[Any]], *, world: int, micro_batch_size: int,
                 max_tokens_per_micro_batch: int = 0, packing: str = "none") -> None:
        self.fanout = fanout
        self.packing = packing  # the learners' trainer.packing: what a micro-batch costs, whether groups stay whole
        self.world = world
        self.micro_batch_size = micro_batch_size
        self.max_tokens = max_tokens_per_micro_batch
        self.version = 0  # GRPO updates applied; stamped on rollouts as the policy version
        self.backend = "torch"  # what wrote the optimizer state: 'torch' or 'deepspeed-zero<stage>'

    def score(self, batch: TrainBatch, *, old: bool = True) -> TrainBatch:
        """Fill old_logprobs / old_entropy (current policy, no grad; with `old` False they stay None and the one
        update's training forward supplies them) and ref_logprobs (reference, if any)."""
        plans = plan_rows(list(range(len(batch))), row_tokens(batch), world=self.world,
                          max_rows=self.micro_batch_size, max_tokens=self.max_tokens, packing=self.packing,
                          prompt_tokens=batch.prompt_mask.sum(1).long().tolist(), group_size=batch.group_size)
        args = [(*_localize(batch, micros), old) for micros in plans]
        outs = self.fanout("score", args)
        kept = [[r for m in micros if m.weight for r in m.rows] for micros in plans]
        fields = {}
        for name in ("old_logprobs", "old_entropy", "ref_logprobs", "old_hidden", "old_vocab_probs"):
            if outs[0].get(name) is not None:
                fields[name] = gather_rows([(rows, o[name]) for rows, o in zip(kept, outs)], len(batch))
        return dataclasses.replace(batch, **fields)

    def train_step(self, batch: TrainBatch, *, ppo_epochs: int, mini_batches: int) -> tuple[dict[str, float], TrainBatch]:
        """ppo_epochs passes; each splits the batch by prompt groups into mini_batches optimizer steps. Every
        micro-batch's loss is divided by its mini-batch's token count over all ranks (token-mean). Returns the
        metrics and the batch — with old_logprobs / old_entropy filled from the training forward when it came
        without them (a one-update step, `score(old=False)`)."""
        if batch.old_logprobs is None and (ppo_epochs, mini_batches) != (1, 1):
            raise ValueError("train_step without old log-probs makes one update only (ppo_epochs 1, mini_batches 1)")
        plans = plan_updates(batch, world=self.world, ppo_epochs=ppo_epochs, mini_batches=mini_batches,
                             max_rows=self.micro_batch_size, max_tokens=self.max_tokens, packing=self.packing)
        args = []
        kept = []
        for updates in plans:
            sub, micros = _localize(batch, [m for u in updates for m in u.micros])
            kept.append([r for u in updates for m in u.micros if m.weight for r in m.rows])
            it = iter(micros)
            args.append((sub, [Update([next(it) for _ in u.micros], u.num_tokens, u.num_seqs) for u in updates]))
        outs = self.fanout("train", args)
        if batch.old_logprobs is None:
            batch = dataclasses.replace(batch, **{
                name: gather_rows([(rows, o[name]) for rows, o in zip(kept, outs)], len(batch))
                for name in ("old_logprobs", "old_entropy")})
        tokens = sum(u.num_tokens for u in plans[0])
        sums: dict[str, float] = defaultdict(float)
        for o in outs:
            for k, v in o["sums"].items():
                sums[k] += v
        self.version += 1
        metrics = {k: v / tokens for k, v in sums.items()}
        grad_norms = outs[0]["grad_norms"]
        finite = [n for n in grad_norms if math.isfinite(n)]
        metrics.update({"actor/grad_norm": sum(finite) / len(finite) if finite else float("nan"),
                        "actor/lr": outs[0]["lrs"][-1], "actor/updates": float(len(grad_norms)),
                        "nonfinite/skipped_updates": float(len(grad_norms) - len(finite))})
        metrics.update(_mean_dicts([o["model"] for o in outs if o.get("model")]))  # MoE load, gates (per-rank means)
        agree, recorded = (sum(o.get("routing", (0, 0))[i] for o in outs) for i in (0, 1))
        if recorded:  # rollouts with recorded MoE routing: how often the policy's router picks the same experts
            metrics["moe/routing_agreement"] = agree / recorded
        return metrics, batch

    def sft_step(self, batch: SFTBatch) -> dict[str, float]:
        """One optimizer step of token-mean NLL over the batch's target tokens, split over ranks and micro-batches."""
        updates = plan_sft(batch, world=self.world, max_rows=self.micro_batch_size)
        args = []
        for u in updates:
            sub, micros = _localize(batch, u.micros)
            args.append((sub, Update(micros, u.num_tokens)))
        outs = self.fanout("sft", args)
        return {"sft/loss": sum(o["loss"] for o in outs), "sft/grad_norm": outs[0]["grad_norm"],
                "nonfinite/skipped_updates": float(not math.isfinite(outs[0]["grad_norm"])),
                "sft/lr": outs[0]["lr"], "sft/tokens": float(updates[0].num_tokens)}

    def save_model(self, path: Path) -> None:
        self.fanout("save_model", [(path,)] * self.world)

    def save(self, path: Path) -> None:
        self.fanout("save", [(path,)] * self.world)
        (path / "learner.json").write_text(json.dumps({"version": self.version, "world_size": self.world,
                                                       "backend": self.backend}))

    def load(self, path: Path) -> None:
        meta = json.loads((path / "learner.json").read_text())
        if (meta["world_size"], meta["backend"]) != (self.world, self.backend):
            raise CheckpointError(
                f"checkpoint {path} holds optimizer state of {meta['world_size']} learner rank(s) ({meta['backend']}) "
                f"but this run has {self.world} ({self.backend}); sharded optimizer states cannot be re-split. Resume "
                f"with the same trainer.mode, trainer.ray.num_learners and trainer.ray.zero_stage, or start a new run "
                f"from its consolidated weights: model.type=pretrained model.path={path / 'model'}")
        self.fanout("load", [(path,)] * self.world)
        self.version = meta["version"]


def local_pool(learner: Learner, *, micro_batch_size: int, max_tokens_per_micro_batch: int = 0) -> LearnerPool:
    """Debug mode: one in-process rank."""
    def fanout(method: str, args: list[tuple]) -> list[Any]:
        return [getattr(learner, method)(*args[0])]
    pool = LearnerPool(fanout, world=1, micro_batch_size=micro_batch_size,
                       max_tokens_per_micro_batch=max_tokens_per_micro_batch, packing=learner.packing)
    pool.learner = learner
    return pool
