"""Fused non-causal softmax attention in Triton (flash-attention 2 style), forward + backward, and attention maps.

    attention(q, k, v, scale=None)                 (B, H, N, D) x3 -> (B, H, N, D), autograd through q, k, v
    attention_map(q, k, query_idx=None, scale=None) (B, H, N, D) x2 -> (B, H, R, N) softmax rows, or the
                                                    (B, H, N) mean over all query rows; fp32, no autograd

What it computes: O = softmax(q k^T * scale) v with scale = 1/sqrt(D) by default, exactly the math of
F.scaled_dot_product_attention (kernels/reference.py:attention_ref), without ever writing the N x N matrix.

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
    (D, dtype). D (head dim) is a constexpr: 32, 64 or 128.
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

How it should compare with PyTorch on a GPU: NOT YET MEASURED with this code (no GPU was available when it was
written; bench.py measures it). Reference numbers on one H100 at (256, 6, 197, 64) bf16
(/work/shared/reference/style-and-kernels.md, 2.1): cuDNN SDPA (the default backend there) 89-92 us forward and
~0.43 ms fwd+bwd; flash 127 / 717 us; a minimal masked Triton forward of the same design as this one ran 98 us with
BLOCK_M=64, BLOCK_N=32 (within 10% of cuDNN) and 21 us at N = 50, faster than every SDPA backend. Expect the
forward to be close to cuDNN and the backward to be slower than cuDNN (it recomputes more than FA2's fused
backward). Attention is only 11-14% of a ViT-S block's fwd+bwd time, so even a 2x faster kernel saves <= ~7%.

Checked without a GPU: every launch the wrappers make (D 32/64/128 x fp32/fp16/bf16, forward, backward, maps) was
compiled for sm_90 with the ptxas bundled in triton 3.7.1 and in triton 3.6.0: shared memory <= 107 KB, no
register spills in fp16/bf16; fp32 (ieee dots on the FMA units) runs at 8 warps and still spills at D = 128 --
fp32 is the exact-parity path, not a fast one.

Limits: non-causal, no mask, no dropout; q, k, v must have the same shape (self-attention); D in {32, 64, 128};
runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the test path). Block sizes are fixed (no
autotune, which also keeps the Triton interpreter working). Written for triton 3.6 and 3.7: masked pointer
arithmetic only (no block pointers / tensor descriptors / libdevice). Under the interpreter bf16 tl.dot is wrong,
so with TRITON_INTERPRET=1 bf16 tiles are upcast to fp32 (UPCAST constexpr). The interpreter on triton 3.6 with
numpy >= 2.4 fails on runtime loop bounds (style-and-kernels.md 2.5); with triton 3.7.1 + numpy 2.4 they work
(the CPU tests run that way), so on triton 3.6 interpret with numpy < 2.4. Compiled GPU code is unaffected.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET
from ._common import empty as _empty
from ._common import launch_args as _launch_args


LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))

# Fixed block sizes (no autotune). Forward: 64 query rows x 32 keys per step, 4 warps, 3 stages was the fastest of
# six fixed configs for a kernel of this design on an H100 at (256, 6, 197, 64) bf16 (style-and-kernels.md 2.1).
# D = 128 and fp32 keep the same tiles with 8 warps (not measured). Backward: the program that owns a tile keeps
# 64 rows (key rows for dK/dV, query rows for dQ) and streams the other side 32 rows at a time, like the forward;
# not measured yet. The interpreter uses the same blocks, so the CPU tests exercise the real masking pattern
# (N = 197 spans 4 query blocks and 7 key blocks; the last of each is partial).
FWD_BLOCK_M, FWD_BLOCK_N = 64, 32
BWD_BLOCK_OWN, BWD_BLOCK_STREAM = 64, 32  # rows a program owns (keys for dK/dV, queries for dQ), rows streamed
PRE_BLOCK = 64                     # rows per program of the delta preprocess
MAP_BLOCK_M, MAP_BLOCK_N = 64, 32  # attention_map


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
    HEAD_DIM: tl.constexpr,  # D, a power of two (32, 64, 128)
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
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    # the q tile stays in registers for the whole loop; rows past N load as 0 (finite scores, never stored)
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_m[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max of the scaled scores (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running un-normalised output
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_n[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_n[:, None], other=0.0)
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
             mask=mask_m[:, None])
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
    BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax-backward row term. reads 2*N*D, writes N
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=mask_m[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=mask_m[:, None], other=0.0).to(tl.float32)
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
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < N
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    row_base = pid_bh.to(tl.int64) * N  # lse / delta

    # this program's K and V tiles stay in registers; key rows past N are loaded as 0 and never stored
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_n[:, None], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask_n[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_m[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=mask_m[:, None],
                     other=0.0)
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
    tl.store(DK + dk_offs, dk.to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + dk_offs, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


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
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    row_base = pid_bh.to(tl.int64) * N

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=mask_m[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_n[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_n[:, None], other=0.0)
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
    tl.store(DQ + dq_offs, dq.to(DQ.dtype.element_ty), mask=mask_m[:, None])


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
    offs_d = tl.arange(0, HEAD_DIM)
    mask_r = offs_r < R
    if HAS_IDX:
        rows = tl.load(QIDX + offs_r, mask=mask_r, other=0)
    else:
        rows = offs_r
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_r[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_n[:, None], other=0.0)
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
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_n[:, None],
                        other=0.0)
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
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < N
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_n[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    col_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_m[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * N + rows, mask=mask_m, other=0.0)
        pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        col_sum += tl.sum(tl.where(mask_m[None, :], pT, 0.0), 1)
    tl.store(OUT + pid_bh.to(tl.int64) * N + offs_n, col_sum * inv_n, mask=mask_n)


# -----------------------------------------------------------------------------
# wrappers

def _num_warps(D, dtype):
    # 4 warps for 16-bit D <= 64; D = 128 and fp32 (ieee dots run on the FMA units and need more registers: at 4
    # warps they spilled, seen by compiling for sm_90) get 8
    return 4 if D <= 64 and dtype != torch.float32 else 8


def _check(q, *others):
    if q.dim() != 4:
        raise ValueError(f"attention: expected (B, H, N, D) tensors, got {tuple(q.shape)}")
    for t in others:
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"attention: q, k, v must share shape, dtype and device, got {tuple(q.shape)} "
                             f"{q.dtype} {q.device} and {tuple(t.shape)} {t.dtype} {t.device}")
    if q.shape[-1] not in (32, 64, 128):
        raise ValueError(f"attention: head dim must be 32, 64 or 128, got {q.shape[-1]}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"attention: dtype must be fp32, fp16 or bf16, got {q.dtype}")
    if not (q.is_cuda or _INTERPRET):
        raise ValueError("attention: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def _bnhd(B, H, N, D, dtype, device):
    """A (B, H, N, D) view of a (B, N, H, D) buffer: what o.transpose(1, 2).reshape(B, N, H*D) wants."""
    return _empty((B, N, H, D), dtype, device).permute(0, 2, 1, 3)


def _attention_fwd(q, k, v, scale):
    B, H, N, D = q.shape
    o = _bnhd(B, H, N, D, q.dtype, q.device)
    lse = _empty((B, H, N), torch.float32, q.device)
    if N == 0 or B * H == 0:
        return o, lse
    upcast, precision = _launch_args(q.dtype)
    grid = (triton.cdiv(N, FWD_BLOCK_M), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, N, scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=FWD_BLOCK_M, BLOCK_N=FWD_BLOCK_N, UPCAST=upcast, PRECISION=precision,
        num_warps=_num_warps(D, q.dtype), num_stages=3,
    )
    return o, lse


def _attention_bwd(do, q, k, v, o, lse, scale):
    B, H, N, D = q.shape
    dq = _bnhd(B, H, N, D, q.dtype, q.device)
    dk = _bnhd(B, H, N, D, q.dtype, q.device)
    dv = _bnhd(B, H, N, D, q.dtype, q.device)
    if N == 0 or B * H == 0:
        return dq, dk, dv
    upcast, precision = _launch_args(q.dtype)
    delta = _empty((B, H, N), torch.float32, q.device)
    _attn_bwd_preprocess[(triton.cdiv(N, PRE_BLOCK), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, N,
        HEAD_DIM=D, BLOCK_M=PRE_BLOCK, num_warps=4 if D <= 64 else 8,
    )
    num_warps = _num_warps(D, q.dtype)
    _attn_bwd_dkdv_kernel[(triton.cdiv(N, BWD_BLOCK_OWN), B * H)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        H, N, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_M=BWD_BLOCK_STREAM, BLOCK_N=BWD_BLOCK_OWN, UPCAST=upcast, PRECISION=precision,
        num_warps=num_warps, num_stages=2,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(N, BWD_BLOCK_OWN), B * H)](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, N, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_M=BWD_BLOCK_OWN, BLOCK_N=BWD_BLOCK_STREAM, UPCAST=upcast, PRECISION=precision,
        num_warps=num_warps, num_stages=2,
    )
    return dq, dk, dv


def _attention_map(q, k, query_idx, scale):
    B, H, N, D = q.shape
    upcast, precision = _launch_args(q.dtype)
    common = dict(HEAD_DIM=D, UPCAST=upcast, PRECISION=precision, num_warps=_num_warps(D, q.dtype))
    if query_idx is not None:
        R = query_idx.shape[0]
        p = _empty((B, H, R, N), torch.float32, q.device)
        if R == 0 or N == 0 or B * H == 0:
            return p
        idx = query_idx.to(device=q.device, dtype=torch.int64)
        idx = torch.where(idx < 0, idx + N, idx).contiguous()  # python-style negative indices, like q[:, :, idx]
        _attn_map_rows_kernel[(triton.cdiv(R, MAP_BLOCK_M), B * H)](
            q, k, idx, p, p, *q.stride(), *k.stride(), H, N, R, scale * LOG2E,
            BLOCK_M=MAP_BLOCK_M, BLOCK_N=MAP_BLOCK_N, HAS_IDX=True, WRITE_P=True, **common,
        )  # (LSE is unused when WRITE_P: p is passed in its place)
        return p
    out = _empty((B, H, N), torch.float32, q.device)
    if N == 0 or B * H == 0:
        return out
    lse = _empty((B, H, N), torch.float32, q.device)
    _attn_map_rows_kernel[(triton.cdiv(N, MAP_BLOCK_M), B * H)](
        q, k, lse, lse, lse, *q.stride(), *k.stride(), H, N, N, scale * LOG2E,
        BLOCK_M=MAP_BLOCK_M, BLOCK_N=MAP_BLOCK_N, HAS_IDX=False, WRITE_P=False, **common,
    )  # (QIDX and P are unused here: lse is passed in their place)
    _attn_map_mean_kernel[(triton.cdiv(N, MAP_BLOCK_N), B * H)](
        q, k, lse, out, *q.stride(), *k.stride(), H, N, scale * LOG2E, 1.0 / N,
        BLOCK_M=MAP_BLOCK_M, BLOCK_N=MAP_BLOCK_N, **common,
    )
    return out


# -----------------------------------------------------------------------------
# torch.library ops: torch.compile traces through them (register_fake gives shapes/strides, register_autograd the
# backward); the implementation launches the Triton kernels on whatever device the tensors live on.

@torch.library.custom_op("pretext::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_fwd(q, k, v, scale)


@attention_fwd_op.register_fake
def _(q, k, v, scale):
    B, H, N, D = q.shape
    o = q.new_empty((B, N, H, D)).permute(0, 2, 1, 3)
    return o, q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("pretext::attention_bwd", mutates_args=())
def attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_bwd(do, q, k, v, o, lse, scale)


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
    return _attention_map(q, k, query_idx, scale)


@attention_map_op.register_fake
def _(q, k, query_idx, scale):
    B, H, N, D = q.shape
    shape = (B, H, N) if query_idx is None else (B, H, query_idx.shape[0], N)
    return q.new_empty(shape, dtype=torch.float32)


# -----------------------------------------------------------------------------
# public API (what kernels/__init__.py imports)

def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v for q, k, v (B, H, N, D) of any strides; returns (B, H, N, D) in q's dtype."""
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _ = attention_fwd_op(q, k, v, scale)
    return o


def attention_map(q, k, query_idx=None, scale=None):
    """fp32 softmax rows (B, H, R, N) of the queries query_idx (R,), or their mean over all queries (B, H, N).

    No autograd: the inputs are detached. query_idx may be negative (counted from the end) but is not bounds-checked.
    """
    _check(q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return attention_map_op(q.detach(), k.detach(), query_idx, scale)
