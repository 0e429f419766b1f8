"""Fused non-causal softmax attention in Triton (flash-attention 2 style), forward + backward, and attention maps.

    attention(q, k, v, scale=None)                 (B, H, N, D) x3 -> (B, H, N, D), autograd through q, k, v
    attention_map(q, k, query_idx=None, scale=None) (B, H, N, D) x2 -> (B, H, R, N) softmax rows, or the
                                                    (B, H, N) mean over all query rows; fp32, no autograd

What it computes: O = softmax(q k^T * scale) v with scale = 1/sqrt(D) by default, exactly the math of
F.scaled_dot_product_attention (kernels/reference.py:attention_ref), without ever writing the N x N matrix.
These are the kernels and their launchers; kernels/ops.py decides when they run (kernels.attention) and
registers them as torch.ops.pretext.* custom ops.

Forward (_attn_fwd_kernel), grid (cdiv(N, BLOCK_M), B*H): each program keeps a BLOCK_M x D tile of q in
registers and streams K/V in BLOCK_N-row tiles with an online softmax (running max m, running sum l, exp2 with
log2(e) folded into the scale). It writes O in the input dtype and the log-sum-exp LSE (fp32, (B, H, N), in base
2 of the scaled scores: lse2 = log2 sum_j 2^(s_ij * scale * log2 e)) for the backward.
Backward, FA2-style, deterministic, no atomics:
  1. _attn_bwd_preprocess: delta_i = sum_d dO_id * O_id                       grid (cdiv(N, BLOCK), B*H)
  2. _attn_bwd_dkdv_kernel: one program per key block, loops over all query blocks, recomputes
     P^T = 2^(k q^T * scale*log2e - lse2), dV += P^T dO, dS^T = P^T * (V dO^T - delta), dK += dS^T q
  3. _attn_bwd_dq_kernel: one program per query block, loops over all key blocks, dQ += dS K
  P and dS are rounded to the input dtype before their tensor-core dot (as in FA2); all accumulators are fp32.

Shapes and layouts:
  - q, k, v: (B, H, N, D), any strides: the views qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4) of a fused
    qkv projection go straight in, strides are passed to the kernels, no .contiguous() copies.
  - O, dq, dk, dv are allocated in (B, N, H, D) memory order and returned as (B, H, N, D) views, so the model's
    o.transpose(1, 2).reshape(B, N, C) is free.
  - N (sequence length, >= 1) is a RUNTIME argument: every block is masked (last query block on load/store, keys
    past N set to -inf before the softmax), so I-JEPA's per-step lengths do not recompile. Triton still
    specialises integer arguments that are 1 or divisible by 16, so expect at most 3 compiled variants per
    (D, dtype).
  - D (head dim) is a constexpr, any multiple of 16 up to 128 (HEAD_DIMS): the I-JEPA predictor's 16, 32 (MAE
    decoder), 64 (ViT-S/B/L), 80 (ViT-H/14), 48/96/112 for other widths. The tiles are BLOCK_D = next power of two
    wide; for D = 48, 80, 96, 112 the padded columns are loaded as zeros and never stored (masked), so they
    change no dot product -- but they are computed: D = 80 does the tensor-core work of D = 128 (1.6x its FLOPs).
  - fp32, fp16, bf16 inputs; fp32 accumulation; O in the input dtype. fp32 inputs use tl.dot(input_precision=
    "ieee") (true fp32, no TF32, slow on tensor-core GPUs but exact parity with SDPA's fp32 path); fp16/bf16 use
    the tensor cores.

Cost, for B, H, N, D:
  FLOPs:  forward 4*B*H*N^2*D (q k^T and P v). The usual fwd+bwd convention is 3.5x forward (bwd = 2.5x: five
          N^2*D matmuls); this split backward recomputes q k^T and dO v^T in both passes, so it actually executes
          7 matmuls = 14*B*H*N^2*D in the backward, i.e. 4.5x forward in total.
  bytes:  forward reads q, k, v and writes O: 4*B*H*N*D*elt, plus 4*B*H*N for LSE; K/V tiles are re-read once per
          query block (cdiv(N, BLOCK_M) = 4 times at N = 197), mostly from L2.
          backward reads q, k, v, O, dO, lse, delta and writes dq, dk, dv: ~8*B*H*N*D*elt + 8*B*H*N (+ re-reads).
  At (B, H, N, D) = (256, 6, 197, 64) bf16: 15.3 GFLOP and 155 MB forward.

How it should compare with PyTorch on a GPU: NOT MEASURED YET -- no GPU has run this code; `python bench.py
gpu-check` measures it against every SDPA backend. What is known: on one H100 (torch 2.11, cuDNN 9.19) at
(256, 6, 197, 64) bf16, cuDNN SDPA (the default backend there) takes ~90 us forward and ~0.43 ms fwd+bwd, flash
127 / 717 us, and a minimal masked Triton forward of this design (BLOCK_M=64, BLOCK_N=32, 4 warps, 3 stages) ran
98 us, within 10% of cuDNN, and 21 us at N = 50, faster than every SDPA backend. Expect this forward to be close to
cuDNN (maybe faster at short N), and the backward to be SLOWER than cuDNN's: it recomputes q k^T and dO v^T in
both backward kernels (4.5x forward instead of 3.5x). The padded head dims (48, 80, 96, 112) pay for the padding;
SDPA's flash backend pads 80 -> 96 and 112 -> 128 the same way. Attention is only 11-14% of a ViT-S block's
fwd+bwd time, so even a 2x faster kernel saves <= ~7% of a step.

Checked without a GPU (tests/test_aot_compile.py, numbers in BENCHMARKS.md): every launch the wrappers can make
is compiled for sm_80 and sm_90 with the ptxas bundled in triton; none exceeds the shared memory of its target
and no fp16/bf16 launch spills registers. The fp32 (ieee) launches run on the FMA units with smaller tiles
(FP32_CONFIGS) so that they do not spill either; fp32 is the exact-parity path, not a fast one.

Limits: non-causal, no mask, no dropout; q, k, v must have the same shape (self-attention); D in HEAD_DIMS;
runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the test path). Block sizes are fixed per
(dtype, padded D) (no autotune, which also keeps the Triton interpreter working). Written for triton 3.6 and 3.7:
masked pointer arithmetic only (no block pointers / tensor descriptors / libdevice). Under the interpreter bf16
tl.dot is wrong, so with TRITON_INTERPRET=1 bf16 tiles are upcast to fp32 (UPCAST constexpr). The interpreter on
triton 3.6 with numpy >= 2.4 fails on runtime loop bounds; with triton 3.7 + numpy 2.4 they work (the CPU tests
run that way), so on triton 3.6 interpret with numpy < 2.4. Compiled GPU code is unaffected.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET
from ._common import empty as _empty
from ._common import launch as _launch
from ._common import launch_args as _launch_args


LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128)  # what the kernels take; kernels/ops.py routes other D to SDPA
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch configurations: (pass, padded head dim BLOCK_D) -> (BLOCK_M, BLOCK_N, num_warps, num_stages), one table for
# fp16/bf16 and one for fp32. The launchers read only these tables, and tests/test_aot_compile.py compiles every
# entry (through the launchers) for sm_80 and sm_90, so a change here is checked for shared memory and spills.
# BLOCK_M is the query-side block, BLOCK_N the key-side block, in every pass:
#   fwd   64 queries x 32 keys per step, 4 warps, 3 stages: the fastest of six fixed configs for a forward of this
#         design on an H100 at (256, 6, 197, 64) bf16; BLOCK_D = 128 gets 8 warps for its larger tiles (not measured).
#   dkdv  a program owns 64 key rows (k, v, dk, dv tiles stay in registers) and streams 32 query rows per step.
#   dq    a program owns 64 query rows and streams 32 key rows per step.
#   pre   64 rows per program of the delta preprocess (no dots: BLOCK_N and stages unused).
#   map   the attention-map kernels: 64 query rows x 32 keys, like the forward.
# N = 197 spans 4 query blocks and 7 key blocks; the last of each is partial, so the masking is always exercised.
HALF_CONFIGS = {
    ("fwd", 16): (64, 32, 4, 3), ("fwd", 32): (64, 32, 4, 3), ("fwd", 64): (64, 32, 4, 3), ("fwd", 128): (64, 32, 8, 3),
    ("dkdv", 16): (32, 64, 4, 2), ("dkdv", 32): (32, 64, 4, 2), ("dkdv", 64): (32, 64, 4, 2),
    ("dkdv", 128): (32, 64, 8, 2),
    ("dq", 16): (64, 32, 4, 2), ("dq", 32): (64, 32, 4, 2), ("dq", 64): (64, 32, 4, 2), ("dq", 128): (64, 32, 8, 2),
    ("pre", 16): (64, 0, 4, 1), ("pre", 32): (64, 0, 4, 1), ("pre", 64): (64, 0, 4, 1), ("pre", 128): (64, 0, 8, 1),
    ("map", 16): (64, 32, 4, 2), ("map", 32): (64, 32, 4, 2), ("map", 64): (64, 32, 4, 2), ("map", 128): (64, 32, 8, 2),
}
# fp32 (ieee dots on the FMA units, twice the bytes per element) needs smaller tiles or more warps to stay in
# registers. Each entry below is the first spill-free one found by compiling candidates for sm_80 and sm_90:
#   fwd 128   32 x 64: 64 x 32 at 8 warps spilled 32 B per thread on sm_80 for the padded D (80, 96, 112).
#   dkdv 64   one stage: two spilled 8 B on sm_80 at D = 48.
#   dkdv 128, dq 128   programs own 32 rows instead of 64: with 64, dkdv held k, v, dk, dv (4 x 64 x 128 fp32) and
#             spilled ~1 KB per thread at 255 registers on sm_90.
FP32_CONFIGS = {
    ("fwd", 16): (64, 32, 4, 3), ("fwd", 32): (64, 32, 4, 3), ("fwd", 64): (64, 32, 8, 3), ("fwd", 128): (32, 64, 8, 2),
    ("dkdv", 16): (32, 64, 4, 2), ("dkdv", 32): (32, 64, 4, 2), ("dkdv", 64): (32, 64, 8, 1),
    ("dkdv", 128): (32, 32, 8, 1),
    ("dq", 16): (64, 32, 4, 2), ("dq", 32): (64, 32, 4, 2), ("dq", 64): (64, 32, 8, 2), ("dq", 128): (32, 32, 8, 1),
    ("pre", 16): (64, 0, 4, 1), ("pre", 32): (64, 0, 4, 1), ("pre", 64): (64, 0, 4, 1), ("pre", 128): (64, 0, 8, 1),
    ("map", 16): (64, 32, 4, 2), ("map", 32): (64, 32, 4, 2), ("map", 64): (64, 32, 8, 2), ("map", 128): (64, 32, 8, 2),
}


def block_d(D):
    """The padded head dim the tiles use: the next power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(D))


def config(pass_, D, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of one pass for head dim D and input dtype."""
    table = FP32_CONFIGS if dtype == torch.float32 else HALF_CONFIGS
    return table[(pass_, block_d(D))]


# -----------------------------------------------------------------------------
# forward

@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,  # *Pointers*: q, k, v, o (B, H, N, D) with the strides below; lse (B, H, N) fp32 contiguous
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N,  # number of heads; sequence length (runtime: no recompile per N)
    qk_scale,  # scale * log2(e), so that softmax uses exp2
    HEAD_DIM: tl.constexpr,  # D, a multiple of 16 up to 128
    BLOCK_D: tl.constexpr,  # D padded to a power of two (the tile width); columns >= HEAD_DIM are masked
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    UPCAST: tl.constexpr,  # interpreter + bf16: compute tl.dot in fp32 (the interpreter's bf16 dot is wrong)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 inputs (no TF32), ignored for fp16/bf16
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of a large qkv can pass 2^31 elements
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM  # all true unless D was padded
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    # the q tile stays in registers for the whole loop; rows past N and padded columns load as 0
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max of the scaled scores (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running un-normalised output
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), 2*M*N*D FLOPs
        s = tl.where(mask_n[None, :], s, float("-inf"))  # keys past N get zero probability (zeros would be wrong)
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block holds at least one key < N
        alpha = tl.math.exp2(m_i - m_new)  # rescales the old sums; 0 on the first step (m_i = -inf)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # 2*M*N*D FLOPs
        m_i = m_new
    acc = acc / l_i[:, None]
    o_base = O + off_b * stride_ob + off_h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


# -----------------------------------------------------------------------------
# backward

@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,  # o, do (B, H, N, D) strided; delta (B, H, N) fp32 contiguous
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax-backward row term. reads 2*N*D, writes N
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask = mask_m[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # q, k, v, do, dk, dv (B, H, N, D) strided; lse, delta (B, H, N) fp32
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # dk and dv share one layout
    H, N,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale (dK = scale * dS^T q)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per loop step (streamed)
    BLOCK_N: tl.constexpr,  # key rows owned by this program
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    row_base = pid_bh.to(tl.int64) * N  # lse / delta

    # this program's K and V tiles stay in registers; key rows past N and padded columns load as 0, never stored
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N
        qdo_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=qdo_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=qdo_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + row_base + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row_base + rows, mask=mask_m, other=0.0)
        # P^T (BLOCK_N, BLOCK_M) recomputed from the saved LSE; query rows past N contribute nothing
        pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        pT = tl.where(mask_m[None, :], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)  # dV = P^T dO
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # dP^T = V dO^T
        dsT = pT * (dpT - delta[None, :])  # dS = P * (dP - delta)
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)  # dK = dS^T q (times scale below)
    dk = dk * sm_scale
    dk_offs = off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(DK + dk_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + dk_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,  # q, k, v, do, dq (B, H, N, D) strided; lse, delta (B, H, N) fp32
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows owned by this program
    BLOCK_N: tl.constexpr,  # key rows per loop step (streamed)
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    row_base = pid_bh.to(tl.int64) * N

    qdo_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=qdo_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=qdo_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)  # keys past N load as 0, so their score is 0, not -inf: mask them
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP = dO V^T
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # dQ = dS K (times scale below)
    dq = dq * sm_scale
    dq_offs = off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
    tl.store(DQ + dq_offs, dq.to(DQ.dtype.element_ty), mask=qdo_mask)


# -----------------------------------------------------------------------------
# attention maps (no autograd)

@triton.jit
def _attn_map_rows_kernel(
    Q, K, QIDX, LSE, P,  # q, k (B, H, N, D) strided; query_idx (R,) int64; lse (B, H, R) fp32; p (B, H, R, N) fp32
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    H, N, R,  # heads, keys, query rows asked for
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    HAS_IDX: tl.constexpr,  # rows are query_idx[r] (else r itself, R = N)
    WRITE_P: tl.constexpr,  # True: write the probability rows to P; False: only write the row LSE
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # pass 1: lse of each chosen row (online max/sum, as the forward without V); pass 2: P = 2^(s - lse)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < R
    mask_d = offs_d < HEAD_DIM
    if HAS_IDX:
        rows = tl.load(QIDX + offs_r, mask=mask_r, other=0)
    else:
        rows = offs_r
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.math.log2(l_i)
    if WRITE_P:
        p_base = P + pid_bh.to(tl.int64) * R * N
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < N
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
            tl.store(p_base + offs_r[:, None] * N + cols[None, :], p, mask=mask_r[:, None] & mask_n[None, :])
    else:
        tl.store(LSE + pid_bh.to(tl.int64) * R + offs_r, lse, mask=mask_r)


@triton.jit
def _attn_map_mean_kernel(
    Q, K, LSE, OUT,  # q, k (B, H, N, D) strided; lse (B, H, N) fp32; out (B, H, N) fp32
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    H, N,
    qk_scale,
    inv_n,  # 1 / N
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # key columns owned by this program
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # column means of P: each program owns BLOCK_N keys and sums P^T over all query rows (deterministic)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    col_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * N + rows, mask=mask_m, other=0.0)
        pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        col_sum += tl.sum(tl.where(mask_m[None, :], pT, 0.0), 1)
    tl.store(OUT + pid_bh.to(tl.int64) * N + offs_n, col_sum * inv_n, mask=mask_n)


# -----------------------------------------------------------------------------
# launchers: every launch goes through _common.launch with a row of the config tables

def check(q, *others):
    """Raise ValueError unless q (and k, v) are what the kernels take."""
    if q.dim() != 4:
        raise ValueError(f"attention: expected (B, H, N, D) tensors, got {tuple(q.shape)}")
    for t in others:
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"attention: q, k, v must share shape, dtype and device, got {tuple(q.shape)} "
                             f"{q.dtype} {q.device} and {tuple(t.shape)} {t.dtype} {t.device}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"attention: head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if q.dtype not in DTYPES:
        raise ValueError(f"attention: dtype must be fp32, fp16 or bf16, got {q.dtype}")
    if not (q.is_cuda or _INTERPRET or q.is_meta):
        raise ValueError("attention: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def bnhd(B, H, N, D, dtype, device):
    """A (B, H, N, D) view of a (B, N, H, D) buffer: what o.transpose(1, 2).reshape(B, N, H*D) wants."""
    return _empty((B, N, H, D), dtype, device).permute(0, 2, 1, 3)


def attention_fwd(q, k, v, scale):
    """(o, lse): o (B, H, N, D) in q's dtype in (B, N, H, D) memory, lse (B, H, N) fp32 base-2 log-sum-exp."""
    B, H, N, D = q.shape
    o = bnhd(B, H, N, D, q.dtype, q.device)
    lse = _empty((B, H, N), torch.float32, q.device)
    if N == 0 or B * H == 0:
        return o, lse
    upcast, precision = _launch_args(q.dtype)
    BLOCK_M, BLOCK_N, num_warps, num_stages = config("fwd", D, q.dtype)
    _launch(_attn_fwd_kernel, (triton.cdiv(N, BLOCK_M), B * H),
            q, k, v, o, lse,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, N, scale * LOG2E,
            HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, UPCAST=upcast, PRECISION=precision,
            num_warps=num_warps, num_stages=num_stages)
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale):
    """(dq, dk, dv), each (B, H, N, D) in q's dtype in (B, N, H, D) memory."""
    B, H, N, D = q.shape
    dq = bnhd(B, H, N, D, q.dtype, q.device)
    dk = bnhd(B, H, N, D, q.dtype, q.device)
    dv = bnhd(B, H, N, D, q.dtype, q.device)
    if N == 0 or B * H == 0:
        return dq, dk, dv
    upcast, precision = _launch_args(q.dtype)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d(D))
    delta = _empty((B, H, N), torch.float32, q.device)
    BLOCK_M, _, num_warps, num_stages = config("pre", D, q.dtype)
    _launch(_attn_bwd_preprocess, (triton.cdiv(N, BLOCK_M), B * H),
            o, do, delta, *o.stride(), *do.stride(), H, N,
            BLOCK_M=BLOCK_M, num_warps=num_warps, num_stages=num_stages, **common)
    common.update(UPCAST=upcast, PRECISION=precision)
    BLOCK_M, BLOCK_N, num_warps, num_stages = config("dkdv", D, q.dtype)
    _launch(_attn_bwd_dkdv_kernel, (triton.cdiv(N, BLOCK_N), B * H),
            q, k, v, do, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
            H, N, scale * LOG2E, scale,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages, **common)
    BLOCK_M, BLOCK_N, num_warps, num_stages = config("dq", D, q.dtype)
    _launch(_attn_bwd_dq_kernel, (triton.cdiv(N, BLOCK_M), B * H),
            q, k, v, do, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, N, scale * LOG2E, scale,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages, **common)
    return dq, dk, dv


def attention_map_fwd(q, k, query_idx, scale):
    """fp32 softmax rows (B, H, R, N) of query_idx (R,), or with query_idx None the mean over queries (B, H, N)."""
    B, H, N, D = q.shape
    upcast, precision = _launch_args(q.dtype)
    BLOCK_M, BLOCK_N, num_warps, num_stages = config("map", D, q.dtype)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, UPCAST=upcast,
                  PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    if query_idx is not None:
        R = query_idx.shape[0]
        p = _empty((B, H, R, N), torch.float32, q.device)
        if R == 0 or N == 0 or B * H == 0:
            return p
        idx = query_idx.to(device=q.device, dtype=torch.int64)
        idx = torch.where(idx < 0, idx + N, idx).contiguous()  # python-style negative indices, like q[:, :, idx]
        _launch(_attn_map_rows_kernel, (triton.cdiv(R, BLOCK_M), B * H),
                q, k, idx, p, p, *q.stride(), *k.stride(), H, N, R, scale * LOG2E,
                HAS_IDX=True, WRITE_P=True, **common)  # (LSE is unused when WRITE_P: p is passed in its place)
        return p
    out = _empty((B, H, N), torch.float32, q.device)
    if N == 0 or B * H == 0:
        return out
    lse = _empty((B, H, N), torch.float32, q.device)
    _launch(_attn_map_rows_kernel, (triton.cdiv(N, BLOCK_M), B * H),
            q, k, lse, lse, lse, *q.stride(), *k.stride(), H, N, N, scale * LOG2E,
            HAS_IDX=False, WRITE_P=False, **common)  # (QIDX and P are unused here: lse is passed in their place)
    _launch(_attn_map_mean_kernel, (triton.cdiv(N, BLOCK_N), B * H),
            q, k, lse, out, *q.stride(), *k.stride(), H, N, scale * LOG2E, 1.0 / N, **common)
    return out


# -----------------------------------------------------------------------------
# the Triton-only API, with autograd (kernels.attention in kernels/ops.py adds routing and torch.compile support)

class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v for q, k, v (B, H, N, D) of any strides; returns (B, H, N, D) in q's dtype."""
    check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _Attention.apply(q, k, v, scale)


def attention_map(q, k, query_idx=None, scale=None):
    """fp32 softmax rows (B, H, R, N) of the queries query_idx (R,), or their mean over all queries (B, H, N).

    No autograd: the inputs are detached. query_idx may be negative (counted from the end) but is not bounds-checked.
    """
    check(q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return attention_map_fwd(q.detach(), k.detach(), query_idx, scale)
