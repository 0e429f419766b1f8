"""The kernel API on CPU: its reference paths against straightforward formulas, its routing and report
(kernels.report, PRETEXT_KERNELS), and the torch.ops.pretext.* custom ops (opcheck, a fullgraph torch.compile of
a small ViT forward + backward with the ops in the graph)."""
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
    monkeypatch.delenv("PRETEXT_KERNELS", raising=False)
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
    importlib.import_module("kernels.ops")
    assert callable(kernels.attention) and kernels.attention is kernels.ops.attention


# -----------------------------------------------------------------------------
# the report: which path each op took and why; PRETEXT_KERNELS

def test_report_says_which_path_and_why(monkeypatch):
    monkeypatch.delenv("PRETEXT_KERNELS", raising=False)
    kernels.reset_report()
    assert kernels.report() == {} and kernels.report_line() == "no kernel op called yet"
    q = torch.randn(2, 3, 50, 16)
    kernels.attention(q, q, q)
    kernels.attention(torch.randn(1, 2, 7, 40), torch.randn(1, 2, 7, 40), torch.randn(1, 2, 7, 40))
    kernels.gather_tokens(torch.randn(2, 5, 8, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.int64))
    r = kernels.report()
    assert set(r) == {"attention", "gather_tokens"}
    assert r["attention"]["path"] == "torch" and r["gather_tokens"]["path"] == "torch"
    why = r["attention"]["why"]
    assert "CPU tensors" in why and "cpu fp32 D=16" in why and "(2, 3, 50, 16)" in why and "D=40" in why
    assert "cpu fp64" in r["gather_tokens"]["why"]
    line = kernels.report_line()
    assert "attention" in line and "gather_tokens" in line and "torch (CPU tensors)" in line
    kernels.reset_report()
    kernels.cosine_similarity(torch.randn(1, 3, 4), torch.randn(1, 5, 4))
    assert list(kernels.report()) == ["cosine_similarity"]


def test_report_reasons_for_kernel_limits():
    """What route() says when the tensors are on a GPU but the kernel cannot take them (checked on meta tensors,
    so no GPU is needed: the reasons are computed before any device check)."""
    ops = kernels.ops
    q = torch.empty(2, 3, 10, 40, device="meta")
    assert "head dim 40" in ops._attention_problem(q, q, q)
    assert ops._attention_problem(torch.empty(2, 3, 10, 16, device="meta"), q[..., :16], q[..., :16]) == ""
    assert "self-attention" in ops._attention_problem(q, q[:, :, :5], q[:, :, :5])
    assert "fp64" in ops._attention_problem(*(torch.empty(1, 1, 4, 16, dtype=torch.float64),) * 3)
    a = torch.empty(1, 3, 2048, device="meta")
    assert "2048 > 1024" in ops._cosine_problem(a, a)
    assert ops._cosine_problem(a[..., :192], a[..., :192]) == ""


def test_pretext_kernels_triton_makes_a_fallback_an_error(monkeypatch):
    monkeypatch.setenv("PRETEXT_KERNELS", "triton")
    q = torch.randn(1, 2, 5, 16)
    if not kernels.ops._INTERPRET:
        with pytest.raises(RuntimeError, match=r"kernels.attention would fall back to PyTorch: CPU tensors"):
            kernels.attention(q, q, q)
    q40 = torch.randn(1, 2, 5, 40)
    with pytest.raises(RuntimeError, match=r"kernels.attention would fall back.*head dim 40|CPU tensors"):
        kernels.attention(q40, q40, q40)
    with pytest.raises(RuntimeError, match=r"kernels.cosine_similarity would fall back"):
        kernels.cosine_similarity(torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(1, 2, 3, dtype=torch.float64))
    monkeypatch.setenv("PRETEXT_KERNELS", "fast")
    with pytest.raises(ValueError, match="PRETEXT_KERNELS='fast': must be one of auto, torch, triton"):
        kernels.attention(q, q, q)


def test_pretext_kernels_torch_is_reported(monkeypatch):
    monkeypatch.setenv("PRETEXT_KERNELS", "torch")
    kernels.reset_report()
    kernels.gather_tokens(torch.randn(1, 4, 8), torch.tensor([[3, 0]]))
    assert kernels.report()["gather_tokens"] == {"path": "torch", "why": kernels.report()["gather_tokens"]["why"]}
    assert kernels.report()["gather_tokens"]["why"].startswith("torch: PRETEXT_KERNELS=torch [cpu fp32")


# -----------------------------------------------------------------------------
# the custom ops on CPU: their implementation is the reference (opcheck: schema, fake tensors, autograd)

def test_opcheck_cpu_reference_impls(monkeypatch):
    monkeypatch.delenv("PRETEXT_KERNELS", raising=False)
    ops = kernels.ops
    B, H, N, D = 2, 2, 9, 16
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    torch.library.opcheck(ops.attention_fwd_op, (q, k, v, 0.25))
    torch.library.opcheck(ops.attention_map_op, (q.detach(), k.detach(), torch.tensor([1, 3]), 0.25))
    torch.library.opcheck(ops.attention_map_op, (q.detach(), k.detach(), None, 0.25))
    x = torch.randn(2, 10, 16, requires_grad=True)
    pos = torch.randn(1, 10, 16, requires_grad=True)
    idx = torch.tensor([[1, 1, 4, 9], [0, 2, 3, 5]])
    torch.library.opcheck(ops.gather_tokens_fwd_op, (x, idx, pos))
    torch.library.opcheck(ops.gather_tokens_fwd_op, (x, idx, None))
    a = torch.randn(2, 7, 16, requires_grad=True)
    b = torch.randn(2, 5, 16, requires_grad=True)
    torch.library.opcheck(ops.cosine_similarity_fwd_op, (a, b, 1e-12))


def test_custom_op_backward_formulas_match_autograd_of_the_references():
    """The CPU implementations of the *_bwd ops are explicit formulas: checked in fp64 against autograd."""
    ops = kernels.ops
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 16, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    o, lse = ops.attention_fwd_op(q, k, v, 0.3)
    ro = attention_ref(q, k, v, 0.3)
    torch.testing.assert_close(o, ro)
    s = q @ k.transpose(-2, -1) * 0.3
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) * ops.LOG2E, rtol=1e-6, atol=1e-6)
    do = torch.randn_like(ro)
    torch.testing.assert_close(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ro, (q, k, v), do))
    a = torch.randn(2, 6, 8, dtype=torch.float64, generator=g)
    a[0, 0] *= 1e-14                                                          # a clamped norm (< eps)
    a.requires_grad_()
    b = torch.randn(2, 4, 8, dtype=torch.float64, generator=g, requires_grad=True)
    s, _, _ = ops.cosine_similarity_fwd_op(a, b, 1e-12)
    rs = cosine_similarity_ref(a, b, 1e-12)
    gs = torch.randn_like(rs)
    torch.testing.assert_close(torch.autograd.grad(s, (a, b), gs), torch.autograd.grad(rs, (a, b), gs))
    x = torch.randn(2, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.tensor([[1, 1, 1, 5], [0, 2, 2, 0]])
    out = ops.gather_tokens_fwd_op(x, idx, None)
    go = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, go), torch.autograd.grad(gather_tokens_ref(x, idx), x, go))


def test_vit_compiles_fullgraph_on_cpu_with_the_pretext_ops():
    """A small ViT forward (gather of kept tokens, attention) + cosine similarity + backward under
    torch.compile(fullgraph=True) on CPU: one graph, the three ops in it as torch.ops.pretext.*, and the same
    loss and gradients as eager."""
    import vit
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch.manual_seed(0)
    model = vit.ViT(vit.ViTConfig(img_size=32, patch_size=8, in_chans=1, embed_dim=64, depth=2, num_heads=4))
    x = torch.randn(2, 1, 32, 32)
    ids_keep = torch.stack([torch.randperm(16)[:9] for _ in range(2)])       # (2, 9) of the 16 patches

    def step(x, ids_keep):
        t = model(x, ids_keep=ids_keep)                                       # (2, 1 + 9, 64)
        return t.pow(2).mean() + kernels.cosine_similarity(t, t).mean()

    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.compile(step, fullgraph=True, backend=backend)(x, ids_keep)
    grads = torch.autograd.grad(loss, params)
    assert len(graphs) == 1
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {"pretext.attention_fwd.default", "pretext.gather_tokens_fwd.default",
            "pretext.cosine_similarity_fwd.default"} <= ops, sorted(ops)
    ref = step(x, ids_keep)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)
    assert "attention" in kernels.report()
