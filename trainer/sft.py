"""Stage `sft`: plain NLL on prompt → answer with the prompt masked, the warm start before GRPO."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from tokenwise.rl.data import PromptStream
from tokenwise.rl.errors import NonFiniteError
from tokenwise.rl.types import SFTBatch
from tokenwise.trainer.evaluate import EVAL_PANEL, run_heldout_eval
from tokenwise.trainer.loading import eos_texts as end_texts, model_eos_ids
from tokenwise.trainer.logging import console
from tokenwise.trainer.stage import StageEnv, StageResult, StageState, run_stage
from tokenwise.trainer.workers import build_workers

PANELS = [("sft/loss", "SFT loss"), (EVAL_PANEL, "held-out accuracy"), ("sft/lr", "learning rate")]


def sft_batch(rows: list[dict], tokenizer: Any, formatter: Any,
              opening: Callable[[dict], tuple[list[dict], list[dict] | None]] | None = None,
              eos_texts: list[str] | None = None) -> SFTBatch:
    """[formatted prompt | answer <eos>], right-padded; the loss covers the answer and the end-of-turn token. The
    answer is the row's demonstration `sft_answer` where the data has one (a built-in task's sloppy teacher), else
    `answer`. A row with `sft_messages` (a multi-turn demonstration after its prompt: assistant turns, tool results)
    is laid out token for token as a multi-turn rollout lays out an episode (trainer/rollout/multiturn.py), the
    loss on the assistant turns only: `opening(row)` gives the episode's first messages and tool schemas
    (multiturn.episode_opening; default: the row's prompt, no tools), `eos_texts` the engines' end-of-turn texts.
    """
    seqs, masks = [], []
    for row in rows:
        if row.get("sft_messages"):
            seq, mask = _conversation(row, tokenizer, formatter, opening, eos_texts)
            seqs.append(seq)
            masks.append(mask)
            continue
        prompt = tokenizer(formatter.row(row), add_special_tokens=False)["input_ids"]
        target = row.get("sft_answer", row["answer"])
        answer = tokenizer(str(target), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt + answer)
        masks.append([0.0] * len(prompt) + [1.0] * len(answer))
    L = max(map(len, seqs))
    input_ids = torch.full((len(seqs), L), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), L), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), L), dtype=torch.float32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
        loss_mask[i, :len(s)] = torch.tensor(m)
    return SFTBatch(input_ids, attention, loss_mask)


def _conversation(row: dict, tokenizer: Any, formatter: Any, opening: Callable | None,
                  eos_texts: list[str] | None) -> tuple[list[int], list[float]]:
    """A multi-turn demonstration as ids and loss mask: the episode prompt, then each assistant turn's text and the
    end-of-turn token (trained on), each run of other messages as the chat template continues after an assistant turn
    (not trained on) — tokenized by the formatter's episode_ids / continuation_ids, as episodes are."""
    eos = tokenizer.eos_token_id
    first, tools = opening(row) if opening else ([{"role": "user", "content": row["prompt"]}], None)
    ids = formatter.episode_ids(first, row=row, tools=tools)
    mask = [0.0] * len(ids)
    pending: list[dict] = []
    for message in row["sft_messages"]:
        if message["role"] != "assistant":
            pending.append({"role": message["role"], "content": message["content"]})
            continue
        if pending:
            context = formatter.continuation_ids(pending, eos_texts=eos_texts or [tokenizer.decode([eos])],
                                                 tools=tools)
            ids += context
            mask += [0.0] * len(context)
            pending = []
        turn = tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [eos]
        ids += turn
        mask += [1.0] * len(turn)
    return ids, mask


def run_sft(env: StageEnv) -> StageResult:
    cfg, s = env.cfg, env.cfg.sft
    stream = PromptStream(env.data["train"], seed=cfg.seed)
    opening = eos_texts = None
    if cfg.rollout.env.type != "none":  # multi-turn demonstrations open and continue as the episodes will
        from tokenwise.trainer.rollout.multiturn import episode_opening
        opening = episode_opening(cfg.rollout.env)
        eos_texts = end_texts(env.tokenizer, model_eos_ids(env.init_dir, env.tokenizer))

    def make_state(workers) -> StageState:
        def evaluate() -> dict:
            workers.sync()
            return run_heldout_eval(workers, cfg, env.data["heldout"])
        return StageState(env, learner=workers.pool, stream=stream, total_steps=s.steps, eval_every=s.eval_every,
                          save_every=s.save_every, evaluate=evaluate)

    def step(workers, n: int) -> tuple[dict, str]:
        t0 = time.perf_counter()
        batch = sft_batch(stream.next_batch(s.batch_size), env.tokenizer, env.formatter, opening=opening,
                          eos_texts=eos_texts)
        metrics = workers.pool.sft_step(batch)
        if metrics["nonfinite/skipped_updates"]:
            reason = (f"the gradient norm was {metrics['sft/grad_norm']} (loss {metrics['sft/loss']:.4g}); the "
                      f"update was not applied")
            if cfg.trainer.on_nonfinite == "stop":
                raise NonFiniteError(reason)
            console.print(f"sft step {n}: {reason} (trainer.on_nonfinite: skip)")
        metrics["perf/tokens_per_s"] = float(batch.attention_mask.sum()) / (time.perf_counter() - t0)
        return metrics, f"loss {metrics['sft/loss']:.3f}  {metrics['perf/tokens_per_s']:.0f} tok/s"

    # debug mode evaluates with the learner's own model object (share_model): no copy, no sync cost
    return run_stage(env, make_state=make_state, step=step, panels=PANELS, make_workers=lambda: build_workers(
        env, micro_batch_size=s.micro_batch_size, share_model=True, learner_kwargs=dict(
            model_dir=env.init_dir, optim=s.optim, total_updates=s.steps, device=env.device, dtype=env.dtype,
            logprobs="naive", lora=env.cfg.model.lora, seed=env.cfg.seed)))
