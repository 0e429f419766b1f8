"""Triton kernels (kernels/attention.py, gather.py, similarity.py) against the references in kernels/reference.py.

On a CPU-only machine the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set below before any kernel
module is imported) on CPU tensors, in fp32 and fp16, plus one bf16 case per kernel for the interpreter's bf16
upcast path. With a GPU the same tests run on CUDA in fp32, fp16 and bf16 (and the CPU cases are skipped unless
TRITON_INTERPRET=1 was set by the caller). Interpreter programs run one at a time, so shapes keep B*H small.

Every output buffer is poisoned with NaN before launch (POISON_OUTPUTS), so an element a kernel forgets to write
fails. References are computed in float64 from the same (rounded) inputs. Tolerances, |got - ref| <= atol + rtol*|ref|:

    op                       fp32 (ieee dots)   fp16               bf16
    attention fwd            1e-4 / 1e-4        2e-3 / 2e-3        2e-2 / 2e-2
    attention bwd (dq,dk,dv) 1e-4 / 1e-4        5e-3 / 5e-3        5e-2 / 5e-2
    attention_map            2e-5 / 1e-4        same (fp32 output, products exact in fp32)
    gather fwd, grad_x       exact              exact              exact (one fp32 add, one rounding, like the ref;
                                                                   2^-7 relative in the interpreter, which truncates)
      grad_x, repeated idx   1e-5 / 1e-6        1e-6 / eps         1e-6 / eps (the ref sums duplicates in its order)
    gather grad_pos (1,N,D)  as grad_x          |err| <= 2 eps sum_b |grad_x[b]| (rows are rounded to the dtype,
                                                then summed over the batch; 4 eps for bf16 in the interpreter)
    cosine fwd               1e-4 / 1e-4        2e-3 / 2e-3        2e-2 / 2e-2
    cosine bwd               1e-4 / 1e-4        5e-3 / 5e-3        5e-2 / 5e-2
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs (the interpreter is picked there)

import importlib  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels.reference import attention_map_ref, attention_ref, cosine_similarity_ref, gather_tokens_ref  # noqa: E402

attn_mod = importlib.import_module("kernels.attention")
gather_mod = importlib.import_module("kernels.gather")
sim_mod = importlib.import_module("kernels.similarity")
# kernels/__init__.py imports these modules before defining its functions, so kernels.attention stays the API
assert callable(kernels.attention)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

cpu = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# (device, dtype): fp32 + fp16 in the interpreter, the same plus bf16 on a GPU
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, marks=cpu, id="cpu-fp32"),
    pytest.param("cpu", torch.float16, marks=cpu, id="cpu-fp16"),
    pytest.param("cuda", torch.float32, marks=gpu, id="cuda-fp32"),
    pytest.param("cuda", torch.float16, marks=gpu, id="cuda-fp16"),
    pytest.param("cuda", torch.bfloat16, marks=gpu, id="cuda-bf16"),
]
BF16_CPU = pytest.param("cpu", torch.bfloat16, marks=cpu, id="cpu-bf16")  # one case per kernel: the UPCAST path

FWD_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)
BWD_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (5e-2, 5e-2)}
MAP_TOL = (2e-5, 1e-4)


@pytest.fixture(autouse=True)
def poison_and_seed(monkeypatch, request):
    monkeypatch.setattr(importlib.import_module("kernels._common"), "POISON_OUTPUTS", True)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))  # fresh data per case, reproducible


def close(got, ref, tol, name=""):
    atol, rtol = tol
    got, ref = got.double(), ref.double()
    err = (got - ref).abs()
    print(f"{name}: max abs diff {err.max().item() if err.numel() else 0:.3e}, "
          f"mean {err.mean().item() if err.numel() else 0:.3e}")
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# -----------------------------------------------------------------------------
# attention

def make_qkv(B, H, N, D, dtype, device, layout):
    """A leaf tensor and q, k, v views of it: 'qkv' = the fused projection's strided (B, N, 3, H, D) views."""
    if layout == "qkv":
        leaf = torch.randn(B, N, 3 * H * D, device=device).to(dtype).requires_grad_()
        q, k, v = leaf.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    else:
        leaf = torch.randn(3, B, H, N, D, device=device).to(dtype).requires_grad_()
        q, k, v = leaf.unbind(0)
    return leaf, q, k, v


ATTN_SHAPES = [  # (B, H, N, D, layout)
    (2, 2, 1, 64, "qkv"),
    (2, 1, 50, 64, "qkv"),
    (1, 2, 197, 64, "qkv"),
    (2, 1, 197, 64, "contiguous"),
    (1, 2, 50, 32, "qkv"),
    (1, 1, 197, 128, "qkv"),
]
# every head dim the kernels take (attention.HEAD_DIMS: multiples of 16 up to 128; 48, 80, 96, 112 are padded to
# the next power of two and masked) at N = 1, 50, 197: the I-JEPA predictor (16), MAE decoder (32), ViT-S/B/L (64),
# ViT-H/14 (80)
HEAD_DIM_SHAPES = [(2, 2, 1, D, "qkv") for D in attn_mod.HEAD_DIMS] + \
    [(2, 1, 50, D, "qkv") for D in attn_mod.HEAD_DIMS] + [(1, 2, 197, D, "qkv") for D in attn_mod.HEAD_DIMS]


def check_attention(B, H, N, D, layout, device, dtype, scale=None):
    leaf, q, k, v = make_qkv(B, H, N, D, dtype, device, layout)
    if layout == "qkv":
        assert not q.is_contiguous()
    o = attn_mod.attention(q, k, v, scale)
    assert o.shape == (B, H, N, D) and o.dtype == dtype
    do = torch.randn(B, H, N, D, device=device).to(dtype)
    (g,) = torch.autograd.grad(o, leaf, do)

    ref_leaf = leaf.detach().double().requires_grad_()
    rq, rk, rv = (ref_leaf.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4) if layout == "qkv" else ref_leaf.unbind(0))
    ro = attention_ref(rq, rk, rv, scale)
    (rg,) = torch.autograd.grad(ro, ref_leaf, do.double())
    close(o, ro, FWD_TOL[dtype], "attention fwd")
    close(g, rg, BWD_TOL[dtype], "attention bwd (dq, dk, dv)")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,H,N,D,layout", ATTN_SHAPES)
def test_attention(B, H, N, D, layout, device, dtype):
    check_attention(B, H, N, D, layout, device, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,H,N,D,layout", HEAD_DIM_SHAPES)
def test_attention_every_head_dim(B, H, N, D, layout, device, dtype):
    check_attention(B, H, N, D, layout, device, dtype)


@pytest.mark.parametrize("device,dtype", [BF16_CPU, pytest.param("cuda", torch.bfloat16, marks=gpu, id="cuda-bf16")])
@pytest.mark.parametrize("D", [16, 80])
def test_attention_bf16_small_and_padded_head_dims(D, device, dtype):
    check_attention(1, 2, 197, D, "qkv", device, dtype)


@pytest.mark.parametrize("device,dtype", [BF16_CPU, pytest.param("cuda", torch.bfloat16, marks=gpu, id="cuda-bf16")])
def test_attention_bf16_and_scale(device, dtype):
    check_attention(2, 1, 50, 64, "qkv", device, dtype, scale=0.3)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("N,D", [(1, 64), (50, 64), (197, 64), (197, 16), (50, 80)])
def test_attention_map(N, D, device, dtype):
    check_attention_map(N, D, device, dtype)


def check_attention_map(N, D, device, dtype):
    B, H = 1, 2
    _, q, k, _ = make_qkv(B, H, N, D, dtype, device, "qkv")
    mean = attn_mod.attention_map(q, k)
    assert mean.shape == (B, H, N) and mean.dtype == torch.float32
    close(mean, attention_map_ref(q.double(), k.double()), MAP_TOL, "attention_map mean")
    close(mean.sum(-1), torch.ones(B, H, device=device), MAP_TOL, "attention_map mean sums")
    idx = torch.tensor([0, N - 1, -1, N // 2, 0], device=device)  # first, last, negative, middle, repeated
    rows = attn_mod.attention_map(q, k, idx, scale=0.2)
    assert rows.shape == (B, H, 5, N) and rows.dtype == torch.float32
    close(rows, attention_map_ref(q.double(), k.double(), idx, scale=0.2), MAP_TOL, "attention_map rows")
    close(rows.sum(-1), torch.ones(B, H, 5, device=device), MAP_TOL, "attention_map row sums")


# On a GPU only (the interpreter would take minutes): N = 333, past 256 and ragged in every block size, for every
# head dim, and the attention maps at every head dim and N = 1, 50, 197, 333. With the cases above this is the grid
# `python bench.py gpu-check` runs: every op against float64 at N = 1, 50, 197, 333, every head dim, fp32/fp16/bf16.
GPU_DTYPES = [p for p in DEVICE_DTYPES if p.values[0] == "cuda"]


@pytest.mark.parametrize("device,dtype", GPU_DTYPES)
@pytest.mark.parametrize("B,H,N,D,layout", [(1, 2, 333, D, "qkv") for D in attn_mod.HEAD_DIMS])
def test_attention_every_head_dim_n333(B, H, N, D, layout, device, dtype):
    check_attention(B, H, N, D, layout, device, dtype)


@pytest.mark.parametrize("device,dtype", GPU_DTYPES)
@pytest.mark.parametrize("N", [1, 50, 197, 333])
@pytest.mark.parametrize("D", attn_mod.HEAD_DIMS)
def test_attention_map_every_head_dim(N, D, device, dtype):
    check_attention_map(N, D, device, dtype)


@gpu
def test_attention_runtime_n_no_recompile():
    """N is a runtime argument: new lengths reuse the compiled kernel (Triton specialises only N%16 == 0, N == 1)."""
    if INTERPRET:
        pytest.skip("nothing is compiled in the interpreter")
    kernel = attn_mod._attn_fwd_kernel
    n_compiled = lambda: sum(len(c) for c in kernel.device_caches.values()) if hasattr(kernel, "device_caches") \
        else sum(len(c) for c in kernel.cache.values())
    for N in (37, 41):  # warm up the "not divisible by 16" variant
        _, q, k, v = make_qkv(2, 2, N, 64, torch.bfloat16, "cuda", "qkv")
        attn_mod.attention(q, k, v)
    before = n_compiled()
    for N in (43, 53, 59, 197):
        _, q, k, v = make_qkv(2, 2, N, 64, torch.bfloat16, "cuda", "qkv")
        attn_mod.attention(q, k, v)
    assert n_compiled() == before


def test_attention_rejects_bad_head_dim():
    q = torch.randn(1, 1, 4, 40, device="cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ValueError, match="head dim must be one of"):
        attn_mod.attention(q, q, q)


# -----------------------------------------------------------------------------
# gather

def make_idx(B, N, K, repeated, device):
    if repeated:
        idx = torch.randint(0, N, (B, K), device=device)
        idx[:, -1] = idx[:, 0]  # at least one repeat per row
    else:
        idx = torch.stack([torch.randperm(N, device=device)[:K] for _ in range(B)])
    return idx


GATHER_CASES = [  # (B, N, K, D, pos: None | 1 | "B", repeated)
    (2, 1, 1, 64, None, False),
    (2, 50, 12, 64, 1, False),  # MAE keep-set: unique, (1, N, D) pos
    (2, 197, 50, 64, "B", False),
    (2, 50, 200, 64, 1, True),  # repeats, K > BLOCK_K (two scan chunks)
    (3, 197, 40, 384, None, True),  # D > BLOCK_D (three channel blocks), repeats
    (2, 50, 20, 24, 1, False),  # D not a power of two (padded, masked columns)
    (2, 197, 49, 192, "B", True),  # ViT-T width: one full and one half channel block
]
GATHER_CASES_GPU = [  # N = 333, on a GPU only (test_gather_tokens_n333)
    (2, 333, 83, 384, 1, False),
    (2, 333, 400, 64, "B", True),
]


@pytest.mark.parametrize("device,dtype", GPU_DTYPES)
@pytest.mark.parametrize("B,N,K,D,pos_kind,repeated", GATHER_CASES_GPU)
def test_gather_tokens_n333(B, N, K, D, pos_kind, repeated, device, dtype):
    test_gather_tokens(B, N, K, D, pos_kind, repeated, device, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES + [BF16_CPU])
@pytest.mark.parametrize("B,N,K,D,pos_kind,repeated", GATHER_CASES)
def test_gather_tokens(B, N, K, D, pos_kind, repeated, device, dtype):
    # x is a strided view (tokens without a CLS token), as the models pass it
    x = torch.randn(B, N + 1, D, device=device).to(dtype)[:, 1:].detach().requires_grad_()
    assert not x.is_contiguous() or N == 1
    pos = None if pos_kind is None else torch.randn(1 if pos_kind == 1 else B, N, D, device=device).to(dtype) \
        .requires_grad_()
    idx = make_idx(B, N, K, repeated, device)
    out = gather_mod.gather_tokens(x, idx, pos)
    assert out.shape == (B, K, D) and out.dtype == dtype
    go = torch.randn(B, K, D, device=device).to(dtype)
    inputs = [x] + ([pos] if pos is not None else [])
    grads = torch.autograd.grad(out, inputs, go)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = gather_tokens_ref(ref_inputs[0], idx, ref_inputs[1] if pos is not None else None)
    ref_grads = torch.autograd.grad(ref, ref_inputs, go.double())
    # exact: one fp32 add (or sum) and one rounding, like the reference -- except that the interpreter truncates
    # fp32 -> bf16 casts (a GPU rounds to nearest even), which is up to one bf16 ulp = 2^-7 relative
    exact = (0.0, 2.0 ** -7) if INTERPRET and dtype == torch.bfloat16 else (0.0, 0.0)
    # repeated indices: the reference adds duplicates in its own order (CUDA scatter_add uses atomics), so its fp32
    # sum may differ in the last bits, and after rounding to a 16-bit dtype by one ulp
    summed = exact if not repeated else (1e-5, 1e-6) if dtype == torch.float32 else \
        (1e-6, exact[1] + torch.finfo(dtype).eps)
    close(out, ref.to(dtype), exact, "gather fwd")
    close(grads[0], ref_grads[0].to(dtype), summed, "gather grad_x")
    if pos is not None:
        if dtype == torch.float32 or pos_kind == "B":
            close(grads[1], ref_grads[1].to(dtype), summed, "gather grad_pos")
        else:  # grad rows rounded to the dtype, then summed over the batch: bound by the summands, not the sum
            ulp = torch.finfo(dtype).eps * (2.0 if INTERPRET and dtype == torch.bfloat16 else 1.0)
            bound = 2 * ulp * ref_grads[0].abs().sum(0, keepdim=True) + 1e-6
            err = (grads[1].float() - ref_grads[1]).abs()
            print(f"gather grad_pos: max abs diff {err.max().item():.3e}, "
                  f"max err/bound {(err / bound).max().item():.2f}")
            assert (err <= bound).all()


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=cpu), pytest.param("cuda", marks=gpu)])
def test_gather_repeated_is_deterministic_and_pos_without_grad(device):
    B, N, K, D = 2, 50, 100, 64
    x = torch.randn(B, N, D, device=device, requires_grad=True)
    pos = torch.randn(1, N, D, device=device)  # a fixed (non-learned) pos embedding
    idx = make_idx(B, N, K, True, device)
    go = torch.randn(B, K, D, device=device)
    g1 = torch.autograd.grad(gather_mod.gather_tokens(x, idx, pos), x, go)[0]
    g2 = torch.autograd.grad(gather_mod.gather_tokens(x, idx, pos), x, go)[0]
    assert torch.equal(g1, g2)
    ref = torch.autograd.grad(gather_tokens_ref(x, idx, pos), x, go)[0]
    close(g1, ref, (1e-6, 1e-6), "gather grad_x, repeated")


# -----------------------------------------------------------------------------
# cosine similarity

COS_CASES = [  # (B, Na, Nb, D)
    (2, 1, 1, 64),
    (2, 197, 50, 64),
    (1, 50, 197, 64),
    (2, 50, 50, 32),
    (1, 50, 197, 128),
    (2, 50, 33, 24),  # D not a power of two
    (1, 50, 50, 192),  # ViT-T width (padded to 256: the fp32 backward that spilled before its table entry)
    (1, 33, 20, 768),  # ViT-B width (padded to 1024)
    (1, 20, 9, 1024),  # the largest D the kernels take
]
COS_CASES_GPU = [(1, 333, 197, 384), (2, 333, 333, 64)]  # N = 333, on a GPU only


def check_cosine(a, b, g, eps, dtype):
    s = sim_mod.cosine_similarity(a, b, eps)
    assert s.shape == (a.shape[0], a.shape[1], b.shape[1]) and s.dtype == dtype
    da, db = torch.autograd.grad(s, [a, b], g)
    ra, rb = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    rs = cosine_similarity_ref(ra, rb, eps)
    rda, rdb = torch.autograd.grad(rs, [ra, rb], g.double())
    close(s, rs, FWD_TOL[dtype], "cosine fwd")
    close(da, rda, BWD_TOL[dtype], "cosine grad_a")
    close(db, rdb, BWD_TOL[dtype], "cosine grad_b")


@pytest.mark.parametrize("device,dtype", GPU_DTYPES)
@pytest.mark.parametrize("B,Na,Nb,D", COS_CASES_GPU)
def test_cosine_similarity_n333(B, Na, Nb, D, device, dtype):
    test_cosine_similarity(B, Na, Nb, D, device, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,Na,Nb,D", COS_CASES)
def test_cosine_similarity(B, Na, Nb, D, device, dtype):
    a = torch.randn(B, Na, D, device=device).to(dtype).requires_grad_()
    b = torch.randn(B, Nb, D, device=device).to(dtype).requires_grad_()
    g = torch.randn(B, Na, Nb, device=device).to(dtype)
    check_cosine(a, b, g, 1e-12, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES[:2] + [BF16_CPU] + DEVICE_DTYPES[2:])
def test_cosine_similarity_eps_clamp_and_strides(device, dtype):
    """Rows with norm < eps take F.normalize's clamped branch; a is a strided view; G is non-contiguous."""
    B, Na, Nb, D = 2, 50, 40, 64
    a = torch.randn(B, 2 * Na, D, device=device)[:, ::2]
    a[:, :5] *= 1e-3  # norms ~8e-3 < eps = 0.05
    a = a.to(dtype).requires_grad_()
    b = torch.randn(B, Nb, D, device=device)
    b[:, -3:] *= 1e-3
    b = b.to(dtype).requires_grad_()
    g = torch.randn(B, Nb, Na, device=device).to(dtype).transpose(1, 2)
    check_cosine(a, b, g, 0.05, dtype)


# -----------------------------------------------------------------------------
# the torch.ops.pretext.* custom ops (kernels/ops.py) on the Triton path: opcheck and torch.compile(fullgraph=True).
# On CPU their implementation runs the kernels in the interpreter only with PRETEXT_KERNELS=triton.

ops_mod = importlib.import_module("kernels.ops")


def _dev():
    return "cuda" if HAS_CUDA and not INTERPRET else "cpu"


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("PRETEXT_KERNELS", "triton")


def test_opcheck(triton_path):
    dev = _dev()
    B, H, N, D = 1, 1, 20, 32
    q, k, v = (torch.randn(B, H, N, D, device=dev, requires_grad=True) for _ in range(3))
    torch.library.opcheck(ops_mod.attention_fwd_op, (q, k, v, 0.2))
    torch.library.opcheck(ops_mod.attention_map_op, (q.detach(), k.detach(), torch.tensor([1, 3], device=dev), 0.2))
    torch.library.opcheck(ops_mod.attention_map_op, (q.detach(), k.detach(), None, 0.2))
    x = torch.randn(2, 10, 16, device=dev, requires_grad=True)
    pos = torch.randn(1, 10, 16, device=dev, requires_grad=True)
    idx = make_idx(2, 10, 6, True, dev)
    torch.library.opcheck(ops_mod.gather_tokens_fwd_op, (x, idx, pos))
    torch.library.opcheck(ops_mod.gather_tokens_fwd_op, (x, idx, None))
    a = torch.randn(2, 7, 16, device=dev, requires_grad=True)
    b = torch.randn(2, 5, 16, device=dev, requires_grad=True)
    torch.library.opcheck(ops_mod.cosine_similarity_fwd_op, (a, b, 1e-12))


def test_torch_compile_fullgraph(triton_path):
    """dynamo traces the public API through all three ops (fake impls + registered autograd) on the Triton path;
    aot_eager keeps it cheap on CPU."""
    dev = _dev()
    B, H, N, D = 1, 2, 24, 32

    def step(qkv, x, idx, pos):
        q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        o = kernels.attention(q, k, v)  # (B, H, N, D)
        t = kernels.gather_tokens(x + o.transpose(1, 2).reshape(B, N, H * D), idx, pos)  # (B, K, C)
        return kernels.cosine_similarity(t, t).sum()

    qkv = torch.randn(B, N, 3 * H * D, device=dev, requires_grad=True)
    x = torch.randn(B, N, H * D, device=dev)
    pos = torch.randn(1, N, H * D, device=dev, requires_grad=True)
    idx = make_idx(B, N, 10, True, dev)
    kernels.reset_report()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(qkv, x, idx, pos)
    grads = torch.autograd.grad(loss, [qkv, pos])
    report = kernels.report()
    assert {op: r["path"] for op, r in report.items()} == {"attention": "triton", "gather_tokens": "triton",
                                                            "cosine_similarity": "triton"}, report
    ref_loss = step(qkv, x, idx, pos)
    ref_grads = torch.autograd.grad(ref_loss, [qkv, pos])
    close(loss, ref_loss, (1e-4, 1e-4), "compiled loss")
    for g, rg in zip(grads, ref_grads):
        close(g, rg, (1e-4, 1e-4), "compiled grad")
