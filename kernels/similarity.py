"""Fused cosine similarity of token sets in Triton (L2-normalise + batched dot product), forward + backward.

    cosine_similarity(a, b, eps=1e-12)   a (B, Na, D), b (B, Nb, D) -> S (B, Na, Nb) in a's dtype; autograd for a, b
                                         S[b, i, j] = <a_i, b_j> / (max(|a_i|, eps) * max(|b_j|, eps))

What it computes: kernels/reference.py:cosine_similarity_ref, i.e. F.normalize(a) @ F.normalize(b)^T in fp32 with
F.normalize's clamp semantics (x / max(||x||, eps)); DINOv3's Gram anchoring builds its Gram matrices this way.

Forward (_cos_fwd_kernel), grid (cdiv(Na, BLOCK_M), cdiv(Nb, BLOCK_N), B): a tiled matmul over D in BLOCK_K
steps on the raw inputs (fp32 accumulation; tensor cores for fp16/bf16) that also accumulates the squared row
norms of the a and b tiles it streams; the epilogue scales the tile by 1/max(|a_i|, eps) * 1/max(|b_j|, eps).
No normalised copy of a or b is ever written. The norms (fp32, (B, Na) and (B, Nb)) are stored by the first
program of each row/column block and saved for the backward.

Backward (_cos_bwd_kernel, launched twice: once for a with G, once for b with G^T via swapped strides), grid
(cdiv(Nx, BLOCK_M), B). With x_hat = x * r, r = 1/max(|x|, eps), and G = dL/dS:
    d x_hat_i = sum_j G_ij * y_hat_j                                    (a (BLOCK_M, D) fp32 accumulator)
    dx_i      = r_i * (d x_hat_i - [|x_i| >= eps] * x_hat_i * <x_hat_i, d x_hat_i>)
Each program owns BLOCK_M full rows of dx (D padded to a power of two in registers), loops over y in BLOCK_N
rows, and applies the normalisation backward in its epilogue -- one kernel per input, no intermediate in memory.
y_hat is formed in registers and rounded to the input dtype before the tensor-core dot (as P/dS in flash attention);
with fp32 inputs every dot is true fp32 (input_precision="ieee", no TF32), for exact parity with PyTorch.

Cost, for B, Na, Nb, D:
  FLOPs:  forward 2*B*Na*Nb*D (+ the squared norms, which every output tile recomputes for its rows and columns);
          backward 4*B*Na*Nb*D (G y_hat and G^T x_hat).
  bytes:  forward reads (Na + Nb)*D*elt per batch (a/b tiles re-read cdiv(Nb, BLOCK_N) / cdiv(Na, BLOCK_M) times,
          mostly from L2), writes Na*Nb*elt (+ 4*(Na+Nb) of norms).
          backward reads G twice (2*Na*Nb*elt), a and b, writes da and db.
  At DINOv3-like (64, 196, 196, 384) bf16: 1.9 GFLOP forward, 19.3 MB read + 4.9 MB written.

How it should compare with PyTorch on a GPU: NOT MEASURED YET -- no GPU has run this code; `python bench.py
gpu-check` times it against eager F.normalize + bmm (target 2x). What is known, on one H100: that eager baseline
took 116.9 us fp32 / 49.0 us bf16 at (64, 196, 384) and 220.7 / 74.8 us at (64, 196, 768). The fused forward
saves writing and re-reading the normalised copies and the fused backward saves the normalisation's separate
passes; the tile sizes are untested guesses, so whether the forward beats cuBLAS bmm at all is open.

Checked without a GPU (tests/test_aot_compile.py, numbers in BENCHMARKS.md): every configuration the launchers can
pick (each padded D 16 ... 1024, fp32/fp16/bf16) compiles for sm_80 and sm_90 within the shared memory of the
target and without register spills. The fp32 backward spilled with the 16-bit table at padded D = 256 (ViT-T's
192: ~0.6 KB per thread on sm_90, 4.6 KB on sm_80) and at 1024; FP32_BWD_CONFIGS gives it 8 warps from 256 and
8-row programs at 1024.

Limits: a and b must share dtype, device, batch and D; D <= 1024 (the backward keeps full rows of D, padded to a
power of two, in registers); fp32, fp16, bf16. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1,
where bf16 tiles are upcast to fp32 before tl.dot (UPCAST constexpr; the interpreter's bf16 dot is wrong).
Masked pointer arithmetic only (triton 3.6 and 3.7).
"""

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET
from ._common import empty as _empty
from ._common import launch as _launch
from ._common import launch_args as _launch_args


DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_D = 1024  # the backward keeps whole rows of D (padded to a power of two) in registers

# Launch configurations (no autotune; not measured on a GPU yet). The launchers read only these, and
# tests/test_aot_compile.py compiles every configuration they can pick for sm_80 and sm_90 (shared memory, spills).
# Forward: a 64 x 64 output tile with 32-wide D steps, 4 warps, 3 stages, the common starting point for bf16
# matmuls of this size (Na = Nb = 196 -> 4 x 4 tiles); D is a runtime loop bound, so one configuration per dtype.
FWD_CONFIG = (64, 64, 32, 4, 3)  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
# Backward: BLOCK_M rows of dx per program own a (BLOCK_M, BLOCK_D) fp32 accumulator and stream BLOCK_N rows of the
# other input; the epilogue holds ~4 (BLOCK_M, BLOCK_D) fp32 tiles (acc, x, x_hat, dx). Per padded D:
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Up to BLOCK_D = 256 the y tile is double-buffered; beyond, tiles run
# unpipelined (one stage) and 8 warps share the registers.
HALF_BWD_CONFIGS = {
    16: (16, 32, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 32, 4, 2),
    512: (16, 32, 8, 1), 1024: (16, 32, 8, 1),
}
# fp32: twice the bytes per element. With the half table, BLOCK_D = 256 (ViT-T's 192 among them) spilled ~0.6 KB
# per thread on sm_90 (4.6 KB on sm_80) and 1024 spilled too, when compiled without a GPU; 8 warps from 256 and
# 8-row programs at 1024 keep everything in registers.
FP32_BWD_CONFIGS = {
    16: (16, 32, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 32, 8, 2),
    512: (16, 32, 8, 1), 1024: (8, 32, 8, 1),
}


def block_d(D):
    return triton.next_power_of_2(max(D, 16))


def bwd_config(D, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward for D channels and input dtype."""
    table = FP32_BWD_CONFIGS if dtype == torch.float32 else HALF_BWD_CONFIGS
    return table[block_d(D)]


@triton.jit
def _cos_fwd_kernel(
    A, B, S, NA, NB,  # *Pointers*: a (B, Na, D), b (B, Nb, D), s (B, Na, Nb), norms na (B, Na), nb (B, Nb) fp32
    stride_ab, stride_an, stride_ad,
    stride_bb, stride_bn, stride_bd,
    stride_sb, stride_sm, stride_sn,
    Na, Nb, D,  # all runtime
    eps,
    BLOCK_M: tl.constexpr,  # a rows per program
    BLOCK_N: tl.constexpr,  # b rows per program
    BLOCK_K: tl.constexpr,  # channels per loop step
    UPCAST: tl.constexpr,  # interpreter + bf16: do the dot in fp32
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < Na
    mask_n = offs_n < Nb
    a_base = A + off_b * stride_ab
    b_base = B + off_b * stride_bb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ssa = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of squares of the a rows
    ssb = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum of squares of the b rows
    for start_k in range(0, D, BLOCK_K):
        cols = start_k + offs_k
        mask_k = cols < D
        a = tl.load(a_base + offs_m[:, None] * stride_an + cols[None, :] * stride_ad,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        bT = tl.load(b_base + offs_n[None, :] * stride_bn + cols[:, None] * stride_bd,
                     mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # (BLOCK_K, BLOCK_N)
        if UPCAST:
            a = a.to(tl.float32)
            bT = bT.to(tl.float32)
        acc = tl.dot(a, bT, acc, input_precision=PRECISION)  # 2*M*N*K FLOPs
        af = a.to(tl.float32)
        bf = bT.to(tl.float32)
        ssa += tl.sum(af * af, 1)
        ssb += tl.sum(bf * bf, 0)
    na = tl.sqrt(ssa)
    nb = tl.sqrt(ssb)
    s = acc * (1.0 / tl.maximum(na, eps))[:, None] * (1.0 / tl.maximum(nb, eps))[None, :]
    tl.store(S + off_b * stride_sb + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
             s.to(S.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    # every program computed the same norms for its rows; the first column/row of programs writes them
    tl.store(NA + off_b * Na + offs_m, na, mask=mask_m & (pid_n == 0))
    tl.store(NB + off_b * Nb + offs_n, nb, mask=mask_n & (pid_m == 0))


@triton.jit
def _cos_bwd_kernel(
    G, X, Y, NX, NY, DX,  # grad (B, Nx, Ny) via its strides, x (B, Nx, D), y (B, Ny, D), norms fp32, dx (B, Nx, D)
    stride_gb, stride_gm, stride_gn,  # for dB pass G's strides swapped: G^T without a copy
    stride_xb, stride_xn, stride_xd,
    stride_yb, stride_yn, stride_yd,
    stride_dxb, stride_dxn, stride_dxd,
    Nx, Ny, D,
    eps,
    BLOCK_M: tl.constexpr,  # rows of dx per program
    BLOCK_N: tl.constexpr,  # rows of y per loop step
    BLOCK_D: tl.constexpr,  # D padded to a power of two: the program owns whole rows
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Nx
    mask_d = offs_d < D
    g_base = G + off_b * stride_gb
    y_base = Y + off_b * stride_yb
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # d x_hat
    for start_n in range(0, Ny, BLOCK_N):
        rows = start_n + offs_n
        mask_n = rows < Ny
        g = tl.load(g_base + offs_m[:, None] * stride_gm + rows[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        ny = tl.load(NY + off_b * Ny + rows, mask=mask_n, other=1.0)
        y = tl.load(y_base + rows[:, None] * stride_yn + offs_d[None, :] * stride_yd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
        # y_hat in registers, rounded to the input dtype for the tensor-core dot (|y_hat| <= 1: no fp16 overflow)
        y_hat = (y.to(tl.float32) * (1.0 / tl.maximum(ny, eps))[:, None]).to(g.dtype)
        acc = tl.dot(g, y_hat, acc, input_precision=PRECISION)  # 2*M*N*D FLOPs
    x = tl.load(X + off_b * stride_xb + offs_m[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    nx = tl.load(NX + off_b * Nx + offs_m, mask=mask_m, other=1.0)
    rx = 1.0 / tl.maximum(nx, eps)
    x_hat = x * rx[:, None]
    proj = tl.sum(x_hat * acc, 1)  # <x_hat, d x_hat>
    proj = tl.where(nx >= eps, proj, 0.0)  # a clamped norm is a constant: no gradient through it (as clamp_min)
    dx = rx[:, None] * (acc - x_hat * proj[:, None])
    tl.store(DX + off_b * stride_dxb + offs_m[:, None] * stride_dxn + offs_d[None, :] * stride_dxd,
             dx.to(DX.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# -----------------------------------------------------------------------------
# launchers: every launch goes through _common.launch with the configurations above

def cos_fwd(a, b, eps):
    """(s, na, nb): S (B, Na, Nb) in a's dtype and the fp32 row norms of a (B, Na) and b (B, Nb)."""
    Bsz, Na, D = a.shape
    Nb = b.shape[1]
    s = _empty((Bsz, Na, Nb), a.dtype, a.device)
    na = _empty((Bsz, Na), torch.float32, a.device)
    nb = _empty((Bsz, Nb), torch.float32, a.device)
    if Bsz == 0 or Na == 0 or Nb == 0:
        return s, na, nb
    upcast, precision = _launch_args(a.dtype)
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages = FWD_CONFIG
    _launch(_cos_fwd_kernel, (triton.cdiv(Na, BLOCK_M), triton.cdiv(Nb, BLOCK_N), Bsz),
            a, b, s, na, nb,
            *a.stride(), *b.stride(), *s.stride(),
            Na, Nb, D, eps,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=upcast, PRECISION=precision,
            num_warps=num_warps, num_stages=num_stages)
    return s, na, nb


def _cos_bwd_one(g_strides, g, x, y, nx, ny, eps):
    """dx for S = x_hat y_hat^T (g_strides = G's (b, i, j) strides as seen from x)."""
    Bsz, Nx, D = x.shape
    Ny = y.shape[1]
    dx = _empty(x.shape, x.dtype, x.device)
    if dx.numel() == 0:
        return dx
    if Ny == 0:
        return dx.zero_()
    upcast, precision = _launch_args(x.dtype)
    BLOCK_M, BLOCK_N, num_warps, num_stages = bwd_config(D, x.dtype)
    _launch(_cos_bwd_kernel, (triton.cdiv(Nx, BLOCK_M), Bsz),
            g, x, y, nx, ny, dx,
            *g_strides, *x.stride(), *y.stride(), *dx.stride(),
            Nx, Ny, D, eps,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d(D), UPCAST=upcast, PRECISION=precision,
            num_warps=num_warps, num_stages=num_stages)
    return dx


def cos_bwd(g, a, b, na, nb, eps):
    """(da, db) for G = dL/dS (B, Na, Nb), any strides."""
    sb, si, sj = g.stride()
    da = _cos_bwd_one((sb, si, sj), g, a, b, na, nb, eps)
    db = _cos_bwd_one((sb, sj, si), g, b, a, nb, na, eps)  # G^T: swap the row/column strides
    return da, db


def check(a, b):
    """Raise ValueError unless a, b are what the kernels take."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"cosine_similarity: need a (B, Na, D) and b (B, Nb, D), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"cosine_similarity: a and b must share dtype and device, got {a.dtype} {a.device} "
                         f"and {b.dtype} {b.device}")
    if a.dtype not in DTYPES:
        raise ValueError(f"cosine_similarity: dtype must be fp32, fp16 or bf16, got {a.dtype}")
    if a.shape[2] > MAX_D:
        raise ValueError(f"cosine_similarity: D must be <= {MAX_D}, got {a.shape[2]}")
    if not (a.is_cuda or _INTERPRET or a.is_meta):
        raise ValueError("cosine_similarity: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


# -----------------------------------------------------------------------------
# the Triton-only API, with autograd (kernels.cosine_similarity in kernels/ops.py adds routing and torch.compile)

class _CosineSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, eps):
        s, na, nb = cos_fwd(a, b, eps)
        ctx.save_for_backward(a, b, na, nb)
        ctx.eps = eps
        return s

    @staticmethod
    def backward(ctx, g):
        a, b, na, nb = ctx.saved_tensors
        da, db = cos_bwd(g, a, b, na, nb, ctx.eps)
        return da, db, None


def cosine_similarity(a, b, eps=1e-12):
    """Cosine similarity of every a-token with every b-token: (B, Na, D), (B, Nb, D) -> (B, Na, Nb) in a's dtype."""
    check(a, b)
    return _CosineSimilarity.apply(a, b, float(eps))
