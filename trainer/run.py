"""A run: prepare the base model and data, then run (or resume) each stage in order, each starting from the
previous stage's model. `tokenwise train` and `tokenwise resume` both end up in `execute`."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import transformers

from tokenwise.models.builtin import save_builtin
from tokenwise.rl.data import arithmetic_task, local_task, sort_task
from tokenwise.rl.safety_data import safety_task
from tokenwise.rl.errors import ConfigError, DataError, ModelLoadError
from tokenwise.trainer.reward_process import close_rewards, reward_specs
from tokenwise.trainer.checkpoint import publish_dir, write_text_atomic
from tokenwise.trainer.config import RunConfig, DataCommon
from tokenwise.trainer.controller import run_grpo
from tokenwise.trainer.evaluate import headline_sampled
from tokenwise.trainer.loading import PromptFormatter, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
from tokenwise.trainer.logging import console, stop_progress
from tokenwise.trainer.sft import run_sft
from tokenwise.trainer.stage import RESULT_FILE, StageEnv, StepBudget

STAGES = {"sft": run_sft, "grpo": run_grpo}
TASKS = {"arithmetic": arithmetic_task, "sort": sort_task, "local": local_task, "safety": safety_task}
_NOT_TASK_ARGS = {"register_tokens", "refusal_patterns", "refusal_detector"}  # data keys the evaluation / model use
LENGTH_CHECK_ROWS = 64  # rows per split whose token length check_lengths measures
_COMMON = {f.name for f in dataclasses.fields(DataCommon)}


def load_task(data_cfg) -> dict:
    """{'train': Dataset, 'heldout': Dataset} for the recipe's `data:` section."""
    params = {f.name: getattr(data_cfg, f.name) for f in dataclasses.fields(data_cfg)
              if f.name != "type" and f.name not in _COMMON and f.name not in _NOT_TASK_ARGS}
    if data_cfg.type == "safety":  # the rows carry their whole system prompt: the deployment's own + the token
        params["system_prompt"] = data_cfg.system_prompt
    return TASKS[data_cfg.type](**params)


def magic_tokens(cfg: RunConfig) -> list[str]:
    """Behaviour tokens to register as special tokens (data.type safety with register_tokens), else []."""
    d = cfg.data
    return list(d.behaviours.values()) if d.type == "safety" and d.register_tokens and d.magic_tokens else []


def add_special_tokens(model_dir: str, tokenizer_dir: str, out: Path, tokens: list[str]) -> None:
    """Copy a model + tokenizer into `out` with `tokens` added as special tokens and the embeddings resized."""
    tok = load_tokenizer(tokenizer_dir)
    model = load_causal_lm(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    tok.add_tokens([t for t in tokens if t not in tok.get_vocab()], special_tokens=True)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prepare_base_model(cfg: RunConfig, run_dir: Path) -> tuple[str, str]:
    """(model dir or hub id, tokenizer dir or hub id). The built-in model is written once into run_dir/base_model."""
    m = cfg.model
    base = run_dir / "base_model"
    tokens = magic_tokens(cfg)
    if m.type == "pretrained":
        if m.code == "transformers" and not tokens:
            return m.path, m.tokenizer_path or m.path
        if not base.is_dir():  # converted once into our decoder (gated if asked) and/or given the magic tokens
            def write(p: Path) -> None:
                if m.code == "tokenwise":
                    convert_pretrained(m, p)
                    if tokens:
                        add_special_tokens(str(p), str(p), p, tokens)
                else:
                    add_special_tokens(m.path, m.tokenizer_path or m.path, p, tokens)
            publish_dir(write, base)
        return str(base), str(base)
    if not base.is_dir():
        params = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in ("type", "dtype", "lora")}
        publish_dir(lambda p: save_builtin(p, seed=cfg.seed, extra_special_tokens=tokens, **params), base)
    return str(base), str(base)


def convert_pretrained(m, out: Path) -> None:
    """model.code tokenwise: the checkpoint at m.path as our decoder (optionally with retrofitted gates) + its
    tokenizer, saved into `out`."""
    from tokenwise.models.adapters import AdapterError, load_as_tokenwise
    from tokenwise.models.decoder import retrofit_gates
    try:
        model = load_as_tokenwise(m.path)
    except AdapterError as e:
        raise ModelLoadError(f"model.code tokenwise: {m.path}: {e}") from None
    if m.retrofit_gate != "none":
        model = retrofit_gates(model, m.retrofit_gate)
    model.save_pretrained(out)
    load_tokenizer(m.tokenizer_path or m.path).save_pretrained(out)


def quiet_libraries(device: torch.device | None = None) -> None:
    """Our progress bar and log lines only: no per-save/load bars from transformers or datasets, and DeepSpeed
    (imported by accelerate inside save_pretrained) told it is on CPU instead of warning that it found no GPU."""
    import datasets
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if device is not None and device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def preflight(cfg: RunConfig) -> None:
    """What can be checked before a run folder exists: the data loads (files, columns, no empty prompts), the reward
    functions import, a pretrained model's directory has a config and weights that are not cut short."""
    quiet_libraries()
    load_task(cfg.data)
    close_rewards(reward_specs(cfg.rewards))
    if cfg.model.type == "pretrained":
        check_weights(cfg.model.path, what="model.path")


def check_weights(model_dir: str, *, what: str) -> None:
    """Every *.safetensors file of a local model directory is complete: its header reads and the file is as long as
    the header says (a copy cut short is a one-line error here, not a SafetensorError deep inside a load)."""
    import struct
    path = Path(model_dir)
    if not path.is_dir():
        return  # a hub id, or a missing folder that load_tokenizer reports
    for f in sorted(path.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError, MemoryError, OverflowError):
            raise ModelLoadError(f"{what}: {f} is not a readable safetensors file (damaged or cut short)") from None
        if f.stat().st_size < 8 + n + end:
            raise ModelLoadError(f"{what}: {f} is cut short ({f.stat().st_size} bytes; its header describes "
                                 f"{8 + n + end}); copy the model again")


def check_lengths(cfg: RunConfig, model_dir: str, tokenizer, formatter, data: dict) -> None:
    """Prompt (+ answer for SFT) + rollout.max_new_tokens must fit the model's positions: one line naming the row,
    not responses running past max_position_embeddings."""
    from transformers import AutoConfig
    try:
        limit = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    except (OSError, ValueError):
        return  # load_causal_lm reports it
    if not limit:
        return
    n = cfg.rollout.max_new_tokens
    if n >= limit:
        raise ConfigError(f"rollout.max_new_tokens ({n}) leaves no room for a prompt: the model ({model_dir}) has "
                          f"max_position_embeddings {limit}; lower rollout.max_new_tokens")
    for split, rows in (("training", data["train"]), ("held-out", data["heldout"])):
        sft = "sft" in cfg.stages and split == "training"
        answer_key = "sft_answer" if "sft_answer" in rows.column_names else "answer"
        prompts, answers = rows["prompt"], [str(a) for a in rows[answer_key]]
        # tokenize only the rows longest in characters (a proxy for tokens), so a million-row file costs no time
        size = [len(p) + (len(a) if sft else 0) for p, a in zip(prompts, answers)]
        longest = sorted(range(len(size)), key=size.__getitem__)[-LENGTH_CHECK_ROWS:]
        for i in longest:
            tokens = len(tokenizer(formatter.row(rows[i]), add_special_tokens=False)["input_ids"])
            if sft:
                total = tokens + len(tokenizer(answers[i], add_special_tokens=False)["input_ids"]) + 1
                if total > limit:
                    raise DataError(f"data: training row {i} is {total} tokens (prompt + answer), more than the "
                                    f"model's max_position_embeddings {limit}; shorten or drop such rows")
            if tokens + n > limit:
                raise DataError(f"data: {split} prompt {i} is {tokens} tokens; with rollout.max_new_tokens {n} that "
                                f"exceeds the model's max_position_embeddings {limit}; shorten or drop such prompts, "
                                f"or lower rollout.max_new_tokens to {max(1, limit - tokens)} or less")


def execute(cfg: RunConfig, run_dir: Path, *, stop_after_steps: int | None = None,
            ray_address: str | None = None) -> dict | None:
    """Run every unfinished stage; None if the step budget stopped the run early (resume continues it).
    In cluster mode (trainer.mode: ray) inside a Ray session: `ray_address` or trainer.ray.address, else local."""
    if cfg.trainer.mode == "ray":
        from tokenwise.trainer.cluster import ray_session
        with ray_session(cfg.trainer.ray, ray_address):
            return _execute(cfg, run_dir, stop_after_steps)
    return _execute(cfg, run_dir, stop_after_steps)


def _execute(cfg: RunConfig, run_dir: Path, stop_after_steps: int | None) -> dict | None:
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = resolve_device(cfg.trainer.device, cluster_gpus=cfg.trainer.ray.gpus_per_learner
                            if cfg.trainer.mode == "ray" else None)
    dtype = resolve_dtype(cfg.model.dtype, device)
    quiet_libraries(device)
    model_dir, tokenizer_dir = prepare_base_model(cfg, run_dir)
    tokenizer = load_tokenizer(tokenizer_dir, what="model.tokenizer_path" if cfg.model.type == "pretrained"
                               and cfg.model.tokenizer_path else "model.path")
    formatter = PromptFormatter(tokenizer, system_prompt=cfg.data.system_prompt,
                                use_chat_template=cfg.data.use_chat_template)
    data = load_task(cfg.data)
    check_lengths(cfg, model_dir, tokenizer, formatter, data)
    rewards = reward_specs(cfg.rewards)  # loads user reward functions now, not after the SFT stage
    try:
        return _run_stages(cfg, run_dir, StepBudget(stop_after_steps), model_dir=model_dir, tokenizer=tokenizer,
                           tokenizer_dir=tokenizer_dir, formatter=formatter, data=data, device=device, dtype=dtype,
                           rewards=rewards)
    finally:
        close_rewards(rewards)


def _run_stages(cfg: RunConfig, run_dir: Path, budget: StepBudget, *, model_dir: str, tokenizer_dir: str,
                **shared) -> dict | None:
    results = {}
    for stage in cfg.stages:
        final = run_dir / stage / "final"
        if not final.is_dir():
            if budget.exhausted:
                return None
            env = StageEnv(cfg=cfg, run_dir=run_dir, stage=stage, init_dir=Path(model_dir),
                           tokenizer_dir=Path(tokenizer_dir), budget=budget, **shared)
            try:
                result = STAGES[stage](env)
            finally:
                stop_progress()
            if result.stopped:
                return None
        results[stage] = json.loads((final / RESULT_FILE).read_text())
        model_dir = str(final)
    summary = {"stages": results, "final_model": model_dir}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def print_summary(summary: dict, run_dir: Path, num_prompts: int) -> None:
    stages = summary["stages"]
    first = next(iter(stages.values()))
    parts = [f"start {first['accuracy_before']:.3f}"] + [f"after {s.upper()} {r['accuracy_after']:.3f}"
                                                          for s, r in stages.items()]
    console.print(f"held-out accuracy (greedy, {num_prompts} prompts): " + " → ".join(parts))
    for key in headline_sampled(first.get("eval_after", {})):  # sampled metrics (eval.k > 0): mean@8, pass@8
        if key in first.get("eval_before", {}):
            values = [f"start {first['eval_before'][key]:.3f}"] + [
                f"after {s.upper()} {r['eval_after'][key]:.3f}" for s, r in stages.items() if key in r.get("eval_after", {})]
            console.print(f"  {key.removeprefix('eval/')} (sampled): " + " → ".join(values))
    if "grpo" in stages:
        g = stages["grpo"]
        console.print(f"GRPO changed held-out accuracy by {100 * (g['accuracy_after'] - g['accuracy_before']):+.1f} points")
    console.print(f"final model: {summary['final_model']}   curves: {run_dir}/*/curves.png   "
                  f"metrics: {run_dir}/*/metrics.jsonl")
