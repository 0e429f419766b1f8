"""Plain-PyTorch reference implementations of every op in `kernels/`.

These are the definitions the Triton kernels are tested against, and the path every op takes on CPU (and on
CUDA with PRETEXT_KERNELS=torch). They are written for clarity first; attention uses PyTorch's SDPA, whose
math path is exactly softmax(q k^T * scale) v.
"""
import math

import torch
import torch.nn.functional as F


def attention_ref(q, k, v, scale=None):
    """Non-causal softmax attention. q, k, v: (B, H, N, D) (any strides) -> (B, H, N, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_map_ref(q, k, query_idx=None, scale=None):
    """Attention probabilities of the last block, without materialising them in the training path.

    q, k: (B, H, N, D). query_idx: (R,) int64 -> (B, H, R, N), the softmax rows of those queries;
    query_idx None -> (B, H, N), the mean over all N query rows (what viz shows for models without CLS).
    Computed in (at least) fp32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(dt), k.to(dt)
    if query_idx is not None:
        q = q[:, :, query_idx]                                   # (B, H, R, D)
    p = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)  # (B, H, R or N, N)
    return p if query_idx is not None else p.mean(dim=2)


def gather_tokens_ref(x, idx, pos=None):
    """out[b, j] = x[b, idx[b, j]] (+ pos[b or 0, idx[b, j]]). x: (B, N, D), idx: (B, K) int64, pos: (1|B, N, D).

    Repeated indices in a row are allowed; autograd then accumulates their gradients (index_add semantics).
    """
    if pos is not None:
        x = x + pos
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def cosine_similarity_ref(a, b, eps=1e-12):
    """Cosine similarity of every a-token with every b-token. a: (B, Na, D), b: (B, Nb, D) -> (B, Na, Nb).

    Norms are clamped at eps as in F.normalize; computed in (at least) fp32 and returned in a's dtype.
    """
    dt = torch.promote_types(a.dtype, torch.float32)          # fp32 for half inputs, fp64 stays fp64
    an = F.normalize(a.to(dt), dim=-1, eps=eps)
    bn = F.normalize(b.to(dt), dim=-1, eps=eps)
    return (an @ bn.transpose(-2, -1)).to(a.dtype)
