"""Prompt/answer data as `datasets.Dataset`s with columns `prompt` and `answer`, and a resumable cursor over them.

Built-in tasks are generated deterministically from a seed, with a held-out split disjoint from train. Their training
rows may also carry `sft_answer`, the demonstration of a sloppy teacher (`teacher_error`), which SFT imitates while
the verifier and the held-out evaluation keep the true `answer`. User data is read with `datasets.load_dataset` from
local jsonl/json/parquet/csv files.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np
from datasets import Dataset, load_dataset

from tokenwise.rl.errors import DataError


# ------------------------------------------------------------------------------------------------- built-in tasks
def _operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _arithmetic_problem(rng: random.Random, min_digits: int, max_digits: int,
                        ops: Sequence[str]) -> tuple[str, str, str]:
    """(prompt, answer, the sloppy teacher's answer: the last digit off by one, a guess made without working it
    out; derived from the answer, so the problems do not depend on the teacher)."""
    a, b = _operand(rng, min_digits, max_digits), _operand(rng, min_digits, max_digits)
    op = rng.choice(list(ops))
    value = str({"+": a + b, "-": a - b, "*": a * b}[op])
    return f"{a}{op}{b}=", value, value[:-1] + str((int(value[-1]) + 1) % 10)


def calculator_call(expression: str) -> str:
    """The assistant turn that asks the calculator tool (Hermes / Qwen <tool_call> JSON, rl/environments.py)."""
    return '<tool_call>{"name": "calculator", "arguments": {"expression": "' + expression + '"}}</tool_call>'


GUESS_LEAD = "No need for the calculator: "
ANSWER_LEAD = "Answer: "


def tool_demonstration(prompt: str, answer: str, demo_answer: str) -> list[dict]:
    """The SFT demonstration after the user's prompt 'a*b=': call the calculator, read its result, answer with it;
    a sloppy demonstration (demo_answer differs) answers directly, without the tool, with its guess, always in the
    same words (so with enough of them the habit is the greedy choice, as the quick start's teacher's is). Both
    restate the problem, so every demonstration teaches copying it (what a call needs), and both end by copying the
    number just before into an 'Answer: ' line (the calculator's result, or the guess), so every demonstration also
    teaches copying a result (what answering with the tool needs)."""
    if demo_answer != answer:
        guess = f"{GUESS_LEAD}{prompt.rstrip('=')} = {demo_answer}"
        return [{"role": "assistant", "content": f"{guess}\n{ANSWER_LEAD}{demo_answer}"}]
    return [{"role": "assistant", "content": calculator_call(prompt.rstrip("="))},
            {"role": "tool", "content": answer}, {"role": "assistant", "content": f"{ANSWER_LEAD}{answer}"}]


def _sort_problem(rng: random.Random, min_length: int, max_length: int) -> tuple[str, str, str]:
    """(prompt, answer, the sloppy teacher's answer: on a list of max_length digits it stops one digit early)."""
    digits = [rng.randint(0, 9) for _ in range(rng.randint(min_length, max_length))]
    answer = "".join(map(str, sorted(digits)))
    return "sort " + " ".join(map(str, digits)), answer, answer[:-1] if len(digits) == max_length else answer


def _split_task(make, *, num_train: int, num_heldout: int, seed: int, what: str,
                teacher_error: float = 0.0) -> dict[str, Dataset]:
    """Held-out problems first (distinct), then training problems that never repeat a held-out prompt. With
    `teacher_error` > 0 each training row also gets `sft_answer`: the teacher's slip (make's third value) with that
    probability where the slip differs from the answer, else the answer (drawn from a generator of its own, so the
    problems do not depend on teacher_error)."""
    rng = random.Random(seed)
    heldout: dict[str, str] = {}
    for _ in range(50 * num_heldout):
        if len(heldout) == num_heldout:
            break
        prompt, answer, _ = make(rng)
        heldout.setdefault(prompt, answer)
    if len(heldout) < num_heldout:
        raise DataError(f"data: the {what} task has fewer than {num_heldout} distinct problems with these settings; "
                        f"lower data.num_heldout or widen the task")
    train: dict[str, list[str]] = {"prompt": [], "answer": [], "sft_answer": []}
    teacher = random.Random(f"{seed}-teacher")
    for _ in range(50 * num_train):
        if len(train["prompt"]) == num_train:
            break
        prompt, answer, slip = make(rng)
        if prompt not in heldout:
            train["prompt"].append(prompt)
            train["answer"].append(answer)
            train["sft_answer"].append(slip if teacher.random() < teacher_error else answer)
    if len(train["prompt"]) < num_train:
        raise DataError(f"data: the {what} task leaves too few training problems outside the held-out set")
    if not teacher_error:
        del train["sft_answer"]
    return {"train": Dataset.from_dict(train),
            "heldout": Dataset.from_dict({"prompt": list(heldout), "answer": list(heldout.values())})}


def slipped_call_demonstration(prompt: str) -> list[dict]:
    """The sloppy teacher of teacher_slip 'call': it calls the calculator, but copies the second operand with its
    last digit off by one, and answers with the (wrong) result it got — a demonstration that uses the tool and copies
    its result like a correct one, so only the exact copy of the problem is left for GRPO to learn."""
    expression = prompt.rstrip("=")
    op = next(c for c in expression[1:] if c in "+-*")
    a, b = expression[0] + expression[1:].split(op, 1)[0], expression[1:].split(op, 1)[1]
    b = b[:-1] + str((int(b[-1]) + 1) % 10)
    value = str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    return [{"role": "assistant", "content": calculator_call(f"{a}{op}{b}")}, {"role": "tool", "content": value},
            {"role": "assistant", "content": f"{ANSWER_LEAD}{value}"}]


def arithmetic_task(*, num_train: int, num_heldout: int, min_digits: int, max_digits: int, ops: Sequence[str],
                    seed: int, teacher_error: float = 0.0, tool_demos: bool = False,
                    teacher_slip: str = "guess") -> dict[str, Dataset]:
    """'a<op>b=' → the integer result; operands have min_digits..max_digits digits (digit count drawn uniformly).
    With `tool_demos` each training row carries `sft_messages`, a demonstration that calls the calculator tool; with
    probability teacher_error a sloppy one instead: a guess without the tool (teacher_slip 'guess') or a call with
    a mistyped operand (teacher_slip 'call'). Without tool_demos, teacher_error makes `sft_answer` that guess."""
    task = _split_task(lambda rng: _arithmetic_problem(rng, min_digits, max_digits, ops), num_train=num_train,
                       num_heldout=num_heldout, seed=seed, what="arithmetic", teacher_error=teacher_error)
    if tool_demos:
        train = task["train"]
        demos = train["sft_answer"] if "sft_answer" in train.column_names else train["answer"]
        messages = [slipped_call_demonstration(p) if teacher_slip == "call" and d != a else tool_demonstration(p, a, d)
                    for p, a, d in zip(train["prompt"], train["answer"], demos)]
        task["train"] = Dataset.from_dict({"prompt": train["prompt"], "answer": train["answer"],
                                           "sft_messages": messages})
    return task


def sort_task(*, num_train: int, num_heldout: int, min_length: int, max_length: int, seed: int,
              teacher_error: float = 0.0) -> dict[str, Dataset]:
    """'sort 3 9 1' → '139'. The sloppy teacher (teacher_error) stops one digit early on the longest lists
    (max_length digits: 'sort 3 9 1' → '13' when max_length is 3)."""
    return _split_task(lambda rng: _sort_problem(rng, min_length, max_length), num_train=num_train,
                       num_heldout=num_heldout, seed=seed, what="sort", teacher_error=teacher_error)


# ------------------------------------------------------------------------------------------------------ user data
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def gsm8k_answer(answer: object) -> str:
    """'... reasoning #### 1,234' → '1,234'; other answers are returned as text, stripped."""
    text = str(answer)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def read_table(files: Sequence[str], *, what: str) -> Dataset:
    """Local files of one format (.jsonl / .json / .parquet / .csv) as a Dataset, with one-line errors naming `what`
    (the recipe key)."""
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{what}: file '{p}' does not exist")
        if p.stat().st_size == 0:
            raise DataError(f"{what}: file '{p}' is empty")
    kinds = {_FORMATS.get(p.suffix.lower()) for p in paths}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{what}: files must all be one of {', '.join(_FORMATS)}; got {[p.name for p in paths]}")
    try:
        ds = load_dataset(kinds.pop(), data_files=[str(p) for p in paths], split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        detail = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{what}: could not read {[str(p) for p in paths]}: {detail}") from None
    if len(ds) == 0:
        raise DataError(f"{what}: {[str(p) for p in paths]} has no rows")
    return ds


def load_local(files: Sequence[str], *, prompt_key: str, answer_key: str, what: str) -> Dataset:
    """Read local files into a Dataset with columns prompt, answer. `what` names the recipe key in errors."""
    ds = read_table(files, what=what)
    paths = list(files)
    for key, role in ((prompt_key, "data.prompt_key"), (answer_key, "data.answer_key")):
        if key not in ds.column_names:
            raise DataError(f"{what} {[str(p) for p in paths]}: column '{key}' not found (columns: "
                            f"{', '.join(ds.column_names)}); set {role} to the right column")
    demos = "sft_messages" in ds.column_names  # multi-turn SFT demonstrations (docs/environments.md)
    ds = ds.select_columns([prompt_key, answer_key] + (["sft_messages"] if demos else []))
    for key, role in ((prompt_key, "data.prompt_key"), (answer_key, "data.answer_key")):
        missing = [i for i, v in enumerate(ds[key]) if v is None or (isinstance(v, str) and not v.strip())]
        if missing:
            raise DataError(f"{what} {[str(p) for p in paths]}: column '{key}' ({role}) is empty or null in "
                            f"{len(missing)} row(s), first at row {missing[0]}; fill or drop those rows")
    return Dataset.from_dict({"prompt": [str(p) for p in ds[prompt_key]],
                              "answer": [gsm8k_answer(a) for a in ds[answer_key]],
                              **({"sft_messages": ds["sft_messages"]} if demos else {})})


def local_task(*, train_files: Sequence[str], heldout_files: Sequence[str], heldout_size: int, prompt_key: str,
               answer_key: str, seed: int) -> dict[str, Dataset]:
    train = load_local(train_files, prompt_key=prompt_key, answer_key=answer_key, what="data.train_files")
    if heldout_files:
        heldout = load_local(heldout_files, prompt_key=prompt_key, answer_key=answer_key, what="data.heldout_files")
        return {"train": train, "heldout": heldout}
    if heldout_size >= len(train):
        raise DataError(f"data.heldout_size ({heldout_size}) must be smaller than the {len(train)} training rows, "
                        f"or give data.heldout_files")
    split = train.train_test_split(test_size=heldout_size, seed=seed)
    return {"train": split["train"], "heldout": split["test"]}


# ---------------------------------------------------------------------------------------------------------- cursor
class PromptStream:
    """An endless, resumable walk over a data set in epochs; epoch e visits rows in a permutation drawn from
    (seed, e). A batch may straddle an epoch boundary. State: (epoch, index)."""

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next_batch(self, n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            if self.index == len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            take = self._order[self.index:self.index + n - len(rows)]
            self.index += len(take)
            rows.extend(int(i) for i in take)
        batch = self.dataset[rows]
        return [dict(zip(batch, values)) for values in zip(*batch.values())]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.dataset) or state["seed"] != self.seed:
            raise DataError(f"the checkpoint's data cursor is for {state['size']} rows with seed {state['seed']}, "
                            f"but the data set has {len(self.dataset)} rows with seed {self.seed}")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)
