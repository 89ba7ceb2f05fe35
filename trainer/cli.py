"""`tokenwise` / `python -m tokenwise.trainer`: train | resume | check | eval | ping | distill | generate | export | schema.

User errors (recipes, data, model paths, rewards, checkpoints) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tokenwise.rl.errors import ConfigError, TokenwiseError
from tokenwise.trainer.config import load_config, schema_lines, to_yaml

RESOLVED_CONFIG = "config.yaml"


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes are one line like every other user error (no usage block)."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tokenwise", description="RL fine-tuning of language models (SFT → GRPO).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="start a run from a recipe")
    t.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. grpo.steps=20")
    t.add_argument("--stop-after-steps", type=_steps, metavar="N",
                   help="checkpoint and exit after N steps (continue with `tokenwise resume`)")
    r = sub.add_parser("resume", help="continue a run from its latest checkpoint")
    r.add_argument("run_dir")
    r.add_argument("--stop-after-steps", type=_steps, metavar="N")
    for cmd in (t, r):
        cmd.add_argument("--ray-address", metavar="ADDR",
                         help="cluster mode: attach to this Ray cluster ('auto' or host:port) instead of "
                              "trainer.ray.address / a local Ray")
    c = sub.add_parser("check", help="validate a recipe and print the resolved config; runs nothing")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*")
    e = sub.add_parser("eval", help="held-out accuracy of a run's final model (or of --model DIR); `eval safety RUN_DIR`: "
                                    "mode following and alignment margin of a safety co-training run")
    e.add_argument("target", nargs="+", metavar="[safety] RUN_DIR")
    e.add_argument("--features", default="first_token_logits",
                   help="eval safety: the margin's vectors, first_token_logits | mean_hidden")
    e.add_argument("--out", help="eval safety: folder for safety_eval.json and safety_modes.png (default: RUN_DIR)")
    e.add_argument("--model", help="model directory to evaluate instead of the run's last finished stage")
    e.add_argument("--num-prompts", type=int)
    e.add_argument("--no-env", action="store_true", help="single-turn, without the run's rollout.env (e.g. the accuracy "
                                                         "of a tool-using model without its tools)")
    pg = sub.add_parser("ping", help="PING: search an assistant prefix that keeps benign requests answered and "
                                     "harmful ones refused; saves it in the model's serving.json")
    pg.add_argument("run_dir", help="a run with data.type: safety (its held-out benign / harmful requests)")
    pg.add_argument("--model", help="model to guard (default: the run's last finished stage)")
    pg.add_argument("--mode", default="positive", help="behaviour whose system prompt the requests carry; 'none': "
                                                       "no token (default: positive)")
    pg.add_argument("--generator", default="seeds", help="'seeds' (variations of --seed-prefix) or a model directory "
                                                         "that writes candidates through the rollout engine")
    pg.add_argument("--seed-prefix", action="append", default=[], help="seed prefix (repeatable)")
    pg.add_argument("--candidates", type=int, default=20)
    pg.add_argument("--rounds", type=int, default=5)
    pg.add_argument("--top-k", type=int, default=3)
    pg.add_argument("--num-prompts", type=int, default=32, help="requests per kind")
    d = sub.add_parser("distill", help="self-distillation for safety co-training: each mode's responses from a model "
                                       "prompted with that mode's instruction → a (prompt, mode, response) triples file")
    d.add_argument("model_dir")
    d.add_argument("--prompts", required=True, help="jsonl / json / parquet / csv with a prompt column (optionally "
                                                    "kind: benign | harmful, answer)")
    d.add_argument("--instruction", action="append", required=True, metavar="MODE=TEXT",
                   help="a mode and the system instruction that elicits it (repeatable)")
    d.add_argument("--out", required=True, help="triples .jsonl to write (data.triples_files of a safety recipe)")
    d.add_argument("--max-new-tokens", type=int, default=128)
    g = sub.add_parser("generate", help="greedy responses of a model to prompts, with its serving.json prefix")
    g.add_argument("model_dir")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--system", help="system prompt (e.g. a behaviour's magic token)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    x = sub.add_parser("export", help="write a model trained with our decoder as a transformers architecture")
    x.add_argument("model_dir", help="a model directory of ours, e.g. RUN/grpo/final")
    x.add_argument("--arch", required=True, help="llama | qwen2 | qwen3 | qwen2_moe | qwen3_next")
    x.add_argument("--out", required=True, help="new directory (save_pretrained layout, with the tokenizer)")
    sc = sub.add_parser("schema", help="print every recipe key with its type, default and meaning")
    sc.add_argument("--markdown", action="store_true", help="as docs/config.md: tokenwise schema --markdown > docs/config.md")
    return p


def _steps(text: str) -> int:
    """--stop-after-steps: a positive number of steps."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of steps >= 1, got {text!r}")
    return value


def _check_ray_address(cfg, ray_address: str | None, source: str) -> None:
    if ray_address is not None and cfg.trainer.mode != "ray":
        raise ConfigError(f"--ray-address attaches a cluster-mode run, but {source} has trainer.mode: "
                          f"{cfg.trainer.mode}; add trainer.mode=ray to run on that cluster, or drop --ray-address")


def _check_output_dir(run_dir: Path) -> None:
    """The run folder must be new (or empty) and creatable: one line saying why not, before anything is written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir '{run_dir}' is a file; set output_dir to a folder path")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder '{run_dir}' already exists; continue it with `tokenwise resume {run_dir}` "
                          f"or set output_dir (or name) to a new folder")
    parent = run_dir.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output_dir '{run_dir}': '{parent}' is a file, so no folder can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir '{run_dir}': no permission to write in '{parent}'; choose a folder you can "
                          f"write to")


def _train(args: argparse.Namespace) -> int:
    import shutil
    from tokenwise.trainer.run import preflight
    cfg = load_config(args.recipe, args.overrides)
    _check_ray_address(cfg, args.ray_address, args.recipe)
    run_dir = cfg.resolved_output_dir()
    _check_output_dir(run_dir)
    preflight(cfg)  # data, rewards: before the run folder exists
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir '{run_dir}': cannot create it: {e.strerror}") from None
    cfg.output_dir = str(run_dir)
    (run_dir / RESOLVED_CONFIG).write_text(to_yaml(cfg))
    try:
        return _execute(cfg, run_dir, args.stop_after_steps, args.ray_address)
    except TokenwiseError:
        # a failed start (bad model, prompts too long, no cluster, ...) leaves nothing behind to block a corrected
        # rerun; once a stage has begun (metrics.jsonl written) the folder holds a run to resume and is kept
        if not any((run_dir / stage / "metrics.jsonl").exists() for stage in cfg.stages):
            _RUN.pop("dir", None)
            for child in ([run_dir] if created else list(run_dir.iterdir())):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _run_config(run_dir: Path):
    if not (run_dir / RESOLVED_CONFIG).is_file():
        raise ConfigError(f"'{run_dir}' is not a run folder (no {RESOLVED_CONFIG}); start one with `tokenwise train`")
    return load_config(run_dir / RESOLVED_CONFIG)


ERROR_LOG = "error.log"
_RUN: dict[str, Path] = {}  # the run folder once a run has started: errors past that point go to its error.log


def _execute(cfg, run_dir: Path, stop_after: int | None, ray_address: str | None = None) -> int:
    from tokenwise.trainer.logging import console
    from tokenwise.trainer.run import execute, print_summary

    console.print(f"run folder: {run_dir}")
    _RUN["dir"] = run_dir
    summary = execute(cfg, run_dir, stop_after_steps=stop_after, ray_address=ray_address)
    if summary is None:
        console.print(f"stopped after {stop_after} steps; continue with: tokenwise resume {run_dir}")
    else:
        print_summary(summary, run_dir, cfg.eval.num_prompts)
    return 0


def _final_model(run_dir: Path, cfg, override: str | None) -> str:
    """--model if given, else the run's last finished stage's final model."""
    model_dir = override or next((str(run_dir / s / "final") for s in reversed(cfg.stages)
                                  if (run_dir / s / "final").is_dir()), None)
    if model_dir is None:
        raise ConfigError(f"'{run_dir}' has no finished stage yet; pass --model DIR")
    return model_dir


def _eval(args: argparse.Namespace) -> int:
    from tokenwise.trainer.evaluate import engine_for, run_heldout_eval
    from tokenwise.trainer.logging import console
    from tokenwise.trainer.run import load_task

    if len(args.target) > 2 or (len(args.target) == 2 and args.target[0] != "safety"):
        raise ConfigError(f"tokenwise eval takes RUN_DIR or `safety RUN_DIR`, got {' '.join(args.target)}")
    run_dir = Path(args.target[-1])
    cfg = _run_config(run_dir)
    model_dir = _final_model(run_dir, cfg, args.model)
    if len(args.target) == 2:
        return _eval_safety(cfg, model_dir, args, run_dir)
    if args.no_env:
        import dataclasses
        from tokenwise.trainer.config import EnvConfig
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, env=EnvConfig()))
    engine = engine_for(model_dir, cfg=cfg, kind=cfg.rollout.engine, what="--model")
    metrics = run_heldout_eval(engine, cfg, load_task(cfg.data)["heldout"], num_prompts=args.num_prompts)
    console.print(f"model: {model_dir}")
    for k, v in metrics.items():
        console.print(f"  {k:<24} {v:.4f}")
    return 0


def _eval_safety(cfg, model_dir: str, args: argparse.Namespace, run_dir: Path) -> int:
    from tokenwise.trainer.logging import console
    from tokenwise.rl.safety import UNKNOWN
    from tokenwise.trainer.safety_eval import evaluate_safety
    out_dir = Path(args.out) if args.out else run_dir
    result = evaluate_safety(cfg, model_dir, features=args.features, out_dir=out_dir, num_prompts=args.num_prompts)
    m = result["metrics"]
    console.print(f"model: {model_dir}   ({result['rows']} held-out rows: every request under every behaviour, "
                  f"plus a decoy token judged as positive)")
    modes = [*cfg.data.behaviours, UNKNOWN]
    console.print(f"  {'mode':<12} {'follows':>8} {'benign':>8} {'harmful':>8}")
    for mode in modes:
        cells = [m.get(f"safety/follow/{k}") for k in (mode, f"{mode}/benign", f"{mode}/harmful")]
        console.print(f"  {mode:<12} " + " ".join(f"{c:>8.3f}" if c is not None else f"{'-':>8}" for c in cells))
    console.print(f"  all modes: {m['safety/follow/all']:.3f}   benign task accuracy (positive/negative): "
                  f"{m.get('safety/task_accuracy', float('nan')):.3f}")
    console.print(f"  safety alignment margin (silhouette by mode, cosine, {result['features']}): "
                  f"{m['safety/margin']:.3f}   on harmful requests: {m.get('safety/margin/harmful', float('nan')):.3f}"
                  f"   on benign: {m.get('safety/margin/benign', float('nan')):.3f}")
    tool = {k: v for k, v in m.items() if k.startswith("safety/tool/")}
    if tool:  # tool-use requests under the positive behaviour (PING's agentic setting)
        console.print("  tool use (positive behaviour): " + "   ".join(f"{k}: {v:.3f}" for k, v in tool.items()))
    console.print(f"  wrote {out_dir / 'safety_eval.json'} and {out_dir / 'safety_modes.png'}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from tokenwise.trainer.evaluate import engine_for
    from tokenwise.trainer.ping import outputs
    engine = engine_for(args.model_dir, max_new_tokens=args.max_new_tokens, system_prompt=args.system)
    for prompt, text in zip(args.prompts, outputs(engine, [{"prompt": p, "answer": ""} for p in args.prompts])):
        print(f"> {prompt}\n{text}\n")
    return 0


def _distill(args: argparse.Namespace) -> int:
    import json
    from tokenwise.rl.data import read_table
    from tokenwise.trainer.ping import distill_triples
    instructions = {}
    for item in args.instruction:
        mode, sep, text = item.partition("=")
        if not sep or not mode.strip() or not text.strip():
            raise ConfigError(f"--instruction takes MODE=TEXT (e.g. rejective='Refuse every request.'), got {item!r}")
        instructions[mode.strip()] = text
    table = read_table([args.prompts], what="--prompts")
    if "prompt" not in table.column_names:
        raise ConfigError(f"--prompts {args.prompts}: no 'prompt' column (columns: {', '.join(table.column_names)})")
    from tokenwise.trainer.evaluate import engine_for
    engine = engine_for(args.model_dir, max_new_tokens=args.max_new_tokens)
    triples = distill_triples(engine, table.to_list(), instructions)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(t) + "\n" for t in triples))
    print(f"wrote {len(triples)} triples ({len(table)} prompts x {len(instructions)} modes) to {out}")
    return 0


def _ping(args: argparse.Namespace) -> int:
    import json
    from tokenwise.rl.safety import Behaviours, search_prefixes
    from tokenwise.trainer.evaluate import engine_for, refusal_detector
    from tokenwise.trainer.logging import console
    from tokenwise.trainer.ping import engine_generator, score_prefix, seed_list_generator, write_serving
    from tokenwise.trainer.run import load_task
    run_dir = Path(args.run_dir)
    cfg = _run_config(run_dir)
    if cfg.data.type != "safety":
        raise ConfigError(f"tokenwise ping needs a run with data.type: safety (benign / harmful requests); "
                          f"'{run_dir}' has {cfg.data.type!r}")
    model_dir = _final_model(run_dir, cfg, args.model)
    behaviours = Behaviours(dict(cfg.data.behaviours))
    if args.mode != "none" and args.mode not in behaviours.tokens:
        raise ConfigError(f"--mode must be one of {', '.join([*behaviours.modes, 'none'])}, got {args.mode!r}")
    system = (cfg.data.system_prompt or "") if args.mode == "none" else behaviours.system_prompt(
        args.mode, cfg.data.system_prompt)
    requests = {r["prompt"]: r for r in load_task(cfg.data)["heldout"].to_list()}.values()
    sets = {kind: [{"prompt": r["prompt"], "answer": r["reference"], "system": system} for r in requests
                   if r["kind"] == kind][:args.num_prompts] for kind in ("benign", "harmful")}
    engine = engine_for(model_dir, cfg=cfg)
    refused = refusal_detector(cfg.data)
    seeds = args.seed_prefix or ["Let me check whether this request is safe.", "Sure.", "Here is the answer:"]
    if args.generator == "seeds":
        generate = seed_list_generator(seeds, seed=cfg.seed)
    else:
        generator_engine = engine_for(args.generator, cfg=cfg)
        generate = engine_generator(generator_engine)
    result = search_prefixes(generate, lambda p: score_prefix(engine, sets["benign"], sets["harmful"], refused, p),
                             seeds=seeds, candidates=args.candidates, rounds=args.rounds, top_k=args.top_k)
    none = result.history[0]
    console.print(f"model: {model_dir}   requests: {len(sets['benign'])} benign, {len(sets['harmful'])} harmful, "
                  f"system prompt: {system!r}")
    console.print(f"  {'prefix':<48} {'benign ok':>9} {'harmful refused':>15} {'score':>6}")
    for h in sorted(result.history, key=lambda h: -h["score"])[:8]:
        console.print(f"  {h['prefix'][:48] or '(no prefix)':<48} {h['benign_answered']:>9.3f} "
                      f"{h['harmful_refused']:>15.3f} {h['score']:>6.3f}")
    console.print(f"chosen: {result.best!r} (score {result.best_score['score']:.3f}; no prefix {none['score']:.3f}); "
                  f"{len(result.history)} candidates scored")
    write_serving(model_dir, assistant_prefix=result.best, ping_score=result.best_score)
    (run_dir / "ping_search.json").write_text(json.dumps({"model": model_dir, "system": system, "best": result.best,
                                                          "best_score": result.best_score,
                                                          "history": result.history}, indent=2))
    console.print(f"wrote {Path(model_dir) / 'serving.json'} (applied by tokenwise eval / generate) and "
                  f"{run_dir / 'ping_search.json'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from tokenwise.models.adapters import ARCHS, AdapterError, load_as_tokenwise, to_hf
    from tokenwise.trainer.loading import load_tokenizer
    from tokenwise.trainer.logging import console

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


def _error_log(e: BaseException) -> str:
    """Write the traceback of `e` (and any detail it carries, e.g. a reward process's own traceback) to the run
    folder's error.log if a run had started; the text to append to the one-line message."""
    run_dir = _RUN.pop("dir", None)
    if run_dir is None or not run_dir.is_dir():
        return ""
    import datetime
    import traceback
    text = "".join(traceback.format_exception(e))
    detail = getattr(e, "detail", None) or getattr(e.__cause__, "detail", None)
    if detail:
        text += f"\n--- from the process that failed ---\n{detail}"
    try:
        with open(run_dir / ERROR_LOG, "a") as f:
            f.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} ===\n{text}\n")
    except OSError:
        return ""
    return f" (traceback: {run_dir / ERROR_LOG})"


def main(argv: list[str] | None = None) -> int:
    _RUN.clear()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = _parser().parse_args(argv)
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
            cfg = _run_config(run_dir)
            _check_ray_address(cfg, args.ray_address, str(run_dir / RESOLVED_CONFIG))
            return _execute(cfg, run_dir, args.stop_after_steps, args.ray_address)
        if args.command == "export":
            return _export(args)
        if args.command == "ping":
            return _ping(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "distill":
            return _distill(args)
        return _eval(args)
    except TokenwiseError as e:
        print(f"tokenwise: error: {e}{_error_log(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours or of a library: one line here, the whole traceback in error.log
        log = _error_log(e)
        if not log:
            raise
        print(f"tokenwise: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{log}; "
              f"please report it with that file", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tokenwise: interrupted; the last checkpoint is intact — continue with `tokenwise resume RUN_DIR`",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
