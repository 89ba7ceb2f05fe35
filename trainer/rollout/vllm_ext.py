"""Code that runs inside vLLM's worker: the weight-sync worker extension and the HAPO adaptive-temperature logits
processor. Kept apart from trainer/rollout/vllm.py so vLLM imports only this small module into its worker.

The processor records the temperature it applied to each (request, decode position) in `_APPLIED`, a table in the
worker's process; `WeightSync.tokenwise_take_temperatures` hands the table's rows to the engine's caller through
`collective_rpc`, so this works whether or not the engine core runs in the caller's process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from tokenwise.rl.hapo import sampling_temperatures

EXTRA_KEY = "tokenwise_adaptive"  # SamplingParams.extra_args[EXTRA_KEY] = {"key", "temperature", "tau", "stats"}

_APPLIED: dict[str, dict[int, float]] = {}  # request key -> {output position: temperature}

ROUTING_KEY = "tokenwise_routing"  # SamplingParams.extra_args[ROUTING_KEY] = request key: record its MoE routing
_ROUTED: dict[str, list[tuple[Any, Any]]] = {}  # request key -> [(positions [n], experts [n, MoE layers, k])]


class WeightSync:
    """Mixed into vLLM's worker (`worker_extension_cls`); reached with `LLM.collective_rpc(name, args=...)`."""

    def tokenwise_reload_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]], partial: bool = False) -> int:
        """Load checkpoint-format (HF-named) weights in place through vLLM's reload path, which also redoes the CPU
        build's linear-weight repacking (its plain `load_weights` cannot load into repacked parameters); on CPU our
        decoder's MoE expert tensors go around it (load_cpu_moe_experts) and tied heads are re-packed after it.
        `partial`: whole layers of the model only (a streamed sync); the others keep their weights, unwarned."""
        model = self.model_runner.get_model()
        moe = cpu_moe_layers(model)
        experts = {n: t for n, t in named_tensors if moe and n.endswith(EXPERT_SUFFIXES)}
        with _quiet_layers_not_reloaded() if experts or partial else contextlib.nullcontext():
            self.model_runner.reload_weights(weights_iterator=((n, t) for n, t in named_tensors if n not in experts))
        repack_output_heads(model)
        load_cpu_moe_experts(moe, experts)
        return len(named_tensors)

    def tokenwise_take_temperatures(self, keys: Sequence[str]) -> dict[str, dict[int, float]]:
        return {k: _APPLIED.pop(k, {}) for k in keys}

    def tokenwise_record_routing(self) -> int:
        """Record the experts every MoE layer picks for each token of requests that carry extra_args[ROUTING_KEY]
        (vLLM's own routed-experts output needs its V2 model runner, which the CPU build lacks). Each layer's router
        writes its top-k ids into one buffer (the router's capture hook, which vLLM calls before any expert-parallel
        remapping); after each forward the runner's batch layout (request order, query start offsets, positions)
        files them under the request's key. Returns the number of MoE layers (0: nothing to record)."""
        from vllm.model_executor.layers.fused_moe.layer import MoERunner
        runner = self.model_runner
        layers = sorted((m for m in runner.get_model().modules() if isinstance(m, MoERunner)), key=lambda m: m.layer_id)
        if not layers or getattr(runner, "_tokenwise_routing", None) is not None:
            return len(layers)
        k = layers[0].router.top_k
        buf = torch.full((len(layers), runner.max_num_tokens, k), -1, dtype=torch.int32, device=runner.device)
        for j, layer in enumerate(layers):
            layer.router.set_capture_fn(lambda ids, j=j: buf[j, :ids.shape[0]].copy_(ids))
        forward = runner._model_forward

        def recording_forward(*args: Any, **kwargs: Any) -> Any:
            out = forward(*args, **kwargs)
            batch = runner.input_batch
            n = batch.num_reqs
            keys = [(runner.requests[r].sampling_params.extra_args or {}).get(ROUTING_KEY)
                    for r in batch.req_ids[:n]]
            if any(keys):
                starts = runner.query_start_loc.np[:n + 1].tolist()
                positions = runner.positions[:starts[-1]].cpu().numpy().copy()  # the buffer is reused
                experts = buf[:, :starts[-1]].transpose(0, 1).to("cpu", torch.int16).numpy()
                for i, key in enumerate(keys):
                    if key and starts[i + 1] > starts[i]:
                        span = slice(starts[i], starts[i + 1])
                        _ROUTED.setdefault(key, []).append((positions[span], experts[span]))
            return out

        runner._model_forward = recording_forward
        runner._tokenwise_routing = buf
        return len(layers)

    def tokenwise_take_routing(self, keys: Sequence[str]) -> dict[str, list[tuple[Any, Any]]]:
        return {k: _ROUTED.pop(k, []) for k in keys}


def repack_output_heads(model: torch.nn.Module) -> int:
    """The CPU build computes logits with a oneDNN handle packed from the head's weight at load time
    (`layer.cpu_linear`). A tied head receives no weights of its own in a reload, so its handle would keep the old
    embedding: re-pack every embedding-method layer that has such a handle. A no-op on GPU (no `cpu_linear`)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    repacked = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if hasattr(module, "cpu_linear") and isinstance(method, UnquantizedEmbeddingMethod):
            method.process_weights_after_loading(module)
            repacked += 1
    return repacked


EXPERT_SUFFIXES = (".experts_gate_up", ".experts_down")  # our decoder's 3-D expert tensors (models/decoder.py)


@contextlib.contextmanager
def _quiet_layers_not_reloaded() -> Iterator[None]:
    """vLLM warns about layers a reload did not touch ('<layer>: Failed to load weights', 'Following weights were not
    loaded') and keeps their weights: here, the CPU experts we load ourselves right after."""
    logs = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("layerwise", "inplace")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def cpu_moe_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{MoE block prefix (e.g. 'model.layers.0.mlp'): its fused experts} for the CPU build's packed experts."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    return {name.split(".experts.")[0]: m for name, m in model.named_modules()
            if isinstance(m, RoutedExperts) and m.w13_weight.device.type == "cpu"
            and getattr(m.quant_method, "moe_kernel", None) is not None}


def load_cpu_moe_experts(layers: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> int:
    """The CPU build pads and packs each MoE layer's w13 / w2 into its grouped-GEMM layout once, at load time, and a
    reload (`is_weight_update`) skips that step — new weights would land unpacked (or not fit, once padded). So our
    decoder's expert tensors bypass the reload: each pair is packed here by the layer's own kernel, on a scratch
    module holding the checkpoint layout, and copied into the packed parameters in place."""
    done = 0
    for prefix, layer in layers.items():
        gate_up, down = tensors.get(prefix + EXPERT_SUFFIXES[0]), tensors.get(prefix + EXPERT_SUFFIXES[1])
        if gate_up is None or down is None:
            continue
        if gate_up.shape[1] != 2 * layer.moe_config.intermediate_size_per_partition:
            raise ValueError(f"{prefix}: weight sync of tensor-parallel MoE experts on CPU is not supported")
        scratch = torch.nn.Module()
        scratch.moe_config = layer.moe_config
        scratch.w13_weight = torch.nn.Parameter(gate_up.to(layer.w13_weight.dtype).contiguous(), requires_grad=False)
        scratch.w2_weight = torch.nn.Parameter(down.to(layer.w2_weight.dtype).contiguous(), requires_grad=False)
        layer.quant_method.moe_kernel.fused_experts.process_weights_after_loading(scratch)
        layer.w13_weight.data.copy_(scratch.w13_weight.data)
        layer.w2_weight.data.copy_(scratch.w2_weight.data)
        done += 1
    return done


class AdaptiveTemperatureProcessor(LogitsProcessor):
    """Divides the logits of each request that carries `extra_args[EXTRA_KEY]` by T_t = T (1 + tau ĥ_t) — the same
    function of the logits (rl.hapo.sampling_temperatures) as the transformers backend — and records T_t. The
    request's own SamplingParams.temperature must be 1.0; vLLM applies its temperature, top-k and top-p after
    custom processors, as transformers does."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[dict, list[int]]] = {}  # batch index -> (settings, the request's output ids)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        args = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if args is not None and sampling_params.temperature != 1.0:
            raise ValueError("adaptive temperature: the request's own temperature must be 1.0")

    def is_argmax_invariant(self) -> bool:
        return True  # dividing by a positive temperature keeps the argmax: greedy requests skip it

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, output_ids in batch_update.added:
            args = (params.extra_args or {}).get(EXTRA_KEY) if params is not None else None
            if args is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = (args, output_ids)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and direction.name == "SWAP":
                self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = [(i, args, out) for i, (args, out) in self.rows.items() if i < logits.shape[0]]
        if not rows:
            return logits
        # requests of one rollout call share T, tau and the statistics: one batched computation per setting
        by_setting: dict[tuple, list] = {}
        for row in rows:
            by_setting.setdefault(_setting_key(row[1]), []).append(row)
        for group in by_setting.values():
            index = torch.tensor([i for i, _, _ in group], device=logits.device)
            args = group[0][1]
            temps = sampling_temperatures(logits[index], temperature=args["temperature"], tau=args["tau"],
                                          stats=args["stats"])
            logits[index] = logits[index] / temps.to(logits.dtype).unsqueeze(-1)
            for (_, a, out), t in zip(group, temps.tolist()):
                _APPLIED.setdefault(a["key"], {})[len(out)] = t
        return logits


def _setting_key(args: dict) -> tuple:
    return (args["temperature"], args["tau"], tuple(sorted(args["stats"].items())))
