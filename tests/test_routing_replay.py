"""MoE routing replay (issue 21, first part): the router can be told which experts each token goes through, and
replaying a forward's own routing reproduces that forward exactly; the gate weights stay the router's, so the router
keeps its gradient."""

import dataclasses

import pytest
import torch

from tokenwise.kernels.moe import moe_ffn, route
from tokenwise.models.decoder import TokenwiseConfig, TokenwiseForCausalLM


def test_route_replays_given_experts_with_the_routers_own_probabilities():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(12, 8, generator=g), torch.randn(6, 8, generator=g)
    own = route(x, w, top_k=2)
    same = route(x, w, top_k=2, replay=own.expert_idx.clone())
    for name in ("expert_idx", "weight", "kept", "aux_loss", "z_loss", "expert_load"):
        assert torch.equal(getattr(same, name), getattr(own, name)), name
    other = (own.expert_idx + 1) % 6  # different experts on every token; rows of -1 keep the router's choice
    other[:4] = -1
    r = route(x, w, top_k=2, replay=other)
    assert torch.equal(r.expert_idx[:4], own.expert_idx[:4]) and torch.equal(r.expert_idx[4:], other[4:])
    probs = torch.softmax(x @ w.T, -1)
    expected = probs.gather(-1, r.expert_idx)
    torch.testing.assert_close(r.weight, expected / expected.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="int64"):
        route(x, w, top_k=2, replay=other[:, :1])
    with pytest.raises(ValueError, match="0..5"):
        route(x, w, top_k=2, replay=torch.full((12, 2), 6))


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_moe_ffn_replaying_its_own_routing_is_the_same_function(capacity):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 8, generator=g)
    w = torch.randn(4, 8, generator=g, requires_grad=True)
    gate_up, down = torch.randn(4, 12, 8, generator=g), torch.randn(4, 8, 6, generator=g)
    out, routing = moe_ffn(x, w, gate_up, down, top_k=2, capacity_factor=capacity)
    (out.square().sum() + routing.aux_loss).backward()
    grad = w.grad.clone()
    w.grad = None
    again, replayed = moe_ffn(x, w, gate_up, down, top_k=2, capacity_factor=capacity,
                              replay=routing.expert_idx.clone())
    (again.square().sum() + replayed.aux_loss).backward()
    assert torch.equal(again, out) and torch.equal(replayed.kept, routing.kept)
    assert torch.equal(w.grad, grad) and grad.abs().sum() > 0


def _moe_model(seed: int = 0) -> TokenwiseForCausalLM:
    torch.manual_seed(seed)
    return TokenwiseForCausalLM(TokenwiseConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        ffn="moe", num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=8, attn_gate="headwise",
        max_position_embeddings=32))


def test_decoder_replaying_its_own_routing_reproduces_its_forward_and_gradients():
    model = _moe_model()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 40, (3, 9), generator=g)
    attn = torch.ones(3, 9, dtype=torch.long)
    attn[0, :3] = 0  # left padding
    out = model(input_ids=ids, attention_mask=attn)
    recorded = model.routed_experts()
    assert recorded.shape == (3, 9, 3, 2) and recorded.dtype == torch.long
    out.logits.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    partial = recorded.clone()
    partial[:, :4] = -1  # e.g. prompt tokens left to the learner's router
    for replay in (recorded, partial):
        again = model(input_ids=ids, attention_mask=attn, expert_ids=replay)
        assert torch.equal(again.logits, out.logits)
        assert torch.equal(model.routed_experts(), recorded)
        again.logits.sum().backward()
        for n, p in model.named_parameters():
            if n in grads:
                assert torch.equal(p.grad, grads[n]), n
        model.zero_grad(set_to_none=True)
    # other experts: another function, and the routers still get gradients through the gate weights
    other = (recorded + 1) % 4
    moved = model(input_ids=ids, attention_mask=attn, expert_ids=other)
    assert not torch.allclose(moved.logits, out.logits)
    assert torch.equal(model.routed_experts(), other)
    moved.logits.sum().backward()
    assert all(layer.mlp.router.weight.grad.abs().sum() > 0 for layer in model.model.layers)
    with pytest.raises(ValueError, match="MoE layers"):
        model(input_ids=ids, attention_mask=attn, expert_ids=recorded[:, :, :2])


def test_a_dense_model_records_no_routing():
    torch.manual_seed(0)
    dense = TokenwiseForCausalLM(TokenwiseConfig(vocab_size=40, hidden_size=16, num_attention_heads=2))
    dense(input_ids=torch.randint(0, 40, (1, 4)))
    assert dense.routed_experts() is None


# ------------------------------------------------------------------------------------ recording and learner replay
@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A saved built-in MoE model of our decoder (random weights scaled up so routing is decided, not near-tied)."""
    from tokenwise.models.builtin import build_model, build_tokenizer
    tok = build_tokenizer()
    model = build_model(tok, seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                        max_position_embeddings=64, arch="tokenwise", attn_gate="headwise", ffn="moe", num_experts=4,
                        experts_per_token=2, moe_intermediate_size=16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    d = tmp_path_factory.mktemp("moe")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (13, 58), (7, 77), (40, 4), (9, 9)]]


def _engine(model_dir, max_new_tokens=6):
    from tokenwise.trainer.config import RolloutConfig
    from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
    from tokenwise.trainer.rollout import build_rollout
    tok = load_tokenizer(model_dir)
    return build_rollout(RolloutConfig(engine="hf", max_new_tokens=max_new_tokens, batch_size=8), model_dir=model_dir,
                         tokenizer=tok, formatter=PromptFormatter(tok, system_prompt=None, use_chat_template=True),
                         dtype=torch.float32, device=torch.device("cpu")), tok


def _full_forward(model, batch, expert_ids=None):
    """(log-probs [B, T] of the response tokens, routed experts [B, P + T, M, k]) of one padded forward."""
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    attn = torch.cat([batch.prompt_mask, batch.response_mask.long()], 1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                    expert_ids=expert_ids)
    T = batch.response_ids.shape[1]
    logp = out.logits[:, -T - 1:-1].float().log_softmax(-1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    return logp * batch.response_mask, model.routed_experts()


def test_hf_engine_records_the_experts_each_token_went_through(moe_dir):
    """generate's prefill routes the prompt, decode step t routes response token t - 1: the record equals the routing
    of one full forward over prompt + response wherever it has a value; padding and each response's last token
    (never fed back) are -1; batches split over generate calls are joined with -1 padding."""
    engine, _ = _engine(moe_dir)
    batch = engine.generate(ROWS, n=3, seed=1)
    P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    assert batch.prompt_expert_ids.shape == (15, P, 2, 2) and batch.response_expert_ids.shape == (15, T, 2, 2)
    assert batch.prompt_expert_ids.dtype == torch.int16
    assert torch.equal(batch.prompt_expert_ids[..., 0, 0] >= 0, batch.prompt_mask > 0)
    recorded = batch.response_expert_ids[..., 0, 0] >= 0
    lengths = batch.response_mask.sum(1).long()
    last = torch.arange(T)[None] == (lengths - 1)[:, None]
    assert not (recorded & (batch.response_mask == 0)).any() and not (recorded & last & batch.truncated[:, None]).any()
    assert torch.equal(recorded | last, batch.response_mask > 0) or torch.equal(
        recorded[batch.truncated], ((batch.response_mask > 0) & ~last)[batch.truncated])
    _, own = _full_forward(engine.model, batch)
    rec = torch.cat([batch.prompt_expert_ids, batch.response_expert_ids], 1).long()
    valid = rec[..., 0] >= 0
    agree = (own.sort(-1).values == rec.sort(-1).values).all(-1)
    assert agree[valid].float().mean() > 0.99 and int(valid.sum()) > 200
    dense_engine = _engine(moe_dir)[0]
    dense_engine.records_routing = False
    assert dense_engine.generate(ROWS[:1], n=1, seed=1).response_expert_ids is None


def _replayed_batch(moe_dir, rotate_share: float):
    """A batch whose 'engine' routed a share of (token, layer) pairs through other experts than the model's own:
    its rollout log-probs are the model's under that routing, its record is that routing. Returns (batch, share of
    recorded response (token, layer) pairs that were moved)."""
    from tokenwise.rl.types import TrainBatch
    engine, tok = _engine(moe_dir)
    batch = engine.generate(ROWS, n=4, seed=3)
    _, own = _full_forward(engine.model, batch)
    g = torch.Generator().manual_seed(0)
    move = torch.rand(own.shape[:3], generator=g) < rotate_share
    P = batch.prompt_ids.shape[1]
    move[:, :P] = move[::4, :P].repeat_interleave(4, 0)  # one prompt, one prefill: a group shares its prompt's routing
    routing = torch.where(move.unsqueeze(-1), (own + 1) % 4, own)
    valid = torch.cat([batch.prompt_mask > 0, batch.response_mask > 0], 1)
    routing = routing.masked_fill(~valid[:, :, None, None], -1)
    routing[:, P:][torch.arange(len(batch)), batch.response_mask.sum(1).long() - 1] = -1  # never fed back
    logp, _ = _full_forward(engine.model, batch, expert_ids=routing)
    batch = TrainBatch.from_rollouts(dataclasses.replace(
        batch, rollout_logprobs=logp, prompt_expert_ids=routing[:, :P].to(torch.int16),
        response_expert_ids=routing[:, P:].to(torch.int16)))
    response = routing[:, P:, :, 0] >= 0
    return batch, tok, float(move[:, P:][response].float().mean())


@pytest.mark.parametrize("packing", ["none", "rows", "groups"])
def test_learner_replays_the_recorded_routing(moe_dir, packing):
    """With routing_replay the learner's old log-probs are the engine's (its record of another routing than the
    learner's own) to float precision, in padded and packed layouts; without it they differ, and
    moe/routing_agreement reports the share of response (token, layer) top-k sets the learner's router picks like
    the engine: one minus the share moved."""
    from tokenwise.rl.algorithm import Algorithm
    from tokenwise.trainer.config import AlgorithmConfig, OptimConfig
    from tokenwise.trainer.learner import Learner, local_pool
    batch, tok, moved = _replayed_batch(moe_dir, rotate_share=0.3)
    assert 0.2 < moved < 0.4
    mask = batch.response_mask > 0
    diffs, agreements = {}, {}
    for replay in (False, True):
        algo = Algorithm(AlgorithmConfig(), max_response_len=6)
        pool = local_pool(Learner(moe_dir, tok, optim=OptimConfig(lr=1e-9), total_updates=2,
                                  device=torch.device("cpu"), dtype=torch.float32, algorithm=algo,
                                  routing_replay=replay, packing=packing, logprobs="naive"), micro_batch_size=8)
        scored = pool.score(batch)
        diffs[replay] = (scored.old_logprobs - batch.rollout_logprobs)[mask].abs()
        scored = algo.make_batch(scored, torch.rand(len(batch), generator=torch.Generator().manual_seed(1)))
        metrics, _ = pool.train_step(scored, ppo_epochs=1, mini_batches=1)
        agreements[replay] = metrics["moe/routing_agreement"]
    assert diffs[True].max() < 1e-5
    assert diffs[False].mean() > 1e-2
    assert agreements[False] == pytest.approx(1 - moved, abs=0.01)


def test_routing_replay_needs_an_moe_model(tmp_path_factory):
    from conftest import builtin_model_dir
    from tokenwise.rl.errors import ConfigError
    from tokenwise.trainer.config import OptimConfig
    from tokenwise.trainer.learner import Learner
    from tokenwise.trainer.loading import load_tokenizer
    d = builtin_model_dir(tmp_path_factory, "dense")
    with pytest.raises(ConfigError, match="algorithm.routing_replay"):
        Learner(d, load_tokenizer(d), optim=OptimConfig(), total_updates=1, device=torch.device("cpu"),
                dtype=torch.float32, routing_replay=True)


def test_adapters_on_the_experts_keep_routing_losses_and_replay():
    """peft wraps an MoE block whose expert tensors it adapts (ParamWrapper): the model still finds the block, so it
    reports its routing, keeps the load-balance / z losses in the loss, and replays recorded experts."""
    from tokenwise.trainer.config import LoraSpec
    from tokenwise.trainer.lora import add_adapters
    model = add_adapters(_moe_model(), LoraSpec(r=4, target_modules=["q_proj"],
                                                target_parameters=["experts_gate_up", "experts_down"]), seed=0)
    base = model.get_base_model()
    assert type(base.model.layers[0].mlp).__name__ == "ParamWrapper"
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids)
    recorded = base.routed_experts()
    assert recorded is not None and recorded.shape == (2, 7, 3, 2)
    assert base.moe_loss() is not None and "moe/aux_loss" in base.routing_metrics()
    assert torch.equal(model(input_ids=ids, expert_ids=recorded).logits, out.logits)
    assert not torch.allclose(model(input_ids=ids, expert_ids=(recorded + 1) % 4).logits, out.logits)


def test_replay_without_recorded_experts_is_a_clear_error(moe_dir):
    """Rollouts that carry no record (an engine that could not record) never train silently without replay."""
    from tokenwise.rl.errors import ConfigError
    from tokenwise.trainer.config import OptimConfig
    from tokenwise.trainer.learner import Learner, local_pool
    batch, tok, _ = _replayed_batch(moe_dir, rotate_share=0.0)
    bare = dataclasses.replace(batch, prompt_expert_ids=None, response_expert_ids=None)
    pool = local_pool(Learner(moe_dir, tok, optim=OptimConfig(), total_updates=1, device=torch.device("cpu"),
                              dtype=torch.float32, routing_replay=True), micro_batch_size=8)
    with pytest.raises(ConfigError, match="algorithm.routing_replay: these rollouts carry no recorded MoE experts"):
        pool.score(bare)
    assert pool.score(batch).old_logprobs is not None
