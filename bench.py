"""Benchmarks: pretext's kernels against the PyTorch alternatives, whole training steps, the data path, and the
first-GPU check that runs all of it in one go.

    python bench.py kernels                   # attention / gather / cosine similarity at ViT-S shapes, bf16
    python bench.py kernels --dtype fp16 --only attention
    python bench.py train --method ijepa      # img/s and MFU of one method's training step, synthetic batch
    python bench.py train --method mae --batch-size 64 --no-compile
    python bench.py data                      # frames/s of one loader worker per input kind (CPU only)
    python bench.py gpu-check --out DIR       # on a new GPU machine: tests, kernel + training timings, torchrun
    python bench.py gpu-check --dry-run       # what gpu-check would run (works on CPU)

Every kernel number is a median of triton.testing.do_bench (25 ms warm-up, 100 ms of timed repetitions, no L2
flush), taken in the same process as the PyTorch baselines it is compared with. Kernel and training benchmarks
need a CUDA GPU. Results go to stdout as markdown tables (paste into BENCHMARKS.md with the command and the GPU).

FLOP / byte conventions, those of the FlashAttention benchmarks (Dao-AILab/flash-attention
benchmarks/benchmark_flash_attention.py, flops()):
- attention forward 4*B*H*N^2*D FLOPs (two matmuls), forward+backward x3.5 (backward 2.5x: five matmuls);
- gather: bytes moved = read K rows + write K rows (+ the pos rows), x2 again for the backward;
- cosine similarity: 2*B*Na*Nb*D FLOPs; bytes = inputs + output.
MFU of a training step uses the dense bf16 peak of the GPU's datasheet (H100 / H200 SXM: 989 TFLOP/s; a large bf16
matmul reaches ~790 of it).
"""
import argparse
import importlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import kernels
from kernels.reference import cosine_similarity_ref

REPO = os.path.dirname(os.path.abspath(__file__))
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peak, NVIDIA datasheets
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"  # the tests point this at the CPU to run the timing code paths without a GPU

# shapes that matter in pretext (B, H, N, D): ViT-S at 224, MAE's visible set, MAE's decoder (512 wide,
# 16 heads -> D 32), an I-JEPA context (~46-62 of 196 tokens with the default masks), ViT-B, and the I-JEPA
# predictor (128 wide, 8 heads -> D 16; one sequence per target block: 4 x batch 128, ~53 context + ~33 target tokens)
ATTN_SHAPES = [("ViT-S 224", 256, 6, 197, 64), ("MAE encoder (25% of 196 + CLS)", 256, 6, 50, 64),
               ("MAE decoder 512x16", 256, 16, 197, 32), ("I-JEPA context", 128, 6, 56, 64),
               ("ViT-B 224", 128, 12, 197, 64), ("I-JEPA predictor 128x8", 512, 8, 86, 16)]
GATHER_SHAPES = [("MAE keep 49 of 196, D 384", 256, 196, 49, 384), ("I-JEPA context 110 of 196", 128, 196, 110, 384),
                 ("I-JEPA targets 4x~35, repeats", 128, 196, 140, 384), ("MAE unshuffle 196 of 196, D 512", 256, 196, 196, 512)]
COS_SHAPES = [("patch x patch, ViT-S", 64, 196, 196, 384), ("KoLeo CLS x CLS", 1, 128, 128, 384),
              ("anchors x patches", 256, 8, 196, 384)]
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")  # torch.nn.attention.SDPBackend, each forced in turn
# the targets (issue 17, BENCHMARKS.md): speed-up of pretext over the fastest PyTorch variant, per op and pass
KERNEL_TARGETS = {("attention", "fwd"): 1.0, ("attention", "fwd+bwd"): 1.0, ("gather", "fwd+bwd"): 1.5,
                  ("cosine", "fwd+bwd"): 2.0}


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


def timed(f, *inputs, backward=False):
    """ms of f(*inputs) (forward) or of forward + backward; NaN where the variant does not run (an SDPA backend that
    does not take this shape or dtype)."""
    try:
        return bench(fwd_bwd(f, *inputs) if backward else (lambda: f(*inputs)))
    except Exception as e:  # noqa: BLE001  (a failing pretext kernel shows as n/a and fails its target)
        print(f"  n/a: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", file=sys.stderr)
        return float("nan")


def row(cells):
    print("| " + " | ".join(str(c) for c in cells) + " |")


def path_of(op):
    """'triton' or 'torch': the path kernels.report() says `op` took since the last reset_report()."""
    return kernels.report().get(op, {}).get("path", "not called")


def verdict(op, pass_, speedup, path):
    """(target, 'pass' | 'FAIL' | '') for one timing row."""
    target = KERNEL_TARGETS.get((op, pass_))
    if target is None:
        return None, ""
    return target, "pass" if path == "triton" and speedup >= target else "FAIL"


# -----------------------------------------------------------------------------
# kernels: each function times one op at its shapes and returns one dict per (shape, pass)

def time_attention(dtype, shapes=ATTN_SHAPES):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    rows = []
    for name, B, H, N, D in shapes:
        # q, k, v as strided views of one fused qkv projection, as vit.py produces them
        qkv = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=dtype).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
        q, k, v = (t.detach().requires_grad_() for t in qkv)
        for pass_, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            kernels.reset_report()
            ms = {"pretext": timed(kernels.attention, q, k, v, backward=pass_ != "fwd")}
            path = path_of("attention")
            for bname in SDPA_BACKENDS:
                with sdpa_kernel([backends[bname]]):
                    ms[bname] = timed(F.scaled_dot_product_attention, q, k, v, backward=pass_ != "fwd")
            rows.append(kernel_row("attention", name, (B, H, N, D), dtype, pass_, ms, path,
                                   flops=4 * B * H * N * N * D * mult))
        del q, k, v, qkv
    return rows


def time_gather(dtype, shapes=GATHER_SHAPES):
    rows = []
    for name, B, N, K, D in shapes:
        x = torch.randn(B, N, D, device=DEVICE, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, N, D, device=DEVICE, dtype=dtype)
        if "repeats" in name:       # 4 overlapping blocks concatenated: indices repeat within a row
            idx = torch.randint(0, N, (B, K), device=DEVICE)
        else:
            idx = torch.rand(B, N, device=DEVICE).argsort(1)[:, :K]
        ar = torch.arange(B, device=DEVICE)[:, None]
        variants = {"pretext": lambda x: kernels.gather_tokens(x, idx, pos),
                    "torch.gather(x + pos)": lambda x: torch.gather(x + pos, 1, idx[..., None].expand(-1, -1, D)),
                    "x[b, idx] + pos[idx]": lambda x: x[ar, idx] + pos[0, idx]}
        for pass_, mult in (("fwd", 1), ("fwd+bwd", 2)):
            kernels.reset_report()
            ms = {k: timed(f, x, backward=pass_ != "fwd") for k, f in variants.items()}
            rows.append(kernel_row("gather", name, (B, N, K, D), dtype, pass_, ms, path_of("gather_tokens"),
                                   nbytes=mult * (2 * B * K * D + K * D) * x.element_size()))
    return rows


def time_cosine(dtype, shapes=COS_SHAPES):
    rows = []
    for name, B, Na, Nb, D in shapes:
        a = torch.randn(B, Na, D, device=DEVICE, dtype=dtype, requires_grad=True)
        b = torch.randn(B, Nb, D, device=DEVICE, dtype=dtype, requires_grad=True)
        variants = {"pretext": kernels.cosine_similarity,
                    "normalize + bmm": lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)}
        err = (kernels.cosine_similarity(a, b).float() - cosine_similarity_ref(a, b).float()).abs().max().item()
        for pass_, mult in (("fwd", 1), ("fwd+bwd", 3)):
            kernels.reset_report()
            ms = {k: timed(f, a, b, backward=pass_ != "fwd") for k, f in variants.items()}
            rows.append(kernel_row("cosine", name, (B, Na, Nb, D), dtype, pass_, ms,
                                   path_of("cosine_similarity"), flops=2 * B * Na * Nb * D * mult, max_err=err))
    return rows


def kernel_row(op, name, dims, dtype, pass_, ms, path, **extra):
    """One timing: ms per variant, the fastest PyTorch variant, pretext's speed-up over it, target and verdict."""
    torch_ms = {k: v for k, v in ms.items() if k != "pretext" and not math.isnan(v)}
    best = min(torch_ms, key=torch_ms.get) if torch_ms else None
    speedup = torch_ms[best] / ms["pretext"] if best and ms["pretext"] > 0 else float("nan")
    target, ok = verdict(op, pass_, speedup, path)
    return dict(op=op, shape=name, dims=list(dims), dtype=str(dtype).removeprefix("torch."), pass_=pass_, ms=ms,
                path=path, best_torch=best, speedup=speedup, target=target, verdict=ok, **extra)


def kernel_tables(rows):
    """The timing rows as markdown: one table for attention (every SDPA backend), one for gather and cosine."""
    fmt = lambda t: "n/a" if t is None or math.isnan(t) else f"{t:.4f}"
    speed = lambda r: "n/a" if math.isnan(r["speedup"]) else f"{r['speedup']:.2f}x"
    out = []
    attn = [r for r in rows if r["op"] == "attention"]
    if attn:
        out += ["| attention (B, H, N, D) | pass | pretext ms | " + " | ".join(SDPA_BACKENDS)
                + " | speed-up vs fastest | target | result |", "|---" * (7 + len(SDPA_BACKENDS)) + "|"]
        for r in attn:
            B, H, N, D = r["dims"]
            out.append(f"| {r['shape']} ({B}, {H}, {N}, {D}) | {r['pass_']} | {fmt(r['ms']['pretext'])} | "
                       + " | ".join(fmt(r["ms"][b]) for b in SDPA_BACKENDS)
                       + f" | {speed(r)} ({r['best_torch']}) | {target_text(r)} | {result_text(r)} |")
        out.append("")
    other = [r for r in rows if r["op"] != "attention"]
    if other:
        out += ["| op | shape | pass | pretext ms | PyTorch variants, ms | speed-up vs fastest | target | result |",
                "|---|---|---|---|---|---|---|---|"]
        for r in other:
            variants = ", ".join(f"{k} {fmt(v)}" for k, v in r["ms"].items() if k != "pretext")
            out.append(f"| {r['op']} | {r['shape']} {tuple(r['dims'])} | {r['pass_']} | {fmt(r['ms']['pretext'])} | "
                       f"{variants} | {speed(r)} | {target_text(r)} | {result_text(r)} |")
        out.append("")
    return "\n".join(out)


def target_text(r):
    return "" if r["target"] is None else f">= {r['target']:g}x"


def result_text(r):
    path = "" if r["path"] == "triton" else f" (ran {r['path']})"
    return (r["verdict"] or "-") + path


def kernels_main(a):
    if not torch.cuda.is_available():
        raise SystemExit("bench.py kernels needs a CUDA GPU (the Triton kernels run only in the interpreter on CPU)")
    if os.environ.get("PRETEXT_KERNELS") == "torch":
        raise SystemExit("unset PRETEXT_KERNELS=torch: it would benchmark the references against themselves")
    import triton
    print(f"## kernels on {gpu_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}\n")
    dtype = DTYPES[a.dtype]
    rows = []
    for name, f in (("attention", time_attention), ("gather", time_gather), ("cosine", time_cosine)):
        if a.only in (None, name):
            rows += f(dtype)
    print(kernel_tables(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


# -----------------------------------------------------------------------------
# training steps

def train_main(a):
    sys.path.insert(0, REPO)
    mod = importlib.import_module(a.method)
    cfg = mod.Config()
    for k, v in (("batch_size", a.batch_size), ("size", a.size), ("img_size", a.img_size), ("in_chans", a.in_chans),
                 ("compile", a.compile)):
        if v is not None:
            setattr(cfg, k, v)
    kw = {"augment": not a.no_augment} if a.method == "dino" else {}
    kernels.reset_report()
    res = mod.benchmark(cfg, steps=a.steps, warmup=a.warmup, **kw)
    tflops = res["img_per_s"] * res["flops_per_img"] / 1e12
    mfu = tflops / peak_tflops()
    compiled = cfg.compile if cfg.compile is not None else torch.cuda.is_available()
    print(f"## {a.method} training step on {gpu_name()}, torch {torch.__version__}")
    print(f"batch {cfg.batch_size}, {cfg.size}, {cfg.img_size} px, {cfg.in_chans} channels, "
          f"{'compiled' if compiled else 'eager'}: {res['img_per_s']:.0f} img/s, "
          f"{res['flops_per_img'] / 1e9:.1f} GFLOP/img (fwd+bwd), {tflops:.1f} TFLOP/s, "
          f"MFU {100 * mfu:.1f}% of the {peak_tflops():g} TFLOP/s dense bf16 peak")
    for k, v in res.items():
        if k not in ("img_per_s", "flops_per_img"):
            print(f"  {k}: {v}")
    print(f"kernels: {kernels.report_line()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(res, method=a.method, batch_size=cfg.batch_size, size=cfg.size, img_size=cfg.img_size,
                           in_chans=cfg.in_chans, compiled=compiled, tflops=tflops, mfu=mfu,
                           peak_tflops=peak_tflops(), gpu=gpu_name(), kernels=kernels.report()), f, indent=1,
                      default=str)


# -----------------------------------------------------------------------------
# the data path: frames/s of one loader worker decoding with mae.py's Frames (the `frames` shared block)

DATA_KINDS = {  # name: what the synthesized files are; every kind is decoded to --load-size (256) squares
    "png": "8-bit grayscale PNG, 600 x 800",
    "jpeg": "grayscale JPEG (quality 90), 600 x 800",
    "tiff16": "16-bit grayscale TIFF, 600 x 800",
    "npy": "uint8 (N, 224, 224) .npy stack, memory-mapped (prep/ultrasound.py --npy, default --size 224)",
    "npy-256": "uint8 (N, 256, 256) .npy stack, memory-mapped (prep/ultrasound.py --npy --size 256: no resize)",
    "npy-raw": "uint8 (N, 600, 800) .npy stack, memory-mapped (raw frames stacked as they are)",
}
NODE_FRAMES_PER_S = 8 * 3 * 1697  # 8 GPUs at the I-JEPA target (3x the official 1697 img/s each): 40,728 frames/s


def us_like(rng, h=600, w=800):
    """An ultrasound-like uint8 frame: a fan of speckle (Rayleigh noise, blurred by a 2x bilinear upsampling, fading
    with depth) on black, so the files compress about as real B-mode frames do."""
    import numpy as np
    from PIL import Image
    small = rng.rayleigh(60.0, (h // 2, w // 2)).clip(0, 255).astype(np.uint8)
    speckle = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.float32)
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot(x - w / 2, y + 60.0)  # apex above the top edge, as a curved probe's
    fan = (r < h + 40) & (np.abs(np.arctan2(x - w / 2, y + 60.0)) < 0.62)
    return np.where(fan, speckle * (1.2 - r / (1.5 * h)), 0).clip(0, 255).astype(np.uint8)


def write_frames(kind, folder, n, rng):
    """n synthetic frames of one kind in `folder`."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder)
    if kind.startswith("npy"):
        side = {"npy": 224, "npy-256": 256}.get(kind)
        stack = np.stack([us_like(rng) if side is None else
                          np.asarray(Image.fromarray(us_like(rng)).resize((side, side), Image.BILINEAR))
                          for _ in range(n)])
        np.save(os.path.join(folder, "frames.npy"), stack)  # (n, H, W) uint8
        return
    for i in range(n):
        a = us_like(rng)
        if kind == "png":
            Image.fromarray(a).save(os.path.join(folder, f"{i:05d}.png"))
        elif kind == "jpeg":
            Image.fromarray(a).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
        else:  # 16-bit: the full range, as a scanner exports it
            Image.fromarray(a.astype(np.uint16) * 257).save(os.path.join(folder, f"{i:05d}.tif"))


def time_frames(folder, load_size, seconds, batch=64):
    """frames/s of ONE DataLoader worker decoding `folder` with mae.py's Frames (listing, decoding, resize, the
    collation and the hand-over to the main process included), after the first batch (the worker's start)."""
    sys.path.insert(0, REPO)
    import mae
    paths, counts = mae.list_frames(folder)
    frames = mae.Frames(paths, counts, 1, load_size)
    n = len(frames)
    order = [i % n for i in range(batch * 4096)]  # cycled: the files stay in the page cache (warm disk)
    loader = torch.utils.data.DataLoader(frames, batch_size=batch, sampler=order, num_workers=1)
    done = 0
    t0 = None
    for x, ok, _ in loader:
        assert bool(ok.all()) and x.shape[1:] == (1, load_size, load_size)
        if t0 is None:
            t0 = time.perf_counter()
            continue
        done += len(x)
        if time.perf_counter() - t0 > seconds:
            break
    return done / (time.perf_counter() - t0)


def decode_rate(folder, load_size, seconds):
    """frames per CPU-second of decoding alone, in this process (mae.py's Frames, no loader): what one worker's core
    does at best, and a number that other jobs on the machine do not change."""
    sys.path.insert(0, REPO)
    import mae
    paths, counts = mae.list_frames(folder)
    frames = mae.Frames(paths, counts, 1, load_size)
    frames[0]  # the first .npy access maps the file
    done = 0
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        frames.decode(done % len(frames))
        done += 1
    return done / (time.process_time() - t0)


def data_main(a):
    import numpy as np
    torch.set_num_threads(1)
    kinds = a.kinds or list(DATA_KINDS)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            folder = os.path.join(tmp, kind)
            write_frames(kind, folder, a.frames, np.random.default_rng(0))
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
            rate = time_frames(folder, a.load_size, a.seconds)
            cpu_rate = decode_rate(folder, a.load_size, a.seconds / 2)
            results.append(dict(kind=kind, what=DATA_KINDS[kind], frames_per_s=rate, decode_per_cpu_s=cpu_rate,
                                kb_per_frame=size / a.frames / 1024,
                                workers_for_node=math.ceil(NODE_FRAMES_PER_S / rate)))
            print(f"{kind}: {rate:.0f} frames/s, decode alone {cpu_rate:.0f} frames per CPU-second", file=sys.stderr)
    load = os.getloadavg()[0]
    print(f"## data path: one loader worker, mae.py Frames, decoded to {a.load_size} x {a.load_size} gray; "
          f"{os.cpu_count()} CPUs (load average {load:.1f} at the end), torch {torch.__version__}\n")
    print(f"| input | KB / frame | frames/s, one DataLoader worker | decode alone, frames per CPU-second | "
          f"workers for {NODE_FRAMES_PER_S:,} frames/s (8 GPUs x 3 x 1697 img/s) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['what']} | {r['kb_per_frame']:.0f} | {r['frames_per_s']:,.0f} | {r['decode_per_cpu_s']:,.0f} | "
              f"{r['workers_for_node']:,} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


# -----------------------------------------------------------------------------
# gpu-check: everything a new GPU machine must prove, in one command. Every stage runs in a subprocess
# with a time limit, so a hang, a crash or a CUDA error in one is recorded and the next one still runs;
# the whole check stays within BUDGET_S, and the results are written after every stage (a killed run
# still leaves what it measured).

BUDGET_S = 480          # all stages together: 8 minutes, so a short GPU rental or a 10-minute job limit holds it
MIN_STAGE_S = 20        # a stage that would get less than this is skipped and recorded as such
STAGE_CAP_S = {"kernel tests": 150, "kernel timings": 120, "torchrun": 120, "train compiled": 150,
               "train eager": 90}  # train: per run
# the training steps at the paper's batch sizes, ViT-S/16 at 224, 3 channels (as the official numbers): (method,
# batch, the official code's img/s on one H100 with torch 2.11, the speed-up pretext must reach)
TRAIN_RUNS = [("ijepa", 128, 1697, 3.0), ("mae", 64, 1140, 2.0), ("mae", 256, 3272, 1.5), ("dino", 128, 1062, 1.5)]
TRAIN_STEPS = {"eager": (5, 30), "compiled": (8, 30)}  # (warm-up, timed) steps; compiled: the compile is warm-up
# the CUDA kernel tests, as pytest -k shards run side by side: the Triton JIT compiles are CPU-bound, one process
# each. Together they are every test of tests/test_triton_kernels.py (each has one dtype id, or none).
TEST_FILE = "tests/test_triton_kernels.py"
TEST_SHARDS = [f"cuda-{dt} and {part}" for dt in ("fp32", "fp16", "bf16") for part in (
    "every_head_dim and not attention_map", "attention_map_every_head_dim", "not every_head_dim")] \
    + ["not cuda-fp32 and not cuda-fp16 and not cuda-bf16"]
TORCHRUN_STEPS = 6      # ijepa.py steps under torchrun, synthetic frames, per-GPU batch TORCHRUN_BATCH
TORCHRUN_BATCH = 32


def gpu_check_plan(n_gpus):
    """[(stage, what it checks, command or None for in-process, time cap in s)] in the order they run."""
    py = sys.executable
    plan = [("env", "GPU name and count, driver, torch, triton, CUDA and cuDNN versions, peak FLOP/s used", None, 30)]
    for i, k in enumerate(TEST_SHARDS):
        plan.append(("kernel tests", f"pytest shard {i + 1}/{len(TEST_SHARDS)}: -k '{k}'",
                     [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST_FILE, "-k", k,
                      f"--junitxml={{scratch}}/tests-{i}.xml"], STAGE_CAP_S["kernel tests"]))
    plan.append(("kernel timings", "attention vs SDPA flash / efficient / cudnn / math, gather vs torch.gather and "
                 "indexing, cosine vs normalize + bmm; bf16, fwd and fwd+bwd",
                 [py, "bench.py", "kernels", "--dtype", "bf16", "--json", "{scratch}/kernels.json"],
                 STAGE_CAP_S["kernel timings"]))
    steps = TORCHRUN_STEPS
    plan.append(("torchrun", f"torchrun --nproc-per-node={n_gpus} ijepa.py, {steps} steps on synthetic frames: "
                 f"exit 0, kernel report with path triton for every op, data_wait logged",
                 [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_gpus}", "ijepa.py",
                  "--out", "{scratch}/torchrun-ijepa", "--max-steps", str(steps), "--batch-size",
                  str(TORCHRUN_BATCH * n_gpus), "--synthetic-frames", str(TORCHRUN_BATCH * n_gpus * 3),
                  "--num-workers", "4", "--log-every", "2", "--no-compile"], STAGE_CAP_S["torchrun"]))
    for mode in ("compiled", "eager"):  # compiled first: the default on CUDA, and what the targets compare
        warmup, timed_steps = TRAIN_STEPS[mode]
        for method, batch, official, x in TRAIN_RUNS:
            plan.append((f"train {mode}", f"{method} batch {batch} {mode}: ViT-S/16 224, {warmup} + {timed_steps} "
                         f"steps; target >= {x:g}x official {official} img/s = {x * official:.0f}",
                         [py, "bench.py", "train", "--method", method, "--batch-size", str(batch), "--size",
                          "vit_small", "--img-size", "224", "--in-chans", "3", "--warmup", str(warmup), "--steps",
                          str(timed_steps), "--compile" if mode == "compiled" else "--no-compile", "--json",
                          f"{{scratch}}/train-{method}-{batch}-{mode}.json"], STAGE_CAP_S[f"train {mode}"]))
    return plan


def run_limited(cmd, timeout, env=None):
    """Run cmd from the repository root in its own process group -> (rc or None when killed at `timeout`, output,
    seconds). The whole group is killed at the limit (torchrun's workers, pytest's children)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        rc = None
    return rc, out, time.perf_counter() - t0


def gpu_env():
    import triton
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        smi = "unknown"
    return {"gpu": gpu_name(), "gpus": torch.cuda.device_count(), "driver": smi, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": sys.version.split()[0], "peak_tflops": peak_tflops(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def junit_counts(paths):
    """pytest --junitxml files -> {passed, failed, skipped, failures: [test id: first line of the message]}."""
    import xml.etree.ElementTree as ET
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for path in paths:
        if not os.path.isfile(path):
            continue
        for case in ET.parse(path).getroot().iter("testcase"):
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is not None:
                counts["failed"] += 1
                msg = (bad.get("message") or "").splitlines()[:1]
                counts["failures"].append(f"{case.get('name')}: {msg[0][:200] if msg else ''}")
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return counts


def torchrun_log(run_dir):
    """What the torchrun stage checks in OUT/log.jsonl: the kernel report of the first step, data_wait, steps."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        return {"problem": "no log.jsonl written"}
    lines = [json.loads(ln) for ln in open(path) if ln.strip()]
    report = next((ln["kernels"] for ln in lines if "kernels" in ln), None)
    steps = [ln for ln in lines if "loss" in ln and ln.get("step", 0) > 0]
    info = {"steps_logged": len(steps), "kernels": report, "data_wait": [ln.get("data_wait") for ln in steps],
            "img_per_s": [ln.get("img_per_s") for ln in steps]}
    if report is None:
        info["problem"] = "no kernel report in the log"
    elif not report or any(r["path"] != "triton" for r in report.values()):
        info["problem"] = "an op did not take the Triton path: " + "; ".join(
            f"{op}: {r['why']}" for op, r in report.items() if r["path"] != "triton")
    elif not any(ln.get("data_wait") is not None for ln in steps):
        info["problem"] = "no data_wait in the log"
    return info


def gpu_check_markdown(res):
    e = res["env"]
    lines = [f"### gpu-check on {e.get('gpu', '?')} x{e.get('gpus', '?')}, {e.get('date', '')}", "",
             f"`python bench.py gpu-check --out DIR`, {res['seconds']:.0f} s. torch {e.get('torch')}, triton "
             f"{e.get('triton')}, CUDA {e.get('cuda')}, cuDNN {e.get('cudnn')}, driver {e.get('driver')}. MFU "
             f"against {e.get('peak_tflops')} TFLOP/s (dense bf16 peak of the datasheet). Official img/s: the "
             f"official code (facebookresearch/ijepa, mae, dinov3) on one H100, torch 2.11, cuDNN 9.19.", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    for s in res["stages"]:
        lines.append(f"| {s['stage']}: {s['what'][:90]} | {s['status']} | {s['seconds']:.0f} | {s.get('note', '')} |")
    t = res.get("kernel_tests")
    if t:
        lines += ["", f"Kernel tests against float64 (tests/test_triton_kernels.py on CUDA): {t['passed']} passed, "
                  f"{t['failed']} failed, {t['skipped']} skipped (CPU-interpreter cases)."]
        lines += [f"- FAIL {f}" for f in t["failures"][:30]]
    if res.get("kernel_timings"):
        lines += ["", "Kernels against PyTorch, bf16, ms (median of triton.testing.do_bench):", "",
                  kernel_tables(res["kernel_timings"])]
    if res.get("train"):
        lines += ["", "Training steps, ViT-S/16 at 224, 3 channels, synthetic batch on the GPU (bench.py train):", "",
                  "| method | batch | mode | img/s | GFLOP/img | TFLOP/s | MFU | official img/s | target img/s | "
                  "result |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["train"]:
            if "img_per_s" in r:
                lines.append(f"| {r['method']} | {r['batch']} | {r['mode']} | {r['img_per_s']:.0f} | "
                             f"{r['flops_per_img'] / 1e9:.1f} | {r['tflops']:.0f} | {100 * r['mfu']:.1f}% | "
                             f"{r['official']} | >= {r['target']:.0f} ({r['x']:g}x) | {r['verdict']} |")
            else:
                lines.append(f"| {r['method']} | {r['batch']} | {r['mode']} | | | | | {r['official']} | "
                             f">= {r['target']:.0f} ({r['x']:g}x) | {r['verdict']} ({r['note']}) |")
    tr = res.get("torchrun")
    if tr:
        ops = ", ".join(f"{op} {r['path']}" for op, r in (tr.get("kernels") or {}).items()) or "no report"
        lines += ["", f"torchrun ijepa.py ({res['env'].get('gpus')} processes): {tr.get('steps_logged', 0)} steps "
                  f"logged; kernels: {ops}; data_wait {tr.get('data_wait')}; {tr.get('problem', 'ok')}"]
    return "\n".join(lines) + "\n"


def gpu_check_main(a):
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 1
    plan = gpu_check_plan(n_gpus)
    if a.dry_run:
        print(f"bench.py gpu-check plan: {len(plan)} commands within {BUDGET_S} s (each stage capped; a failed or "
              f"timed-out stage is recorded and the next one runs); results in {a.out}/gpu-check.json and "
              f"{a.out}/gpu-check.md")
        print(f"kernel tests: every op against a float64 reference at N = 1, 50, 197, 333, head dims "
              f"{', '.join(map(str, kernels.HEAD_DIMS))}, fp32 / fp16 / bf16, forward and backward "
              f"({TEST_FILE}, {len(TEST_SHARDS)} shards side by side)")
        print("kernel timings (bf16, fwd and fwd+bwd):")
        for name, B, H, N, D in ATTN_SHAPES:
            print(f"  attention {name} B{B} H{H} N{N} D{D}: pretext vs SDPA {' / '.join(SDPA_BACKENDS)}")
        for name, B, N, K, D in GATHER_SHAPES:
            print(f"  gather {name} B{B} N{N} K{K} D{D}: pretext vs torch.gather(x + pos) / x[b, idx] + pos[idx]")
        for name, B, Na, Nb, D in COS_SHAPES:
            print(f"  cosine {name} B{B} Na{Na} Nb{Nb} D{D}: pretext vs normalize + bmm")
        print("targets: " + ", ".join(f"{op} {p} >= {x:g}x the fastest PyTorch variant"
                                      for (op, p), x in KERNEL_TARGETS.items()))
        for stage, what, cmd, cap in plan:
            shown = shlex.join(cmd).replace(sys.executable, "python") if cmd else "(in process)"
            print(f"[{stage}] (<= {cap} s) {what}\n    {shown}")
        return
    if not torch.cuda.is_available():
        print("bench.py gpu-check: no CUDA GPU here; it needs one (H100/H200). "
              "`python bench.py gpu-check --dry-run` lists what it would run.", file=sys.stderr)
        sys.exit(2)
    os.makedirs(a.out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="gpu-check-")
    t_start = time.perf_counter()
    deadline = t_start + BUDGET_S
    res = {"command": "python bench.py gpu-check", "budget_s": BUDGET_S, "env": {}, "stages": [], "train": [],
           "plan": [(stage, what, cmd and shlex.join(cmd)) for stage, what, cmd, _ in plan]}
    log = open(os.path.join(a.out, "gpu-check.log"), "w")

    def save():
        res["seconds"] = time.perf_counter() - t_start
        with open(os.path.join(a.out, "gpu-check.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(os.path.join(a.out, "gpu-check.md"), "w") as f:
            f.write(gpu_check_markdown(res))

    def record(stage, what, status, seconds, note="", output=""):
        res["stages"].append(dict(stage=stage, what=what, status=status, seconds=seconds, note=note))
        print(f"[{stage}] {status} in {seconds:.0f} s: {what} {note}", flush=True)
        log.write(f"===== [{stage}] {status} in {seconds:.0f} s: {what}\n{output[-20000:]}\n")
        log.flush()
        save()

    def budget(cap):
        return min(cap, deadline - time.perf_counter())

    # env
    try:
        res["env"] = gpu_env()
        record("env", plan[0][1], "ok", 0.0, f"{res['env']['gpu']} x{res['env']['gpus']}")
    except Exception as e:  # noqa: BLE001  (recorded; the stages below still run)
        record("env", plan[0][1], "FAIL", 0.0, f"{type(e).__name__}: {e}")

    # kernel tests: the shards side by side (TRITON_INTERPRET=0: conftest only sets the interpreter when it is unset)
    shards = [p for p in plan if p[0] == "kernel tests"]
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("PRETEXT_KERNELS", None)
    t0 = time.perf_counter()
    timeout = budget(shards[0][3])
    logs = [open(os.path.join(scratch, f"tests-{i}.log"), "w+") for i in range(len(shards))]  # files: no pipe fills
    procs = [subprocess.Popen([c.format(scratch=scratch) for c in cmd], cwd=REPO, env=env, stdout=f,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for (_, _, cmd, _), f in zip(shards, logs)]
    outputs, killed = [], 0
    for p, f in zip(procs, logs):
        try:
            p.wait(timeout=max(1.0, t0 + timeout - time.perf_counter()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            killed += 1
        f.seek(0)
        outputs.append(f.read())
        f.close()
    counts = junit_counts([os.path.join(scratch, f"tests-{i}.xml") for i in range(len(shards))])
    res["kernel_tests"] = counts
    status = "pass" if counts["failed"] == 0 and counts["passed"] > 0 and not killed else "FAIL"
    note = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped" \
        + (f"; {killed} shard(s) killed at {timeout:.0f} s" if killed else "")
    record("kernel tests", f"{TEST_FILE} on CUDA, {len(shards)} shards", status, time.perf_counter() - t0, note,
           "\n".join(o[-4000:] for o in outputs))

    # the other stages: one command each, in plan order
    for stage, what, cmd, cap in plan[1 + len(shards):]:
        cmd = [c.format(scratch=scratch) for c in cmd]
        timeout = budget(cap)
        if timeout < MIN_STAGE_S:
            record(stage, what, "skipped", 0.0, f"out of time ({BUDGET_S} s budget)")
            if stage.startswith("train"):
                method, batch = cmd[cmd.index("--method") + 1], int(cmd[cmd.index("--batch-size") + 1])
                res["train"].append(train_result(method, batch, stage.split()[1], None, "out of time", "skipped"))
            continue
        if stage == "torchrun":
            shutil.rmtree(cmd[cmd.index("--out") + 1], ignore_errors=True)
        rc, out, seconds = run_limited(cmd, timeout)
        try:
            status, note = stage_result(res, stage, cmd, rc, out, timeout)
        except Exception as e:  # noqa: BLE001  (a result that cannot be read is this stage's failure only)
            status, note = "FAIL", f"gpu-check could not read the result: {type(e).__name__}: {e}"
        record(stage, what, status, seconds, note, out)
    log.close()
    shutil.rmtree(scratch, ignore_errors=True)
    save()
    print(f"bench.py gpu-check: {time.perf_counter() - t_start:.0f} s; {a.out}/gpu-check.md, {a.out}/gpu-check.json")


def stage_result(res, stage, cmd, rc, out, timeout):
    """(status, note) of one finished command; what it measured goes into res."""
    if rc is None:
        note = f"killed at {timeout:.0f} s"
    elif rc != 0:  # the last line that names an error, else the last line
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()] or [""]
        named = [ln for ln in lines if "Error" in ln or "error:" in ln or "Exception" in ln]
        note = f"exit {rc}: {(named or lines)[-1][:200]}"
    else:
        note = ""
    status = "ok" if rc == 0 else "FAIL"
    if stage == "kernel timings" and rc == 0:
        res["kernel_timings"] = json.load(open(cmd[cmd.index("--json") + 1]))
        bad = [r for r in res["kernel_timings"] if r["verdict"] == "FAIL"]
        status = "pass" if not bad else "FAIL"
        note = f"{len(bad)} of {sum(1 for r in res['kernel_timings'] if r['verdict'])} timings miss their target"
    if stage == "torchrun":
        res["torchrun"] = info = torchrun_log(cmd[cmd.index("--out") + 1])
        if rc == 0:
            status = "pass" if "problem" not in info else "FAIL"
            note = info.get("problem", f"{info['steps_logged']} steps, every op on triton")
    if stage.startswith("train"):
        method, batch = cmd[cmd.index("--method") + 1], int(cmd[cmd.index("--batch-size") + 1])
        got = json.load(open(cmd[-1])) if rc == 0 and os.path.isfile(cmd[-1]) else None
        r = train_result(method, batch, stage.split()[1], got, note)
        res["train"].append(r)
        status = r["verdict"]
        if got:
            note = f"{got['img_per_s']:.0f} img/s, MFU {100 * got['mfu']:.1f}%"
    return status, note


def train_result(method, batch, mode, got, note, missing="FAIL"):
    """One training row: the measurement (or why there is none) beside the official number and the target."""
    official, x = next((o, x) for m, b, o, x in TRAIN_RUNS if (m, b) == (method, batch))
    r = dict(method=method, batch=batch, mode=mode, official=official, x=x, target=x * official)
    if not got:
        return dict(r, verdict=missing, note=note)
    paths = {op: k["path"] for op, k in got["kernels"].items()}
    ok = got["img_per_s"] >= r["target"] and all(p == "triton" for p in paths.values())
    return dict(r, img_per_s=got["img_per_s"], flops_per_img=got["flops_per_img"], tflops=got["tflops"],
                mfu=got["mfu"], kernels=paths, verdict="pass" if ok else "FAIL")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels", help="time the Triton kernels against PyTorch")
    k.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    k.add_argument("--only", choices=["attention", "gather", "cosine"])
    k.add_argument("--json", help="also write every timing here")
    t = sub.add_parser("train", help="img/s and MFU of a method's training step")
    t.add_argument("--method", required=True, choices=["ijepa", "mae", "dino"])
    t.add_argument("--batch-size", type=int)
    t.add_argument("--size", choices=["vit_tiny", "vit_small", "vit_base"])
    t.add_argument("--img-size", type=int)
    t.add_argument("--in-chans", type=int, default=3, help="3 as the official numbers (ImageNet RGB)")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--no-augment", action="store_true", help="dino: time the step without the GPU augmentations")
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the step (default: the method's, on for CUDA)")
    t.add_argument("--json", help="also write the result here")
    d = sub.add_parser("data", help="frames/s of one loader worker per input kind (mae.py's Frames)")
    d.add_argument("--kinds", nargs="+", choices=list(DATA_KINDS))
    d.add_argument("--frames", type=int, default=128, help="frames synthesized per kind (cycled while timing)")
    d.add_argument("--seconds", type=float, default=4.0, help="time each kind at least this long")
    d.add_argument("--load-size", type=int, default=256, help="decoded square side (256: --img-size 224)")
    d.add_argument("--json", help="also write the results here")
    g = sub.add_parser("gpu-check", help="on a new GPU machine: kernel tests, kernel and training timings, torchrun")
    g.add_argument("--out", default="runs/gpu-check", help="gpu-check.json, gpu-check.md, gpu-check.log go here")
    g.add_argument("--dry-run", action="store_true", help="list every check and timing, run nothing (CPU too)")
    a = p.parse_args()
    {"kernels": kernels_main, "train": train_main, "data": data_main, "gpu-check": gpu_check_main}[a.cmd](a)
