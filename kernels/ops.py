"""Which path each kernel op takes, the record of it (kernels.report), and the torch.ops.pretext.* custom ops.

Routing, per call (route()): an op runs its Triton kernel when PRETEXT_KERNELS is not "torch", triton is installed,
the tensors are CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 and PRETEXT_KERNELS=triton: the interpreter)
and the kernel takes their dtype and shape (attention: head dim in attention.HEAD_DIMS, q, k, v of one shape;
cosine: D <= similarity.MAX_D; all: fp32, fp16 or bf16). Otherwise the PyTorch reference of kernels/reference.py
runs. PRETEXT_KERNELS:
    auto    (default) as above
    torch   the references always
    triton  as auto, but a call that would run a reference raises RuntimeError naming the op and the reason
Every call records (op, path, reason) with the first shape seen; report() returns it, report_line() says it in
one line, reset_report() starts over. Under torch.compile the routing runs while dynamo traces, and dynamo replays
the record on every call of the compiled code (with the traced mode: a compiled graph keeps the PRETEXT_KERNELS it
was traced with, and records no shape).

Custom ops (torch.library.custom_op, each with a fake implementation for tracing and an autograd formula):
    torch.ops.pretext.attention_fwd(q, k, v, scale) -> (o, lse)        attention_bwd(do, q, k, v, o, lse, scale)
    torch.ops.pretext.attention_map(q, k, query_idx, scale) -> p
    torch.ops.pretext.gather_tokens_fwd(x, idx, pos) -> out            gather_tokens_bwd(grad, idx, N)
    torch.ops.pretext.cosine_similarity_fwd(a, b, eps) -> (s, na, nb)  cosine_similarity_bwd(g, a, b, na, nb, eps)
Their implementation launches the Triton kernels for CUDA tensors (and for CPU tensors in the interpreter with
PRETEXT_KERNELS=triton) and computes the reference otherwise, with the same output layout and dtypes, so a graph
traced on CPU tensors holds the same ops as the one a GPU compiles. The public functions call them when the Triton
path runs, and on the reference path only while torch.compile traces (torch.compiler.is_compiling()): eager CPU
code calls the references directly, with no custom-op dispatch and PyTorch's own autograd.
"""
import math
import os

import torch

from . import reference as _ref

try:
    from . import attention as _attention
    from . import gather as _gather
    from . import similarity as _similarity
    from ._common import INTERPRET as _INTERPRET
    HAVE_TRITON = True
    HEAD_DIMS = _attention.HEAD_DIMS
    COSINE_MAX_D = _similarity.MAX_D
except ImportError:  # e.g. a platform without triton wheels: the references serve every device
    HAVE_TRITON = False
    _INTERPRET = False
    HEAD_DIMS = ()  # attention and cosine then run their references inline, under torch.compile too
    COSINE_MAX_D = 0

MODES = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634  # the kernels' lse is in base 2: lse2 = lse * log2(e)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# op -> {(path, reason, where): first shape seen, or None when first seen while torch.compile traced}
_REPORT = {}


# -----------------------------------------------------------------------------
# the report

def reset_report():
    """Forget every recorded call: report() then covers only the calls made from now on."""
    _REPORT.clear()


def report():
    """{op: {"path": "triton" | "torch", "why": str}} for every op called since import (or reset_report()).

    An op that took both paths (say, attention at head dim 64 and at 40) reports "torch", and its "why" lists every
    distinct reason with the first shape it was seen at.
    """
    out = {}
    for op, entries in _REPORT.items():
        paths = {path for path, _, _ in entries}
        whys = []
        for (path, reason, where), shape in entries.items():
            seen = "traced by torch.compile" if shape is None else f"first {shape}"
            whys.append(f"{path}: {reason} [{where}, {seen}]")
        out[op] = {"path": "torch" if "torch" in paths else "triton", "why": "; ".join(whys)}
    return out


def report_line():
    """One short line: the path each op took, ops with the same story grouped, every fallback with its reason."""
    if not _REPORT:
        return "no kernel op called yet"
    groups = {}
    for op, entries in _REPORT.items():
        triton = sorted({where for path, _, where in entries if path == "triton"})
        fallbacks = sorted({reason for path, reason, _ in entries if path == "torch"})
        story = []
        if triton:
            story.append(f"triton ({', '.join(triton)})")
        if fallbacks:
            story.append(f"torch ({'; '.join(fallbacks)})")
        groups.setdefault(" + ".join(story), []).append(op)
    return "; ".join(f"{', '.join(ops)}: {story}" for story, ops in groups.items())


def _mode():
    mode = os.environ.get("PRETEXT_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"PRETEXT_KERNELS={mode!r}: must be one of {', '.join(MODES)} (unset it for auto)")
    return mode


def _name(dtype):
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def route(op, t, problem):
    """"triton" or "torch" for one call of `op` on tensor `t`; records it. `problem` is why the kernel cannot take
    these inputs ("" if it can); with PRETEXT_KERNELS=triton a fallback raises RuntimeError."""
    mode = _mode()
    if mode == "torch":
        reason = "PRETEXT_KERNELS=torch"
    elif not HAVE_TRITON:
        reason = "triton is not installed"
    elif t.device.type == "cpu" and not (_INTERPRET and mode == "triton"):
        reason = "CPU tensors"  # the Triton kernels need CUDA (or the interpreter, which PRETEXT_KERNELS=triton asks for)
    elif t.device.type not in ("cuda", "cpu"):
        reason = f"{t.device.type} tensors: the Triton kernels need CUDA"
    else:
        reason = problem
    path = "torch" if reason else "triton"
    where = f"{t.device.type} {_name(t.dtype)}"
    if op in ("attention", "attention_map") and t.dim() == 4:
        where += f" D={t.shape[-1]}"
    shape = None if torch.compiler.is_compiling() else tuple(t.shape)
    entries = _REPORT.setdefault(op, {})
    key = (path, reason or "Triton kernel", where)
    if key not in entries:
        entries[key] = shape
    if path == "torch" and mode == "triton":
        hint = " (the Triton kernels need CUDA, or TRITON_INTERPRET=1 for CPU tensors)" if t.device.type == "cpu" else ""
        raise RuntimeError(f"PRETEXT_KERNELS=triton: kernels.{op} would fall back to PyTorch: {reason}{hint} "
                           f"({where}, shape {tuple(t.shape)}); unset PRETEXT_KERNELS to allow the fallback")
    return path


def _use_op(path, t, problem):
    """Call the custom op rather than the reference: on the Triton path, and while torch.compile traces CPU tensors
    the kernel could take (the op's implementation is then the reference: the graph holds the op a GPU runs)."""
    if path == "triton":
        return True
    return not problem and t.device.type == "cpu" and torch.compiler.is_compiling()


def _triton_impl(t):
    """What the custom ops' implementation runs: Triton for CUDA tensors, and for CPU tensors in the interpreter
    with PRETEXT_KERNELS=triton (where route() sends them); the reference otherwise."""
    if not HAVE_TRITON:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and _INTERPRET and os.environ.get("PRETEXT_KERNELS") == "triton"


def _bnhd_like(t):
    """A (B, H, N, D) copy of t in (B, N, H, D) memory order: the layout the attention kernels write."""
    B, H, N, D = t.shape
    return t.new_empty((B, N, H, D)).permute(0, 2, 1, 3).copy_(t)  # (B, H, N, D) view


# -----------------------------------------------------------------------------
# attention

def _attention_problem(q, k, v):
    if q.dim() != 4:
        return f"not (B, H, N, D) tensors: {tuple(q.shape)}"
    if any(t is not None and (t.shape != q.shape or t.dtype != q.dtype or t.device != q.device) for t in (k, v)):
        return "q, k, v differ in shape, dtype or device (the kernel does self-attention)"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {_name(q.dtype)}: the kernels take fp32, fp16, bf16"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]}: the kernel takes {', '.join(map(str, HEAD_DIMS))}"
    return ""


@torch.library.custom_op("pretext::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton_impl(q):
        return _attention.attention_fwd(q, k, v, scale)
    o = _bnhd_like(_ref.attention_ref(q, k, v, scale))
    dt = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(dt) @ k.to(dt).transpose(-2, -1)) * scale  # (B, H, N, N)
    lse = (torch.logsumexp(s, dim=-1) * LOG2E).float()  # (B, H, N), base 2 like the kernel's
    return o, lse


@attention_fwd_op.register_fake
def _(q, k, v, scale):
    B, H, N, D = q.shape
    o = q.new_empty((B, N, H, D)).permute(0, 2, 1, 3)  # (B, H, N, D) view of (B, N, H, D) memory
    return o, q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("pretext::attention_bwd", mutates_args=())
def attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _triton_impl(q):
        return _attention.attention_bwd(do, q, k, v, o, lse, scale)
    # the softmax-attention backward in (at least) fp32, P recomputed: what autograd of the reference computes
    dt = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, dof = q.to(dt), k.to(dt), v.to(dt), do.to(dt)
    p = torch.softmax((qf @ kf.transpose(-2, -1)) * scale, dim=-1)  # (B, H, N, N)
    dv = p.transpose(-2, -1) @ dof  # (B, H, N, D)
    dp = dof @ vf.transpose(-2, -1)  # (B, H, N, N)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-2, -1) @ qf) * scale
    return tuple(_bnhd_like(g.to(q.dtype)) for g in (dq, dk, dv))


@attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale):
    B, H, N, D = q.shape
    return tuple(q.new_empty((B, N, H, D)).permute(0, 2, 1, 3) for _ in range(3))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@torch.library.custom_op("pretext::attention_map", mutates_args=())
def attention_map_op(q: torch.Tensor, k: torch.Tensor, query_idx: torch.Tensor | None, scale: float) -> torch.Tensor:
    if _triton_impl(q):
        return _attention.attention_map_fwd(q, k, query_idx, scale)
    return _ref.attention_map_ref(q, k, query_idx, scale)


@attention_map_op.register_fake
def _(q, k, query_idx, scale):
    B, H, N, D = q.shape
    shape = (B, H, N) if query_idx is None else (B, H, query_idx.shape[0], N)
    return q.new_empty(shape, dtype=torch.promote_types(q.dtype, torch.float32))


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v, non-causal; q, k, v (B, H, N, D), any strides -> (B, H, N, D) in q's dtype."""
    problem = _attention_problem(q, k, v)
    path = route("attention", q, problem)
    if not _use_op(path, q, problem):
        return _ref.attention_ref(q, k, v, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _ = attention_fwd_op(q, k, v, scale)
    return o


def attention_map(q, k, query_idx=None, scale=None):
    """Softmax rows (B, H, R, N) of the queries query_idx (R,), or the mean over all queries (B, H, N); fp32
    (fp64 for fp64 inputs); no autograd (the inputs are detached on the Triton path)."""
    problem = _attention_problem(q, k, None)
    path = route("attention_map", q, problem)
    if not _use_op(path, q, problem):
        return _ref.attention_map_ref(q, k, query_idx, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return attention_map_op(q.detach(), k.detach(), query_idx, scale)


# -----------------------------------------------------------------------------
# gather

@torch.library.custom_op("pretext::gather_tokens_fwd", mutates_args=())
def gather_tokens_fwd_op(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    if _triton_impl(x):
        return _gather.gather_fwd(x, idx, pos)
    return _ref.gather_tokens_ref(x, idx, pos)


@gather_tokens_fwd_op.register_fake
def _(x, idx, pos):
    dtype = x.dtype if pos is None else torch.result_type(x, pos)
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]), dtype=dtype)


@torch.library.custom_op("pretext::gather_tokens_bwd", mutates_args=())
def gather_tokens_bwd_op(grad: torch.Tensor, idx: torch.Tensor, N: int) -> torch.Tensor:
    if _triton_impl(grad):
        return _gather.gather_bwd(grad, idx, N)
    B, K, D = grad.shape
    gx = grad.new_zeros((B, N, D))
    return gx.scatter_add_(1, idx.unsqueeze(-1).expand(B, K, D), grad)  # torch.gather's backward


@gather_tokens_bwd_op.register_fake
def _(grad, idx, N):
    return grad.new_empty((grad.shape[0], N, grad.shape[2]))


def _gather_setup_context(ctx, inputs, output):
    x, idx, pos = inputs
    ctx.save_for_backward(idx)
    ctx.N = x.shape[1]
    ctx.x_dtype = x.dtype
    ctx.pos_info = None if pos is None else (pos.shape, pos.dtype)


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    need_x, _, need_pos = ctx.needs_input_grad
    if not (need_x or need_pos):
        return None, None, None
    gx = gather_tokens_bwd_op(grad, idx, ctx.N)  # (B, N, D) in grad's dtype
    gpos = None
    if need_pos:
        pos_shape, pos_dtype = ctx.pos_info
        gpos = (gx if pos_shape[0] == gx.shape[0] else gx.sum(0, keepdim=True)).to(pos_dtype)
    return (gx.to(ctx.x_dtype) if need_x else None), None, gpos


gather_tokens_fwd_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)


def gather_tokens(x, idx, pos=None):
    """out[b, j] = x[b, idx[b, j]] (+ pos[b or 0, idx[b, j]]); x (B, N, D), idx (B, K) int64, pos (1|B, N, D)."""
    if idx.dtype != torch.int64 or idx.dim() != 2 or x.dim() != 3 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens: need x (B, N, D) and int64 idx (B, K) with the same B, got x "
                         f"{tuple(x.shape)} and idx {tuple(idx.shape)} {idx.dtype}")
    if pos is not None and (pos.dim() != 3 or pos.shape[0] not in (1, x.shape[0]) or pos.shape[1:] != x.shape[1:]):
        raise ValueError(f"gather_tokens: pos must be (1, N, D) or (B, N, D), got {tuple(pos.shape)} "
                         f"for x {tuple(x.shape)}")
    dtypes = {x.dtype} | ({pos.dtype} if pos is not None else set())
    problem = ""
    if not dtypes <= set(KERNEL_DTYPES):
        problem = f"dtype {', '.join(sorted(map(_name, dtypes)))}: the kernels take fp32, fp16, bf16"
    path = route("gather_tokens", x, problem)
    if not _use_op(path, x, problem):
        return _ref.gather_tokens_ref(x, idx, pos)
    return gather_tokens_fwd_op(x, idx, pos)


# -----------------------------------------------------------------------------
# cosine similarity

def _cosine_problem(a, b):
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return f"not (B, Na, D) and (B, Nb, D): {tuple(a.shape)} and {tuple(b.shape)}"
    if a.dtype != b.dtype or a.device != b.device:
        return "a and b differ in dtype or device"
    if a.dtype not in KERNEL_DTYPES:
        return f"dtype {_name(a.dtype)}: the kernels take fp32, fp16, bf16"
    if a.shape[2] > COSINE_MAX_D:
        return f"D = {a.shape[2]} > {COSINE_MAX_D} (the backward keeps whole rows in registers)"
    return ""


@torch.library.custom_op("pretext::cosine_similarity_fwd", mutates_args=())
def cosine_similarity_fwd_op(a: torch.Tensor, b: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _triton_impl(a):
        return _similarity.cos_fwd(a, b, eps)
    s = _ref.cosine_similarity_ref(a, b, eps)
    return s, a.float().norm(dim=-1), b.float().norm(dim=-1)


@cosine_similarity_fwd_op.register_fake
def _(a, b, eps):
    Bsz, Na, _ = a.shape
    Nb = b.shape[1]
    return (a.new_empty((Bsz, Na, Nb)), a.new_empty((Bsz, Na), dtype=torch.float32),
            a.new_empty((Bsz, Nb), dtype=torch.float32))


def _normalize_bwd(x, dx_hat, eps):
    """d/dx of x_hat = x / max(|x|, eps) applied to dx_hat (rows; the clamped branch is constant)."""
    n = x.norm(dim=-1, keepdim=True)
    x_hat = x / n.clamp_min(eps)
    proj = (x_hat * dx_hat).sum(-1, keepdim=True) * (n >= eps)
    return (dx_hat - x_hat * proj) / n.clamp_min(eps)


@torch.library.custom_op("pretext::cosine_similarity_bwd", mutates_args=())
def cosine_similarity_bwd_op(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, na: torch.Tensor, nb: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton_impl(a):
        return _similarity.cos_bwd(g, a, b, na, nb, eps)
    dt = torch.promote_types(a.dtype, torch.float32)  # as the reference: (at least) fp32, norms recomputed
    af, bf, gf = a.to(dt), b.to(dt), g.to(dt)
    a_hat = torch.nn.functional.normalize(af, dim=-1, eps=eps)
    b_hat = torch.nn.functional.normalize(bf, dim=-1, eps=eps)
    da = _normalize_bwd(af, gf @ b_hat, eps)  # (B, Na, D)
    db = _normalize_bwd(bf, gf.transpose(-2, -1) @ a_hat, eps)  # (B, Nb, D)
    return da.to(a.dtype).contiguous(), db.to(b.dtype).contiguous()


@cosine_similarity_bwd_op.register_fake
def _(g, a, b, na, nb, eps):
    return (torch.empty_like(a, memory_format=torch.contiguous_format),
            torch.empty_like(b, memory_format=torch.contiguous_format))


def _cos_setup_context(ctx, inputs, output):
    a, b, eps = inputs
    _, na, nb = output
    ctx.save_for_backward(a, b, na, nb)
    ctx.eps = eps
    ctx.mark_non_differentiable(na, nb)


def _cos_backward(ctx, g, gna, gnb):
    a, b, na, nb = ctx.saved_tensors
    da, db = cosine_similarity_bwd_op(g, a, b, na, nb, ctx.eps)
    return da, db, None


cosine_similarity_fwd_op.register_autograd(_cos_backward, setup_context=_cos_setup_context)


def cosine_similarity(a, b, eps=1e-12):
    """Cosine similarity of every a-token with every b-token: (B, Na, D), (B, Nb, D) -> (B, Na, Nb) in a's dtype."""
    problem = _cosine_problem(a, b)
    path = route("cosine_similarity", a, problem)
    if not _use_op(path, a, problem):
        return _ref.cosine_similarity_ref(a, b, eps)
    s, _, _ = cosine_similarity_fwd_op(a, b, float(eps))
    return s
