"""Token gather in Triton, with an optional fused positional-embedding add, and a deterministic backward.

    gather_tokens(x, idx, pos=None)   x (B, N, D), idx (B, K) int64, pos None | (1, N, D) | (B, N, D) -> (B, K, D)
                                      out[b, j] = x[b, idx[b, j]] (+ pos[b or 0, idx[b, j]]); autograd for x and pos

What it computes: exactly kernels/reference.py:gather_tokens_ref (torch.gather along the token axis after x + pos),
i.e. MAE's keep-set / unshuffle gathers and I-JEPA's mask gathers, without materialising a (B, K, D) index.

Forward (_gather_fwd_kernel), grid (B * cdiv(K, BLOCK_R), cdiv(D, BLOCK_D)): each program loads BLOCK_R indices
and copies BLOCK_R x BLOCK_D elements of the chosen rows (adding pos if given; the add is done in fp32 and
rounded once to the output dtype). x, pos, idx may have any strides (x can be tokens[:, 1:], pos a (1, N, D)
parameter broadcast with stride 0 over the batch).

Backward (_gather_bwd_kernel), grid (B * cdiv(N, BLOCK_R), cdiv(D, BLOCK_D)): the "inverse" of the forward,
one program per block of DESTINATION rows n of grad_x (a pull, not a push/scatter):
    grad_x[b, n] = sum over j with idx[b, j] == n of grad_out[b, j]    (0 when n was not gathered)
Each program scans idx[b, :] in BLOCK_K chunks, compares it against its BLOCK_R destinations, and then adds the
matching grad_out rows one match at a time in increasing j (a loop over the largest match count in the chunk).
  - unique indices (MAE, one I-JEPA mask): every destination matches 0 or 1 times, so this is one masked load
    and one store per row, and -- unlike zero-fill + scatter -- every grad row is written exactly once with no
    separate memset.
  - repeated indices (I-JEPA target blocks that overlap, or any idx with duplicates): handled by the same code,
    the matches are summed in fp32 in a fixed order. Deterministic, no atomics, no sort, no host sync, so there is
    no uniqueness check to pay for and nothing for the caller to promise.
  The price is the index scan: every destination block reads the whole idx row, i.e. B * cdiv(N, BLOCK_R) *
  cdiv(D, BLOCK_D) * K int64 loads and B*N*K compares. idx is tiny (B*K*8 bytes) and these reads hit L2, so at
  ViT sizes (N ~ 200, K <= N) it should be small next to the row traffic, but it grows as N*K: for K, N in the
  thousands a sort-based segmented reduction would be the better design.
grad_pos = grad_x for a (B, N, D) pos, and grad_x.sum(0) (a PyTorch reduction) for a (1, N, D) pos.

Cost, for B, K gathered rows out of N, D channels, elt bytes per element:
  FLOPs:  none to speak of (B*K*D adds with pos).
  bytes:  forward reads B*K*D*elt (+ the same from pos) and B*K*8 of index, writes B*K*D*elt.
          backward reads B*K*D*elt of grad_out and writes B*N*D*elt of grad_x (+ the idx scan above, from L2);
          a (1, N, D) pos adds a B*N*D read and an N*D write for the batch sum.
  MAE encoder gather at (256, 196 -> 49, 384) bf16: 9.6 MB read + 9.6 MB written forward.

How it should compare with PyTorch on a GPU: NOT MEASURED YET -- no GPU has run this code; `python bench.py
gpu-check` times it against torch.gather and index_select (fwd and fwd+bwd). What is known, on one H100, bf16, at
(256, 196 -> 49, 384): torch.gather with index.expand 23.9 us forward, index_select on the flattened tensor
17.8 us, a one-row-per-program Triton gather 13.3 us; fwd+bwd of torch.gather(index.repeat) 233 us, of
index_select 190 us, dominated by the zero-fill + scatter backward that this kernel replaces with a single write of
grad_x. Expect the forward near that Triton gather (it is a pure copy at memory speed) and the fwd+bwd well ahead
of torch (target 1.5x); the block sizes here differ from that measured kernel, so the number may move either way.

Checked without a GPU (tests/test_aot_compile.py): every configuration compiles for sm_80 and sm_90 without
register spills (the 16-bit backward spilled 20 B per thread with BLOCK_K = 128; it uses 64).

Limits: indices must be in [0, N); out-of-range indices are not checked (a check would need a host sync) -- the
forward reads zeros for them and the backward drops their gradient, where torch.gather would raise. x and pos
may differ in dtype (the output takes the promoted dtype, like x + pos); D is a runtime argument. Runs on CUDA
tensors, or on CPU tensors under TRITON_INTERPRET=1. All math is in fp32 (no tl.dot), so the interpreter's bf16 dot
problem does not apply; note the interpreter truncates fp32 -> bf16 casts where a GPU rounds to nearest even, so
bf16 results with pos or repeated indices can differ by one bf16 ulp there. Masked pointer arithmetic only (triton
3.6 and 3.7).
"""

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET
from ._common import empty as _empty
from ._common import launch as _launch


DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch configurations (no autotune; not measured on a GPU yet). The launchers read only config(), and
# tests/test_aot_compile.py compiles every configuration they can pick for sm_80 and sm_90 (shared memory, spills).
#   BLOCK_R  16 rows per program: 16 x 128 channels is 4 KB of bf16 and a (16, 128) fp32 accumulator, 16 registers
#            per thread at 4 warps.
#   BLOCK_D  the channel block: D padded to a power of two, at most 128 (wider D is split over grid axis 1).
#   BLOCK_K  index entries compared per step of the backward's index scan (K <= 128 for MAE's keep-set at 75%
#            masking: one step). fp16/bf16 take 64: with 128 the (16, 128) hit matrix, the match search and the
#            16-bit conversions spilled 20 B per thread when compiled for sm_90.
BLOCK_R = 16
BLOCK_D_MAX = 128


def config(pass_, D, dtype):
    """(BLOCK_R, BLOCK_D, BLOCK_K, num_warps) of the forward ("fwd") or backward ("bwd") for D channels."""
    block_d = min(BLOCK_D_MAX, triton.next_power_of_2(max(D, 16)))
    block_k = 128 if dtype == torch.float32 else 64
    return BLOCK_R, block_d, block_k, 4


@triton.jit
def _gather_fwd_kernel(
    X, POS, IDX, OUT,  # *Pointers*: x (B, N, D), pos (B or broadcast, N, D), idx (B, K) int64, out (B, K, D)
    stride_xb, stride_xn, stride_xd,
    stride_pb, stride_pn, stride_pd,  # stride_pb = 0 for a (1, N, D) pos
    stride_ib, stride_ik,
    stride_ob, stride_ok, stride_od,
    N, K, D,  # source rows, gathered rows, channels (all runtime)
    HAS_POS: tl.constexpr,  # add pos[b, idx] to the gathered rows
    BLOCK_R: tl.constexpr,  # output rows per program
    BLOCK_D: tl.constexpr,  # channels per program
):
    num_rblocks = tl.cdiv(K, BLOCK_R)
    pid = tl.program_id(0)
    off_b = (pid // num_rblocks).to(tl.int64)
    offs_r = (pid % num_rblocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = offs_r < K
    mask_d = offs_d < D
    src = tl.load(IDX + off_b * stride_ib + offs_r * stride_ik, mask=mask_r, other=0)  # (BLOCK_R,) int64
    ok = mask_r & (src >= 0) & (src < N)  # out-of-range indices read zeros instead of stray memory
    mask = ok[:, None] & mask_d[None, :]
    val = tl.load(X + off_b * stride_xb + src[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
    if HAS_POS:  # add in fp32, round once on the store
        val = val.to(tl.float32) + tl.load(POS + off_b * stride_pb + src[:, None] * stride_pn
                                           + offs_d[None, :] * stride_pd, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + off_b * stride_ob + offs_r[:, None] * stride_ok + offs_d[None, :] * stride_od,
             val.to(OUT.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])


@triton.jit
def _gather_bwd_kernel(
    GOUT, IDX, GX,  # *Pointers*: grad_out (B, K, D) strided, idx (B, K) int64, grad_x (B, N, D)
    stride_gb, stride_gk, stride_gd,
    stride_ib, stride_ik,
    stride_xb, stride_xn, stride_xd,
    N, K, D,
    BLOCK_R: tl.constexpr,  # destination rows (of grad_x) per program
    BLOCK_D: tl.constexpr,  # channels per program
    BLOCK_K: tl.constexpr,  # index entries compared per scan step
):
    num_rblocks = tl.cdiv(N, BLOCK_R)
    pid = tl.program_id(0)
    off_b = (pid // num_rblocks).to(tl.int64)
    offs_r = (pid % num_rblocks) * BLOCK_R + tl.arange(0, BLOCK_R)  # destination rows n
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = offs_r < N
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start_k in range(0, K, BLOCK_K):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        src = tl.load(IDX + off_b * stride_ib + offs_k * stride_ik, mask=offs_k < K, other=-1)  # -1 matches nothing
        hit = src[None, :] == offs_r[:, None]  # (BLOCK_R, BLOCK_K): gathered row j came from destination n
        n_hits = tl.max(tl.sum(hit.to(tl.int32), 1), 0)  # 0 or 1 with unique indices
        last = tl.full([BLOCK_R], -1, dtype=tl.int32) + start_k  # last j already added, per destination row
        for _ in range(n_hits):
            # the next match after `last` in increasing j (K when a row has no more): a fixed summation order
            j = tl.min(tl.where(hit & (offs_k[None, :] > last[:, None]), offs_k[None, :], K), 1)
            found = j < K
            acc += tl.load(GOUT + off_b * stride_gb + j[:, None] * stride_gk + offs_d[None, :] * stride_gd,
                           mask=found[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            last = tl.where(found, j, last)
    tl.store(GX + off_b * stride_xb + offs_r[:, None] * stride_xn + offs_d[None, :] * stride_xd,
             acc.to(GX.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])


# -----------------------------------------------------------------------------
# launchers: every launch goes through _common.launch with config()

def gather_fwd(x, idx, pos):
    """out (B, K, D) = x[b, idx] (+ pos[b or 0, idx]) in the promoted dtype of x and pos."""
    B, N, D = x.shape
    K = idx.shape[1]
    dtype = x.dtype if pos is None else torch.result_type(x, pos)
    out = _empty((B, K, D), dtype, x.device)
    if out.numel() == 0:
        return out
    p = x if pos is None else pos.expand(B, N, D)  # a (1, N, D) pos gets batch stride 0
    BLOCK_R, BLOCK_D, _, num_warps = config("fwd", D, dtype)
    _launch(_gather_fwd_kernel, (B * triton.cdiv(K, BLOCK_R), triton.cdiv(D, BLOCK_D)),
            x, p, idx, out,
            *x.stride(), *p.stride(), *idx.stride(), *out.stride(),
            N, K, D,
            HAS_POS=pos is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return out


def gather_bwd(grad, idx, N):
    """grad_x (B, N, D) in grad's dtype: the gathered rows' gradients summed back into their source rows."""
    B, K, D = grad.shape
    gx = _empty((B, N, D), grad.dtype, grad.device)
    if gx.numel() == 0:
        return gx
    if K == 0:
        return gx.zero_()
    BLOCK_R, BLOCK_D, BLOCK_K, num_warps = config("bwd", D, grad.dtype)
    _launch(_gather_bwd_kernel, (B * triton.cdiv(N, BLOCK_R), triton.cdiv(D, BLOCK_D)),
            grad, idx, gx,
            *grad.stride(), *idx.stride(), *gx.stride(),
            N, K, D,
            BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, num_warps=num_warps)
    return gx


def pos_grad(gx, pos_shape, pos_dtype):
    """grad of pos from grad_x (B, N, D): itself for a (B, N, D) pos, the batch sum for a (1, N, D) one."""
    return (gx if pos_shape[0] == gx.shape[0] else gx.sum(0, keepdim=True)).to(pos_dtype)


def check(x, idx, pos):
    """Raise ValueError unless x, idx, pos are what the kernels take."""
    if x.dim() != 3 or idx.dim() != 2 or idx.dtype != torch.int64 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens: need x (B, N, D) and int64 idx (B, K), got {tuple(x.shape)} "
                         f"and {tuple(idx.shape)} {idx.dtype}")
    if pos is not None and (pos.dim() != 3 or pos.shape[0] not in (1, x.shape[0]) or pos.shape[1:] != x.shape[1:]):
        raise ValueError(f"gather_tokens: pos must be (1, N, D) or (B, N, D), got {tuple(pos.shape)} "
                         f"for x {tuple(x.shape)}")
    dtypes = [x.dtype] + ([] if pos is None else [pos.dtype])
    if any(dt not in DTYPES for dt in dtypes):
        raise ValueError(f"gather_tokens: x and pos must be fp32, fp16 or bf16, got {dtypes}")
    if not (x.is_cuda or _INTERPRET or x.is_meta):
        raise ValueError("gather_tokens: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


# -----------------------------------------------------------------------------
# the Triton-only API, with autograd (kernels.gather_tokens in kernels/ops.py adds routing and torch.compile support)

class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, pos):
        ctx.save_for_backward(idx)
        ctx.N = x.shape[1]
        ctx.x_dtype = x.dtype
        ctx.pos_info = None if pos is None else (pos.shape, pos.dtype)
        return gather_fwd(x, idx, pos)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        need_x, _, need_pos = ctx.needs_input_grad
        if not (need_x or need_pos):
            return None, None, None
        gx = gather_bwd(grad, idx, ctx.N)  # (B, N, D) in grad's dtype
        gpos = pos_grad(gx, *ctx.pos_info) if need_pos else None
        return (gx.to(ctx.x_dtype) if need_x else None), None, gpos


def gather_tokens(x, idx, pos=None):
    """out[b, j] = x[b, idx[b, j]] (+ pos[b or 0, idx[b, j]]); x (B, N, D), idx (B, K) int64 -> (B, K, D).

    Repeated indices are allowed (their gradients are summed, deterministically). Indices are not bounds-checked.
    """
    check(x, idx, pos)
    return _GatherTokens.apply(x, idx, pos)
