"""Padding-free packing (trainer/packing.py): packed forwards give the padded log-probs, entropies and gradients, on
transformers models (SDPA and eager attention) and on our decoder (gated attention, MoE), fused and naive."""

import pytest
import torch

from conftest import builtin_model_dir, rollout_batch
from tokenwise.models.builtin import build_tokenizer
from tokenwise.models.decoder import TokenwiseConfig, TokenwiseForCausalLM
from tokenwise.rl.types import RolloutBatch
from tokenwise.trainer.batching import plan_rows, row_tokens
from tokenwise.trainer.config import OptimConfig
from tokenwise.trainer.learner import Learner, trim
from tokenwise.trainer.packing import pack, unpack

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return builtin_model_dir(tmp_path_factory, "llama", num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """Our decoder with everything that touches the mask or the token layout: elementwise gates, q/k norm, partial
    RoPE, GQA, MoE with a shared expert (no capacity limit, so routing is per token)."""
    d = tmp_path_factory.mktemp("decoder")
    tok = build_tokenizer()
    torch.manual_seed(0)
    TokenwiseForCausalLM(TokenwiseConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, qk_norm=True, partial_rotary_factor=0.5, attn_gate="elementwise", ffn="moe",
        num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=16, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _batch(seed: int, *, groups: int = 3, G: int = 4, P: int = 9, T: int = 7, vocab: int = 90) -> RolloutBatch:
    """Groups of G rows sharing a left-padded prompt of their own length, responses of random lengths 1..T
    (right-padded), random token ids."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(2, P + 1, (groups,), generator=g).repeat_interleave(G)
    rlen = torch.randint(1, T + 1, (groups * G,), generator=g)
    prompt_mask = (torch.arange(P)[None] >= P - plen[:, None]).long()
    prompt_ids = torch.randint(3, vocab, (groups, P), generator=g).repeat_interleave(G, 0) * prompt_mask
    response_mask = (torch.arange(T)[None] < rlen[:, None]).float()
    response_ids = torch.randint(3, vocab, (groups * G, T), generator=g) * response_mask.long()
    B = groups * G
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(B, T),
                        torch.zeros(B, dtype=torch.bool), [""] * B, [""] * B, [""] * B, G, 0,
                        temperatures=0.5 + torch.rand(B, T, generator=g))


def _learner(model_dir, *, packing: str, logprobs: str, dtype=torch.float32, attn: str | None = None) -> Learner:
    learner = Learner(model_dir, build_tokenizer(), optim=OptimConfig(), total_updates=1, device=CPU, dtype=dtype,
                      logprobs=logprobs, packing=packing)
    if attn is not None:  # transformers' attention backends: the packed path adapts its mask to each
        learner.model.set_attn_implementation(attn)
        learner.packing = learner._packing_supported(learner.model, packing)
    return learner


def _run(learner: Learner, batch: RolloutBatch, weights: torch.Tensor):
    """log-probs, entropies and the gradient of a loss that weighs every token's log-prob and entropy."""
    learner.model.zero_grad(set_to_none=True)
    logp, ent, _ = learner._forward(learner.model, batch)
    m = batch.response_mask[:, :logp.shape[1]].to(logp.dtype)
    ((logp * weights[:, :logp.shape[1]] + 0.1 * ent) * m).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None])
    return logp.detach() * m, ent.detach() * m, grads


@pytest.mark.parametrize("model, attn", [("llama", None), ("llama", "eager"), ("decoder", None)])
@pytest.mark.parametrize("logprobs", ["fused", "naive"])
@pytest.mark.parametrize("mode", ["rows", "groups"])
def test_packed_forward_equals_padded(llama_dir, decoder_dir, model, attn, logprobs, mode):
    """float32: log-probs and entropies within 1e-6 (relative; absolute below 1), gradients within 1e-5 of their
    norm; float64: log-probs within 1e-12, so nothing but summation order differs."""
    model_dir = llama_dir if model == "llama" else decoder_dir
    for seed in (0, 1):
        batch = trim(_batch(seed))
        weights = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(seed + 10))
        # (transformers' padded eager attention in float64 turns left-padding rows into NaN that then reach valid
        # rows through masked keys: the eager comparison is float32 only)
        for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12))[:1 if attn == "eager" else 2]:
            torch.manual_seed(0)
            padded = _run(_learner(model_dir, packing="none", logprobs=logprobs, dtype=dtype, attn=attn), batch,
                          weights.to(dtype))
            torch.manual_seed(0)
            learner = _learner(model_dir, packing=mode, logprobs=logprobs, dtype=dtype, attn=attn)
            assert learner.packing == mode
            packed = _run(learner, batch, weights.to(dtype))
            for a, b in zip(packed[:2], padded[:2]):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            # float64 gradients: RMSNorm (transformers' and ours) and MoE routing compute in float32 by design, so
            # gradients are rounded to float32 on the way back; 'rows' rounds the same per-token values, but 'groups'
            # rounds the sum over a prompt's responses once instead of each response's share
            gtol = 10 * tol if dtype == torch.float32 else (1e-8 if mode == "rows" else 2e-7)
            assert float((packed[2] - padded[2]).norm() / padded[2].norm()) < gtol
            assert padded[2].norm() > 0


def test_pack_layout_keeps_rows_apart_and_shares_prompts_once():
    batch = _batch(3, groups=2, G=3)
    pm, rm = batch.prompt_mask, batch.response_mask
    rows = pack(batch.prompt_ids, pm, batch.response_ids, rm, mode="rows", min_bin=1)
    groups = pack(batch.prompt_ids, pm, batch.response_ids, rm, mode="groups", min_bin=1)
    real = int(pm.sum() + rm.sum())
    assert rows.tokens == real  # no padding token counted, none lost
    assert groups.tokens == real - int(pm[[1, 2, 4, 5]].sum())  # one prompt copy per group
    for p in (rows, groups):
        flat_ids = p.input_ids.reshape(-1)
        # the token after each predecessor is the response token it predicts (or the prompt's last → first token)
        nxt = flat_ids[p.src + 1]
        first = torch.zeros_like(rm, dtype=torch.bool)
        first[:, 0] = True
        assert torch.equal(nxt[~first[p.valid]], batch.response_ids[p.valid & ~first])
        # position ids of each response token's predecessor: its own row's position (prompt length + t - 1)
        pos = p.position_ids.reshape(-1)[p.src]
        t = torch.arange(rm.shape[1]).expand_as(rm)
        assert torch.equal(pos, (pm.sum(1, keepdim=True) + t - 1)[p.valid])
        # the predecessor of response token t sees exactly its row's prompt and response tokens 0..t-1: no other
        # row, and in 'groups' no sibling response (a count the block structure alone would not give)
        L = p.input_ids.shape[1]
        visible = p.mask[p.src // L, 0, p.src % L].sum(-1)
        assert torch.equal(visible, (pm.sum(1, keepdim=True) + t)[p.valid])


def test_unpack_scatters_in_row_order_and_keeps_the_gradient():
    valid = torch.tensor([[True, True, False], [True, False, False]])
    v = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = unpack(v, valid)
    assert out.tolist() == [[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]
    out.sum().backward()
    assert v.grad.tolist() == [1.0, 1.0, 1.0]


def test_group_packing_plans_groups_whole_and_counts_a_prompt_once():
    lengths = [3, 1, 4, 1, 5, 9, 2, 6]
    batch = rollout_batch(lengths, group_size=4, prompt_len=10)
    tokens, prompt = row_tokens(batch), batch.prompt_mask.sum(1).long().tolist()
    # 'groups': group 0 costs 10 + 9 = 19 tokens, group 1 costs 10 + 22 = 32; budget 40 holds one group at a time
    (micros,) = plan_rows(list(range(8)), tokens, world=1, max_rows=8, max_tokens=40, packing="groups",
                          prompt_tokens=prompt, group_size=4)
    assert [m.rows for m in micros] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # padded, the same budget holds 2 rows (3 x 14 > 40); 'rows' counts real tokens (13 + 11 + 14 ≤ 40)
    (padded,) = plan_rows(list(range(8)), tokens, world=1, max_rows=8, max_tokens=40, packing="none")
    assert [m.rows for m in padded] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    (rows,) = plan_rows(list(range(8)), tokens, world=1, max_rows=8, max_tokens=40, packing="rows")
    assert [m.rows for m in rows][0] == [0, 1, 2]
    # over two ranks a group never splits
    plans = plan_rows(list(range(8)), tokens, world=2, max_rows=8, packing="groups", prompt_tokens=prompt,
                      group_size=4)
    assert sorted(r for p in plans for m in p for r in m.rows) == list(range(8))
    assert all(set(m.rows) in ({0, 1, 2, 3}, {4, 5, 6, 7}) for p in plans for m in p)


def test_varlen_rows_find_their_boundaries_from_the_position_ids(llama_dir):
    """Under flash attention the learner packs 'rows' into one sequence without a mask: the attention finds the rows
    where the position ids restart. transformers' SDPA path reads the same position ids (its packed-sequence
    mask), so the layout is checked here against the padded forward on CPU."""
    batch = trim(_batch(4))
    weights = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    padded = _run(_learner(llama_dir, packing="none", logprobs="fused"), batch, weights)
    learner = _learner(llama_dir, packing="rows", logprobs="fused")
    learner._varlen = True  # what _packing_supported sets under flash_attention_2 (not installed here)
    packed = _run(learner, batch, weights)
    for a, b in zip(packed[:2], padded[:2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert float((packed[2] - padded[2]).norm() / padded[2].norm()) < 1e-5
    p = pack(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, mode="rows", varlen=True)
    assert p.mask is None and p.input_ids.shape[0] == 1
    assert p.input_ids.shape[1] == p.tokens == int(batch.prompt_mask.sum() + batch.response_mask.sum())
    with pytest.raises(ValueError, match="rows only"):
        pack(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, mode="groups", varlen=True)


def test_layouts_packing_cannot_express_are_refused_with_the_setting_to_change():
    batch = _batch(5)
    mask = batch.response_mask.clone()
    mask[0, 0] = 0  # a masked token before valid ones
    with pytest.raises(ValueError, match="trainer.packing: none"):
        pack(batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask, mode="groups")
    empty = batch.prompt_mask.clone()
    empty[0] = 0
    with pytest.raises(ValueError, match="at least one prompt token"):
        pack(batch.prompt_ids, empty, batch.response_ids, batch.response_mask, mode="rows")
