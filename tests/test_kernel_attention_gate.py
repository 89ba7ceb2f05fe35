"""Attention output gate Y ⊙ σ(G): reference and Triton kernel (CPU interpreter here) against float64, headwise and
elementwise, forward and both gradients, odd shapes."""

import math

import pytest
import torch

from tokenwise.kernels.attention_gate import attention_gate

B, S, H, DH = 2, 5, 3, 20  # DH not a power of two
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _inputs(dtype, mode, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, S, H, DH, generator=g)
    gate = torch.randn(B, S, H, generator=g) * 2 if mode == "headwise" else torch.randn(B, S, H, DH, generator=g) * 2
    dout = torch.randn(B, S, H, DH, generator=g)
    return y.to(device, dtype), gate.to(device, dtype), dout.to(device, dtype)


def _check(impl, dtype, mode, device="cpu"):
    y, gate, dout = _inputs(dtype, mode, device)
    yy, gg = y.clone().requires_grad_(), gate.clone().requires_grad_()
    out = attention_gate(yy, gg, impl=impl)
    out.backward(dout)
    ry, rg = y.double().cpu().requires_grad_(), gate.double().cpu().requires_grad_()
    s = torch.sigmoid(rg)
    ref = ry * (s.unsqueeze(-1) if mode == "headwise" else s)
    ref.backward(dout.double().cpu())
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == y.shape
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(yy.grad.double().cpu(), ry.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(gg.grad.double().cpu(), rg.grad, atol=4 * tol, rtol=4 * tol)  # a sum over Dh (headwise)


@pytest.mark.parametrize("mode", ["headwise", "elementwise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_reference_matches_float64(mode, dtype):
    _check("reference", dtype, mode)


@pytest.fixture
def poisoned(monkeypatch):
    import tokenwise.kernels.attention_gate.triton as tk
    monkeypatch.setattr(tk, "_alloc", lambda like: torch.full_like(like, math.nan))


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["headwise", "elementwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_kernel_matches_float64(poisoned, mode, dtype):
    _check("triton", dtype, mode, device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("mode", ["headwise", "elementwise"])
def test_triton_kernel_bf16_on_gpu(poisoned, mode):
    _check("triton", torch.bfloat16, mode, device="cuda")


def test_gate_of_large_logits_is_identity_and_bad_shapes_are_clear():
    y, _, _ = _inputs(torch.float32, "headwise")
    torch.testing.assert_close(attention_gate(y, torch.full((B, S, H), 40.0)), y)  # σ = 1: ungated attention
    with pytest.raises(ValueError, match="headwise"):
        attention_gate(y, torch.zeros(B, S, H, 3))
