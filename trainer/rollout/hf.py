"""Rollout engine on transformers `generate` (CPU, debug, or one GPU): batched, KV-cached, G samples per prompt."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedModel

from rl.types import RolloutBatch
from trainer.loading import PromptFormatter, eos_token_ids


class HFRollout:
    """generate(rows, n) → RolloutBatch; load_weights(state_dict, version) swaps the policy in place."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, formatter: PromptFormatter, *, temperature: float,
                 top_p: float, top_k: int, max_new_tokens: int, batch_size: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.format = formatter
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.eos_ids = eos_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id
        self.version = 0

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor], *, version: int) -> None:
        self.model.load_state_dict(state_dict, strict=True)
        self.version = version

    @torch.no_grad()
    def generate(self, rows: list[dict], *, n: int, greedy: bool = False) -> RolloutBatch:
        """n responses per row (groups contiguous). Sampling uses the global torch RNG, which checkpoints save."""
        self.model.eval()
        texts = [self.format(r["prompt"]) for r in rows]
        per_call = max(1, self.batch_size // n)
        parts = [self._generate(texts[i:i + per_call], n, greedy) for i in range(0, len(texts), per_call)]
        P = max(p[0].shape[1] for p in parts)
        T = max(p[2].shape[1] for p in parts)
        prompt_ids = torch.cat([F.pad(p[0], (P - p[0].shape[1], 0), value=self.pad_id) for p in parts])
        prompt_mask = torch.cat([F.pad(p[1], (P - p[1].shape[1], 0), value=0) for p in parts])
        response_ids = torch.cat([F.pad(p[2], (0, T - p[2].shape[1]), value=self.pad_id) for p in parts])
        response_mask = torch.cat([F.pad(p[3], (0, T - p[3].shape[1]), value=0.0) for p in parts])
        logprobs = torch.cat([F.pad(p[4], (0, T - p[4].shape[1]), value=0.0) for p in parts])
        is_eos = torch.isin(response_ids, torch.tensor(self.eos_ids)) & (response_mask > 0)
        content = response_mask.bool() & ~is_eos
        responses = [self.tokenizer.decode(ids[keep], skip_special_tokens=True)
                     for ids, keep in zip(response_ids, content)]
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
            rollout_logprobs=logprobs, truncated=~is_eos.any(dim=1),
            prompts=[r["prompt"] for r in rows for _ in range(n)], answers=[str(r["answer"]) for r in rows for _ in range(n)],
            responses=responses, group_size=n, policy_version=self.version,
        )

    def _generate(self, texts: list[str], n: int, greedy: bool) -> tuple[torch.Tensor, ...]:
        device = self.model.device
        enc = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        ids = enc["input_ids"].repeat_interleave(n, dim=0)
        mask = enc["attention_mask"].repeat_interleave(n, dim=0)
        if greedy:
            gen = GenerationConfig(do_sample=False, max_new_tokens=self.max_new_tokens)
        else:
            gen = GenerationConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                   top_k=self.top_k, max_new_tokens=self.max_new_tokens)
        gen.pad_token_id, gen.eos_token_id = self.pad_id, self.eos_ids
        gen.return_dict_in_generate, gen.output_scores = True, not greedy
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
        response = out.sequences[:, ids.shape[1]:].cpu()
        is_eos = torch.isin(response, torch.tensor(self.eos_ids))
        after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        response_mask = (~after_first_eos).float()
        if greedy:
            logprobs = torch.zeros(response.shape, dtype=torch.float32)
        else:  # scores are the processed logits (temperature, top-k/p applied): the actual sampling distribution
            scores = torch.stack(out.scores, dim=1).float().cpu()
            logprobs = scores.log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
            logprobs = logprobs.masked_fill(response_mask == 0, 0.0)
        return ids, mask, response, response_mask, logprobs
