"""Loading models and tokenizers from directories, devices and dtypes, and turning prompts into model text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

import tokenwise.models.decoder  # noqa: F401  (registers model_type 'tokenwise' with the Auto classes)
from tokenwise.rl.errors import ConfigError, ModelLoadError


def resolve_device(name: str, *, cluster_gpus: float | None = None) -> torch.device:
    """`cluster_gpus`: in cluster mode the actors' devices follow trainer.ray.gpus_per_learner, not this machine."""
    if cluster_gpus is not None:
        if name == "cpu" or (name == "auto" and cluster_gpus == 0):
            return torch.device("cpu")
        if cluster_gpus == 0:
            raise ModelLoadError("trainer.device is 'cuda' but trainer.ray.gpus_per_learner is 0; "
                                 "give the learners GPUs or use trainer.device: cpu")
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("trainer.device is 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _check_source(path: str | Path, what: str) -> None:
    p = Path(path)
    looks_local = p.is_absolute() or str(path).startswith((".", "~")) or p.exists() or str(path).count("/") != 1
    if looks_local and not p.is_dir():
        raise ModelLoadError(f"{what}: directory '{path}' does not exist")


def load_tokenizer(path: str | Path, *, what: str = "model.path") -> Any:
    """AutoTokenizer from a directory, left-padding (for generation), with a pad token (the EOS if none)."""
    _check_source(path, what)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{what}: cannot load a tokenizer from '{path}': {str(e).splitlines()[0]}") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, *, dtype: torch.dtype, device: torch.device,
                   what: str = "model.path") -> PreTrainedModel:
    _check_source(path, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated or damaged weights file
        raise ModelLoadError(f"{what}: cannot load a causal LM from '{path}': {str(e).splitlines()[0]}") from None
    return model.to(device)


def eos_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS plus the model's generation_config EOS list (Qwen has two)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(generation_config, "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


def model_eos_ids(model_dir: str | Path, tokenizer: Any) -> list[int]:
    """eos_token_ids with the generation_config saved in `model_dir` (none saved: the tokenizer's EOS only)."""
    from transformers import GenerationConfig
    try:
        gen = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:
        gen = GenerationConfig()
    return eos_token_ids(tokenizer, gen)


def eos_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """The end-of-turn tokens as text: where an environment's answer starts (PromptFormatter.continuation_ids)."""
    return [tokenizer.decode([i]) for i in ids]


class PromptFormatter:
    """Data-set prompt → model input text: the chat template with an optional system turn, or the raw prompt.

    A row may bring its own system prompt (`system`, e.g. a safety behaviour's magic token; '' = no system turn) and
    an assistant prefix (`prefix`) that pre-fills the assistant turn after the generation prompt (PING); otherwise
    the formatter's own `system_prompt` / `assistant_prefix` apply. The response the model writes continues the
    prefix."""

    def __init__(self, tokenizer: Any, *, system_prompt: str | None, use_chat_template: bool,
                 assistant_prefix: str = "") -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.assistant_prefix = assistant_prefix
        self.chat = use_chat_template and getattr(tokenizer, "chat_template", None) is not None

    def __call__(self, prompt: str, *, system: str | None = None, prefix: str | None = None) -> str:
        system = self.system_prompt if system is None else system
        prefix = self.assistant_prefix if prefix is None else prefix
        if not self.chat:
            return (f"{system}\n{prompt}" if system else prompt) + prefix
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefix

    def row(self, row: dict) -> str:
        """The model input for a data row: its prompt, with its own system prompt and prefix if it has them."""
        return self(row["prompt"], system=row.get("system"), prefix=row.get("prefix"))

    # ------------------------------------------------------------------------------------ multi-turn episodes
    def episode(self, messages: list[dict], *, row: dict, tools: list[dict] | None = None) -> str:
        """The model input for an episode's first messages (an Environment's reset): the row's (else the
        formatter's) system prompt first when the messages bring none, the chat template with the tools' schemas,
        then the row's (else the formatter's) assistant prefix."""
        if not self.chat:
            raise ConfigError("rollout.env: multi-turn episodes need a chat template (data.use_chat_template true and "
                              "a tokenizer with chat_template)")
        system = self.system_prompt if row.get("system") is None else row["system"]
        prefix = self.assistant_prefix if row.get("prefix") is None else row["prefix"]
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        kwargs = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                  **kwargs) + prefix

    def continuation(self, messages: list[dict], *, eos_texts: list[str], tools: list[dict] | None = None) -> str:
        """The text that follows an assistant turn's end-of-turn token up to the next assistant turn: `messages` (the
        environment's) and the generation prompt, as the chat template renders them after an assistant turn. Taken
        as the difference of two renderings of a stand-in conversation, so earlier turns are never rendered (or
        tokenized) again."""
        kwargs = {"tools": tools} if tools else {}
        base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        before = self.tokenizer.apply_chat_template(base, tokenize=False, **kwargs)
        after = self.tokenizer.apply_chat_template(base + list(messages), add_generation_prompt=True, tokenize=False,
                                                   **kwargs)
        ends = [before.rfind(e) + len(e) for e in eos_texts if e and before.rfind(e) >= 0]
        cut = max(ends) if ends else len(before)
        if not after.startswith(before[:cut]):
            raise ConfigError("rollout.env: this chat template renders an assistant turn differently once more "
                              "messages follow it, so an episode cannot be continued from the sampled tokens")
        return after[cut:]

    def episode_ids(self, messages: list[dict], *, row: dict, tools: list[dict] | None = None) -> list[int]:
        """`episode` as token ids: an episode's prompt (rollouts and SFT demonstrations tokenize it here alone)."""
        return self.tokenizer(self.episode(messages, row=row, tools=tools), add_special_tokens=False)["input_ids"]

    def continuation_ids(self, messages: list[dict], *, eos_texts: list[str],
                         tools: list[dict] | None = None) -> list[int]:
        """`continuation` as token ids: the environment's tokens after an assistant turn (rollouts and SFT
        demonstrations tokenize them here alone)."""
        return self.tokenizer(self.continuation(messages, eos_texts=eos_texts, tools=tools),
                              add_special_tokens=False)["input_ids"]
