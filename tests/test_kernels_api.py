"""The kernel API's reference paths against straightforward formulas (CPU), and its dispatch."""
import math

import pytest
import torch

import kernels
from kernels.reference import attention_map_ref, attention_ref, cosine_similarity_ref, gather_tokens_ref


def naive_attention(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("N", [1, 50, 197])
def test_attention_matches_formula(N):
    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(2, 3, N, 64, generator=g) for _ in range(3))
    torch.testing.assert_close(kernels.attention(q, k, v), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_strided_views_of_fused_qkv():
    B, N, H, D = 2, 50, 3, 32
    qkv = torch.randn(B, N, 3 * H * D).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
    q, k, v = qkv
    assert not q.is_contiguous()
    torch.testing.assert_close(kernels.attention(q, k, v),
                               naive_attention(q.contiguous(), k.contiguous(), v.contiguous()),
                               atol=1e-5, rtol=1e-5)


def test_attention_gradcheck():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(kernels.attention, (q, k, v))


@pytest.mark.parametrize("N", [1, 50, 197])
def test_attention_map_rows_and_mean(N):
    q, k = torch.randn(2, 2, N, 16), torch.randn(2, 2, N, 16)
    p = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)                 # (B, H, N, N)
    rows = torch.tensor([0, N - 1])
    out = kernels.attention_map(q, k, rows)
    torch.testing.assert_close(out, p[:, :, rows], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(kernels.attention_map(q, k), p.mean(2), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("N,K", [(1, 1), (50, 13), (197, 49)])
def test_gather_matches_indexing(N, K):
    x, pos = torch.randn(3, N, 8), torch.randn(1, N, 8)
    idx = torch.stack([torch.randperm(N)[:K] for _ in range(3)])
    want = torch.stack([(x[b] + pos[0])[idx[b]] for b in range(3)])
    torch.testing.assert_close(kernels.gather_tokens(x, idx, pos), want)
    torch.testing.assert_close(kernels.gather_tokens(x, idx), torch.stack([x[b][idx[b]] for b in range(3)]))


def test_gather_grad_accumulates_on_repeats():
    x = torch.randn(2, 6, 4, requires_grad=True)
    pos = torch.randn(1, 6, 4, requires_grad=True)
    idx = torch.tensor([[1, 1, 1, 5], [0, 2, 2, 0]])
    g = torch.randn(2, 4, 4)
    kernels.gather_tokens(x, idx, pos).backward(g)
    want = torch.zeros(2, 6, 4)
    for b in range(2):
        want[b].index_add_(0, idx[b], g[b])
    torch.testing.assert_close(x.grad, want)
    torch.testing.assert_close(pos.grad, want.sum(0, keepdim=True))


def test_gather_rejects_bad_indices():
    x = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="int64"):
        kernels.gather_tokens(x, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        kernels.gather_tokens(x, torch.zeros(3, 3, dtype=torch.int64))


@pytest.mark.parametrize("Na,Nb", [(1, 1), (50, 197), (197, 3)])
def test_cosine_matches_formula(Na, Nb):
    a, b = torch.randn(2, Na, 24), torch.randn(2, Nb, 24)
    want = torch.nn.functional.cosine_similarity(a[:, :, None], b[:, None], dim=-1)
    torch.testing.assert_close(kernels.cosine_similarity(a, b), want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(kernels.cosine_similarity(a, a).diagonal(dim1=1, dim2=2), torch.ones(2, Na), atol=1e-5)


def test_cosine_gradcheck_and_zero_vector():
    a = torch.randn(1, 3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kernels.cosine_similarity, (a, b))
    z = kernels.cosine_similarity(torch.zeros(1, 1, 5), torch.randn(1, 2, 5))
    assert torch.isfinite(z).all() and (z == 0).all()


def test_dispatch(monkeypatch):
    assert not kernels.use_triton(torch.zeros(1))                             # CPU -> reference
    if torch.cuda.is_available():
        t = torch.zeros(1, device="cuda")
        assert kernels.use_triton(t)
        monkeypatch.setenv("PRETEXT_KERNELS", "torch")
        assert not kernels.use_triton(t)


def test_references_are_what_the_api_calls_on_cpu():
    q, k, v = (torch.randn(1, 1, 7, 8) for _ in range(3))
    assert torch.equal(kernels.attention(q, k, v), attention_ref(q, k, v))
    assert torch.equal(kernels.attention_map(q, k), attention_map_ref(q, k))
    idx = torch.tensor([[0, 3]])
    assert torch.equal(kernels.gather_tokens(q[0], idx), gather_tokens_ref(q[0], idx))
    assert torch.equal(kernels.cosine_similarity(q[0], k[0]), cosine_similarity_ref(q[0], k[0]))


def test_api_names_survive_submodule_imports():
    import importlib
    importlib.import_module("kernels.attention")
    assert callable(kernels.attention) and kernels.attention.__module__ == "kernels"
