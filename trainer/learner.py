"""The learner: a policy under an optimizer, plus an optional frozen reference. Debug mode runs it in-process.

Coarse interface (STYLE.md §4): `score` (old/ref log-probs and entropies), `train_step` (GRPO update),
`sft_step`, `weights` (for rollout sync), `save` / `load` (checkpoints), `save_model` (HF directory).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from rl.types import RolloutBatch, SFTBatch, TrainBatch
from trainer.loading import load_causal_lm


def token_logprobs_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) and entropy H = logsumexp(z) - sum p z per position, from (temperature-scaled) logits."""
    logz_BT = torch.logsumexp(logits_BTV, dim=-1)
    logp_BT = logits_BTV.gather(-1, labels_BT.unsqueeze(-1)).squeeze(-1) - logz_BT
    entropy_BT = logz_BT - (torch.softmax(logits_BTV, dim=-1) * logits_BTV).sum(-1)
    return logp_BT, entropy_BT


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """lr multiplier: linear warm-up over `warmup` updates, then cosine from 1 to min_ratio at `total`."""
    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / warmup
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def trim(batch: RolloutBatch) -> RolloutBatch:
    """Drop prompt columns that are padding in every row and response columns past the longest response."""
    p0 = int(batch.prompt_mask.any(0).long().argmax())
    t1 = max(1, int(batch.response_mask.any(0).nonzero().max()) + 1) if batch.response_mask.any() else 1
    T = batch.response_ids.shape[1]
    out = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if f.name.startswith("prompt_") and isinstance(v, torch.Tensor):
            v = v[:, p0:]
        elif isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == T:
            v = v[:, :t1]
        out[f.name] = v
    return type(batch)(**out)


class Learner:
    def __init__(self, model_dir: str | Path, tokenizer: Any, *, optim: Any, total_updates: int,
                 device: torch.device, dtype: torch.dtype, micro_batch_size: int, temperature: float = 1.0,
                 algorithm: Any = None, reference_dir: str | Path | None = None) -> None:
        self.model = load_causal_lm(model_dir, dtype=dtype, device=device)
        self.model.train()
        self.tokenizer = tokenizer
        self.device, self.dtype = device, dtype
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature
        self.algorithm = algorithm
        self.reference = None
        if reference_dir is not None:
            self.reference = load_causal_lm(reference_dir, dtype=dtype, device=device).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, warmup_cosine(optim.warmup_steps, total_updates, optim.min_lr_ratio))
        self.grad_clip = optim.grad_clip
        self.version = 0  # GRPO updates applied; stamped on rollouts as the policy version
        self._keep_arg = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    # ------------------------------------------------------------------------------------------------ forward
    def _forward(self, model: torch.nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """log-probs and entropies [B, T] of the response tokens at the sampling temperature."""
        T = batch.response_ids.shape[1]
        ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1).to(self.device)
        attn = torch.cat([batch.prompt_mask, batch.response_mask.long()], dim=1).to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": T + 1} if self._keep_arg else {}
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, **kwargs).logits
        logits = logits[:, -(T + 1):-1].float() / self.temperature
        logp, ent = token_logprobs_entropy(logits, batch.response_ids.to(self.device))
        return logp, ent

    @torch.no_grad()
    def _no_grad_pass(self, model: torch.nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logps, ents = [], []
        T = batch.response_ids.shape[1]
        for start in range(0, len(batch), self.micro_batch_size):
            micro = trim(batch.select(slice(start, start + self.micro_batch_size)))
            logp, ent = self._forward(model, micro)
            pad = T - logp.shape[1]
            logps.append(F.pad(logp.float().cpu(), (0, pad)))
            ents.append(F.pad(ent.float().cpu(), (0, pad)))
        mask = batch.response_mask
        return torch.cat(logps) * mask, torch.cat(ents) * mask

    def score(self, batch: TrainBatch) -> TrainBatch:
        """Fill old_logprobs / old_entropy (current policy, no grad) and ref_logprobs (reference, if any)."""
        was_training = self.model.training
        self.model.eval()
        old_logp, old_ent = self._no_grad_pass(self.model, batch)
        self.model.train(was_training)
        ref_logp = self._no_grad_pass(self.reference, batch)[0] if self.reference is not None else None
        return dataclasses.replace(batch, old_logprobs=old_logp, old_entropy=old_ent, ref_logprobs=ref_logp)

    # ------------------------------------------------------------------------------------------------ updates
    def _apply_update(self) -> float:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def train_step(self, batch: TrainBatch, *, ppo_epochs: int, mini_batches: int) -> dict[str, float]:
        """ppo_epochs passes; each splits the batch by prompt groups into mini_batches optimizer steps, each
        accumulated over micro-batches. The loss of every micro-batch is divided by its mini-batch's token count."""
        self.model.train()
        G = batch.group_size
        groups = len(batch) // G
        sums: dict[str, float] = defaultdict(float)
        tokens, grad_norms, lrs = 0, [], []
        for _ in range(ppo_epochs):
            for m in range(mini_batches):
                lo, hi = m * groups // mini_batches, (m + 1) * groups // mini_batches
                mini = batch.select(slice(lo * G, hi * G))
                num_tokens = max(1, int(mini.response_mask.sum()))
                lrs.append(self.scheduler.get_last_lr()[0])
                for start in range(0, len(mini), self.micro_batch_size):
                    micro = trim(mini.select(slice(start, start + self.micro_batch_size))).to(self.device)
                    logp, ent = self._forward(self.model, micro)
                    loss, stats = self.algorithm.loss(logp, ent, micro, num_tokens=num_tokens)
                    loss.backward()
                    for k, v in stats.items():
                        sums[k] += float(v)
                    sums["actor/loss"] += float(loss.detach()) * num_tokens
                tokens += num_tokens
                grad_norms.append(self._apply_update())
        self.version += 1
        metrics = {k: v / tokens for k, v in sums.items()}
        metrics.update({"actor/grad_norm": sum(grad_norms) / len(grad_norms), "actor/lr": lrs[-1],
                        "actor/updates": float(len(grad_norms))})
        return metrics

    def sft_step(self, batch: SFTBatch) -> dict[str, float]:
        """One optimizer step of token-mean NLL over the batch's target tokens, micro-batched."""
        self.model.train()
        num_tokens = max(1, int(batch.loss_mask[:, 1:].sum()))
        total = 0.0
        lr = self.scheduler.get_last_lr()[0]
        for start in range(0, len(batch), self.micro_batch_size):
            micro = batch.select(slice(start, start + self.micro_batch_size))
            ids, attn = micro.input_ids.to(self.device), micro.attention_mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            loss = (nll * micro.loss_mask[:, 1:].to(self.device)).sum() / num_tokens
            loss.backward()
            total += float(loss.detach())
        grad_norm = self._apply_update()
        return {"sft/loss": total, "sft/grad_norm": grad_norm, "sft/lr": lr, "sft/tokens": float(num_tokens)}

    # ------------------------------------------------------------------------------------------------- state
    def weights(self) -> dict[str, torch.Tensor]:
        """The policy's parameters for the rollout engine (views, not copies: the engine copies on load)."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def save_model(self, path: Path) -> None:
        """A Hugging Face directory (safetensors + config + tokenizer) that `from_pretrained` loads."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def save(self, path: Path) -> None:
        self.save_model(path / "model")
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        torch.save({"scheduler": self.scheduler.state_dict(), "version": self.version}, path / "scheduler.pt")

    def load(self, path: Path) -> None:
        saved = load_causal_lm(path / "model", dtype=self.dtype, device=self.device, what=f"checkpoint {path}")
        self.model.load_state_dict(saved.state_dict(), strict=True)
        del saved
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        sched = torch.load(path / "scheduler.pt", weights_only=True)
        self.scheduler.load_state_dict(sched["scheduler"])
        self.version = sched["version"]
