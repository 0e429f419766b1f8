"""pretext's kernel API: every op the ViT and the methods call goes through here.

    attention(q, k, v)                  (B, H, N, D) x3 -> (B, H, N, D), non-causal softmax attention
    attention_map(q, k, query_idx=None) (B, H, N, D) x2 -> (B, H, R, N) rows, or (B, H, N) mean over queries
    gather_tokens(x, idx, pos=None)     (B, N, D), (B, K) -> (B, K, D), optionally adding pos before gathering
    cosine_similarity(a, b)             (B, Na, D), (B, Nb, D) -> (B, Na, Nb)

Dispatch: CUDA tensors go to the Triton kernels in kernels/{attention,gather,similarity}.py; everything else
(CPU, or PRETEXT_KERNELS=torch) to the plain-PyTorch references in kernels/reference.py. The Triton modules
are imported lazily, so a CPU-only install never touches them unless a test asks for them.
"""
import os

import torch

from .reference import attention_map_ref, attention_ref, cosine_similarity_ref, gather_tokens_ref

__all__ = ["attention", "attention_map", "gather_tokens", "cosine_similarity", "use_triton"]


def use_triton(t: torch.Tensor) -> bool:
    """True when `t` should take the Triton path: a CUDA tensor and PRETEXT_KERNELS is not 'torch'."""
    return t.is_cuda and os.environ.get("PRETEXT_KERNELS", "triton") != "torch"


def attention(q, k, v, scale=None):
    if use_triton(q):
        from .attention import attention as attention_triton
        return attention_triton(q, k, v, scale)
    return attention_ref(q, k, v, scale)


def attention_map(q, k, query_idx=None, scale=None):
    if use_triton(q):
        from .attention import attention_map as attention_map_triton
        return attention_map_triton(q, k, query_idx, scale)
    return attention_map_ref(q, k, query_idx, scale)


def gather_tokens(x, idx, pos=None):
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens: idx must be int64 of shape (B, K) with B={x.shape[0]}, "
                         f"got {tuple(idx.shape)} {idx.dtype}")
    if use_triton(x):
        from .gather import gather_tokens as gather_triton
        return gather_triton(x, idx, pos)
    return gather_tokens_ref(x, idx, pos)


def cosine_similarity(a, b, eps=1e-12):
    if use_triton(a):
        from .similarity import cosine_similarity as cosine_triton
        return cosine_triton(a, b, eps)
    return cosine_similarity_ref(a, b, eps)
