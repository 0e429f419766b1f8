"""pretext's kernel API: every op the ViT and the methods call goes through here.

    attention(q, k, v)                  (B, H, N, D) x3 -> (B, H, N, D), non-causal softmax attention
    attention_map(q, k, query_idx=None) (B, H, N, D) x2 -> (B, H, R, N) rows, or (B, H, N) mean over queries
    gather_tokens(x, idx, pos=None)     (B, N, D), (B, K) -> (B, K, D), optionally adding pos before gathering
    cosine_similarity(a, b)             (B, Na, D), (B, Nb, D) -> (B, Na, Nb)

Dispatch: CUDA tensors go to the Triton kernels in kernels/{attention,gather,similarity}.py; everything else
(CPU, PRETEXT_KERNELS=torch, or an attention head dim the kernel does not cover) to the plain-PyTorch
references in kernels/reference.py. The Triton modules are imported here, before the public functions are
defined: importing a submodule binds its name on the package, and `kernels.attention` must stay the function.
Without triton installed, everything runs on the references.
"""
import os

import torch

from .reference import attention_map_ref, attention_ref, cosine_similarity_ref, gather_tokens_ref

try:
    from . import attention as _attention_triton
    from . import gather as _gather_triton
    from . import similarity as _similarity_triton
    HAVE_TRITON = True
except ImportError:         # e.g. a platform without triton wheels: the references serve every device
    HAVE_TRITON = False

__all__ = ["attention", "attention_map", "gather_tokens", "cosine_similarity", "use_triton"]

ATTENTION_HEAD_DIMS = (32, 64, 128)     # what kernels/attention.py compiles for (D is a constexpr there)


def use_triton(t: torch.Tensor) -> bool:
    """True when `t` should take the Triton path: a CUDA tensor, triton present, PRETEXT_KERNELS not 'torch'."""
    return t.is_cuda and HAVE_TRITON and os.environ.get("PRETEXT_KERNELS", "triton") != "torch"


def attention(q, k, v, scale=None):
    if use_triton(q) and q.shape[-1] in ATTENTION_HEAD_DIMS:
        return _attention_triton.attention(q, k, v, scale)
    return attention_ref(q, k, v, scale)


def attention_map(q, k, query_idx=None, scale=None):
    if use_triton(q) and q.shape[-1] in ATTENTION_HEAD_DIMS:
        return _attention_triton.attention_map(q, k, query_idx, scale)
    return attention_map_ref(q, k, query_idx, scale)


def gather_tokens(x, idx, pos=None):
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens: idx must be int64 of shape (B, K) with B={x.shape[0]}, "
                         f"got {tuple(idx.shape)} {idx.dtype}")
    if use_triton(x):
        return _gather_triton.gather_tokens(x, idx, pos)
    return gather_tokens_ref(x, idx, pos)


def cosine_similarity(a, b, eps=1e-12):
    if use_triton(a):
        return _similarity_triton.cosine_similarity(a, b, eps)
    return cosine_similarity_ref(a, b, eps)
