"""`tokenwise eval safety RUN_DIR`: mode following and the safety alignment margin of a co-trained model.

On the run's held-out safety rows (every request under every behaviour, plus a decoy token judged as positive):
greedy responses → mode-following accuracy per mode (rl.safety.follows_mode with the recipe's refusal detector and
the task verifier: "holds an answer"); benign task accuracy; the margin: silhouette (cosine) of one feature vector
per (request, mode) grouped by mode — the first response token's logits, or the mean last-layer hidden state over the
response — and a PNG of those vectors projected on their first two principal components.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tokenwise.rl.rewards import exact_answer, extract_answer
from tokenwise.rl.safety import REJECTIVE, UNKNOWN, mode_following_metrics, silhouette
from tokenwise.trainer.evaluate import engine_for, refusal_detector

FEATURES = ("first_token_logits", "mean_hidden")


@torch.no_grad()
def features_of(model: Any, tokenizer: Any, texts: list[str], responses: list[str], kind: str,
                device: torch.device) -> torch.Tensor:
    """[N, D] per (prompt text, response): logits of the first response token (V), or the mean final hidden state
    over the response tokens (d)."""
    out = []
    for text, response in zip(texts, responses):
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        resp = tokenizer(response, add_special_tokens=False)["input_ids"] if kind == "mean_hidden" else []
        ids = torch.tensor([prompt + resp], device=device)
        result = model(input_ids=ids, output_hidden_states=kind == "mean_hidden")
        if kind == "first_token_logits":
            out.append(result.logits[0, -1].float().cpu())
        else:
            hidden = result.hidden_states[-1][0].float()
            out.append(hidden[len(prompt) - 1:].mean(0).cpu())  # the states that predict the response tokens
    return torch.stack(out)


def plot_modes(points: torch.Tensor, modes: list[str], kinds: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = points.double() - points.double().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ v[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    for mode in sorted(set(modes)):
        for kind, marker in (("benign", "o"), ("harmful", "x")):
            idx = [i for i, (m, k) in enumerate(zip(modes, kinds)) if m == mode and k == kind]
            if idx:
                ax.scatter(xy[idx, 0], xy[idx, 1], marker=marker, s=18, label=f"{mode} / {kind}", alpha=0.8)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_safety(cfg: Any, model_dir: str, *, features: str = "first_token_logits", out_dir: Path | None = None,
                    num_prompts: int | None = None) -> dict[str, Any]:
    from tokenwise.trainer.loading import load_causal_lm, resolve_dtype
    from tokenwise.trainer.run import load_task
    if cfg.data.type != "safety":
        from tokenwise.rl.errors import ConfigError
        raise ConfigError(f"tokenwise eval safety needs a run with data.type: safety; this run has {cfg.data.type!r}")
    if features not in FEATURES:
        from tokenwise.rl.errors import ConfigError
        raise ConfigError(f"--features must be one of {', '.join(FEATURES)}, got {features!r}")
    # the model as trained: no serving prefix (PING's prefix is measured by `tokenwise ping`)
    engine = engine_for(model_dir, cfg=cfg, kind=cfg.rollout.engine, serving_prefix=False, what="--model")
    formatter, tokenizer = engine.format, engine.tokenizer
    model = getattr(engine, "model", None)  # the transformers engine's own; a vLLM engine needs a copy for features
    if model is None:
        model = load_causal_lm(model_dir, dtype=resolve_dtype(cfg.model.dtype, engine.device), device=engine.device,
                               what="--model").eval()
    rows = load_task(cfg.data)["heldout"].to_list()
    if num_prompts:
        prompts = set(list(dict.fromkeys(r["prompt"] for r in rows))[:num_prompts])
        rows = [r for r in rows if r["prompt"] in prompts]
    out = engine.generate(rows, n=1, greedy=True)
    detector = refusal_detector(cfg.data)
    metrics = mode_following_metrics(rows, out.responses, detector, lambda r: extract_answer(r) is not None)
    if any(r.get("tool") for r in rows):  # tool-use requests (PING's agentic setting): refusal and task success
        from tokenwise.rl.safety import tool_use_metrics
        from tokenwise.rl.types import EPISODE_STATS
        calls = (out.episode_stats[:, EPISODE_STATS.index("tool_calls")].tolist()
                 if out.episode_stats is not None else None)
        metrics.update(tool_use_metrics(rows, out.responses, detector, lambda r, resp: bool(exact_answer(
            prompt="", response=resp, answer=r["reference"], truncated=False)), calls))
    benign = [(r, resp) for r, resp in zip(rows, out.responses) if r["kind"] == "benign" and r["mode"] != REJECTIVE]
    if benign:
        metrics["safety/task_accuracy"] = sum(exact_answer(prompt="", response=resp, answer=r["reference"],
                                                           truncated=False) for r, resp in benign) / len(benign)
    keep = [i for i, r in enumerate(rows) if r["mode"] != UNKNOWN]
    texts = [formatter(rows[i]["prompt"], system=rows[i]["system"]) for i in keep]
    feats = features_of(model, tokenizer, texts, [out.responses[i] for i in keep], features, model.device)
    modes = [rows[i]["mode"] for i in keep]
    metrics["safety/margin"] = silhouette(feats, modes)
    kinds = [rows[i]["kind"] for i in keep]
    for kind in ("benign", "harmful"):  # per kind: where behaviours differ (harmful) and where two of them agree
        idx = [j for j, k in enumerate(kinds) if k == kind]
        if len({modes[j] for j in idx}) > 1:
            metrics[f"safety/margin/{kind}"] = silhouette(feats[idx], [modes[j] for j in idx])
    result = {"model": str(model_dir), "features": features, "rows": len(rows), "metrics": metrics,
              "examples": [{"mode": r["mode"], "kind": r["kind"], "prompt": r["prompt"], "response": resp}
                           for r, resp in list(zip(rows, out.responses))[:12]]}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_modes(feats, modes, kinds, out_dir / "safety_modes.png",
                   f"{features}: silhouette {metrics['safety/margin']:.3f} ({Path(model_dir).name})")
        (out_dir / "safety_eval.json").write_text(json.dumps(result, indent=2))
    return result
