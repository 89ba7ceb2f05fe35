"""Fused log-prob + entropy: the chunked reference and the Triton kernel (CPU interpreter here, compiled on CUDA)
against a float64 torch reference on odd shapes, forward and both gradients, temperatures, ignore_index."""

import math

import pytest
import torch

from tokenwise.kernels.logprob_entropy import logprob_entropy

N, V, D = 37, 203, 45  # none a multiple of the block sizes
# Tolerances against the float64 reference, per input dtype: (log p, entropy, gradients); bf16 is ALGORITHMS.md §8's
# table (bf16 inputs, fp32 outputs), checked on GPU only (the interpreter's bf16 arithmetic is wrong).
TOL = {torch.float64: (1e-10, 1e-10, 1e-10), torch.float32: (2e-5, 2e-5, 2e-5), torch.float16: (2e-3, 5e-3, 2e-2),
       torch.bfloat16: (1e-3, 5e-3, 2e-2)}


def _inputs(dtype, device="cpu", seed=0, ignore=(3, 20)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g) * 0.5
    weight = torch.randn(V, D, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignore)] = -100
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return [t.to(device) for t in (hidden.to(dtype), weight.to(dtype), labels, g_lp, g_ent)]


def _reference(hidden, weight, labels, temperature, g_lp, g_ent):
    """float64, full logits, autograd."""
    h = hidden.detach().double().cpu().requires_grad_()
    w = weight.detach().double().cpu().requires_grad_()
    t = torch.as_tensor(temperature, dtype=torch.float64).cpu()
    logp_all = torch.log_softmax((h @ w.T) / (t[:, None] if t.dim() else t), dim=-1)
    lab = labels.cpu()
    valid = lab != -100
    logp = logp_all.gather(1, lab.clamp(min=0)[:, None]).squeeze(1) * valid
    ent = -(logp_all.exp() * logp_all).sum(-1) * valid
    (logp * g_lp.double().cpu() + ent * g_ent.double().cpu()).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def _check(impl, dtype, temperature, device="cpu", **kw):
    hidden, weight, labels, g_lp, g_ent = _inputs(dtype, device)
    if isinstance(temperature, list):
        temperature = torch.tensor(temperature * (N // len(temperature) + 1))[:N].to(device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = logprob_entropy(h, w, labels, temperature=temperature, impl=impl, **kw)
    assert logp.dtype == torch.float32 or dtype == torch.float64
    (logp * g_lp + ent * g_ent).sum().backward()
    ref_lp, ref_ent, ref_dh, ref_dw = _reference(hidden, weight, labels, temperature, g_lp, g_ent)
    tol_lp, tol_ent, tol_grad = TOL[dtype]
    torch.testing.assert_close(logp.double().cpu(), ref_lp, atol=tol_lp, rtol=0)
    torch.testing.assert_close(ent.double().cpu(), ref_ent, atol=tol_ent, rtol=0)
    torch.testing.assert_close(h.grad.double().cpu(), ref_dh, atol=tol_grad, rtol=tol_grad)
    torch.testing.assert_close(w.grad.double().cpu(), ref_dw, atol=tol_grad, rtol=tol_grad)
    ignored = (labels == -100).cpu()
    assert not logp.cpu()[ignored].any() and not ent.cpu()[ignored].any()
    assert not h.grad.cpu()[ignored].any()  # ignored rows get no gradient
    return logp, ent


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5, [0.7, 1.0, 1.3]], ids=["T0.5", "T1", "T1.5", "per-token"])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_chunked_reference_matches_float64(temperature, chunk_size):
    _check("chunked", torch.float64, temperature, chunk_size=chunk_size)
    _check("chunked", torch.float32, temperature, chunk_size=chunk_size)


def test_naive_path_matches_float64():
    _check("naive", torch.float32, 0.7)


@pytest.fixture
def poisoned(monkeypatch):
    """Output buffers filled with NaN: any element the kernel fails to write shows up."""
    import tokenwise.kernels.logprob_entropy.triton as tk
    monkeypatch.setattr(tk, "_alloc", lambda n, device: torch.full((n,), math.nan, device=device))


@pytest.mark.triton
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5, [0.7, 1.0, 1.3]], ids=["T0.5", "T1", "T1.5", "per-token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_kernel_matches_float64(poisoned, temperature, dtype):
    logp, ent = _check("triton", dtype, temperature, device="cuda" if torch.cuda.is_available() else "cpu")
    assert not torch.isnan(logp).any() and not torch.isnan(ent).any()


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("temperature", [0.5, 1.0, [0.7, 1.0, 1.3]], ids=["T0.5", "T1", "per-token"])
def test_triton_kernel_bf16_on_gpu(poisoned, temperature):
    _check("triton", torch.bfloat16, temperature, device="cuda")


def test_only_one_output_used_still_gets_a_gradient():
    hidden, weight, labels, _, _ = _inputs(torch.float64)
    h = hidden.clone().requires_grad_()
    logp, _ = logprob_entropy(h, weight, labels, impl="chunked", chunk_size=5)
    logp.sum().backward()
    ref = _reference(hidden, weight, labels, 1.0, torch.ones(N), torch.zeros(N))[2]
    torch.testing.assert_close(h.grad, ref, atol=1e-10, rtol=0)


def test_bad_shapes_are_clear_errors():
    hidden, weight, labels, _, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="share D"):
        logprob_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="labels must be"):
        logprob_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="impl must be one of"):
        logprob_entropy(hidden, weight, labels, impl="fast")


@pytest.mark.triton
@pytest.mark.parametrize("budget_columns", [32, 64, 96])
def test_triton_backward_in_vocabulary_chunks_matches_float64(poisoned, monkeypatch, budget_columns):
    """The backward's dz buffer is [N, C] for a vocabulary chunk of C columns (C from DLOGITS_BUDGET_BYTES): several
    chunks, the last one partial (V = 203), give the float64 gradients, and the same bits on a second run (no
    atomics: each gradient row is written once)."""
    import tokenwise.kernels.logprob_entropy.triton as tk
    monkeypatch.setattr(tk, "DLOGITS_BUDGET_BYTES", N * 4 * budget_columns)
    assert tk.vocab_chunk(N, V, 4, 32) == budget_columns
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check("triton", torch.float32, [0.7, 1.0, 1.3], device=device)
    hidden, weight, labels, g_lp, g_ent = _inputs(torch.float32, device)
    grads = []
    for _ in range(2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = logprob_entropy(h, w, labels, temperature=0.8, impl="triton")
        (logp * g_lp + ent * g_ent).sum().backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
