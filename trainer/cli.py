"""`tokenwise` / `python -m trainer`: train | resume | check | eval | export | schema.

User errors (recipes, data, model paths, rewards, checkpoints) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rl.errors import ConfigError, TokenwiseError
from trainer.config import load_config, schema_lines, to_yaml

RESOLVED_CONFIG = "config.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenwise", description="RL fine-tuning of language models (SFT → GRPO).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="start a run from a recipe")
    t.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. grpo.steps=20")
    t.add_argument("--stop-after-steps", type=int, metavar="N",
                   help="checkpoint and exit after N steps (continue with `tokenwise resume`)")
    r = sub.add_parser("resume", help="continue a run from its latest checkpoint")
    r.add_argument("run_dir")
    r.add_argument("--stop-after-steps", type=int, metavar="N")
    for cmd in (t, r):
        cmd.add_argument("--ray-address", metavar="ADDR",
                         help="cluster mode: attach to this Ray cluster ('auto' or host:port) instead of "
                              "trainer.ray.address / a local Ray")
    c = sub.add_parser("check", help="validate a recipe and print the resolved config; runs nothing")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*")
    e = sub.add_parser("eval", help="held-out accuracy of a run's final model (or of --model DIR)")
    e.add_argument("run_dir")
    e.add_argument("--model", help="model directory to evaluate instead of the run's last finished stage")
    e.add_argument("--num-prompts", type=int)
    x = sub.add_parser("export", help="write a model trained with our decoder as a transformers architecture")
    x.add_argument("model_dir", help="a model directory of ours, e.g. RUN/grpo/final")
    x.add_argument("--arch", required=True, help="llama | qwen2 | qwen3 | qwen2_moe | qwen3_next")
    x.add_argument("--out", required=True, help="new directory (save_pretrained layout, with the tokenizer)")
    sc = sub.add_parser("schema", help="print every recipe key with its type, default and meaning")
    sc.add_argument("--markdown", action="store_true", help="as docs/config.md: tokenwise schema --markdown > docs/config.md")
    return p


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    run_dir = cfg.resolved_output_dir()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder '{run_dir}' already exists; continue it with `tokenwise resume {run_dir}` "
                          f"or set run.output_dir / name to a new folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.output_dir = str(run_dir)
    (run_dir / RESOLVED_CONFIG).write_text(to_yaml(cfg))
    return _execute(cfg, run_dir, args.stop_after_steps, args.ray_address)


def _run_config(run_dir: Path):
    if not (run_dir / RESOLVED_CONFIG).is_file():
        raise ConfigError(f"'{run_dir}' is not a run folder (no {RESOLVED_CONFIG}); start one with `tokenwise train`")
    return load_config(run_dir / RESOLVED_CONFIG)


def _execute(cfg, run_dir: Path, stop_after: int | None, ray_address: str | None = None) -> int:
    from trainer.logging import console
    from trainer.run import execute, print_summary

    console.print(f"run folder: {run_dir}")
    summary = execute(cfg, run_dir, stop_after_steps=stop_after, ray_address=ray_address)
    if summary is None:
        console.print(f"stopped after {stop_after} steps; continue with: tokenwise resume {run_dir}")
    else:
        print_summary(summary, run_dir, cfg.eval.num_prompts)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from trainer.evaluate import heldout_metrics
    from trainer.loading import PromptFormatter, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
    from trainer.logging import console
    from trainer.rollout import build_rollout
    from trainer.run import load_task

    run_dir = Path(args.run_dir)
    cfg = _run_config(run_dir)
    model_dir = args.model or next((str(run_dir / s / "final") for s in reversed(cfg.stages)
                                    if (run_dir / s / "final").is_dir()), None)
    if model_dir is None:
        raise ConfigError(f"'{run_dir}' has no finished stage yet; pass --model DIR")
    device = resolve_device(cfg.trainer.device)
    tokenizer = load_tokenizer(model_dir, what="--model")
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = (load_causal_lm(model_dir, dtype=dtype, device=device, what="--model") if cfg.rollout.engine == "hf"
             else None)  # the vllm engine loads the directory itself
    formatter = PromptFormatter(tokenizer, system_prompt=cfg.data.system_prompt,
                                use_chat_template=cfg.data.use_chat_template)
    engine = build_rollout(cfg.rollout, model_dir=model_dir, tokenizer=tokenizer, formatter=formatter, dtype=dtype,
                           device=device, seed=cfg.seed, model=model)
    metrics = heldout_metrics(engine, load_task(cfg.data)["heldout"],
                              num_prompts=args.num_prompts or cfg.eval.num_prompts)
    console.print(f"model: {model_dir}")
    for k, v in metrics.items():
        console.print(f"  {k:<24} {v:.4f}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from models.adapters import ARCHS, AdapterError, load_as_tokenwise, to_hf
    from trainer.loading import load_tokenizer
    from trainer.logging import console

    if args.arch not in ARCHS:
        raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {args.arch!r}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out '{out}' exists and is not empty")
    try:
        hf = to_hf(load_as_tokenwise(args.model_dir), args.arch)
    except AdapterError as e:
        raise ConfigError(f"{args.model_dir}: {e}") from None
    hf.save_pretrained(out)
    load_tokenizer(args.model_dir, what="model_dir").save_pretrained(out)
    console.print(f"wrote {out} ({type(hf).__name__}); load it with AutoModelForCausalLM.from_pretrained")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "check":
            print(to_yaml(load_config(args.recipe, args.overrides)), end="")
            return 0
        if args.command == "schema":
            if args.markdown:
                print("# Recipe keys\n\nEvery key a recipe may set, with its type, default and meaning. Generated with "
                      "`tokenwise schema --markdown > docs/config.md`; a test checks that it is current.\n")
            print("\n".join(schema_lines()))
            return 0
        if args.command == "train":
            return _train(args)
        if args.command == "resume":
            run_dir = Path(args.run_dir)
            return _execute(_run_config(run_dir), run_dir, args.stop_after_steps, args.ray_address)
        if args.command == "export":
            return _export(args)
        return _eval(args)
    except TokenwiseError as e:
        print(f"tokenwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenwise: interrupted; the last checkpoint is intact — continue with `tokenwise resume RUN_DIR`",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
