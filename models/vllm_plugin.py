"""Registers our decoder with vLLM: `vllm.general_plugins` entry point `tokenwise` (pyproject.toml), so every vLLM
process — our rollout engine, its Ray actors, `vllm serve RUN_DIR/...` — can load a TokenwiseForCausalLM checkpoint.
Kept free of vLLM imports at module level: vLLM loads plugins while it is itself importing."""

from __future__ import annotations

ARCHITECTURE = "TokenwiseForCausalLM"


def register() -> None:
    import tokenwise.models.decoder  # noqa: F401  (AutoConfig learns model_type "tokenwise")
    from vllm import ModelRegistry
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "tokenwise.models.vllm_decoder:TokenwiseForCausalLM")
