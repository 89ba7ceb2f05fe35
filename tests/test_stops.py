"""Stop strings: the response ends with the token completing the first stop string, in either backend."""

from __future__ import annotations

import torch

from tokenwise.models.builtin import build_tokenizer
from tokenwise.rl.types import RolloutBatch
from tokenwise.trainer.rollout.stops import apply_stop_strings


def _batch(tok, texts: list[str], eos: list[bool]) -> RolloutBatch:
    rows = [tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if e else []) for t, e in zip(texts, eos)]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return RolloutBatch(prompt_ids=torch.ones(len(rows), 1, dtype=torch.long),
                        prompt_mask=torch.ones(len(rows), 1, dtype=torch.long), response_ids=ids, response_mask=mask,
                        rollout_logprobs=-torch.rand(len(rows), T) * mask, truncated=torch.tensor([not e for e in eos]),
                        prompts=["p"] * len(rows), answers=["a"] * len(rows), responses=texts, group_size=1,
                        policy_version=0)


def test_stop_strings_cut_text_and_mask_later_tokens():
    tok = build_tokenizer()
    batch = _batch(tok, ["12\n\nmore", "no stop here", "ab##cd##", "x##"], [False, True, False, True])
    out = apply_stop_strings(batch, ["\n\n", "##"], tok)
    assert out.responses == ["12", "no stop here", "ab", "x"]
    # character tokens: the stop string's last character is the last valid token
    assert out.response_mask.sum(1).tolist() == [4, 13, 4, 3]
    assert out.truncated.tolist() == [False, False, False, False]
    assert torch.equal(out.response_mask[1], batch.response_mask[1])  # untouched row
    assert (out.rollout_logprobs[out.response_mask == 0] == 0).all()
    kept = out.response_mask.bool()
    assert torch.equal(out.rollout_logprobs[kept], batch.rollout_logprobs[kept])
    assert apply_stop_strings(batch, [], tok) is batch


def test_hf_engine_applies_stop_strings(tmp_path):
    from tokenwise.models.builtin import save_builtin
    from tokenwise.trainer.config import RolloutConfig
    from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
    from tokenwise.trainer.rollout import build_rollout
    d = save_builtin(tmp_path / "m", seed=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                     intermediate_size=64, max_position_embeddings=64)
    tok = load_tokenizer(d)
    fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
    common = dict(model_dir=d, tokenizer=tok, formatter=fmt, dtype=torch.float32, device=torch.device("cpu"))
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    plain = build_rollout(RolloutConfig(max_new_tokens=24), **common).generate(rows, n=4, seed=0)
    # a random model emits every character: stop at the most common one in its responses
    counts = {}
    for r in plain.responses:
        for c in set(r):
            counts[c] = counts.get(c, 0) + 1
    stop = max(counts, key=counts.get)
    stopped = build_rollout(RolloutConfig(max_new_tokens=24, stop=[stop]), **common).generate(rows, n=4, seed=0)
    hit = [stop in r for r in plain.responses]
    assert sum(hit) >= 4
    for a, b, h in zip(plain.responses, stopped.responses, hit):
        assert b == (a[:a.find(stop)] if h else a)
    assert (stopped.response_mask.sum(1) <= plain.response_mask.sum(1)).all()
    assert (stopped.response_mask.sum(1) < plain.response_mask.sum(1)).sum() == sum(hit)
