"""Seeing a run: metrics.jsonl + TensorBoard (+ optional W&B), a rich progress bar, and a PNG of the curves.

Metric names are stable and dotted (`reward/mean`, `actor/entropy`, `actor/kl`, `perf/tokens_per_s`,
`rollout/response_len_mean`, `eval/accuracy`). The history lives in memory too: checkpoints store it, and a resumed
run rewrites metrics.jsonl from it, so lines logged after the checkpoint (by the run that crashed) disappear.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tokenwise.rl.errors import ConfigError
from tokenwise.trainer.checkpoint import write_text_atomic

console = Console(highlight=False, soft_wrap=True)


def read_metrics(run_dir: Path, stage: str) -> list[dict]:
    """The rows one stage of a run logged to its metrics.jsonl, in order (what `MetricsLogger` writes)."""
    path = Path(run_dir) / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    def __init__(self, stage_dir: Path, cfg: Any, *, run_name: str, stage: str, history: Sequence[dict] = (),
                 config: dict | None = None) -> None:
        self.history: list[dict] = [dict(r) for r in history]
        self.path = stage_dir / "metrics.jsonl"
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        self._file = open(self.path, "a")
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            last = self.history[-1]["step"] if self.history else None
            self.tb = SummaryWriter(str(stage_dir / "tb"), purge_step=None if last is None else last + 1)
        self.wandb = None
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("logging.wandb is true but wandb is not installed: pip install wandb "
                                  "(or set logging.wandb=false)") from None
            id_file = stage_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.wandb_project, name=f"{run_name}/{stage}", id=run_id,
                                    resume="allow", config=config, dir=str(stage_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def panel_keys(history: Sequence[dict], spec: str) -> list[str]:
    """The metrics a panel draws: `spec` itself, or with a trailing '*' every logged metric starting with the rest
    ('eval/pass@*'), in order of first appearance."""
    if not spec.endswith("*"):
        return [spec] if any(spec in r for r in history) else []
    return list(dict.fromkeys(k for r in history for k in r if k.startswith(spec[:-1])))


def plot_curves(history: Sequence[dict], path: Path, panels: Sequence[tuple[str | tuple[str, ...], str]],
                title: str) -> Path | None:
    """One panel per (metric or tuple of metrics, label) present in the history, against step; a tuple draws one line
    per metric, with a legend (see panel_keys for '*' patterns)."""
    panels = [(keys, label) for spec, label in panels
              if (keys := [k for s in ((spec,) if isinstance(spec, str) else spec) for k in panel_keys(history, s)])]
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (keys, label) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in history if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3,
                    label="greedy" if key == "eval/accuracy" else key.removeprefix("eval/"))
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_live: set["StepProgress"] = set()


def stop_progress() -> None:
    """Stop any running bar, so an error message printed next is not followed by a redrawn bar."""
    for bar in list(_live):
        bar.stop()


class StepProgress:
    """A rich progress bar with a free-text field for the latest metrics on a terminal; where stdout is not one (a
    cluster job's log, CI, a file) a plain, whole line every `every` steps and at the last step instead of a bar
    that rich would cut to the log's width; silent when disabled."""

    def __init__(self, *, enabled: bool, description: str, total: int, completed: int, every: int = 10) -> None:
        self.enabled = enabled
        self.plain = enabled and not console.is_terminal
        self.every, self.description, self.total = every, description, total
        self._start = time.monotonic()
        self._first = completed
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
            disable=not enabled or self.plain,
        )
        self._task = self._progress.add_task(description, total=total, completed=completed, info="")

    def start(self) -> None:
        _live.add(self)
        self._start = time.monotonic()
        self._progress.start()

    def stop(self) -> None:
        _live.discard(self)
        self._progress.stop()

    def update(self, step: int, info: str) -> None:
        self._progress.update(self._task, completed=step, info=info)
        if self.plain and self.every and (step % self.every == 0 or step == self.total):
            console.print(self.line(step, info), soft_wrap=True, markup=False, highlight=False)

    def line(self, step: int, info: str) -> str:
        """'grpo step 20/80 (25%) | reward 0.412 | gen 0.1 … | 0:00:41 elapsed, eta 0:02:03'"""
        elapsed = time.monotonic() - self._start
        done = step - self._first
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        clock = lambda s: "?" if s != s else str(datetime.timedelta(seconds=int(s)))  # noqa: E731
        return (f"{self.description} step {step}/{self.total} ({100 * step // max(1, self.total)}%) | {info} | "
                f"{clock(elapsed)} elapsed, eta {clock(eta)}")
