"""Benchmarks: pretext's kernels against the PyTorch alternatives, and whole training steps, in one run.

    python bench.py kernels                   # attention / gather / cosine similarity at ViT-S shapes, bf16
    python bench.py kernels --dtype fp16 --only attention
    python bench.py train --method ijepa      # img/s and MFU of one method's training step, synthetic batch
    python bench.py train --method mae --batch-size 64

Every number is a median of triton.testing.do_bench (25 warm-up, 100 timed repetitions, no L2 flush), taken in
the same process as the PyTorch baselines it is compared with. Kernel benchmarks need a CUDA GPU. Results go to
stdout as a markdown table (paste into BENCHMARKS.md with the command and the GPU).

FLOP / byte conventions (as ../shared/reference/style-and-kernels.md 2.6):
- attention forward 4*B*H*N^2*D FLOPs (two matmuls), forward+backward x3.5 (five matmuls, one recomputed);
- gather: bytes moved = read K rows + write K rows (+ the pos rows), x2 again for the backward;
- cosine similarity: 2*B*Na*Nb*D FLOPs; bytes = inputs + output.
MFU of a training step uses the dense bf16 peak of the GPU (H100 SXM: 989 TFLOP/s; measured matmul ~792).
"""
import argparse
import importlib
import math
import os
import sys

import torch
import torch.nn.functional as F

import kernels
from kernels.reference import cosine_similarity_ref

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# shapes that matter in pretext (B, H, N, D): ViT-S at 224, MAE's visible set, MAE's decoder (512 wide,
# 16 heads -> D 32), an I-JEPA context (~0.85 * 196 minus the targets ~ 56-110 tokens; 56 as the issue),
# and ViT-B
ATTN_SHAPES = [("ViT-S 224", 256, 6, 197, 64), ("MAE encoder (25% of 196 + CLS)", 256, 6, 50, 64),
               ("MAE decoder 512x16", 256, 16, 197, 32), ("I-JEPA context", 128, 6, 56, 64),
               ("ViT-B 224", 128, 12, 197, 64)]
GATHER_SHAPES = [("MAE keep 49 of 196, D 384", 256, 196, 49, 384), ("I-JEPA context 110 of 196", 128, 196, 110, 384),
                 ("I-JEPA targets 4x~35, repeats", 128, 196, 140, 384), ("MAE unshuffle 196 of 196, D 512", 256, 196, 196, 512)]
COS_SHAPES = [("patch x patch, ViT-S", 64, 196, 196, 384), ("KoLeo CLS x CLS", 1, 128, 128, 384),
              ("anchors x patches", 256, 8, 196, 384)]


def bench(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def gpu_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_tflops():
    name = gpu_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan"))


def fwd_bwd(f, *inputs):
    out = f(*inputs)
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(f(*inputs), [t for t in inputs if t.requires_grad], grad)


def row(cells):
    print("| " + " | ".join(str(c) for c in cells) + " |")


def bench_attention(dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    print(f"\n### attention ({dtype}), ms; TFLOP/s in brackets; ratio = fastest SDPA / pretext (> 1: pretext faster)\n")
    row(["shape (B, H, N, D)", "pass", "pretext"] + list(backends) + ["ratio"])
    row(["---"] * (4 + len(backends)))
    for name, B, H, N, D in ATTN_SHAPES:
        # q, k, v as strided views of one fused qkv projection, as vit.py produces them
        qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
        q, k, v = (t.detach().requires_grad_() for t in qkv)
        flops = 4 * B * H * N * N * D
        for pass_, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            def run(f):
                try:
                    return bench((lambda: f(q, k, v)) if pass_ == "fwd" else fwd_bwd(f, q, k, v))
                except RuntimeError:
                    return float("nan")     # backend not available for this shape / dtype
            ours = run(kernels.attention)
            base = {}
            for bname, b in backends.items():
                with sdpa_kernel([b]):
                    base[bname] = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
            best = min((t for t in base.values() if not math.isnan(t)), default=float("nan"))
            fmt = lambda t: "n/a" if math.isnan(t) else f"{t:.3f} ({flops * mult / t / 1e9:.0f})"
            row([f"{name} ({B}, {H}, {N}, {D})", pass_, fmt(ours)] + [fmt(t) for t in base.values()]
                + [f"{best / ours:.2f}x"])


def bench_gather(dtype):
    print(f"\n### token gather + positional embedding ({dtype}), fwd+bwd ms; GB/s in brackets\n")
    row(["shape (B, N -> K, D)", "pretext", "torch.gather(x + pos)", "x[b, idx] + pos[idx]", "ratio"])
    row(["---"] * 5)
    for name, B, N, K, D in GATHER_SHAPES:
        x = torch.randn(B, N, D, device="cuda", dtype=dtype, requires_grad=True)
        pos = torch.randn(1, N, D, device="cuda", dtype=dtype)
        if "repeats" in name:       # 4 overlapping blocks concatenated: indices repeat within a row
            idx = torch.randint(0, N, (B, K), device="cuda")
        else:
            idx = torch.rand(B, N, device="cuda").argsort(1)[:, :K]
        nbytes = 2 * (2 * B * K * D + K * D) * x.element_size()
        ours = bench(fwd_bwd(lambda x: kernels.gather_tokens(x, idx, pos), x))
        t_gather = bench(fwd_bwd(lambda x: torch.gather(x + pos, 1, idx[..., None].expand(-1, -1, D)), x))
        ar = torch.arange(B, device="cuda")[:, None]
        t_index = bench(fwd_bwd(lambda x: x[ar, idx] + pos[0, idx], x))
        fmt = lambda t: f"{t:.4f} ({nbytes / t / 1e6:.0f})"
        row([f"{name} ({B}, {N} -> {K}, {D})", fmt(ours), fmt(t_gather), fmt(t_index),
             f"{min(t_gather, t_index) / ours:.2f}x"])


def bench_cosine(dtype):
    print(f"\n### cosine similarity ({dtype}), ms (fwd / fwd+bwd); ratio vs eager normalize + bmm\n")
    row(["shape (B, Na, Nb, D)", "pretext fwd", "eager fwd", "pretext fwd+bwd", "eager fwd+bwd", "ratio fwd+bwd"])
    row(["---"] * 6)
    for name, B, Na, Nb, D in COS_SHAPES:
        a = torch.randn(B, Na, D, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(B, Nb, D, device="cuda", dtype=dtype, requires_grad=True)
        eager = lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)
        t = [bench(lambda: kernels.cosine_similarity(a, b)), bench(lambda: eager(a, b)),
             bench(fwd_bwd(kernels.cosine_similarity, a, b)), bench(fwd_bwd(eager, a, b))]
        row([f"{name} ({B}, {Na}, {Nb}, {D})"] + [f"{x:.4f}" for x in t] + [f"{t[3] / t[2]:.2f}x"])
        err = (kernels.cosine_similarity(a, b).float() - cosine_similarity_ref(a, b).float()).abs().max().item()
        assert err < 2e-2, f"cosine similarity kernel disagrees with the reference by {err}"


def kernels_main(a):
    if not torch.cuda.is_available():
        raise SystemExit("bench.py kernels needs a CUDA GPU (the Triton kernels run only in the interpreter on CPU)")
    if os.environ.get("PRETEXT_KERNELS") == "torch":
        raise SystemExit("unset PRETEXT_KERNELS=torch: it would benchmark the references against themselves")
    import triton
    print(f"## kernels on {gpu_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    dtype = DTYPES[a.dtype]
    for name, f in (("attention", bench_attention), ("gather", bench_gather), ("cosine", bench_cosine)):
        if a.only in (None, name):
            f(dtype)


def train_main(a):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    mod = importlib.import_module(a.method)
    cfg = mod.Config()
    for k, v in (("batch_size", a.batch_size), ("size", a.size), ("img_size", a.img_size), ("in_chans", a.in_chans)):
        if v is not None:
            setattr(cfg, k, v)
    kw = {"augment": not a.no_augment} if a.method == "dino" else {}
    res = mod.benchmark(cfg, steps=a.steps, warmup=a.warmup, **kw)
    tflops = res["img_per_s"] * res["flops_per_img"] / 1e12
    print(f"## {a.method} training step on {gpu_name()}, torch {torch.__version__}")
    print(f"batch {cfg.batch_size}, {cfg.size}, {cfg.img_size} px, {cfg.in_chans} channels: "
          f"{res['img_per_s']:.0f} img/s, {res['flops_per_img'] / 1e9:.1f} GFLOP/img (fwd+bwd), "
          f"{tflops:.1f} TFLOP/s, MFU {100 * tflops / peak_tflops():.1f}% of dense bf16 peak")
    for k, v in res.items():
        if k not in ("img_per_s", "flops_per_img"):
            print(f"  {k}: {v}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels", help="time the Triton kernels against PyTorch")
    k.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    k.add_argument("--only", choices=["attention", "gather", "cosine"])
    t = sub.add_parser("train", help="img/s and MFU of a method's training step")
    t.add_argument("--method", required=True, choices=["ijepa", "mae", "dino"])
    t.add_argument("--batch-size", type=int)
    t.add_argument("--size", choices=["vit_tiny", "vit_small", "vit_base"])
    t.add_argument("--img-size", type=int)
    t.add_argument("--in-chans", type=int, default=3, help="3 as the official numbers (ImageNet RGB)")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--no-augment", action="store_true", help="dino: time the step without the GPU augmentations")
    t.add_argument("--warmup", type=int, default=10)
    a = p.parse_args()
    kernels_main(a) if a.cmd == "kernels" else train_main(a)
