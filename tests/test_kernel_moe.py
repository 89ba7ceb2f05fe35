"""MoE: router by hand (top-k, renormalisation, capacity drops, aux and z losses), the permute → grouped GEMM →
unpermute path against the per-expert loop, and the Triton grouped GEMM (CPU interpreter here) against float64."""

import math

import pytest
import torch

from tokenwise.kernels.moe import grouped_mm, moe_ffn, moe_ffn_reference, route

N, H, F, E = 29, 24, 20, 5  # odd sizes; not multiples of the block sizes


def _weights(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    router = torch.randn(E, H, generator=g)
    w1 = torch.randn(E, 2 * F, H, generator=g) / math.sqrt(H)
    w2 = torch.randn(E, H, F, generator=g) / math.sqrt(F)
    return [t.to(dtype) for t in (x, router, w1, w2)]


def test_router_hand_computed():
    # one token, 3 experts: logits = x W^T = [2, 1, 0] -> p = softmax = [0.6652, 0.2447, 0.0900]
    x = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    r = route(x, w, top_k=2, renormalize=False)
    assert r.expert_idx.tolist() == [[0, 1]]
    torch.testing.assert_close(r.weight, p[:2][None])
    r = route(x, w, top_k=2, renormalize=True)
    torch.testing.assert_close(r.weight, (p[:2] / p[:2].sum())[None])
    # f = [1/2, 1/2, 0] (two slots), P = p: aux = 3 (0.5 p0 + 0.5 p1); z = logsumexp([2, 1, 0])^2
    assert float(r.aux_loss) == pytest.approx(3 * 0.5 * float(p[0] + p[1]))
    assert float(r.z_loss) == pytest.approx(float(torch.logsumexp(torch.tensor([2.0, 1.0, 0.0]), 0)) ** 2)
    assert r.expert_load.tolist() == [0.5, 0.5, 0.0] and r.dropped_frac == 0.0


def test_uniform_routing_gives_aux_loss_one():
    r = route(torch.zeros(16, 8), torch.randn(4, 8), top_k=2)
    assert float(r.aux_loss) == pytest.approx(1.0)


def test_capacity_drops_later_tokens_and_dropped_tokens_contribute_zero():
    # 4 tokens, 2 experts, top-1, cf 0.5: capacity = 1 * ceil(0.5 * 4 / 2) = 1 slot per expert
    x = torch.tensor([[1.0], [2.0], [-1.0], [3.0]])
    w = torch.tensor([[1.0], [-1.0]])  # positive x -> expert 0, negative -> expert 1
    r = route(x, w, top_k=1, capacity_factor=0.5)
    assert r.expert_idx.squeeze(1).tolist() == [0, 0, 1, 0]
    assert r.kept.squeeze(1).tolist() == [True, False, True, False]  # expert 0 serves token 0 only
    assert r.dropped_frac == 0.5 and r.weight[1].item() == 0.0
    x, router, w1, w2 = _weights()
    out, routing = moe_ffn(x, router, w1, w2, top_k=2, capacity_factor=0.3)
    dropped = ~routing.kept.any(1)
    assert dropped.any() and not out[dropped].any()  # tokens whose every slot was dropped get exactly zero


def test_large_capacity_equals_dropless():
    x, router, w1, w2 = _weights()
    a, ra = moe_ffn(x, router, w1, w2, top_k=2)
    b, rb = moe_ffn(x, router, w1, w2, top_k=2, capacity_factor=float(E))
    assert rb.kept.all()
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("top_k, renormalize, capacity", [(1, False, None), (2, True, None), (2, True, 0.6),
                                                          (3, False, 1.0)])
def test_fast_path_equals_the_per_expert_loop(top_k, renormalize, capacity):
    x, router, w1, w2 = _weights()
    leaves = [t.clone().requires_grad_() for t in (x, router, w1, w2)]
    out, routing = moe_ffn(*leaves, top_k=top_k, renormalize=renormalize, capacity_factor=capacity)
    ref_leaves = [t.clone().requires_grad_() for t in (x, router, w1, w2)]
    ref_routing = route(ref_leaves[0], ref_leaves[1], top_k=top_k, renormalize=renormalize, capacity_factor=capacity)
    ref = moe_ffn_reference(ref_leaves[0], ref_leaves[2], ref_leaves[3], ref_routing)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    (out * g).sum().add(routing.aux_loss + routing.z_loss).backward()
    (ref * g).sum().add(ref_routing.aux_loss + ref_routing.z_loss).backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)


@pytest.fixture
def poisoned(monkeypatch):
    import tokenwise.kernels.moe.triton as tk
    monkeypatch.setattr(tk, "_alloc", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                               device=device))


@pytest.mark.triton
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)], ids=["fp32", "fp16"])
def test_triton_grouped_gemm_matches_float64(poisoned, dtype, tol):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    offsets = [0, 7, 7, 30, 33, 41]  # expert 1 gets no rows; segments not multiples of the tile
    M, K, Nout = offsets[-1], 21, 18
    x = (torch.randn(M, K, generator=g) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(len(offsets) - 1, Nout, K, generator=g) * 0.5).to(device, dtype).requires_grad_()
    y = grouped_mm(x, w, offsets, impl="triton")
    dy = torch.randn(M, Nout, generator=g).to(device, dtype)
    y.backward(dy)
    xr, wr = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    yr = grouped_mm(xr, wr, offsets, impl="reference")
    yr.backward(dy.double().cpu())
    torch.testing.assert_close(y.double().cpu(), yr.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(w.grad.double().cpu(), wr.grad, atol=tol, rtol=tol)
    assert not w.grad[1].any()  # the expert without rows gets an exact zero gradient


@pytest.mark.triton
def test_triton_moe_ffn_equals_the_per_expert_loop(poisoned):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, router, w1, w2 = [t.to(device) for t in _weights(torch.float32)]
    out, routing = moe_ffn(x, router, w1, w2, top_k=2, impl="triton")
    ref = moe_ffn_reference(x, w1, w2, routing)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_top_k_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="top_k must be in 1..5"):
        route(torch.zeros(2, H), torch.zeros(E, H), top_k=6)
