"""DINOv3-style self-distillation (DINO + iBOT + KoLeo, Sinkhorn-Knopp centering), without Gram anchoring.

    python dino.py --data us_frames/ --in-chans 1                                     # one GPU
    torchrun --standalone --nproc_per_node=8 dino.py --data us_frames/ --in-chans 1   # 8 GPUs, --batch-size split
    python dino.py --data he_tiles/ --lr 1e-5                                         # histopathology (Table 4)
    python dino.py --device cpu --size vit_tiny --depth 2 --img-size 64 --batch-size 8 --n-prototypes 1024 \\
        --head-hidden 256 --max-steps 20 --num-workers 0                              # CPU smoke run, synthetic data
OUT/ckpt.safetensors holds the TEACHER backbone as the encoder probe.py / abmil.py / viz.py read (pool "cls"),
plus the student, the teacher heads, AdamW state, step and RNG states for --resume.

One step (paper section 2; dinov3@6876159 train/ssl_meta_arch.py:355-649): 2 global + 8 local crops per image, iBOT
block masks on half of the global crops; the EMA teacher (eval mode) sees unmasked global crops, the student masked
global + local crops; loss = 16/18 DINO(local vs both global) + 2/18 DINO(global vs the other) + 0.1*2 KoLeo + iBOT.

What differs from the official code, and why:
- Schedule epochs are --epoch-length iterations: 1250 = the official OFFICIAL_EPOCH_LENGTH (100 epochs = 125k
  iterations, where the paper's runs converged), 0 = one pass over --data (log.jsonl's epoch counts passes).
  Warmups and the last-layer freeze are clipped to the run length, so short runs stay well defined.
- --lr is the peak LR applied (Table 4: 1e-3). The official multiplies it by 4*sqrt(B/1024) (configs/config.py:50,
  x1.41 at batch 128); --lr-scaling sqrt_wrt_1024 does the same.
- Blur: the official GaussianBlur hands 1-p to RandomApply (data/transforms.py:19-28, dinov3 #286), so the
  configured 1.0 / 0.1 / 0.5 (global 1 / global 2 / local) act as never / 90 % / 50 %. We use these effective
  values (--blur-p 0 0.9 0.5); --blur-p 1 0.1 0.5 gives the DINOv2/BYOL intent.
- Frames are padded to a square with black (an ultrasound fan keeps its aspect ratio) and resized in the workers;
  views are batched torch ops on the device, no torchvision: crops by bicubic grid_sample (no antialiasing); hue
  jitter rotates colours about the grey axis (a linear stand-in for the HSV shift, same range); the jitter op order
  is random per image as in torchvision; with 1 channel it is brightness/contrast only.
- iBOT masks (MaskingGenerator) come from a numpy Generator seeded by (seed, rank, epoch, batch): resumable.
- Sinkhorn-Knopp subtracts the global max logit before exp (the official overflows once logit/tau > 88; a constant
  cancels in the first normalisation) and runs with or without a process group.
- NaN: the official aborts after 3 NaN losses in a row, stepping on them; we stop at the first and save nothing.
- From vit.py: per-sample drop path (official: a batch subset), one RoPE rescale per forward (official: per
  block), RoPE in fp32 (official: bf16), trunc_normal patch-embed init. Precision: bf16 autocast, fp32 weights.
"""
import argparse
import copy
import glob
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import kernels
import vit

# -----------------------------------------------------------------------------
# config: every knob; defaults = paper Table 4 + the official ViT-S recipe (reference notes section 4.7)


@dataclass
class Config:
    data: str = ""                   # folder of frames (png/jpg/jpeg/bmp/tif/tiff, .npy stacks); "" = synthetic
    out: str = "runs/dino"
    synthetic: int = 1024            # synthetic ultrasound frames when --data is not given
    in_chans: int = 3                # 1 for grayscale ultrasound
    img_size: int = 224              # global crop; local crop = img_size * 96/224 rounded to the patch
    load_size: int = 0               # frames are decoded to this square; 0 = img_size * 256/224
    num_workers: int = 8
    size: str = "vit_small"          # backbone
    depth: int = 0                   # 0 = the size's depth (12)
    patch_size: int = 16
    num_reg: int = 4                 # storage tokens, as the released ViT-S
    drop_path: float = 0.1
    layerscale: float = 1e-5
    rope_rescale: float = 2.0        # training-only log-uniform coordinate rescaling in [1/2, 2]
    n_prototypes: int = 65536        # per head; the DINO and iBOT heads are separate
    head_hidden: int = 2048
    head_bottleneck: int = 256
    n_local: int = 8                 # views
    global_scale: tuple = (0.32, 1.0)
    local_scale: tuple = (0.05, 0.32)
    blur_p: tuple = (0.0, 0.9, 0.5)  # global 1, global 2, local: the official EFFECTIVE probabilities (see above)
    solarize_p: float = 0.2          # global crop 2 only
    mask_sample_p: float = 0.5       # fraction of global crops with iBOT masks
    mask_ratio: tuple = (0.1, 0.5)
    tau_s: float = 0.1               # losses
    tau_t: tuple = (0.04, 0.07)      # teacher temperature, linear warmup then constant
    tau_t_warmup: float = 10.0       # epochs (Table 4; the official default is 30)
    koleo_w: float = 0.1
    ibot_w: float = 1.0
    batch_size: int = 128            # global, split over ranks
    epochs: int = 100
    epoch_length: int = 1250         # iterations per epoch; 0 = one pass over the data
    lr: float = 1e-3                 # peak LR (histopathology: 1e-5)
    min_lr: float = 1e-6
    lr_scaling: str = "none"         # none | sqrt_wrt_1024 (official: lr * 4 * sqrt(batch / 1024))
    warmup: float = 10.0             # epochs
    wd: tuple = (0.04, 0.4)          # cosine from -> to
    momentum: tuple = (0.992, 1.0)   # teacher EMA, cosine from -> to
    layer_decay: float = 0.9
    patch_embed_lr: float = 0.2
    freeze_last_layer: float = 1.0   # epochs with the heads' last layer at lr 0
    clip: float = 3.0                # per sub-module: backbone, dino_head, ibot_head
    max_steps: int = 0               # stop after this many steps (0 = the whole schedule)
    save_every: int = 2500
    resume: str = ""
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile: bool = False            # torch.compile each ViT block (as the official)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DINOv3-style pretraining without Gram anchoring")
    for f in fields(Config):
        flag, d = "--" + f.name.replace("_", "-"), f.default
        if isinstance(d, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=d)
        else:
            p.add_argument(flag, type=type(d[0] if isinstance(d, tuple) else d), default=d,
                           nargs=len(d) if isinstance(d, tuple) else None)
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()})


def crop_sizes(cfg):
    """(global, local, load) in pixels; the local crop keeps 96/224 of the global one, rounded to the patch."""
    P = cfg.patch_size
    return cfg.img_size, max(P, round(cfg.img_size * 96 / 224 / P) * P), cfg.load_size or round(cfg.img_size * 8 / 7)

# -----------------------------------------------------------------------------
# data: uint8 (C, L, L) frames decoded in workers; views on the device, one torch.Generator (data/augmentations.py)

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_frames(root):
    """-> [(path, index)]: one entry per frame (a tif page, a row of a .npy stack), files sorted."""
    items = []
    for p in sorted(glob.glob(os.path.join(glob.escape(root), "**", "*"), recursive=True)):
        ext, n = os.path.splitext(p)[1].lower(), 1
        try:
            if ext == ".npy":
                a = np.load(p, mmap_mode="r")
                if a.dtype != np.uint8 or a.ndim not in (3, 4):
                    raise SystemExit(f"{p}: {a.dtype} {a.shape}; save frame stacks as uint8 (N, H, W) or (N, H, W, C)")
                n = len(a)
            elif ext in (".tif", ".tiff"):
                with Image.open(p) as im:
                    n = getattr(im, "n_frames", 1)
        except Exception:
            pass                                         # unreadable: one entry, the worker flags it
        items += [(p, i) for i in range(n)] if ext in EXTS + (".npy",) else []
    if not items:
        raise SystemExit(f"--data {root}: no {'/'.join(e[1:] for e in EXTS)} images or .npy stacks; check the path")
    return items


class Frames(torch.utils.data.Dataset):
    """items [(path or uint8 stack, i)]; (k, epoch, batch) -> uint8 (C, L, L), "" or why unreadable, (epoch, batch)"""

    def __init__(self, items, chans, size):
        self.items, self.chans, self.L = items, chans, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        src, i = self.items[key[0]]
        try:
            if isinstance(src, np.ndarray) or src.endswith(".npy"):
                a = src if isinstance(src, np.ndarray) else np.load(src, mmap_mode="r")
                img = Image.fromarray(np.ascontiguousarray(a[i]).squeeze())     # (H, W, 1) -> (H, W)
            else:
                with Image.open(src) as f:
                    f.seek(i)                                # tif page
                    img = f.copy()
            if img.mode.startswith("I") or img.mode == "F":   # 16-bit: /257, the full range, no stretch; float: [0, 1]
                a = np.asarray(img, dtype=np.float32) * (255 if img.mode == "F" else 1 / 257)
                img = Image.fromarray((a.clip(0, 255) + 0.5).astype(np.uint8))
            img = img.convert("L" if self.chans == 1 else "RGB")    # RGB -> gray by PIL's "L"; gray repeated
            sq = Image.new(img.mode, (max(img.size),) * 2)   # pad to a square with black, centred: a fan keeps
            sq.paste(img, ((sq.width - img.width) // 2, (sq.height - img.height) // 2))   # its aspect ratio
            a = np.asarray(sq.resize((self.L, self.L), Image.BICUBIC)).reshape(self.L, self.L, -1)   # (L, L, C)
            return torch.from_numpy(a.transpose(2, 0, 1).copy()), "", key[1:]             # (C, L, L)
        except Exception as e:
            why = f"{src if isinstance(src, str) else 'synthetic'}[{i}] ({e})"
            return torch.zeros(self.chans, self.L, self.L, dtype=torch.uint8), why, key[1:]


def block_mask(rng, g, count, max_patches, min_patches=4, log_ar=(math.log(0.3), -math.log(0.3))):
    """DINOv3 MaskingGenerator (data/masking.py) on a g x g grid: add blocks (area U[4, budget], log-uniform aspect
    0.3-3.3, 10 tries each) until `count` are masked or none fits, then complete at random to exactly `count`."""
    mask = np.zeros((g, g), dtype=bool)
    while mask.sum() < count:
        budget = min(count - mask.sum(), max_patches)
        for _ in range(10):
            area = min_patches + (budget - min_patches) * rng.random()      # random.uniform allows budget < 4
            ar = math.exp(log_ar[0] + (log_ar[1] - log_ar[0]) * rng.random())
            h, w = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if w < g and h < g:
                top, left = rng.integers(0, g - h + 1), rng.integers(0, g - w + 1)   # inclusive, as random.randint
                if 0 < h * w - mask[top:top + h, left:left + w].sum() <= budget:   # adds patches, within budget
                    mask[top:top + h, left:left + w] = True
                    break
        else:                                                                # 10 tries placed nothing
            break
    flat = mask.flatten()                                                    # (g*g,)
    flat[rng.choice(np.flatnonzero(~flat), count - flat.sum(), replace=False)] = True
    return flat


def ibot_masks(rng, n, g, p=0.5, ratio=(0.1, 0.5)):
    """(n, g*g) bool for n global crops (data/collate.py:35-56): int(n*p) crops get int(N*probs[i+1]) masked patches,
    probs = linspace(*ratio, int(n*p)+1) in float32 (torch.linspace), the others none; then shuffled."""
    N, k = g * g, int(n * p)
    probs = np.linspace(ratio[0], ratio[1], k + 1, dtype=np.float32)
    masks = [block_mask(rng, g, int(N * probs[i + 1]), 0.5 * N) for i in range(k)] + [np.zeros(N, bool)] * (n - k)
    return torch.from_numpy(np.stack([masks[i] for i in rng.permutation(n)]))


def collate(samples, cfg, rank):
    """In the workers: stack the frames, replace unreadable ones by readable ones of the batch, draw iBOT masks."""
    frames, bad = torch.stack([s[0] for s in samples]), [s[1] for s in samples if s[1]]   # (B, C, L, L) uint8
    ok = [k for k, s in enumerate(samples) if not s[1]] or [0]       # none: black frames, the loop stops the run
    for k in (k for k, s in enumerate(samples) if s[1]):
        frames[k] = frames[ok[k % len(ok)]]
    rng = np.random.default_rng([cfg.seed, rank, *samples[0][2]])          # (seed, rank, epoch, batch)
    mask = ibot_masks(rng, 2 * len(samples), cfg.img_size // cfg.patch_size, cfg.mask_sample_p, cfg.mask_ratio)
    idx = mask.flatten().nonzero().flatten()                                # (M,) into the 2B*N patch tokens
    weight = (1 / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(mask)[mask]   # (M,) 1/#masked in its crop
    return frames, mask, idx, weight, bad


def batches(ds, cfg, rank, world, B, start, steps_per_pass):
    """Endless (epoch, batch) from step `start`; epochs permuted by seed (seed, epoch), rank r takes perm[r::world]."""
    while True:
        epoch, b0 = divmod(start, steps_per_pass)
        shard = np.random.default_rng([cfg.seed, epoch]).permutation(len(ds))[rank::world]
        keys = ([(int(i), epoch, b) for i in shard[b * B:(b + 1) * B]] for b in range(b0, steps_per_pass))   # lazy
        yield from ((epoch, x) for x in torch.utils.data.DataLoader(
            ds, batch_sampler=keys, collate_fn=partial(collate, cfg=cfg, rank=rank), num_workers=cfg.num_workers,
            pin_memory=cfg.device.startswith("cuda"), generator=torch.Generator()))   # not the global RNG
        start = (epoch + 1) * steps_per_pass


def get_stats(cfg, ds, master, ddp):
    """Per-channel mean/std in [0, 1] from DIR/stats.json; if absent, rank 0 computes them over up to 2000 evenly
    spaced frames and writes DIR/stats.json (OUT/stats.json, recomputed each run, for synthetic or read-only data)."""
    found = bool(cfg.data) and os.path.isfile(os.path.join(cfg.data, "stats.json"))
    p = os.path.join(cfg.data if found or (cfg.data and os.access(cfg.data, os.W_OK)) else cfg.out, "stats.json")
    if master and not found:
        idx = np.unique(np.linspace(0, len(ds) - 1, min(2000, len(ds))).round().astype(int))
        loader = torch.utils.data.DataLoader(ds, None, sampler=[(i, 0, 0) for i in idx], num_workers=cfg.num_workers)
        xs = (f.double() / 255 for f, bad, _ in tqdm(loader, "stats", len(idx), leave=False) if not bad)
        m = [torch.stack([x.mean((1, 2)), x.pow(2).mean((1, 2))]) for x in xs]   # (2, C) per frame: E[x], E[x^2]
        if not m:
            raise SystemExit(f"--data {cfg.data}: none of {len(idx)} frames could be read; check the files")
        m1, m2 = torch.stack(m).mean(0)                                      # (C,) each
        with open(p, "w") as f:
            json.dump({"mean": m1.tolist(), "std": (m2 - m1 ** 2).clamp(min=1e-12).sqrt().tolist()}, f)
    if ddp:
        dist.barrier()
    try:
        mean, std = ([float(v) for v in json.load(open(p))[k]] for k in ("mean", "std"))
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{p}: not {{\"mean\": [...], \"std\": [...]}} ({e}); delete it to recompute") from None
    if not len(mean) == len(std) == cfg.in_chans:
        raise SystemExit(f"{p}: {len(mean)} channel(s), not {cfg.in_chans}; delete it or pass --in-chans {len(mean)}")
    return mean, std


def crop_boxes(n, scale, gen, ratio=(3 / 4, 4 / 3), tries=10):
    """RandomResizedCrop boxes (fractions of the side; torchvision's 10 tries, else all) -> (n, 4) [w, h, cx, cy]."""
    rand = partial(torch.rand, device=gen.device, generator=gen)
    area = scale[0] + (scale[1] - scale[0]) * rand(n, tries)
    ar = (math.log(ratio[0]) + math.log(ratio[1] / ratio[0]) * rand(n, tries)).exp()
    w, h = (area * ar).sqrt(), (area / ar).sqrt()                            # (n, tries)
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1, keepdim=True)                             # the first try that fits
    w, h = [torch.where(fits.any(1), v.gather(1, first)[:, 0], 1.0) for v in (w, h)]
    return torch.stack([w, h, w / 2 + rand(n) * (1 - w), h / 2 + rand(n) * (1 - h)], 1)


def resized_crop(x, boxes, size, flip):
    """x (B, C, L, L) float, boxes (B, 4), flip (B,) bool -> (B, C, size, size) by one affine grid per sample."""
    w, h, cx, cy = boxes.unbind(1)
    theta = torch.stack([torch.where(flip, -w, w), 0 * w, 2 * cx - 1, 0 * w, h, 2 * cy - 1], 1)     # (B, 6)
    grid = F.affine_grid(theta.view(-1, 2, 3), [x.shape[0], x.shape[1], size, size], align_corners=False)   # (B, 2, 3)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(0, 1)


def color_jitter(y, gen, p=0.8, b=0.4, c=0.4, s=0.2, hue=0.1, gray_p=0.2):
    """RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), 0.8) + RandomGrayscale(0.2). Each op is y -> clamp(A y + off)
    with a per-image C x C matrix A; the four ops run in a random order per image (torchvision's randperm)."""
    M, C, dev = y.shape[0], y.shape[1], y.device
    rand = partial(torch.rand, device=dev, generator=gen)
    I = torch.eye(C, device=dev)
    G = torch.tensor([0.299, 0.587, 0.114] if C == 3 else [1.0], device=dev).expand(C, C)   # rows: grey weights
    fb, fc, fs = [1 - v + 2 * v * rand(M, 1, 1) for v in (b, c, s)]
    th = (2 * rand(M, 1, 1) - 1) * hue * 2 * math.pi                         # hue: rotation about the grey axis
    K = torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=dev) / math.sqrt(3)
    R = th.cos() * I + th.sin() * K + (1 - th.cos()) / 3 if C == 3 else I.expand(M, C, C)   # Rodrigues, u u^T = 1/3
    mats = torch.stack([fb * I, fc * I, fs * I + (1 - fs) * G, R], 1)     # (M, 4, C, C) bright, contrast, sat, hue
    order, on = rand(M, 4).argsort(1), rand(M) < p
    for r in range(4):
        A = torch.where(on[:, None, None], mats[torch.arange(M, device=dev), order[:, r]], I)   # (M, C, C)
        grey = torch.einsum("c,mchw->m", G[0], y) / y[0, 0].numel()          # contrast blends towards the mean grey
        off = torch.where(on & (order[:, r] == 1), (1 - fc[:, 0, 0]) * grey, 0.0)
        y = (torch.einsum("mij,mjhw->mihw", A, y) + off[:, None, None, None]).clamp(0, 1)
    return torch.where((rand(M) < gray_p)[:, None, None, None], torch.einsum("ij,mjhw->mihw", G, y), y)


def gaussian_blur(y, p, gen, k=9, sigma=(0.1, 2.0)):
    """GaussianBlur(9, sigma U[0.1, 2]) w.p. p per image: separable depthwise conv; a one-hot kernel if not drawn."""
    if p <= 0:
        return y
    M, C, H, W = y.shape
    rand = partial(torch.rand, device=y.device, generator=gen)
    t = torch.arange(k, device=y.device) - k // 2
    ker = torch.exp(-0.5 * (t / (sigma[0] + (sigma[1] - sigma[0]) * rand(M, 1))) ** 2)           # (M, k)
    ker = torch.where(rand(M, 1) < p, ker / ker.sum(1, keepdim=True), (t == 0).float()).repeat_interleave(C, 0)
    z = F.pad(y.reshape(1, M * C, H, W), (k // 2,) * 4, mode="reflect")    # (1, M*C, H+k-1, W+k-1)
    z = F.conv2d(F.conv2d(z, ker[:, None, None, :], groups=M * C), ker[:, None, :, None], groups=M * C)
    return z.reshape(M, C, H, W)                                             # (M, C, H, W)


def make_views(frames, cfg, gen, mean, std):
    """uint8 (B, C, L, L) -> normalised global (2B, C, G, G), local (nB, C, l, l) crops, crop-major as official."""
    (G, Lc, _), x, B = crop_sizes(cfg), frames.float() / 255, frames.shape[0]
    rand = partial(torch.rand, device=x.device, generator=gen)

    def crops(n, size, scale):
        return torch.cat([resized_crop(x, crop_boxes(B, scale, gen), size, rand(B) < 0.5) for _ in range(n)])
    g1 = gaussian_blur(color_jitter(crops(1, G, cfg.global_scale), gen), cfg.blur_p[0], gen)
    g2 = gaussian_blur(color_jitter(crops(1, G, cfg.global_scale), gen), cfg.blur_p[1], gen)
    g2 = torch.where((rand(B) < cfg.solarize_p)[:, None, None, None] & (g2 >= 128 / 255), 1 - g2, g2)  # solarize
    loc = gaussian_blur(color_jitter(crops(cfg.n_local, Lc, cfg.local_scale), gen), cfg.blur_p[2], gen)
    mean, std = mean[:, None, None], std[:, None, None]
    return (torch.cat([g1, g2]) - mean) / std, (loc - mean) / std

# -----------------------------------------------------------------------------
# model: backbone + DINO head + iBOT head; the teacher is a deep copy updated by EMA


class DINOHead(nn.Module):
    """dinov3 layers/dino_head.py: MLP D-h-h-b with GELU, L2-normalise, bias-free linear to K prototypes; no weight
    norm (DINOv2 had one); trunc_normal(0.02) init."""

    def __init__(self, dim, hidden, bottleneck, k):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last_layer = nn.Linear(bottleneck, k, bias=False)
        for m in [*self.mlp[::2], self.last_layer]:                           # the Linear layers
            nn.init.trunc_normal_(m.weight, std=0.02)
        for m in self.mlp[::2]:
            nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12))


class DINO(nn.Module):
    """Backbone + DINO head + separate iBOT head; the teacher is a deep copy."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = vit.ViT(vit.vit_config(
            cfg.size, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_reg=cfg.num_reg,
            pos_embed="rope", rope_base=100.0, rope_rescale=cfg.rope_rescale, layerscale=cfg.layerscale, ln_eps=1e-5,
            drop_path=cfg.drop_path, mask_token=True, cls_token=True, **({"depth": cfg.depth} if cfg.depth else {})))
        head = (self.backbone.cfg.embed_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.n_prototypes)
        self.dino_head, self.ibot_head = DINOHead(*head), DINOHead(*head)

    def forward(self, x_g, mask_idx, mask=None, x_l=None):
        """Global (masked for the student) [+ local] crops -> global CLS (2B, D), CLS logits, masked-patch logits."""
        g = self.backbone(x_g, mask=mask)                                    # (2B, 1 + R + N, D)
        cls = g[:, 0] if x_l is None else torch.cat([g[:, 0], self.backbone(x_l)[:, 0]])   # (2B [+ nB], D)
        patches = g[:, self.backbone.num_prefix:].flatten(0, 1)[mask_idx]    # (M, D)
        return g[:, 0], self.dino_head(cls), self.ibot_head(patches)


def param_groups(model, cfg):
    """AdamW groups (dinov3 train/param_groups.py): backbone LR x layer_decay^(depth+1-layer), tokens and patch
    embed at layer 0, block i at i+1, the final norm at depth+1; patch embed x0.2 more; heads x1. No weight decay on
    biases, norms, LayerScale gamma (the tokens ARE decayed, as official). last_layer: frozen the first epoch."""
    depth, groups = len(model.backbone.blocks), {}
    for name, p in model.named_parameters():
        lr_mult, n = 1.0, name.removeprefix("backbone.")
        if name.startswith("backbone."):
            layer = (0 if n.startswith(("cls_token", "reg_token", "mask_token", "patch_embed", "pos_embed"))
                     else int(n.split(".")[1]) + 1 if n.startswith("blocks.") else depth + 1)
            lr_mult = cfg.layer_decay ** (depth + 1 - layer) * (cfg.patch_embed_lr if "patch_embed" in n else 1.0)
        wd_mult = 0.0 if name.endswith("bias") or "norm" in name or "gamma" in name else 1.0
        groups.setdefault((lr_mult, wd_mult, "last_layer" in name), []).append(p)
    return [{"params": ps, "lr_mult": k[0], "wd_mult": k[1], "last_layer": k[2]} for k, ps in groups.items()]


def build(cfg, device):
    torch.manual_seed(cfg.seed)                                             # the same init on every rank
    student = DINO(cfg).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)           # official: teacher <- student weights
    opt = torch.optim.AdamW(param_groups(student, cfg), lr=0.0, betas=(0.9, 0.999), fused=device.type == "cuda")
    for blk in [*student.backbone.blocks, *teacher.backbone.blocks] if cfg.compile else []:
        blk.compile()
    return student, teacher, opt

# -----------------------------------------------------------------------------
# losses (dinov3 loss/*.py, in fp32), schedules (per step) and one training step


def sinkhorn_knopp(logits, tau, n_iter=3):
    """(B, K) teacher logits -> (B, K) targets whose rows sum to 1 and whose prototypes share the mass equally over
    the GLOBAL batch (loss/dino_clstoken_loss.py:42-70): sums are all-reduced when a process group exists."""
    ddp = dist.is_available() and dist.is_initialized()
    allsum = (lambda t: dist.all_reduce(t) or t) if ddp else (lambda t: t)   # noqa: E731  (in-place sum over ranks)
    x = logits.float() / tau
    top = x.max()
    if ddp:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    Q = torch.exp(x - top).t()                                               # (K, B)
    K, B = Q.shape[0], Q.shape[1] * (dist.get_world_size() if ddp else 1)
    Q /= allsum(Q.sum())
    for _ in range(n_iter):
        Q /= allsum(Q.sum(dim=1, keepdim=True)) * K                          # each prototype: 1/K of the mass
        Q /= Q.sum(dim=0, keepdim=True) * B                                  # each sample: 1/B
    return (Q * B).t()


def dino_loss(s_logits, t_probs, tau_s, ignore_diagonal=False):
    """(S, B, K) student logits, (T, B, K) teacher targets -> -sum_k t log softmax(s / tau_s) averaged over the
    (s, t, b) triples, without the s == t pairs if ignore_diagonal (global vs the OTHER global)."""
    (S, B, _), T = s_logits.shape, t_probs.shape[0]
    ce = -torch.einsum("sbk,tbk->st", F.log_softmax(s_logits.float() / tau_s, dim=-1), t_probs)   # (S, T)
    if not ignore_diagonal:
        return ce.sum() / (B * S * T)
    return (ce.sum() - ce.diagonal().sum()) / (B * (S * T - min(S, T)))


def ibot_loss(s_logits, t_probs, weight, n_crops, tau_s):
    """Masked patches (M, K): sum_m w_m CE_m / n_crops, w = 1/#masked of its crop: each crop's mean, averaged over
    ALL 2B global crops, unmasked ones included (loss/ibot_patch_loss.py:96-117)."""
    ce = -(t_probs * F.log_softmax(s_logits.float() / tau_s, dim=-1)).sum(-1)   # (M,)
    return (ce * weight).sum() / n_crops


def koleo_loss(x, eps=1e-8):
    """-mean log ||x_i - x_nn(i) + eps|| over L2-normalised rows (loss/koleo_loss.py:14-43, PairwiseDistance adds
    eps); the nearest neighbour by cosine similarity with the diagonal at -1."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    nn_idx = kernels.cosine_similarity(x.detach()[None], x.detach()[None])[0].fill_diagonal_(-1).argmax(1)   # (n,)
    return -torch.log((x - x[nn_idx] + eps).norm(dim=-1) + eps).mean()


def cosine(step, total, base, final, warmup=0, start=0.0):
    """dinov3 CosineScheduler: linspace(start, base, warmup) then a half cosine to final; final after total."""
    warmup = min(warmup, total)
    if step < warmup:
        return start + (base - start) * step / max(warmup - 1, 1)
    if step >= total:
        return final
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def schedules(step, cfg, E, total):
    """lr, last-layer lr, wd, teacher momentum and temperature at `step`; E = iterations per epoch."""
    peak = cfg.lr * (4 * math.sqrt(cfg.batch_size / 1024) if cfg.lr_scaling == "sqrt_wrt_1024" else 1.0)
    lr = cosine(step, total, peak, cfg.min_lr, warmup=round(cfg.warmup * E))
    tw = min(round(cfg.tau_t_warmup * E), total)                            # teacher temperature warmup
    return dict(lr=lr, last_lr=0.0 if step < min(round(cfg.freeze_last_layer * E), total) else lr,
                wd=cosine(step, total, *cfg.wd), momentum=cosine(step, total, *cfg.momentum),
                tau_t=cosine(step, tw, cfg.tau_t[1], cfg.tau_t[1], warmup=tw, start=cfg.tau_t[0]))


def train_step(model, raw, teacher, opt, views, masks, sched, cfg, ctx):
    """One step; -> detached [loss, dino_local, dino_global, koleo, ibot] on the device (no host sync)."""
    (x_g, x_l), (mask, mask_idx, weight), B = views, masks, views[0].shape[0] // 2
    for g in opt.param_groups:
        g["lr"] = (sched["last_lr"] if g["last_layer"] else sched["lr"]) * g["lr_mult"]
        g["weight_decay"] = sched["wd"] * g["wd_mult"]
    with ctx:
        _, t_cls, t_patch = teacher(x_g, mask_idx)                           # no graph: its weights need no grad
        g_cls, s_cls, s_patch = model(x_g, mask_idx, mask, x_l)
    t_cls = sinkhorn_knopp(t_cls, sched["tau_t"]).unflatten(0, (2, B))        # (2, B, K)
    t_patch = sinkhorn_knopp(t_patch, sched["tau_t"])     # (M, K); M is the same on every rank (counts depend on B)
    s_glob, s_loc = s_cls[:2 * B].unflatten(0, (2, B)), s_cls[2 * B:].unflatten(0, (-1, B))   # (2, B, K), (n, B, K)
    l_local = dino_loss(s_loc, t_cls, cfg.tau_s)
    l_global = dino_loss(s_glob, t_cls, cfg.tau_s, ignore_diagonal=True)
    l_koleo = sum(koleo_loss(c) for c in g_cls.unflatten(0, (2, B))) / 2    # per crop, per-GPU batch
    l_ibot = ibot_loss(s_patch, t_patch, weight, 2 * B, cfg.tau_s)
    n_loc = 2 * cfg.n_local                 # (s, t) pairs: local x global vs 2 global s != t (ssl_meta_arch:596)
    loss = (n_loc * l_local + 2 * l_global) / (n_loc + 2) + cfg.koleo_w * 2 * l_koleo + cfg.ibot_w * l_ibot
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for m in (raw.backbone, raw.dino_head, raw.ibot_head):                   # clipped apart (train.py:488-498)
        nn.utils.clip_grad_norm_(m.parameters(), cfg.clip)
    opt.step()
    with torch.no_grad():                                                    # teacher = m teacher + (1 - m) student
        torch._foreach_lerp_(list(teacher.parameters()), list(raw.parameters()), 1 - sched["momentum"])
    return torch.stack([loss, l_local, l_global, l_koleo, l_ibot]).detach()

# -----------------------------------------------------------------------------
# checkpoints (the teacher backbone as the encoder, plus everything --resume needs) and training


def save(path, cfg, raw, teacher, opt, step, position, mean, std, gen, device):
    """Collective (gathers every rank's RNG states); rank 0 writes. position: (epoch, batch) of the next step."""
    np_st, py_st = np.random.get_state(), random.getstate()
    rngs = [{"torch": torch.get_rng_state(), "aug": gen.get_state(),
             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0),
             "numpy": [np_st[1].tolist(), *np_st[2:]], "python": [py_st[0], list(py_st[1]), py_st[2]]}]
    if dist.is_initialized():
        rngs, mine = [None] * dist.get_world_size(), rngs[0]
        dist.all_gather_object(rngs, mine)
        if dist.get_rank() != 0:
            return
    t_opt, s_opt = vit.pack_state(opt.state_dict(), "optim")
    t_rng, s_rng = vit.pack_state(rngs, "rng")
    tensors = {**{f"student.{k}": v for k, v in raw.state_dict().items()}, **t_opt, **t_rng,
               **{f"teacher.{k}": v for k, v in teacher.state_dict().items() if not k.startswith("backbone.")}}
    vit.save_checkpoint(path, teacher.backbone, method="dino", pool="cls", mean=mean, std=std, args=asdict(cfg),
                        step=step, tensors=tensors, state={"optim": s_opt, "rng": s_rng, "data_position": position})


def load(path, raw, teacher, opt, gen, device, rank, world):
    """Restore a dino.py checkpoint into student, teacher, optimizer and RNGs; -> the step to continue from."""
    tensors, meta = vit.load_checkpoint(path)
    if meta.get("method") != "dino" or "optim" not in meta.get("state", {}):
        raise SystemExit(f"{path}: not a dino.py training checkpoint; --resume takes a dino.py OUT/ckpt.safetensors")
    sub = lambda pre: {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}   # noqa: E731
    try:
        raw.load_state_dict(sub("student."))
        teacher.load_state_dict({**{f"backbone.{k}": v for k, v in sub("encoder.").items()}, **sub("teacher.")})
        opt.load_state_dict(vit.unpack_state(meta["state"]["optim"], tensors))
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: does not fit this run's model ({str(e)[:300]}); resume with the --size, --depth, "
                         f"--in-chans, --num-reg and head sizes it was trained with") from None
    rngs = vit.unpack_state(meta["state"]["rng"], tensors)
    if len(rngs) != world:
        print(f"{path}: written by {len(rngs)} rank(s), resumed on {world}: random streams restart from the seed")
    else:
        s = rngs[rank]
        torch.set_rng_state(s["torch"])
        gen.set_state(s["aug"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda"], device)
        np.random.set_state(("MT19937", np.array(s["numpy"][0], np.uint32), *s["numpy"][1:]))
        random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    return int(meta["step"])


def train(cfg):
    """Pretrain; -> dict(step, losses = per-step [loss, dino_local, dino_global, koleo, ibot], student, teacher)."""
    ddp, device = int(os.environ.get("RANK", -1)) != -1, torch.device(cfg.device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master, B, (G, Lc, L) = rank == 0, cfg.batch_size // world, crop_sizes(cfg)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.batch_size % world or B < 2:
        raise SystemExit(f"--batch-size {cfg.batch_size}: pass a multiple of {world} ranks, >= 2 per rank (KoLeo)")
    if cfg.img_size % cfg.patch_size or cfg.img_size < 2 * cfg.patch_size or cfg.n_local < 1:
        raise SystemExit(f"--img-size {cfg.img_size}, --n-local {cfg.n_local}: pass a multiple of --patch-size of "
                         f">= 2 patches, and >= 1 local crop")
    if cfg.lr_scaling not in ("none", "sqrt_wrt_1024") or cfg.in_chans not in (1, 3):
        raise SystemExit(f"--lr-scaling {cfg.lr_scaling}, --in-chans {cfg.in_chans}: pass none|sqrt_wrt_1024, 1|3")
    if cfg.data:
        items = list_frames(cfg.data)
    else:
        try:
            from prep.synthetic import ultrasound_frames
        except ImportError:
            raise SystemExit("dino.py: no --data and no prep/ beside it for synthetic data; pass --data DIR") from None
        a = ultrasound_frames(cfg.synthetic, size=L, seed=cfg.seed)                       # (n, L, L) uint8
        items = [(a, i) for i in range(len(a))]
    ds = Frames(items, cfg.in_chans, L)
    os.makedirs(cfg.out, exist_ok=True)
    mean, std = get_stats(cfg, ds, master, ddp)
    steps_per_pass = len(ds) // world // B
    if steps_per_pass == 0:
        raise SystemExit(f"--data {cfg.data}: {len(ds)} frames < one batch of {B} per rank; lower --batch-size")
    E = cfg.epoch_length or steps_per_pass
    total = cfg.epochs * E
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    raw, teacher, opt = build(cfg, device)
    model = nn.parallel.DistributedDataParallel(raw, [device] if device.type == "cuda" else None) if ddp else raw
    gen = torch.Generator(device).manual_seed(cfg.seed + rank)    # crops and colours: one stream per rank
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):  # torch: drop path, RoPE rescaling
        seed_fn(cfg.seed + rank)
    start = load(cfg.resume, raw, teacher, opt, gen, device, rank, world) if cfg.resume else 0
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    ckpt = os.path.join(cfg.out, "ckpt.safetensors")
    if master:
        log = open(os.path.join(cfg.out, "log.jsonl"), "a" if cfg.resume else "w")
        print(f"dino: {sum(p.numel() for p in raw.backbone.parameters()) / 1e6:.1f}M-parameter ViT, {len(ds)} frames, "
              f"{world} x {B} images, crops 2x{G} + {cfg.n_local}x{Lc}, steps {start}..{end} of {total} ({E}/epoch)")
    losses, seen, failed, first_bad = [], 0, 0, []
    pbar = tqdm(total=end, initial=start, disable=not master, dynamic_ncols=True)
    t0 = time.time()
    for step, (epoch, (frames, mask, mask_idx, weight, bad)) in zip(
            range(start, end), batches(ds, cfg, rank, world, B, start, steps_per_pass)):
        sched = schedules(step, cfg, E, total)
        views = make_views(frames.to(device, non_blocking=True), cfg, gen, mean_t, std_t)
        masks = [t.to(device, non_blocking=True) for t in (mask, mask_idx, weight)]
        counts = torch.tensor([len(bad), len(bad) == B], dtype=torch.float32)    # unreadable frames, whole batches
        stats = torch.cat([train_step(model, raw, teacher, opt, views, masks, sched, cfg, ctx), counts.to(device)])
        if ddp:
            dist.all_reduce(stats)             # summed over ranks: a NaN on any rank stops them all, and the counts
        *vals, n_bad, n_lost = stats.tolist()                                # the one host sync per step
        vals = [v / world for v in vals]                                     # losses: the mean over ranks
        if not math.isfinite(vals[0]):
            raise RuntimeError(f"step {step}: loss is {vals[0]}")
        losses.append(vals)
        if n_lost:
            raise SystemExit(f"--data {cfg.data}: a whole batch is unreadable, e.g. {bad[:3]}; fix or remove them")
        if epoch == 0:                                                       # > 1 % unreadable: stop
            seen, failed, first_bad = seen + cfg.batch_size, failed + int(n_bad), (first_bad + bad)[:5]
            if seen >= 100 and failed > 0.01 * seen:
                raise SystemExit(f"--data {cfg.data}: {failed} of the first {seen} frames unreadable, e.g. "
                                 f"{first_bad}; fix or remove them")
        dt, t0 = time.time() - t0, time.time()
        if master:
            for b in bad:
                tqdm.write(f"skipped unreadable frame {b}")
            rec = {"step": step, "epoch": epoch, **{k: sched[k] for k in ("lr", "wd", "momentum", "tau_t")}}
            rec.update(zip(("loss", "dino_local", "dino_global", "koleo", "ibot"), vals), img_per_s=cfg.batch_size / dt)
            print(json.dumps(rec), file=log, flush=True)
            pbar.set_postfix(loss=f"{vals[0]:.4f}", lr=f"{sched['lr']:.2e}", img_s=f"{rec['img_per_s']:.0f}")
            pbar.update(1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            save(ckpt, cfg, raw, teacher, opt, step + 1, divmod(step + 1, steps_per_pass), mean, std, gen, device)
    pbar.close()
    if master:
        log.close()
        print(f"done: step {end}, teacher encoder in {ckpt}")
    if ddp:         # gloo can deadlock destroying a group whose worker still frees a Python-owned tensor: wait for it
        dist.barrier()
        dist.destroy_process_group()
    return dict(step=end, losses=losses, student=raw, teacher=teacher)

# -----------------------------------------------------------------------------
# benchmark (bench.py train --method dino)


def benchmark(cfg, steps=20, warmup=5, augment=True):
    """Time the training step on a synthetic uint8 batch on the device, making the views every step (augment) or
    once (to show what the augmentation costs); flops_per_img: matmuls, backward = 2 x forward, teacher forward."""
    device, B, (G, Lc, L) = torch.device(cfg.device), cfg.batch_size, crop_sizes(cfg)
    raw, teacher, opt = build(cfg, device)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    frames = torch.randint(0, 256, (B, cfg.in_chans, L, L), dtype=torch.uint8, device=device, generator=gen)
    masks = [t.to(device) for t in collate([(f, "", (0, 0)) for f in frames.cpu()], cfg, 0)[1:4]]
    mean, std = torch.full((cfg.in_chans,), 0.5, device=device), torch.full((cfg.in_chans,), 0.25, device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sched = dict(lr=1e-4, last_lr=1e-4, wd=0.04, momentum=0.992, tau_t=0.04)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    views = make_views(frames, cfg, gen, mean, std)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        views = make_views(frames, cfg, gen, mean, std) if augment else views
        train_step(raw, raw, teacher, opt, views, masks, sched, cfg, ctx)
    sync()
    dt = time.perf_counter() - t0
    bb, P, h, b = raw.backbone.cfg, cfg.patch_size, cfg.head_hidden, cfg.head_bottleneck
    D, pre, M = bb.embed_dim, bb.num_prefix, masks[1].numel() / B           # M: masked patches per image
    n = lambda side: pre + (side // P) ** 2                                 # noqa: E731  tokens of a crop
    vit_f = lambda side: bb.depth * (24 * n(side) * D * D + 4 * n(side) ** 2 * D)   # noqa: E731  one crop
    head_f = lambda rows: 2 * rows * (D * h + h * h + h * b + b * cfg.n_prototypes)   # noqa: E731
    student = 2 * vit_f(G) + cfg.n_local * vit_f(Lc) + head_f(2 + cfg.n_local) + head_f(M)
    return dict(img_per_s=B * steps / dt, flops_per_img=3 * student + 2 * vit_f(G) + head_f(2) + head_f(M))


if __name__ == "__main__":
    train(parse_args())
