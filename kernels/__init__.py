"""pretext's kernel API: every op the ViT and the methods call goes through here.

    attention(q, k, v, scale=None)                (B, H, N, D) x3 -> (B, H, N, D), non-causal softmax attention
    attention_map(q, k, query_idx=None, scale=None)  (B, H, N, D) x2 -> (B, H, R, N) rows, or (B, H, N) mean
    gather_tokens(x, idx, pos=None)               (B, N, D), (B, K) -> (B, K, D), optionally adding pos first
    cosine_similarity(a, b, eps=1e-12)            (B, Na, D), (B, Nb, D) -> (B, Na, Nb)

    report()        {op: {"path": "triton" | "torch", "why": str}} for every op called since import / reset_report()
    report_line()   the same in one short line (what the training scripts print after their first step)
    reset_report()

Dispatch (kernels/ops.py): CUDA tensors the kernels take go to the Triton kernels in kernels/{attention,gather,
similarity}.py; everything else (CPU, PRETEXT_KERNELS=torch, a head dim or dtype a kernel does not cover, no
triton installed) runs the plain-PyTorch references in kernels/reference.py, and the report says which and why.
PRETEXT_KERNELS=triton turns every such fallback into an error naming the op and the reason. The ops trace under
torch.compile(fullgraph=True) as torch.ops.pretext.* custom ops, on CPU tensors too (their CPU implementation is
the reference). ops.py is imported after the Triton modules and its functions are bound here last: importing a
submodule binds its name on the package, and `kernels.attention` must stay the function.
"""
from .ops import HAVE_TRITON, HEAD_DIMS, MODES, report, report_line, reset_report  # noqa: F401  (imports the kernels)
from .ops import attention, attention_map, cosine_similarity, gather_tokens  # noqa: F401

__all__ = ["attention", "attention_map", "gather_tokens", "cosine_similarity", "report", "report_line",
           "reset_report", "use_triton"]


def use_triton(t) -> bool:
    """True when a CUDA tensor `t` would take the Triton path: CUDA, triton present, PRETEXT_KERNELS not 'torch'.
    (Whether a given call did is in report(): dtype and shape decide too.)"""
    import os
    return t.is_cuda and HAVE_TRITON and os.environ.get("PRETEXT_KERNELS", "auto") != "torch"
