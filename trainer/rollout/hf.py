"""Rollout engine on transformers `generate` (CPU, debug, or one GPU): batched, KV-cached, G samples per prompt."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from tokenwise.models.decoder import routes_experts
from tokenwise.rl.hapo import sampling_temperatures
from tokenwise.rl.types import RolloutBatch
from tokenwise.trainer.loading import PromptFormatter, eos_token_ids
from tokenwise.trainer.rollout.base import BucketedSync
from tokenwise.trainer.rollout.stops import apply_stop_strings


def concat_rollouts(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One batch from several (prompts left-padded, responses right-padded to the longest); groups stay contiguous."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.response_ids.shape[1] for p in parts)
    return RolloutBatch(
        prompt_ids=torch.cat([F.pad(p.prompt_ids, (P - p.prompt_ids.shape[1], 0), value=pad_id) for p in parts]),
        prompt_mask=torch.cat([F.pad(p.prompt_mask, (P - p.prompt_mask.shape[1], 0), value=0) for p in parts]),
        response_ids=torch.cat([F.pad(p.response_ids, (0, T - p.response_ids.shape[1]), value=pad_id) for p in parts]),
        response_mask=torch.cat([F.pad(p.response_mask, (0, T - p.response_mask.shape[1])) for p in parts]),
        rollout_logprobs=torch.cat([F.pad(p.rollout_logprobs, (0, T - p.rollout_logprobs.shape[1])) for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        prompts=[x for p in parts for x in p.prompts], answers=[x for p in parts for x in p.answers],
        responses=[x for p in parts for x in p.responses], group_size=parts[0].group_size,
        policy_version=min(p.policy_version for p in parts),
        temperatures=None if parts[0].temperatures is None else torch.cat(
            [F.pad(p.temperatures, (0, T - p.temperatures.shape[1]), value=1.0) for p in parts]),
        prompt_expert_ids=None if parts[0].prompt_expert_ids is None else torch.cat(
            [F.pad(p.prompt_expert_ids, (0, 0, 0, 0, P - p.prompt_expert_ids.shape[1], 0), value=-1) for p in parts]),
        response_expert_ids=None if parts[0].response_expert_ids is None else torch.cat(
            [F.pad(p.response_expert_ids, (0, 0, 0, 0, 0, T - p.response_expert_ids.shape[1]), value=-1)
             for p in parts]),
        context_mask=None if parts[0].context_mask is None else torch.cat(
            [F.pad(p.context_mask, (0, T - p.context_mask.shape[1])) for p in parts]),
        episode_stats=None if parts[0].episode_stats is None else torch.cat([p.episode_stats for p in parts]),
        token_versions=torch.cat([F.pad(p.token_versions, (0, T - p.token_versions.shape[1]), value=-1)
                                  for p in parts]),
    )


class SampledLogprobs(LogitsProcessor):
    """Last in the processor list, so it sees the scores the sampler draws from. It keeps one step's log-softmax
    [B, V] and, at the next step, takes the log-prob of the token drawn from it (the newest column of input_ids):
    [B] a step instead of generate's output_scores, [B, T, V] of them."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self.taken: list[torch.Tensor] = []

    def _take(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.taken.append(self.pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.pending = scores.float().log_softmax(-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probs of the T sampled tokens, given generate's output sequences."""
        self._take(sequences[:, -1])
        self.pending = None
        return torch.stack(self.taken, dim=1)


class AdaptiveTemperature(LogitsProcessor):
    """HAPO adaptive temperature as a logits processor: divides each row's logits by T_t = T (1 + tau ĥ_t) and
    records T_t per decoding step. transformers runs custom processors before its own top-k / top-p warpers, so those
    see the tempered logits (generation_config.temperature must be 1.0)."""

    def __init__(self, *, temperature: float, tau: float, stats: dict[str, float]) -> None:
        self.temperature, self.tau, self.stats = temperature, tau, stats
        self.history: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        temps = sampling_temperatures(scores, temperature=self.temperature, tau=self.tau, stats=self.stats)
        self.history.append(temps.float())  # stays on the device; one copy to the host after generate
        return scores / temps.to(scores.dtype).unsqueeze(-1)


class PartialRollouts(LogitsProcessor):
    """First in the processor list under partial rollouts: at each decoding step, after the forward that scored the
    token about to be sampled, stamps that token with the engine's version and loads weights posted meanwhile, so the
    next forward runs on them (the KV cache of the tokens before stays, as vLLM's pause with requests kept leaves it)."""

    def __init__(self, engine: BucketedSync) -> None:
        self.engine = engine
        self.versions: list[int] = []  # one per decoding step: the version that scored that step's token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.versions.append(self.engine.version)
        self.engine.take_posted()
        return scores

    def stamps(self, response_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] int32: each response column's version where sampled, -1 elsewhere."""
        T = response_mask.shape[1]
        if len(self.versions) != T:
            raise RuntimeError(f"partial rollouts: {len(self.versions)} decoding steps stamped for {T} generated "
                               "tokens (generate must call the logits processors once per token)")
        cols = torch.tensor(self.versions, dtype=torch.int32)
        return torch.where(response_mask > 0, cols[None, :], torch.tensor(-1, dtype=torch.int32))


class HFRollout(BucketedSync):
    """generate(rows, n, seed) → RolloutBatch. Weights arrive in buckets: begin_sync(), load_bucket(named tensors)...,
    finish_sync(version); load_weights(state_dict, version) does all three."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, formatter: PromptFormatter, *, temperature: float,
                 top_p: float, top_k: int, max_new_tokens: int, batch_size: int, stop: list[str] = ()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.format = formatter
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stop = list(stop)
        self.eos_ids = eos_token_ids(tokenizer, model.generation_config)
        self.pad_id = tokenizer.pad_token_id
        self.version = 0
        self._pending: set[str] = set()
        self._home = model.device
        # MoE routing replay: record each token's experts (our decoder reports them; a dense model has none)
        self.records_routing = routes_experts(model)

    def begin_sync(self) -> None:
        self._pending = set(self.model.state_dict().keys())

    @torch.no_grad()
    def load_bucket(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = set(tensors) - self._pending
        if unknown:
            raise KeyError(f"weight sync: the rollout model has no (or already received) weights {sorted(unknown)[:5]}")
        self.model.load_state_dict(tensors, strict=False)
        self._pending -= set(tensors)

    def finish_sync(self, version: int) -> None:
        if self._pending:
            raise KeyError(f"weight sync ended without weights {sorted(self._pending)[:5]} "
                           f"({len(self._pending)} missing)")
        self.version = version

    def sleep(self) -> None:
        """Free the accelerator for colocated learners (weights to CPU); a no-op on CPU."""
        if self._home.type != "cpu":
            self.model.to("cpu")

    def wake_up(self) -> None:
        if self._home.type != "cpu":
            self.model.to(self._home)

    @torch.no_grad()
    def attention_sink(self, rows: list[dict]) -> dict[str, float]:
        """Mean attention mass on each prompt's first token, per layer and overall (queries after the first token,
        all heads), for models that return attention probabilities (our decoder); {} for others."""
        if not hasattr(self.model, "routing_metrics"):
            return {}
        enc = self.tokenizer([self.format.row(r) for r in rows], padding=True, add_special_tokens=False,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(self._home), enc["attention_mask"].to(self._home)
        self.model.eval()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=False, output_attentions=True, logits_to_keep=1)
        first = mask.argmax(1)  # left padding: the first real token
        queries = mask.bool() & (torch.arange(ids.shape[1], device=ids.device)[None] > first[:, None])
        sinks = []
        for probs in out.attentions:  # [B, heads, S, S]
            mass = probs.float().gather(-1, first.view(-1, 1, 1, 1).expand(-1, probs.shape[1], probs.shape[2], 1))
            sinks.append(float((mass.squeeze(-1).mean(1) * queries).sum() / queries.sum()))
        return {"eval/attn_sink": sum(sinks) / len(sinks), **{f"eval/attn_sink_layer{i}": v for i, v in enumerate(sinks)}}

    @torch.no_grad()
    def generate(self, rows: list[dict], *, n: int, greedy: bool = False, seed: int | None = None,
                 adaptive: dict | None = None, temperature: float | None = None,
                 prompt_ids: list[list[int]] | None = None, max_new_tokens: int | None = None) -> RolloutBatch:
        """n responses per row (groups contiguous). With `seed`, sampling draws from a generator seeded with it
        (the same rows, weights and seed give the same responses in any process); else from the global RNG.
        `adaptive` = {tau, stats}: HAPO adaptive temperature (ignored when greedy); the batch then records each
        token's temperature. `temperature` overrides the engine's sampling temperature for this call. `prompt_ids`
        (one list per row) are the model's input as token ids instead of the rows' formatted prompts (multi-turn
        rollouts continue a trajectory this way, never re-tokenizing it); `max_new_tokens` overrides the engine's."""
        temperature = self.temperature if temperature is None else temperature
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if prompt_ids is None:
            prompt_ids = [self.tokenizer(self.format.row(r), add_special_tokens=False)["input_ids"] for r in rows]
        if seed is None:
            return self._generate_all(rows, prompt_ids, n, greedy, adaptive, temperature, limit)
        devices = [self._home] if self._home.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self._generate_all(rows, prompt_ids, n, greedy, adaptive, temperature, limit)

    def _generate_all(self, rows: list[dict], prompt_ids: list[list[int]], n: int, greedy: bool,
                      adaptive: dict | None, temperature: float, limit: int) -> RolloutBatch:
        self.model.eval()
        per_call = max(1, self.batch_size // n)
        batch = concat_rollouts([self._generate(rows[i:i + per_call], prompt_ids[i:i + per_call], n, greedy,
                                                None if greedy else adaptive, temperature, limit)
                                 for i in range(0, len(rows), per_call)], self.pad_id)
        return apply_stop_strings(batch, self.stop, self.tokenizer)

    def _generate(self, rows: list[dict], prompt_ids: list[list[int]], n: int, greedy: bool, adaptive: dict | None,
                  temperature: float, limit: int) -> RolloutBatch:
        device = self.model.device
        P = max(len(p) for p in prompt_ids)
        ids = torch.tensor([[self.pad_id] * (P - len(p)) + list(p) for p in prompt_ids]).repeat_interleave(n, dim=0)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompt_ids]).repeat_interleave(n, dim=0)
        # Sampling: our own processor list — temperature (or HAPO's per-token one), top-k, top-p, then the recorder
        # of the sampled tokens' log-probs — with generate's own warpers neutral, so the recorder sees exactly the
        # distribution the sampler draws from. No output_scores: those are [B, T, V] (GBs at a 150k vocabulary).
        gen = GenerationConfig(do_sample=not greedy, max_new_tokens=limit, return_dict_in_generate=True,
                               pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        processors = LogitsProcessorList()
        track = PartialRollouts(self) if self.mailbox is not None else None
        if track is not None:
            processors.append(track)
        tempering = recorder = None
        if not greedy:
            gen.temperature, gen.top_k, gen.top_p = 1.0, 0, 1.0
            if adaptive is not None:
                tempering = AdaptiveTemperature(temperature=temperature, tau=adaptive["tau"], stats=adaptive["stats"])
                processors.append(tempering)
            elif temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if self.top_k:
                processors.append(TopKLogitsWarper(top_k=self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=self.top_p))
            recorder = SampledLogprobs()
            processors.append(recorder)
        routed: list[torch.Tensor] = []  # per forward of generate: [B, S, MoE layers, k] (prefill, then one token)
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # peft: its base
        hook = (inner.register_forward_hook(lambda m, a, o: routed.append(m.routed_experts().to("cpu", torch.int16)))
                if self.records_routing else None)
        try:
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen,
                                      logits_processor=processors)
        finally:
            if hook is not None:
                hook.remove()
        response = out.sequences[:, ids.shape[1]:].cpu()
        is_eos = torch.isin(response, torch.tensor(self.eos_ids))
        after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        response_mask = (~after_first_eos).float()
        if greedy:
            logprobs = torch.zeros(response.shape, dtype=torch.float32)
        else:
            logprobs = recorder.finish(out.sequences).cpu().masked_fill(response_mask == 0, 0.0)
        is_eos = is_eos & (response_mask > 0)
        content = response_mask.bool() & ~is_eos
        experts = _recorded_experts(routed, mask, response_mask) if self.records_routing else (None, None)
        return RolloutBatch(
            prompt_ids=ids, prompt_mask=mask, response_ids=response, response_mask=response_mask,
            rollout_logprobs=logprobs, truncated=~is_eos.any(dim=1),
            prompts=[r["prompt"] for r in rows for _ in range(n)], answers=[str(r["answer"]) for r in rows for _ in range(n)],
            responses=[self.tokenizer.decode(ids_[keep], skip_special_tokens=True)
                       for ids_, keep in zip(response, content)],
            group_size=n, policy_version=track.versions[0] if track and track.versions else self.version,
            temperatures=(torch.stack(tempering.history, dim=1).cpu() * response_mask + (1 - response_mask)
                          if tempering is not None else None),
            prompt_expert_ids=experts[0], response_expert_ids=experts[1],
            token_versions=track.stamps(response_mask) if track is not None else None,
        )


def _recorded_experts(routed: list[torch.Tensor], prompt_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt [B, P, M, k], response [B, T, M, k]) expert ids from generate's forwards: the prefill routes the prompt,
    decode step t routes response token t - 1; the last token is never fed back (-1), nor is anything masked."""
    B, P = prompt_mask.shape
    T = response_mask.shape[1]
    if not routed or routed[0].shape[1] != P or any(r.shape[1] != 1 for r in routed[1:]) or len(routed) != T:
        raise RuntimeError(f"routing record: expected a prefill of {P} tokens and {T - 1} one-token decode steps, got "
                           f"forwards of {[r.shape[1] for r in routed]} tokens")
    prompt = routed[0].masked_fill(prompt_mask[:, :, None, None] == 0, -1)
    response = torch.cat([*routed[1:], torch.full_like(routed[0][:, :1], -1)], dim=1)
    return prompt, response.masked_fill(response_mask[:, :, None, None] == 0, -1)
