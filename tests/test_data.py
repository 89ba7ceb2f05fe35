import json

import pytest

from tokenwise.rl.data import PromptStream, arithmetic_task, load_local, local_task, sort_task
from tokenwise.rl.errors import DataError
from tokenwise.rl.rewards import exact_answer


def test_arithmetic_task_is_deterministic_disjoint_and_correct():
    a = arithmetic_task(num_train=500, num_heldout=50, min_digits=1, max_digits=3, ops=["+", "-", "*"], seed=3)
    b = arithmetic_task(num_train=500, num_heldout=50, min_digits=1, max_digits=3, ops=["+", "-", "*"], seed=3)
    assert a["train"].to_list() == b["train"].to_list()
    assert len(a["train"]) == 500 and len(a["heldout"]) == 50
    assert not set(a["train"]["prompt"]) & set(a["heldout"]["prompt"])
    for row in a["train"].select(range(100)):
        expr = row["prompt"].rstrip("=")
        assert str(eval(expr)) == row["answer"]  # the prompt is a Python expression of two integers
    c = arithmetic_task(num_train=500, num_heldout=50, min_digits=1, max_digits=3, ops=["+"], seed=4)
    assert c["train"]["prompt"] != a["train"]["prompt"]


def test_sort_task():
    t = sort_task(num_train=100, num_heldout=20, min_length=3, max_length=5, seed=0)
    for row in t["train"]:
        digits = row["prompt"].removeprefix("sort ").split()
        assert 3 <= len(digits) <= 5 and row["answer"] == "".join(sorted(digits))


def test_sloppy_teacher_stops_early_only_on_the_longest_lists_at_its_rate():
    """sort's teacher_error: a training row's sft_answer drops the last digit of a max_length list with probability
    teacher_error, and is the answer otherwise; the problems and the held-out split do not change with it."""
    clean = sort_task(num_train=4000, num_heldout=50, min_length=3, max_length=5, seed=0)
    t = sort_task(num_train=4000, num_heldout=50, min_length=3, max_length=5, seed=0, teacher_error=0.6)
    assert "sft_answer" not in clean["train"].column_names and "sft_answer" not in t["heldout"].column_names
    assert t["train"]["prompt"] == clean["train"]["prompt"] and t["train"]["answer"] == clean["train"]["answer"]
    assert t["heldout"].to_list() == clean["heldout"].to_list()
    longest = slips = 0
    for row in t["train"]:
        if len(row["answer"]) < 5:
            assert row["sft_answer"] == row["answer"]
            continue
        longest += 1
        assert row["sft_answer"] in (row["answer"], row["answer"][:-1])
        slips += row["sft_answer"] != row["answer"]
    assert longest > 1000 and abs(slips / longest - 0.6) < 0.05  # binomial sd ~0.015


def test_sft_batch_trains_on_the_teachers_answer():
    from tokenwise.models.builtin import build_tokenizer
    from tokenwise.trainer.loading import PromptFormatter
    from tokenwise.trainer.sft import sft_batch
    tok = build_tokenizer()
    fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
    rows = [{"prompt": "sort 3 1 2", "answer": "123", "sft_answer": "12"}, {"prompt": "sort 5 4", "answer": "45"}]
    batch = sft_batch(rows, tok, fmt)
    targets = [tok.decode(ids[mask > 0]) for ids, mask in zip(batch.input_ids, batch.loss_mask)]
    assert targets == ["12<|end|>", "45<|end|>"]


def test_too_small_task_space_is_a_clear_error():
    with pytest.raises(DataError, match="num_heldout"):
        arithmetic_task(num_train=10, num_heldout=500, min_digits=1, max_digits=1, ops=["+"], seed=0)


def test_local_jsonl_with_gsm8k_answers(tmp_path):
    f = tmp_path / "train.jsonl"
    rows = [{"question": f"q{i}", "solution": f"work {i} #### {i * 1000:,}"} for i in range(20)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_local([str(f)], prompt_key="question", answer_key="solution", what="data.train_files")
    assert ds.column_names == ["prompt", "answer"]
    assert ds[3] == {"prompt": "q3", "answer": "3,000"}
    assert exact_answer(prompt="q3", response="#### 3000", answer=ds[3]["answer"], truncated=False) == 1.0
    split = local_task(train_files=[str(f)], heldout_files=[], heldout_size=5, prompt_key="question",
                       answer_key="solution", seed=0)
    assert len(split["train"]) == 15 and len(split["heldout"]) == 5


def test_local_parquet(tmp_path):
    from datasets import Dataset
    path = tmp_path / "d.parquet"
    Dataset.from_dict({"prompt": ["a", "b"], "answer": [1, 2]}).to_parquet(str(path))
    ds = load_local([str(path)], prompt_key="prompt", answer_key="answer", what="data.train_files")
    assert ds["answer"] == ["1", "2"]


def test_local_missing_column_names_file_and_columns(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"prompt": "x", "solution": "1"}) + "\n")
    with pytest.raises(DataError) as e:
        load_local([str(f)], prompt_key="prompt", answer_key="answer", what="data.train_files")
    msg = str(e.value)
    assert "train.jsonl" in msg and "'answer' not found" in msg and "solution" in msg and "data.answer_key" in msg


def test_local_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_local([str(tmp_path / "nope.jsonl")], prompt_key="p", answer_key="a", what="data.train_files")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=".jsonl"):
        load_local([str(tmp_path / "x.txt")], prompt_key="p", answer_key="a", what="data.train_files")


@pytest.mark.parametrize("size, batch, split_at", [(12, 4, 3), (10, 4, 3), (7, 3, 5)])
def test_prompt_stream_resumes_exactly(size, batch, split_at):
    from datasets import Dataset
    ds = Dataset.from_dict({"prompt": [f"p{i}" for i in range(size)], "answer": [str(i) for i in range(size)]})
    straight = PromptStream(ds, seed=7)
    expected = [straight.next_batch(batch) for _ in range(8)]
    first = PromptStream(ds, seed=7)
    got = [first.next_batch(batch) for _ in range(split_at)]
    resumed = PromptStream(ds, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.next_batch(batch) for _ in range(8 - split_at)]
    assert got == expected
    # every epoch is a permutation: each row appears once per epoch
    flat = [r["prompt"] for b in expected for r in b]
    assert sorted(flat[:size]) == sorted(ds["prompt"])
    assert flat[:size] != flat[size:2 * size]  # epochs are shuffled differently


def test_prompt_stream_rejects_a_different_dataset():
    from datasets import Dataset
    ds = Dataset.from_dict({"prompt": ["a", "b"], "answer": ["1", "2"]})
    state = PromptStream(ds, seed=1).state_dict()
    other = PromptStream(Dataset.from_dict({"prompt": ["a"], "answer": ["1"]}), seed=1)
    with pytest.raises(DataError, match="data cursor"):
        other.load_state_dict(state)


def test_sloppy_teacher_that_mistypes_the_calculator_call():
    """teacher_slip 'call': every demonstration calls the calculator; a sloppy one (teacher_error) with the second
    operand's last digit off by one, and it answers with the result of that call (wrong), as a correct one answers
    with the right result. The problems do not depend on the slip."""
    import json as _json
    kw = dict(num_train=200, num_heldout=10, min_digits=3, max_digits=4, ops=["*"], seed=5, teacher_error=0.5,
              tool_demos=True)
    rows = arithmetic_task(**kw, teacher_slip="call")["train"].to_list()
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in arithmetic_task(**kw)["train"].to_list()]
    slipped = 0
    for r in rows:
        call, tool, final = r["sft_messages"]
        expression = _json.loads(call["content"].removeprefix("<tool_call>").removesuffix("</tool_call>"))
        expression = expression["arguments"]["expression"]
        a, b = expression.split("*")
        pa, pb = r["prompt"].rstrip("=").split("*")
        assert tool["role"] == "tool" and tool["content"] == str(int(a) * int(b))
        assert final["content"] == f"Answer: {tool['content']}"
        assert a == pa and b[:-1] == pb[:-1]
        if b != pb:
            slipped += 1
            assert int(b[-1]) == (int(pb[-1]) + 1) % 10 and tool["content"] != r["answer"]
        else:
            assert tool["content"] == r["answer"]
    assert 0.35 < slipped / len(rows) < 0.65
