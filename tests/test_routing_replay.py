"""MoE routing replay (issue 21, first part): the router can be told which experts each token goes through, and
replaying a forward's own routing reproduces that forward exactly; the gate weights stay the router's, so the router
keeps its gradient."""

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
