"""DINOv3-style self-distillation (DINO + iBOT + KoLeo, Sinkhorn-Knopp centering), without Gram
anchoring, as "Pretext Matters" trains it ("DINOv3", Simeoni et al. 2025;
facebookresearch/dinov3@6876159, cited as file:line).

A student ViT sees 2 global and 8 local crops of each image, with iBOT block masks on half of the
global crops; the EMA teacher (eval mode) sees the unmasked global crops. Its CLS and masked-patch
outputs, centred by Sinkhorn-Knopp, are the targets of the student's: loss = 16/18 DINO(local vs
both global) + 2/18 DINO(global vs the other) + 0.1 * 2 KoLeo + iBOT (paper section 2;
train/ssl_meta_arch.py:355-649).

    python dino.py --data us_frames/                     # one GPU (or CPU), grayscale frames
    torchrun --standalone --nproc_per_node=8 dino.py --data us_frames/ # 8 GPUs, global batch
    python dino.py --data he_tiles/ --in-chans 3 --lr 1e-5                # histopathology (Table 4)
    python dino.py --device cpu --size vit_tiny --depth 2 --img-size 64 --batch-size 8 \\
        --n-prototypes 1024 --head-hidden 256 --max-steps 20 --num-workers 0   # CPU smoke run
    python dino.py --data us_frames/ --resume runs/dino/ckpt.safetensors  # continue exactly

Writes OUT/ckpt.safetensors (the TEACHER backbone as the `encoder.*` probe.py, abmil.py and viz.py
read, pool "cls"; the student, the teacher heads, AdamW state, data position and RNG states for
--resume), OUT/init.safetensors (the teacher before any update: the run's random twin),
OUT/log.jsonl (a line per step; the collapse diagnostic of the teacher every --diag-every steps) and
OUT/stats.json when it computes the normalisation. `--help` lists every flag with its meaning and
default.

Defaults: dinov3's configs/ssl_default_config.yaml (the paper used the default configuration apart
from its Table 4: batch 128, lr 1e-3 -> 1e-6, 10 warmup epochs, teacher temperature warmup 10
epochs) with the ViT-S student of the only from-scratch recipe (train/vitl_im1k_lin834.yaml,
multidist_tests/vits_p16.yaml: drop path 0.1). That config has no storage tokens (n_storage_tokens
0, ssl_default_config.yaml:97) and no RoPE coordinate rescaling (pos_embed_rope_rescale_coords null,
:109); the released ViT-S, distilled from the 7B model, has 4 and 2 (hub/backbones.py:215,228):
--num-reg 4 --rope-rescale 2 give that architecture.

What differs from the official code, and why:
- Schedule epochs are --epoch-length iterations: 1250 = the official OFFICIAL_EPOCH_LENGTH (100
  epochs = 125k iterations, where the paper's runs converged), 0 = one pass over --data (log.jsonl's
  epoch counts passes). Warmups and the last-layer freeze are clipped to the run length, so short
  runs stay well defined.
- --lr is the peak LR applied (Table 4: 1e-3). The official multiplies it by 4*sqrt(B/1024)
  (configs/config.py:50, x1.41 at batch 128); --lr-scaling sqrt_wrt_1024 does the same.
- Blur: the official GaussianBlur hands 1-p to RandomApply (data/transforms.py:19-28, dinov3 #286),
  so the configured 1.0 / 0.1 / 0.5 (global 1 / global 2 / local) act as never / 90 % / 50 %. We use
  these effective values (--blur-p 0 0.9 0.5); --blur-p 1 0.1 0.5 gives the DINOv2/BYOL intent.
- Frames are padded to a square with black (an ultrasound fan keeps its aspect ratio) and resized in
  the workers; views are batched torch ops on the device, no torchvision: crops by bicubic
  grid_sample (no antialiasing); hue jitter rotates colours about the grey axis (a linear stand-in
  for the HSV shift, same range); the jitter op order is random per image as in torchvision; with 1
  channel it is brightness/contrast.
- iBOT masks (MaskingGenerator) come from a numpy Generator seeded by (seed, rank, step): resumable.
- Sinkhorn-Knopp subtracts the global max logit before exp (the official overflows once logit/tau >
  88; a constant cancels in the first normalisation) and runs with or without a process group. A
  batch without any masked patch (--mask-sample-p 0, tiny grids) has an iBOT term of 0, as the
  official loss gives for empty masks (loss/ibot_patch_loss.py:30-58, 96-117).
- NaN: the official aborts after 3 NaN losses in a row, stepping on them; we stop at the first and
  save nothing.
- An unreadable frame is replaced by a readable one of its batch and reported; more than 1% of them
  in the first epoch stop the run.
- From vit.py: per-sample drop path (official: a batch subset), one RoPE rescale per forward when
  enabled (official: per block), RoPE in fp32 (official: bf16), trunc_normal patch-embed init.
  Precision: bf16 autocast, fp32 weights. --compile compiles the whole forward and loss (official:
  each block).

The file reads top to bottom: the config, the views, the iBOT masks, the model and heads, the losses
and schedules, one training step and the training loop; then the plumbing mae.py, dino.py and
ijepa.py share, copied verbatim from mae.py (DEVELOPERS.md; tests/check_copies.py keeps the copies
identical).
"""
import argparse
import copy
import hashlib
import inspect
import json
import math
import os
import random
import re
import time
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import kernels
import vit

METHOD = "dino"  # the names the shared plumbing below expects every method file to define
POOL = "cls"  # the checkpoint's pooling: probe.py reads the teacher's CLS token
# the method flags --resume must find as they were
ARCH_FLAGS = ("num_reg", "layerscale", "n_prototypes", "head_hidden", "head_bottleneck", "n_local")

# -----------------------------------------------------------------------------
# config: every knob; defaults = paper Table 4 + dinov3's ssl_default_config.yaml (docstring)


@dataclass
class Config:
    # data
    data: str = ""                   # folder of frames (png/jpg/bmp/tif incl. 16-bit and
                                     # multi-page, .npy stacks); "" = synthetic ultrasound from
                                     # prep/synthetic.py
    in_chans: int = 1                # 1 = grayscale (ultrasound), 3 = RGB (H&E)
    img_size: int = 224              # global crop side (px); the local crop is 96/224 of it,
                                     # rounded to patches
    load_size: int = 0               # each frame is decoded to this square; 0 = img_size * 8 // 7
    synthetic_frames: int = 1024     # frames of synthetic ultrasound without --data
    num_workers: int = 8             # data loader processes per rank
    n_local: int = 8                 # local crops per image
    global_scale: tuple = (0.32, 1.0)    # global crop area range
    local_scale: tuple = (0.05, 0.32)    # local crop area range
    blur_p: tuple = (0.0, 0.9, 0.5)  # blur probability: global 1, global 2, local (the official
                                     # EFFECTIVE ones)
    solarize_p: float = 0.2          # solarization probability, global crop 2 only
    # model
    size: str = "vit_small"          # ViT size: vit_tiny | vit_small | vit_base
    depth: int = 0                   # ViT blocks; 0 = the size's (12)
    patch_size: int = 16             # patch side (px)
    num_reg: int = 0                 # storage (register) tokens: 0 as ssl_default_config, 4 as the
                                     # release
    drop_path: float = 0.1           # stochastic depth rate, every block (vits_p16.yaml)
    layerscale: float = 1e-5         # LayerScale init value
    rope_rescale: float = 0.0        # training-time RoPE coordinate rescaling in [1/s, s]; 0 = off
                                     # (the release: 2)
    n_prototypes: int = 65536        # prototypes per head; the DINO and iBOT heads are separate
    head_hidden: int = 2048          # head MLP width
    head_bottleneck: int = 256       # head bottleneck width
    # pretext
    mask_sample_p: float = 0.5       # fraction of the global crops with iBOT masks
    mask_ratio: tuple = (0.1, 0.5)   # masked fraction range of a masked crop
    tau_s: float = 0.1               # student temperature
    tau_t: tuple = (0.04, 0.07)      # teacher temperature: linear warmup from the first, then the
                                     # second
    tau_t_warmup: float = 10.0       # teacher temperature warmup, epochs (Table 4; the official
                                     # default is 30)
    koleo_w: float = 0.1             # KoLeo loss weight
    ibot_w: float = 1.0              # iBOT loss weight
    # optimisation (paper Table 4: batch 128, lr 1e-3 -> 1e-6, warmup 10)
    batch_size: int = 128            # global batch, split over the ranks
    epochs: int = 100                # schedule length, in --epoch-length epochs
    epoch_length: int = 1250         # iterations per schedule epoch; 0 = one pass over the data
    warmup_epochs: float = 10.0      # linear lr warmup from 0
    lr: float = 1e-3                 # peak lr (histopathology: 1e-5)
    min_lr: float = 1e-6             # the cosine's end value
    lr_scaling: str = "none"         # none | sqrt_wrt_1024 (official: lr * 4 * sqrt(batch / 1024))
    weight_decay: float = 0.04       # AdamW weight decay at the start (none on biases, norms,
                                     # LayerScale)
    weight_decay_end: float = 0.4    # weight decay at the end of its cosine
    momentum: tuple = (0.992, 1.0)   # teacher EMA momentum, cosine from the first to the second
    layer_decay: float = 0.9         # layer-wise lr decay of the backbone
    patch_embed_lr: float = 0.2      # extra lr factor of the patch embedding
    freeze_last_layer: float = 1.0   # epochs with the heads' last layer at lr 0
    clip: float = 3.0                # gradient norm clip, per sub-module (backbone, dino_head,
                                     # ibot_head)
    # run
    out: str = "runs/dino"           # run folder: ckpt.safetensors, init.safetensors, log.jsonl,
                                     # stats.json
    resume: str = ""                 # continue the run of this ckpt.safetensors exactly (same flags
                                     # and data)
    max_steps: int = 0               # stop after this many steps (the schedule still spans
                                     # --epochs); 0 = all
    save_every: int = 1000           # steps between checkpoints (one is always written at the end)
    log_every: int = 10              # steps between host syncs (loss read, NaN guard); the log has
                                     # every step
    diag_every: int = 250            # steps between collapse diagnostics (also at step 0 and the
                                     # end); 0 = off
    seed: int = 0                    # seeds weights, data order, crops, colours and masks
    device: str = ""                 # cuda | cpu; "" = cuda when available (torchrun: one GPU per
                                     # process)
    compile: Optional[bool] = None   # torch.compile the forward and loss; unset = on for CUDA, off
                                     # for CPU


def method_errors(cfg):
    """dino.py's own checks of the flags (check() below adds the common ones)."""
    errors = []
    if cfg.img_size < 2 * cfg.patch_size:
        errors.append(f"--img-size {cfg.img_size} must hold at least 2 patches of --patch-size "
                      f"{cfg.patch_size}")
    if cfg.n_local < 1:
        errors.append("--n-local must be >= 1")
    if cfg.lr_scaling not in ("none", "sqrt_wrt_1024"):
        errors.append(f"--lr-scaling is none or sqrt_wrt_1024, not {cfg.lr_scaling!r}")
    if min(cfg.n_prototypes, cfg.head_hidden, cfg.head_bottleneck) < 1 or cfg.num_reg < 0:
        errors.append("--n-prototypes, --head-hidden and --head-bottleneck must be >= 1, --num-reg "
                      ">= 0")
    return errors


def crop_sizes(cfg):
    """(global, local) crop sides in pixels; the local crop keeps 96/224 of the global one, rounded
    to the patch."""
    P = cfg.patch_size
    return cfg.img_size, max(P, round(cfg.img_size * 96 / 224 / P) * P)

# -----------------------------------------------------------------------------
# views: uint8 (C, L, L) frames decoded in workers; crops and colours on the device, one
# torch.Generator (data/augmentations.py)


def crop_boxes(n, scale, gen, ratio=(3 / 4, 4 / 3), tries=10):
    """RandomResizedCrop boxes (fractions of the side; torchvision's 10 tries, else all) -> (n, 4)
    [w, h, cx, cy]."""
    rand = partial(torch.rand, device=gen.device, generator=gen)
    area = scale[0] + (scale[1] - scale[0]) * rand(n, tries)
    ar = (math.log(ratio[0]) + math.log(ratio[1] / ratio[0]) * rand(n, tries)).exp()
    w = (area * ar).sqrt()                                                  # (n, tries)
    h = (area / ar).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1, keepdim=True)  # the first try that fits
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], 1.0)
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], 1.0)
    return torch.stack([w, h, w / 2 + rand(n) * (1 - w), h / 2 + rand(n) * (1 - h)], 1)


def resized_crop(x, boxes, size, flip):
    """x (B, C, L, L) float, boxes (B, 4), flip (B,) bool -> (B, C, size, size) by one affine grid
    per sample."""
    w, h, cx, cy = boxes.unbind(1)
    # (B, 6)
    theta = torch.stack([torch.where(flip, -w, w), 0 * w, 2 * cx - 1, 0 * w, h, 2 * cy - 1], 1)
    theta = theta.view(-1, 2, 3)  # (B, 2, 3)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    y = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return y.clamp(0, 1)


def color_jitter(y, gen, p=0.8, b=0.4, c=0.4, s=0.2, hue=0.1, gray_p=0.2):
    """RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), 0.8) + RandomGrayscale(0.2). Each op is y ->
    clamp(A y + off) with a per-image C x C matrix A; the four ops run in a random order per
    image (torchvision's randperm)."""
    M, C = y.shape[:2]
    dev = y.device
    rand = partial(torch.rand, device=dev, generator=gen)
    I = torch.eye(C, device=dev)
    # rows: grey weights
    G = torch.tensor([0.299, 0.587, 0.114] if C == 3 else [1.0], device=dev).expand(C, C)
    fb, fc, fs = [1 - v + 2 * v * rand(M, 1, 1) for v in (b, c, s)]
    th = (2 * rand(M, 1, 1) - 1) * hue * 2 * math.pi  # hue: rotation about the grey axis
    K = torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=dev) / math.sqrt(3)
    if C == 3:
        R = th.cos() * I + th.sin() * K + (1 - th.cos()) / 3                # Rodrigues, u u^T = 1/3
    else:
        R = I.expand(M, C, C)
    # (M, 4, C, C) bright, contrast, sat, hue
    mats = torch.stack([fb * I, fc * I, fs * I + (1 - fs) * G, R], 1)
    order = rand(M, 4).argsort(1)
    on = rand(M) < p
    for r in range(4):
        # (M, C, C)
        A = torch.where(on[:, None, None], mats[torch.arange(M, device=dev), order[:, r]], I)
        # contrast blends to the mean grey
        grey = torch.einsum("c,mchw->m", G[0], y) / y[0, 0].numel()
        off = torch.where(on & (order[:, r] == 1), (1 - fc[:, 0, 0]) * grey, 0.0)
        y = (torch.einsum("mij,mjhw->mihw", A, y) + off[:, None, None, None]).clamp(0, 1)
    gray = (rand(M) < gray_p)[:, None, None, None]
    return torch.where(gray, torch.einsum("ij,mjhw->mihw", G, y), y)


def gaussian_blur(y, p, gen, k=9, sigma=(0.1, 2.0)):
    """GaussianBlur(9, sigma U[0.1, 2]) w.p. p per image: separable depthwise conv; a one-hot kernel
    if not drawn."""
    if p <= 0:
        return y
    M, C, H, W = y.shape
    rand = partial(torch.rand, device=y.device, generator=gen)
    t = torch.arange(k, device=y.device) - k // 2
    ker = torch.exp(-0.5 * (t / (sigma[0] + (sigma[1] - sigma[0]) * rand(M, 1))) ** 2)  # (M, k)
    ker = torch.where(rand(M, 1) < p, ker / ker.sum(1, keepdim=True), (t == 0).float())
    ker = ker.repeat_interleave(C, 0)  # (M*C, k)
    z = F.pad(y.reshape(1, M * C, H, W), (k // 2,) * 4, mode="reflect")   # (1, M*C, H+k-1, W+k-1)
    z = F.conv2d(z, ker[:, None, None, :], groups=M * C)                   # along the rows
    z = F.conv2d(z, ker[:, None, :, None], groups=M * C)                   # along the columns
    return z.reshape(M, C, H, W)                                            # (M, C, H, W)


def make_views(frames, cfg, gen, mean, std):
    """uint8 (B, C, L, L) -> normalised global (2B, C, G, G), local (nB, C, l, l) crops, crop-major
    as official."""
    G, Lc = crop_sizes(cfg)
    x = frames.float() / 255
    B = frames.shape[0]
    rand = partial(torch.rand, device=x.device, generator=gen)

    def crops(n, size, scale):
        views = [resized_crop(x, crop_boxes(B, scale, gen), size, rand(B) < 0.5) for _ in range(n)]
        return torch.cat(views)                                             # (nB, C, size, size)
    g1 = gaussian_blur(color_jitter(crops(1, G, cfg.global_scale), gen), cfg.blur_p[0], gen)
    g2 = gaussian_blur(color_jitter(crops(1, G, cfg.global_scale), gen), cfg.blur_p[1], gen)
    solarize = (rand(B) < cfg.solarize_p)[:, None, None, None] & (g2 >= 128 / 255)
    g2 = torch.where(solarize, 1 - g2, g2)
    loc = color_jitter(crops(cfg.n_local, Lc, cfg.local_scale), gen)
    loc = gaussian_blur(loc, cfg.blur_p[2], gen)
    mean = mean[:, None, None]
    std = std[:, None, None]
    return (torch.cat([g1, g2]) - mean) / std, (loc - mean) / std

# -----------------------------------------------------------------------------
# iBOT masks, drawn in the loader workers (data/masking.py, data/collate.py)


def block_mask(rng, g, count, max_patches, min_patches=4, log_ar=(math.log(0.3), -math.log(0.3))):
    """DINOv3 MaskingGenerator (data/masking.py) on a g x g grid: add blocks (area U[4, budget],
    log-uniform aspect 0.3-3.3, 10 tries each) until `count` are masked or none fits, then
    complete at random to exactly `count`."""
    mask = np.zeros((g, g), dtype=bool)
    while mask.sum() < count:
        budget = min(count - mask.sum(), max_patches)
        for _ in range(10):
            # random.uniform allows budget < 4
            area = min_patches + (budget - min_patches) * rng.random()
            ar = math.exp(log_ar[0] + (log_ar[1] - log_ar[0]) * rng.random())
            h = int(round(math.sqrt(area * ar)))
            w = int(round(math.sqrt(area / ar)))
            if w < g and h < g:
                top = rng.integers(0, g - h + 1)  # inclusive, as random.randint
                left = rng.integers(0, g - w + 1)
                # adds patches, within budget
                if 0 < h * w - mask[top:top + h, left:left + w].sum() <= budget:
                    mask[top:top + h, left:left + w] = True
                    break
        else:  # 10 tries placed nothing
            break
    flat = mask.flatten()                                                    # (g*g,)
    flat[rng.choice(np.flatnonzero(~flat), count - flat.sum(), replace=False)] = True
    return flat


def ibot_masks(rng, n, g, p=0.5, ratio=(0.1, 0.5)):
    """(n, g*g) bool for n global crops (data/collate.py:35-56): int(n*p) crops get
    int(N*probs[i+1]) masked patches, probs = linspace(*ratio, int(n*p)+1) in float32
    (torch.linspace), the others none; then shuffled."""
    N = g * g
    k = int(n * p)
    probs = np.linspace(ratio[0], ratio[1], k + 1, dtype=np.float32)
    masks = [block_mask(rng, g, int(N * probs[i + 1]), 0.5 * N) for i in range(k)]
    masks += [np.zeros(N, bool)] * (n - k)
    return torch.from_numpy(np.stack([masks[i] for i in rng.permutation(n)]))


def batch_extras(cfg, n, step, rank):
    """In the loader workers, for a batch of n frames: the iBOT masks of its 2n global crops, drawn
    from (seed, rank, step) (independent of --num-workers and of resuming), the masked patches'
    flat indices into the 2n*N patch tokens and their weights 1/#masked in their crop."""
    rng = np.random.default_rng([cfg.seed, rank, step])
    # (2n, N)
    mask = ibot_masks(rng, 2 * n, cfg.img_size // cfg.patch_size, cfg.mask_sample_p, cfg.mask_ratio)
    mask_idx = mask.flatten().nonzero().flatten()                                             # (M,)
    weight = (1 / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(mask)[mask]             # (M,)
    return {"mask": mask, "mask_idx": mask_idx, "weight": weight}

# -----------------------------------------------------------------------------
# model: backbone + DINO head + iBOT head; the teacher is a deep copy updated by EMA


class DINOHead(nn.Module):
    """dinov3 layers/dino_head.py: MLP D-h-h-b with GELU, L2-normalise, bias-free linear to K
    prototypes; no weight norm (DINOv2 had one); trunc_normal(0.02) init."""

    def __init__(self, dim, hidden, bottleneck, k):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last_layer = nn.Linear(bottleneck, k, bias=False)
        for m in [*self.mlp[::2], self.last_layer]:                           # the Linear layers
            nn.init.trunc_normal_(m.weight, std=0.02)
        for m in self.mlp[::2]:
            nn.init.zeros_(m.bias)

    def forward(self, x):
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=eps))


class DINO(nn.Module):
    """Backbone + DINO head + separate iBOT head; the teacher is a deep copy."""

    def __init__(self, cfg):
        super().__init__()
        depth = {"depth": cfg.depth} if cfg.depth else {}
        self.backbone = vit.ViT(vit.vit_config(
            cfg.size, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
            num_reg=cfg.num_reg, pos_embed="rope", rope_base=100.0, rope_rescale=cfg.rope_rescale,
            layerscale=cfg.layerscale, ln_eps=1e-5, drop_path=cfg.drop_path, mask_token=True,
            cls_token=True, **depth))
        head = (self.backbone.cfg.embed_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.n_prototypes)
        self.dino_head = DINOHead(*head)
        self.ibot_head = DINOHead(*head)

    def forward(self, x_g, mask_idx, mask=None, x_l=None):
        """Global (masked for the student) [+ local] crops -> global CLS (2B, D), CLS logits,
        masked-patch logits."""
        g = self.backbone(x_g, mask=mask)                                    # (2B, 1 + R + N, D)
        cls = g[:, 0]
        if x_l is not None:
            cls = torch.cat([cls, self.backbone(x_l)[:, 0]])                 # (2B + nB, D)
        patches = g[:, self.backbone.num_prefix:].flatten(0, 1)[mask_idx]    # (M, D)
        return g[:, 0], self.dino_head(cls), self.ibot_head(patches)


def param_groups(model, cfg):
    """AdamW groups (dinov3 train/param_groups.py): backbone LR x layer_decay^(depth+1-layer),
    tokens and patch embed at layer 0, block i at i+1, the final norm at depth+1; patch embed
    x0.2 more; heads x1. No weight decay on biases, norms, LayerScale gamma (the tokens ARE
    decayed, as official). last_layer: frozen the first epoch."""
    depth = len(model.backbone.blocks)
    groups = {}
    for name, p in model.named_parameters():
        lr_mult = 1.0
        n = name.removeprefix("backbone.")
        if name.startswith("backbone."):
            if n.startswith(("cls_token", "reg_token", "mask_token", "patch_embed", "pos_embed")):
                layer = 0
            elif n.startswith("blocks."):
                layer = int(n.split(".")[1]) + 1
            else:
                layer = depth + 1
            lr_mult = cfg.layer_decay ** (depth + 1 - layer)
            if "patch_embed" in n:
                lr_mult *= cfg.patch_embed_lr
        wd_mult = 0.0 if name.endswith("bias") or "norm" in name or "gamma" in name else 1.0
        groups.setdefault((lr_mult, wd_mult, "last_layer" in name), []).append(p)
    return [{"params": ps, "lr_mult": k[0], "wd_mult": k[1], "last_layer": k[2]}
            for k, ps in groups.items()]


def build(cfg, device):
    torch.manual_seed(cfg.seed)  # the same init on every rank
    student = DINO(cfg).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)  # official: teacher <- student
    opt = torch.optim.AdamW(param_groups(student, cfg), lr=0.0, betas=(0.9, 0.999),
                            fused=device.type == "cuda")
    return student, teacher, opt

# -----------------------------------------------------------------------------
# losses (dinov3 loss/*.py, in fp32), schedules (per step) and one training step


def all_sum(t):
    """In-place sum over the ranks when a process group exists; -> t."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def sinkhorn_knopp(logits, tau, n_iter=3):
    """(B, K) teacher logits -> (B, K) targets whose rows sum to 1 and whose prototypes share the
    mass equally over the GLOBAL batch (loss/dino_clstoken_loss.py:42-70): sums are all-reduced
    when a process group exists. No rows (no masked patch on any rank: the count is the same on
    all): no targets."""
    ddp = dist.is_available() and dist.is_initialized()
    x = logits.float() / tau
    if x.numel() == 0:
        return x
    top = x.max()
    if ddp:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    Q = torch.exp(x - top).t()                                               # (K, B)
    K = Q.shape[0]
    B = Q.shape[1] * (dist.get_world_size() if ddp else 1)
    Q /= all_sum(Q.sum())
    for _ in range(n_iter):
        Q /= all_sum(Q.sum(dim=1, keepdim=True)) * K  # each prototype: 1/K of the mass
        Q /= Q.sum(dim=0, keepdim=True) * B                                  # each sample: 1/B
    return (Q * B).t()


def dino_loss(s_logits, t_probs, tau_s, ignore_diagonal=False):
    """(S, B, K) student logits, (T, B, K) teacher targets -> -sum_k t log softmax(s / tau_s)
    averaged over the (s, t, b) triples, without the s == t pairs if ignore_diagonal (global vs
    the OTHER global)."""
    S, B, _ = s_logits.shape
    T = t_probs.shape[0]
    # (S, T)
    ce = -torch.einsum("sbk,tbk->st", F.log_softmax(s_logits.float() / tau_s, dim=-1), t_probs)
    if not ignore_diagonal:
        return ce.sum() / (B * S * T)
    return (ce.sum() - ce.diagonal().sum()) / (B * (S * T - min(S, T)))


def ibot_loss(s_logits, t_probs, weight, n_crops, tau_s):
    """Masked patches (M, K): sum_m w_m CE_m / n_crops, w = 1/#masked of its crop: each crop's mean,
    averaged over ALL 2B global crops, unmasked ones included (loss/ibot_patch_loss.py:96-117); 0
    when M = 0."""
    ce = -(t_probs * F.log_softmax(s_logits.float() / tau_s, dim=-1)).sum(-1)   # (M,)
    return (ce * weight).sum() / n_crops


def koleo_loss(x, eps=1e-8):
    """-mean log ||x_i - x_nn(i) + eps|| over L2-normalised rows (loss/koleo_loss.py:14-43,
    PairwiseDistance adds eps); the nearest neighbour by cosine similarity with the diagonal at
    -1."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    sim = kernels.cosine_similarity(x.detach()[None], x.detach()[None])[0]     # (n, n)
    self_pair = torch.eye(len(x), dtype=torch.bool, device=x.device)
    nn_idx = sim.masked_fill(self_pair, -1).argmax(1)          # (n,); out of place: compilable
    return -torch.log((x - x[nn_idx] + eps).norm(dim=-1) + eps).mean()


def cosine(step, total, base, final, warmup=0, start=0.0):
    """dinov3 CosineScheduler: linspace(start, base, warmup) then a half cosine to final; final
    after total."""
    warmup = min(warmup, total)
    if step < warmup:
        return start + (base - start) * step / max(warmup - 1, 1)
    if step >= total:
        return final
    t = (step - warmup) / (total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


def schedules(step, cfg, E, total):
    """lr, last-layer lr, wd, teacher momentum and temperature at `step` (0-based); E = iterations
    per epoch."""
    peak = cfg.lr
    if cfg.lr_scaling == "sqrt_wrt_1024":
        peak *= 4 * math.sqrt(cfg.batch_size / 1024)
    lr = cosine(step, total, peak, cfg.min_lr, warmup=round(cfg.warmup_epochs * E))
    tw = min(round(cfg.tau_t_warmup * E), total)  # teacher temperature warmup
    frozen = step < min(round(cfg.freeze_last_layer * E), total)
    return dict(lr=lr, last_lr=0.0 if frozen else lr,
                wd=cosine(step, total, cfg.weight_decay, cfg.weight_decay_end),
                momentum=cosine(step, total, *cfg.momentum),
                tau_t=cosine(step, tw, cfg.tau_t[1], cfg.tau_t[1], warmup=tw, start=cfg.tau_t[0]))


def forward_loss(model, teacher, x_g, x_l, mask, mask_idx, weight, tau_t, cfg):
    """Teacher targets, student outputs and the losses, what --compile compiles -> (5,) [loss,
    dino_local, dino_global, koleo, ibot]; tau_t is a 0-d tensor, so that its warmup does not
    recompile."""
    B = x_g.shape[0] // 2
    _, t_cls, t_patch = teacher(x_g, mask_idx)  # no graph: no weight needs grad
    g_cls, s_cls, s_patch = model(x_g, mask_idx, mask, x_l)
    t_cls = sinkhorn_knopp(t_cls, tau_t).unflatten(0, (2, B))                # (2, B, K)
    t_patch = sinkhorn_knopp(t_patch, tau_t)  # (M, K), M the same on every rank
    s_glob = s_cls[:2 * B].unflatten(0, (2, B))                              # (2, B, K)
    s_loc = s_cls[2 * B:].unflatten(0, (-1, B))                              # (n, B, K)
    l_local = dino_loss(s_loc, t_cls, cfg.tau_s)
    l_global = dino_loss(s_glob, t_cls, cfg.tau_s, ignore_diagonal=True)
    l_koleo = sum(koleo_loss(c) for c in g_cls.unflatten(0, (2, B))) / 2  # per crop, per-GPU batch
    l_ibot = ibot_loss(s_patch, t_patch, weight, 2 * B, cfg.tau_s)
    n_loc = 2 * cfg.n_local  # (s, t) pairs: local x global vs 2 global s != t (ssl_meta_arch:596)
    l_dino = (n_loc * l_local + 2 * l_global) / (n_loc + 2)
    loss = l_dino + cfg.koleo_w * 2 * l_koleo + cfg.ibot_w * l_ibot
    return torch.stack([loss, l_local, l_global, l_koleo, l_ibot])


def train_step(model, raw, teacher, opt, views, masks, sched, cfg, ctx, loss_fn=forward_loss):
    """One step; -> detached [loss, dino_local, dino_global, koleo, ibot] on the device (no host
    sync)."""
    x_g, x_l = views
    mask, mask_idx, weight = masks
    for g in opt.param_groups:
        g["lr"] = (sched["last_lr"] if g["last_layer"] else sched["lr"]) * g["lr_mult"]
        g["weight_decay"] = sched["wd"] * g["wd_mult"]
    tau_t = torch.tensor(sched["tau_t"], device=x_g.device)
    with ctx:
        terms = loss_fn(model, teacher, x_g, x_l, mask, mask_idx, weight, tau_t, cfg)
    opt.zero_grad(set_to_none=True)
    terms[0].backward()
    for m in (raw.backbone, raw.dino_head, raw.ibot_head):  # clipped apart (train.py:488-498)
        nn.utils.clip_grad_norm_(m.parameters(), cfg.clip)
    opt.step()
    with torch.no_grad():  # teacher = m teacher + (1 - m) student
        weight = 1 - sched["momentum"]
        torch._foreach_lerp_(list(teacher.parameters()), list(raw.parameters()), weight)
    return terms.detach()

# -----------------------------------------------------------------------------
# training


def train_loop(cfg, run):
    """DINO training on this rank (train() below sets up the processes) -> dict(step, losses,
    student, teacher)."""
    frames = open_data(cfg, run)
    if run.per_rank < 2:
        raise SystemExit(f"--batch-size {cfg.batch_size}: KoLeo needs >= 2 images per rank "
                         f"({run.world} ranks)")
    G, Lc = crop_sizes(cfg)
    E = cfg.epoch_length or run.steps_per_epoch
    total = cfg.epochs * E
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    cuda = run.device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = cuda  # as the official (train.py)
    torch.backends.cudnn.allow_tf32 = cuda
    raw, teacher, opt = build(cfg, run.device)
    model = raw
    if run.ddp:
        model = nn.parallel.DistributedDataParallel(raw, [run.device] if cuda else None)
    # crops and colours
    gens = {"aug": torch.Generator(run.device).manual_seed(cfg.seed + run.rank)}
    torch.manual_seed(cfg.seed + run.rank)  # drop path, RoPE rescaling
    np.random.seed(cfg.seed + run.rank)
    random.seed(cfg.seed + run.rank)
    step = 0
    if cfg.resume:
        tensors, meta = resume(cfg, run, opt, gens)
        load_tensors(raw, tensors, "student.", cfg.resume)
        load_tensors(teacher.backbone, tensors, "encoder.", cfg.resume)
        load_tensors(teacher.dino_head, tensors, "teacher.dino_head.", cfg.resume)
        load_tensors(teacher.ibot_head, tensors, "teacher.ibot_head.", cfg.resume)
        step = meta["step"]
    else:
        frame_stats(frames, cfg, run)
        write_init(cfg, run, teacher.backbone)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    mean = torch.tensor(run.mean, device=run.device)
    std = torch.tensor(run.std, device=run.device)
    loss_fn = compiled(forward_loss, cfg, run.device)
    if run.master:
        n = sum(p.numel() for p in raw.backbone.parameters()) / 1e6
        print(f"dino: {n:.1f}M-parameter ViT, {len(frames)} frames, {run.world} x {run.per_rank} "
              f"images, crops 2x{G} + {cfg.n_local}x{Lc}, steps {step}..{end} of {total} "
              f"({E}/epoch)")
    probe = diagnostic_frames(frames, cfg, run)                              # None off the master
    log = Log(cfg, run, step, end)
    if step == 0 and probe is not None:
        lr0 = schedules(0, cfg, E, total)["lr"]
        diag = collapse_diagnostic(teacher.backbone, probe, POOL)
        log.line({"step": 0, "epoch": 0, "lr": lr0, **diag})
    for batch in log.batches(batches(frames, cfg, run, step) if step < end else []):
        sched = schedules(step, cfg, E, total)
        imgs = batch["imgs"].to(run.device, non_blocking=True)              # (B, C, L, L) uint8
        views = make_views(imgs, cfg, gens["aug"], mean, std)
        masks = [batch[k].to(run.device, non_blocking=True) for k in ("mask", "mask_idx", "weight")]
        terms = train_step(model, raw, teacher, opt, views, masks, sched, cfg, ctx, loss_fn)
        step += 1
        log.add(step, batch["epoch"], loss=terms[0], lr=sched["lr"], wd=sched["wd"],
                dino_local=terms[1], dino_global=terms[2], koleo=terms[3], ibot=terms[4],
                momentum=sched["momentum"], tau_t=sched["tau_t"])
        if probe is not None and is_due(step, cfg.diag_every, end):
            log.diag(step, collapse_diagnostic(teacher.backbone, probe, POOL))
        saving = is_due(step, cfg.save_every, end)
        if saving or is_due(step, cfg.log_every, end):
            log.flush()  # before any save: no NaN on disk
        if saving:
            tensors = {f"student.{k}": v for k, v in raw.state_dict().items()}
            for k, v in teacher.state_dict().items():
                if not k.startswith("backbone."):  # the backbone is the encoder
                    tensors[f"teacher.{k}"] = v
            save_run(cfg, run, step, teacher.backbone, tensors, {}, gens, opt)
        if step == end:
            break
    log.close()
    if run.master:
        print(f"done: step {step}, teacher encoder in {run.ckpt}")
    return {"step": step, "losses": log.losses, "student": raw, "teacher": teacher}

# -----------------------------------------------------------------------------
# benchmark (bench.py train --method dino)


def benchmark(cfg, steps=20, warmup=5, augment=True):
    """Time the training step on a synthetic uint8 batch on the device, making the views every step
    (augment) or once (to show what the augmentation costs); --compile honoured. flops_per_img:
    matmuls, backward = 2 x forward, teacher forward."""
    check(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    B = cfg.batch_size
    G, Lc = crop_sizes(cfg)
    L = load_size(cfg)
    raw, teacher, opt = build(cfg, device)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    frames = torch.randint(0, 256, (B, cfg.in_chans, L, L), dtype=torch.uint8, device=device,
                           generator=gen)
    extras = batch_extras(cfg, B, 0, 0)
    masks = [extras[k].to(device) for k in ("mask", "mask_idx", "weight")]
    mean = torch.full((cfg.in_chans,), 0.5, device=device)
    std = torch.full((cfg.in_chans,), 0.25, device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sched = dict(lr=1e-4, last_lr=1e-4, wd=0.04, momentum=0.992, tau_t=0.04)
    loss_fn = compiled(forward_loss, cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    views = make_views(frames, cfg, gen, mean, std)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        if augment:
            views = make_views(frames, cfg, gen, mean, std)
        train_step(raw, raw, teacher, opt, views, masks, sched, cfg, ctx, loss_fn)
    sync()
    dt = time.perf_counter() - t0
    bb = raw.backbone.cfg
    P = cfg.patch_size
    h = cfg.head_hidden
    b = cfg.head_bottleneck
    D = bb.embed_dim
    M = masks[1].numel() / B  # masked patches per image

    def vit_f(side):  # one crop's forward matmuls
        n = bb.num_prefix + (side // P) ** 2
        return bb.depth * (24 * n * D * D + 4 * n ** 2 * D)

    def head_f(rows):
        return 2 * rows * (D * h + h * h + h * b + b * cfg.n_prototypes)
    student = 2 * vit_f(G) + cfg.n_local * vit_f(Lc) + head_f(2 + cfg.n_local) + head_f(M)
    teacher_f = 2 * vit_f(G) + head_f(2) + head_f(M)
    return dict(img_per_s=B * steps / dt, flops_per_img=3 * student + teacher_f)

# ==================================================================================================
# The plumbing mae.py, dino.py and ijepa.py share, copied verbatim from mae.py: edit it there, then
# `make fix-copies` (tests/test_copies.py fails on any difference between a copy and its origin).
# The blocks use names this file defines above: Config, METHOD, POOL, ARCH_FLAGS,
# method_errors(cfg), batch_extras(cfg, n, step, rank), train_loop(cfg, run).

# Copied from mae.py: cli


def config_help():
    """The Config's comments, read from its source -> ({field: help}, [(section, [fields])]). A
    field's help is the text after its '#', continued on the comment-only lines below whose '#'
    is in the same column; any other comment-only line starts a section (an argparse group)."""
    helps = {}
    sections = [("options", [])]
    field = None
    column = -1
    for line in inspect.getsource(Config).splitlines()[1:]:
        code, hash_sign, comment = line.partition("#")
        comment = comment.strip()
        m = re.match(r"\s+(\w+)\s*:[^=]*=", code)
        if m:
            field = m.group(1)
            column = len(code) if hash_sign else -1
            helps[field] = comment
            sections[-1][1].append(field)
        elif hash_sign and not code.strip():
            if field is not None and len(code) == column:
                helps[field] += " " + comment
            else:
                sections.append((comment, []))
                field = None
    return helps, [s for s in sections if s[1]]


def parse_args(argv=None):
    """Config -> argparse: one --flag per field (bools --flag/--no-flag, tuples as several numbers);
    --help gives every flag's meaning (its Config comment) and default, grouped by the Config's
    sections."""
    helps, sections = config_help()
    parser = argparse.ArgumentParser(prog=f"{METHOD}.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    field_of = {f.name: f for f in fields(Config)}
    metavars = {int: "N", float: "X"}
    for title, names in sections:
        group = parser.add_argument_group(title)
        for name in names:
            f = field_of[name]
            flag = "--" + name.replace("_", "-")
            d = f.default
            shown = "unset" if d is None else repr(d)
            if isinstance(d, tuple):
                shown = " ".join(map(str, d))
            # the Config's default, shown here; argparse adds none (set_defaults below sets them)
            text = f"{helps[name]} (default: {shown})".replace("%", "%%")
            if f.type in (bool, Optional[bool]):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
            elif isinstance(d, tuple):
                kind = type(d[0])
                shape = (metavars[kind],) * len(d)
                group.add_argument(flag, type=kind, nargs=len(d), metavar=shape, help=text)
            else:
                metavar = metavars.get(type(d), name.upper())
                group.add_argument(flag, type=type(d), metavar=metavar, help=text)
    parser.set_defaults(**{f.name: f.default for f in fields(Config)})
    args = vars(parser.parse_args(argv))
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def check(cfg):
    """Refuse bad settings before anything is read or written, naming every bad flag at once."""
    errors = []
    if cfg.in_chans not in (1, 3):
        errors.append(f"--in-chans is 1 (grayscale) or 3 (RGB), not {cfg.in_chans}")
    if cfg.size not in vit.SIZES:
        errors.append(f"--size is one of {', '.join(vit.SIZES)}, not {cfg.size!r}")
    if cfg.patch_size < 1 or cfg.img_size < cfg.patch_size or cfg.img_size % cfg.patch_size:
        errors.append(f"--img-size {cfg.img_size} must be a multiple of --patch-size "
                      f"{cfg.patch_size}")
    if cfg.load_size and cfg.load_size < cfg.img_size:
        errors.append(f"--load-size {cfg.load_size} must be 0 or at least --img-size "
                      f"{cfg.img_size}")
    for name in ("batch_size", "epochs", "log_every"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1")
    counts = ("depth", "num_workers", "max_steps", "save_every", "diag_every", "seed",
              "synthetic_frames")
    for name in counts:
        if getattr(cfg, name) < 0:
            errors.append(f"--{name.replace('_', '-')} must be >= 0")
    errors += method_errors(cfg)
    if errors:
        raise SystemExit(f"{METHOD}.py: " + "; ".join(errors))

# End of shared block: cli

# Copied from mae.py: listing


FRAME_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")


def list_frames(data):
    """Every frame file under `data` (recursive, symbolic links followed, sorted) and how many
    frames each holds: a page of a tif, a row of a .npy stack (uint8 (N, H, W) or (N, H, W, C)),
    any other image one frame."""
    if not os.path.isdir(data):
        raise SystemExit(f"{data}: no such folder; pass --data the folder that holds your frames")
    paths = []
    for root, _, names in os.walk(data, followlinks=True):
        paths += [os.path.join(root, n) for n in names if n.lower().endswith(FRAME_EXTS)]
    paths.sort()
    if not paths:
        kinds = "/".join(e[1:] for e in FRAME_EXTS)
        raise SystemExit(f"{data}: no {kinds} files under it; point --data at the folder of your "
                         f"frames")
    return paths, [frames_in(p) for p in paths]


def frames_in(path):
    """How many frames one file holds; 1 for an image that cannot be opened (reported when it is
    decoded)."""
    if path.lower().endswith(".npy"):
        try:
            a = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: not a readable .npy file ({e}); remove it or rewrite it "
                             f"with np.save") from None
        channels_ok = a.ndim == 3 or (a.ndim == 4 and a.shape[3] in (1, 3, 4))
        if a.dtype != np.uint8 or not channels_ok:
            raise SystemExit(f"{path}: a frame stack must be uint8 (N, H, W) or (N, H, W, C) with "
                             f"C 1, 3 or 4, not {a.dtype} {a.shape}; convert it, e.g. "
                             f"np.save(path, a.astype(np.uint8))")
        return len(a)
    if path.lower().endswith((".tif", ".tiff")):
        with suppress(Exception), Image.open(path) as im:
            return getattr(im, "n_frames", 1)
    return 1


def fingerprint(data, paths, counts):
    """sha256 of a listing: each file's path relative to `data`, its size in bytes and its frame
    count, so it changes when a frame file is added, removed, renamed or rewritten with another
    size."""
    h = hashlib.sha256()
    for path, n in zip(paths, counts):
        h.update(f"{os.path.relpath(path, data)}\t{os.path.getsize(path)}\t{n}\n".encode())
    return h.hexdigest()

# End of shared block: listing

# Copied from mae.py: frames


def load_size(cfg):
    """The square side the workers decode frames to: --load-size, or img_size * 8 // 7 (256 for
    224)."""
    return cfg.load_size or cfg.img_size * 8 // 7


class Frames(torch.utils.data.Dataset):
    """The frames of a listing (or of in-memory uint8 stacks): frames[i] -> (uint8 (C, L, L), ok,
    i), with ok False and a black frame when frame i cannot be decoded.

    Decoding, the same in every method: 16-bit frames by / 257 (the full range, no per-frame
    stretch), float frames taken as [0, 1]; RGB to gray by PIL's "L" for --in-chans 1, gray repeated
    for 3; padded to a square with black, centred (an ultrasound fan keeps its aspect ratio, as
    prep/ultrasound.py pads), then resized to L x L by PIL's bicubic filter (antialiased when
    shrinking)."""

    def __init__(self, paths, counts, in_chans, size, arrays=None):
        # one fixed-width array: no per-path objects for forked workers
        self.paths = np.array(paths)
        # (files + 1,) first frames
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.in_chans = in_chans
        self.L = size
        self.arrays = dict(arrays or {})  # .npy stacks, memory-mapped on first use in each worker

    def __len__(self):
        return int(self.starts[-1])

    def locate(self, i):
        """Frame i -> (its file, the index of the frame within the file)."""
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return str(self.paths[f]), i - int(self.starts[f])

    def name(self, i):
        """How messages name frame i: the file, and the frame's index when the file holds several.
        """
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        if self.starts[f + 1] - self.starts[f] == 1:
            return str(self.paths[f])
        return f"{self.paths[f]} [frame {i - int(self.starts[f])}]"

    def decode(self, i):
        path, k = self.locate(i)
        if path in self.arrays or path.lower().endswith(".npy"):
            if path not in self.arrays:
                self.arrays[path] = np.load(path, mmap_mode="r")
            # (H, W[, C])
            im = Image.fromarray(np.ascontiguousarray(self.arrays[path][k]).squeeze())
        else:
            with Image.open(path) as f:
                f.seek(k)                                        # a page of a multi-page tif
                im = f.copy()
        if im.mode.startswith("I") or im.mode == "F":            # 16-bit: / 257; float: [0, 1]
            scale = 255 if im.mode == "F" else 1 / 257
            a = np.asarray(im, dtype=np.float32) * scale
            im = Image.fromarray((a.clip(0, 255) + 0.5).astype(np.uint8))
        im = im.convert("L" if self.in_chans == 1 else "RGB")
        square = Image.new(im.mode, (max(im.size), max(im.size)))
        square.paste(im, ((square.width - im.width) // 2, (square.height - im.height) // 2))
        # (L, L, C)
        a = np.asarray(square.resize((self.L, self.L), Image.BICUBIC)).reshape(self.L, self.L, -1)
        return torch.from_numpy(a.transpose(2, 0, 1).copy())  # (C, L, L)

    def __getitem__(self, i):
        try:
            return self.decode(i), True, i
        except Exception:  # any decode error: flagged; the batch replaces and reports it
            return torch.zeros(self.in_chans, self.L, self.L, dtype=torch.uint8), False, i


class Batches(torch.utils.data.Dataset):
    """This rank's batches of one epoch, decoded in the loader workers: batches[b] -> dict(imgs
    uint8 (B, C, L, L), bad (names of unreadable frames), epoch, batch, step, and what the
    method's batch_extras adds).

    Each epoch is a permutation seeded by (seed, epoch); rank r takes perm[r::world] and cuts it
    into whole batches, the same number on every rank (drop_last). An unreadable frame is replaced
    by a readable one of its batch, so that shapes never change (the same counts on every rank, no
    recompiles); a batch without any readable frame comes back black, and the training loop stops
    the run."""

    def __init__(self, frames, cfg, rank, world, epoch, per_rank):
        self.frames = frames
        self.cfg = cfg
        self.rank = rank
        self.epoch = epoch
        self.per_rank = per_rank
        self.shard = np.random.default_rng([cfg.seed, epoch]).permutation(len(frames))[rank::world]
        self.n_batches = (len(frames) // world) // per_rank

    def __len__(self):
        return self.n_batches

    def __getitem__(self, b):
        ids = self.shard[b * self.per_rank:(b + 1) * self.per_rank]
        items = [self.frames[int(i)] for i in ids]
        good = [x for x, ok, _ in items if ok]
        bad = [self.frames.name(i) for _, ok, i in items if not ok]
        imgs = []
        for x, ok, _ in items:
            if not ok and good:
                x = good[len(imgs) % len(good)]
            imgs.append(x)
        step = self.epoch * self.n_batches + b                  # the 0-based step this batch is for
        extras = batch_extras(self.cfg, len(ids), step, self.rank)
        return dict(imgs=torch.stack(imgs), bad=bad, epoch=self.epoch, batch=b, step=step, **extras)


def batches(frames, cfg, run, step):
    """This rank's batches from data position `step` on, endlessly: one DataLoader per epoch."""
    while True:
        epoch, first = divmod(step, run.steps_per_epoch)
        ds = Batches(frames, cfg, run.rank, run.world, epoch, run.per_rank)
        # a generator of its own: the global RNG stays as it was (exact resume)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=range(first, len(ds)), num_workers=cfg.num_workers,
            pin_memory=run.device.type == "cuda", generator=torch.Generator())
        yield from loader
        step = (epoch + 1) * run.steps_per_epoch


def decoded(frames, ids, cfg, desc):
    """Frames `ids`, decoded by the loader workers -> uint8 (n, C, L, L) of the readable ones."""
    loader = torch.utils.data.DataLoader(frames, batch_size=64, sampler=[int(i) for i in ids],
                                         num_workers=cfg.num_workers, generator=torch.Generator())
    xs = [x[ok] for x, ok, _ in tqdm(loader, desc=desc, leave=False)]
    return torch.cat(xs)


def open_data(cfg, run):
    """The frames of --data (listed once, on the master), or prep/synthetic.py's ultrasound frames
    without --data; sets run.data (the frame count and the listing's fingerprint) and
    run.steps_per_epoch."""
    L = load_size(cfg)
    if cfg.data:
        paths, counts = agree(run, lambda: list_frames(cfg.data))
        frames = Frames(paths, counts, cfg.in_chans, L)
        fp = agree(run, lambda: fingerprint(cfg.data, paths, counts))
    else:
        try:
            from prep.synthetic import ultrasound_frames
        except ImportError as e:
            raise SystemExit(f"no --data given and prep/synthetic.py cannot be imported ({e}); "
                             f"pass --data DIR with your frames, or run {METHOD}.py from the "
                             f"pretext repository") from None
        stack = ultrasound_frames(cfg.synthetic_frames, size=L, seed=cfg.seed)  # (n, L, L) uint8
        frames = Frames(["<synthetic>"], [len(stack)], cfg.in_chans, L,
                        arrays={"<synthetic>": stack})
        fp = hashlib.sha256(f"synthetic {len(stack)} {L} {cfg.seed}".encode()).hexdigest()
    run.data = {"frames": len(frames), "fingerprint": fp}
    run.steps_per_epoch = (len(frames) // run.world) // run.per_rank
    if run.steps_per_epoch == 0:
        raise SystemExit(f"{cfg.data or 'synthetic data'}: {len(frames)} frames do not fill one "
                         f"batch of {cfg.batch_size} ({run.world} processes); lower --batch-size "
                         f"or add frames")
    return frames

# End of shared block: frames

# Copied from mae.py: stats


def frame_stats(frames, cfg, run):
    """Per-channel mean and std in [0, 1] units into run.mean / run.std, decided on the master and
    broadcast.

    Where from, in this order: DIR/stats.json (prep/ultrasound.py writes it), if it describes these
    frames (its "frames" and "fingerprint" match the listing; a stats.json without a fingerprint,
    written by hand, is taken as given); else OUT/stats.json of an earlier computation on the same
    frames; else computed from up to 2000 frames spread evenly over the data and written to
    OUT/stats.json (never into the data folder). A changed folder is recomputed, with a message. One
    value serves every channel (gray frames); a stats.json for another channel count is refused."""
    mean, std, source = agree(run, lambda: resolve_stats(frames, cfg, run.data))
    if run.master:
        shown = f"mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}"
        print(f"normalisation: {shown} from {source}")
    run.mean = mean
    run.std = std


def read_stats(path, in_chans):
    """A stats.json -> its dict, mean and std as in_chans floats each; a clean exit when it is
    malformed."""
    try:
        with open(path) as f:
            s = json.load(f)
        mean = [float(v) for v in s["mean"]]
        std = [float(v) for v in s["std"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a stats file ({e!r}); it needs {{\"mean\": [...], \"std\": "
                         f"[...]}} in [0, 1] units: fix it, or delete it to recompute") from None
    sized = len(mean) == len(std) and len(mean) in (1, in_chans)
    if not sized or not all(map(math.isfinite, mean + std)) or min(std) <= 0:
        raise SystemExit(f"{path}: {len(mean)} mean and {len(std)} std values; --in-chans "
                         f"{in_chans} needs {in_chans} each (or 1 for gray frames), finite, std > "
                         f"0: fix it, delete it to recompute, or pass the --in-chans it was "
                         f"written for")
    s["mean"] = mean * (in_chans // len(mean))
    s["std"] = std * (in_chans // len(std))
    return s


def resolve_stats(frames, cfg, data):
    """frame_stats' decision on the master -> (mean, std, where they came from)."""
    here = os.path.join(cfg.data, "stats.json") if cfg.data else ""
    cache = os.path.join(cfg.out, "stats.json")
    for path in (here, cache):
        if not path or not os.path.isfile(path):
            continue
        s = read_stats(path, cfg.in_chans)
        if "fingerprint" not in s:
            return s["mean"], s["std"], f"{path} (without a fingerprint of its frames: taken as " \
                                        f"given)"
        same = s.get("frames") == data["frames"] and s["fingerprint"] == data["fingerprint"]
        if same and s.get("in_chans", cfg.in_chans) == cfg.in_chans:
            return s["mean"], s["std"], path
        print(f"{path}: computed from {s.get('frames')} frames (listing "
              f"{str(s['fingerprint'])[:12]}, {s.get('in_chans', 'any')} channels); the data now "
              f"has {data['frames']} (listing {data['fingerprint'][:12]}, {cfg.in_chans} "
              f"channels): recomputing")
    ids = np.linspace(0, len(frames) - 1, min(len(frames), 2000)).round().astype(np.int64)
    ids = np.unique(ids)                                                 # evenly spread, each once
    x = decoded(frames, ids, cfg, "mean/std")  # (n, C, L, L) uint8
    if len(x) == 0:
        raise SystemExit(f"{cfg.data}: none of {len(ids)} sampled frames could be decoded; check "
                         f"the files")
    x = x.flatten(2).double() / 255                                                  # (n, C, L*L)
    mean = x.mean((0, 2))
    std = (x.square().mean((0, 2)) - mean.square()).clamp_min(1e-12).sqrt()
    record = {"mean": mean.tolist(), "std": std.tolist(), "in_chans": cfg.in_chans,
              "sampled": len(x), **data}
    os.makedirs(cfg.out, exist_ok=True)
    with open(cache + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(cache + ".tmp", cache)
    return record["mean"], record["std"], f"{len(x)} frames (written to {cache})"

# End of shared block: stats

# Copied from mae.py: processes


class Run:
    """One training process: where it stands in the process group, its device and run folder, and
    what the training loop settles on its way (data, normalisation, the newest checkpoint)."""

    def __init__(self, cfg):
        self.ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun (nanoGPT's test)
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.master = self.rank == 0
        cuda = torch.cuda.is_available() and not cfg.device.startswith("cpu")
        if self.ddp and cuda:                                    # one process per GPU
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            self.device = torch.device(cfg.device or ("cuda" if cuda else "cpu"))
        self.per_rank = cfg.batch_size // self.world
        self.ckpt = os.path.join(cfg.out, "ckpt.safetensors")
        self.init = os.path.join(cfg.out, "init.safetensors")
        self.log = os.path.join(cfg.out, "log.jsonl")
        self.steps_per_epoch = 0
        self.data = None  # {"frames": n, "fingerprint": sha256}
        self.mean = None
        self.std = None
        self.saved = None  # step of the checkpoint in OUT, if any


def train(cfg):
    """Train under plain `python` or torchrun -> what train_loop returns. Every exit path tears the
    process group down, errors included, so that no rank is left in a collective or aborts at
    exit."""
    check(cfg)
    run = Run(cfg)
    if cfg.batch_size % run.world:
        raise SystemExit(f"--batch-size {cfg.batch_size} is not divisible by the {run.world} "
                         f"processes")
    if run.ddp:
        if run.device.type == "cuda":
            torch.cuda.set_device(run.device)
        dist.init_process_group("nccl" if run.device.type == "cuda" else "gloo")
    finished = False
    try:
        prepare_out(cfg, run)
        result = train_loop(cfg, run)
        finished = True
        return result
    finally:
        if run.ddp:
            close_group(finished)


def close_group(finished):
    """Destroy the process group. After a clean finish every rank first waits for the others (gloo
    can deadlock tearing down while a peer still frees a tensor it sent); after an error the wait
    is bounded, so that a rank whose peer is gone or stuck does not hang."""
    with suppress(Exception):  # a peer that crashed: nothing to wait for
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=300 if finished else 10))
        elif finished:
            dist.barrier()
    dist.destroy_process_group()


def agree(run, decide):
    """decide() on the master; its result, or the SystemExit it raised, broadcast: every rank goes
    on, or stops with the same message, on one decision (files looked at once, no rank racing
    another's writes)."""
    box = [None, None]
    if run.master:
        try:
            box[0] = decide()
        except SystemExit as e:
            box[1] = str(e)
    if run.ddp:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise SystemExit(box[1])
    return box[0]


def prepare_out(cfg, run):
    """Never overwrite: a fresh run refuses an --out that holds a run, --resume continues into the
    checkpoint's own folder or an empty one; removes the .tmp files a kill mid-write left;
    creates OUT."""
    def decide():
        if cfg.resume and not os.path.isfile(cfg.resume):
            raise SystemExit(f"{cfg.resume}: no such checkpoint; --resume takes the "
                             f"OUT/ckpt.safetensors of an earlier {METHOD}.py run")
        held = [n for n in ("ckpt.safetensors", "init.safetensors", "log.jsonl")
                if os.path.exists(os.path.join(cfg.out, n))]
        own = os.path.isfile(run.ckpt) and cfg.resume and os.path.samefile(cfg.resume, run.ckpt)
        if held and not cfg.resume and not os.path.isfile(run.ckpt):
            raise SystemExit(f"{cfg.out} holds the start of a run that saved no checkpoint "
                             f"({', '.join(held)}): nothing to resume; delete those files or "
                             f"choose another --out")
        if held and not cfg.resume:
            raise SystemExit(f"{cfg.out} holds a run ({', '.join(held)}): pass --resume {run.ckpt} "
                             f"to continue it, or choose another --out")
        if held and not own:
            raise SystemExit(f"{cfg.out} holds another run ({', '.join(held)}): --resume "
                             f"{cfg.resume} continues into its own folder or an empty one; choose "
                             f"another --out")
        os.makedirs(cfg.out, exist_ok=True)
        for name in ("ckpt.safetensors.tmp", "init.safetensors.tmp", "stats.json.tmp",
                     "log.jsonl.tmp"):
            path = os.path.join(cfg.out, name)
            if os.path.exists(path):
                os.remove(path)
                print(f"{path}: removed (left by a run killed while writing it)")
    agree(run, decide)


def compiled(fn, cfg, device):
    """torch.compile(fn) with --compile; unset, on for CUDA and off for CPU (compiling costs more
    there)."""
    on = cfg.compile if cfg.compile is not None else device.type == "cuda"
    return torch.compile(fn) if on else fn


def is_due(step, every, end):
    """Whether something done every `every` steps (0 = never) and at the last step is due after
    `step`."""
    return step == end or (every > 0 and step % every == 0)

# End of shared block: processes

# Copied from mae.py: log


def jsonable(v):
    """v with every non-finite float as None: log lines are strict JSON (a bare NaN is not JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def trim_log(path, step):
    """Keep the whole lines of log.jsonl up to `step`, each step once: a resumed run rewrites the
    later ones, and a line cut off by a kill is dropped. -> how many lines were dropped."""
    if not os.path.exists(path):
        return 0
    keep = []
    seen = set()
    dropped = 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line) if line.endswith("\n") else None
            except ValueError:
                rec = None
            s = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(s, int) and s <= step and s not in seen:
                keep.append(line)
                seen.add(s)
            else:
                dropped += 1
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    return dropped


class Log:
    """OUT/log.jsonl and the progress bar (master), and what every rank reads at a host sync: the
    NaN guard, the unreadable-frame rules, img/s and the fraction of time spent waiting for data.

    add() keeps a step's values as they are (losses as device tensors); flush() reads them all with
    one all-reduce and one host sync, writes one line per step, and stops the run on a non-finite
    loss. The loop flushes every --log-every steps and before every checkpoint, so that no
    checkpoint holds weights that saw a non-finite loss."""

    def __init__(self, cfg, run, start, end):
        self.cfg = cfg
        self.run = run
        self.pending = []  # (step, epoch, {name: tensor or number}) not yet written
        self.diags = {}  # step -> collapse diagnostic, merged into that step's line
        self.losses = []                         # every loss read, in step order
        self.seen = 0  # this rank's epoch-0 frames, unreadable ones, empty batches
        self.unreadable = 0
        self.empty = 0
        self.bad_names = []                      # the first unreadable frames of this rank
        self.wait = 0.0  # seconds spent waiting for the loader since the last flush
        self.t_last = time.perf_counter()
        self.flushes = 0
        self.warned = False
        self.kernels = None  # (step, kernels.report()) of this launch's first step
        self.file = None
        if run.master:
            dropped = trim_log(run.log, start)
            if dropped:
                print(f"{run.log}: dropped {dropped} lines logged after step {start} or cut off")
            self.file = open(run.log, "a")
        self.bar = tqdm(total=end, initial=start, disable=not run.master, desc=METHOD,
                        dynamic_ncols=True)

    def line(self, rec):
        """Write one line now (master)."""
        if self.file is not None:
            self.file.write(json.dumps(jsonable(rec), allow_nan=False) + "\n")
            self.file.flush()

    def batches(self, loader):
        """The loader's batches, timing the wait for each, counting and naming the unreadable
        frames."""
        it = iter(loader)
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            self.wait += time.perf_counter() - t
            if batch is None:
                return
            bad = batch["bad"]
            if batch["epoch"] == 0:
                self.seen += len(batch["imgs"])
                self.unreadable += len(bad)
                self.bad_names += bad[:max(0, 5 - len(self.bad_names))]
            if bad and len(bad) == len(batch["imgs"]):
                self.empty += 1
                self.bad_names = (bad[:5] + self.bad_names)[:5]
            if bad:
                tqdm.write(f"skipping unreadable {', '.join(bad)}")
            yield batch

    def add(self, step, epoch, **values):
        """Step `step` (updates done): tensors (averaged over the ranks at flush) and numbers, in
        log order."""
        self.pending.append((step, epoch, values))
        if self.kernels is None:                 # which path each kernel op took, once per launch
            self.kernels = (step, kernels.report())
            if self.run.master:
                tqdm.write(f"kernels: {kernels.report_line()}")

    def diag(self, step, fields):
        self.diags[step] = fields

    def flush(self):
        if not self.pending:
            return
        run = self.run
        tensors = [v.double().reshape(()) for _, _, values in self.pending for v in values.values()
                   if torch.is_tensor(v)]
        counts = torch.tensor([self.seen, self.unreadable, self.empty], dtype=torch.float64)
        v = torch.cat([torch.stack(tensors), counts.to(tensors[0].device)])   # (values + 3,)
        wait = torch.tensor([self.wait], dtype=torch.float64, device=v.device)
        if run.ddp:
            dist.all_reduce(v)  # a NaN on any rank stops them all, counts summed over ranks
            dist.all_reduce(wait, op=dist.ReduceOp.MAX)  # the slowest rank's loader holds them all
        host = v.tolist()
        seen, unreadable, empty = host[-3:]
        now = time.perf_counter()
        elapsed = max(now - self.t_last, 1e-9)
        img_per_s = len(self.pending) * self.cfg.batch_size / elapsed
        data_wait = min(wait.item() / elapsed, 1.0)
        it = iter(host)
        stop = None
        for step, epoch, values in self.pending:
            rec = {"step": step, "epoch": epoch}
            for k, x in values.items():
                rec[k] = next(it) / run.world if torch.is_tensor(x) else x
            rec["img_per_s"] = round(img_per_s, 1)
            rec["data_wait"] = round(data_wait, 4)
            rec.update(self.diags.pop(step, {}))
            if step == self.kernels[0]:
                rec["kernels"] = self.kernels[1]
            self.line(rec)
            self.losses.append(rec["loss"])
            if stop is None and not math.isfinite(rec["loss"]):
                stop = (step, rec["loss"])
        self.bar.update(self.pending[-1][0] - self.bar.n)
        self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}", img_s=f"{img_per_s:.0f}",
                             wait=f"{data_wait:.0%}")
        self.pending = []
        self.wait = 0.0
        self.t_last = time.perf_counter()
        self.flushes += 1
        if stop is not None:
            kept = "no checkpoint was written"
            if run.saved is not None:
                kept = f"{run.ckpt} (step {run.saved}) is kept"
            raise SystemExit(f"step {stop[0]}: loss is {stop[1]}; the run stops before saving "
                             f"anything from it, {kept}; lower --lr or check the data")
        names = ", ".join(self.bad_names) or "frames on other ranks"
        if empty:
            raise SystemExit(f"{names}: unreadable, as is every frame of its batch; fix or remove "
                             f"them")
        if seen >= 100 and unreadable > 0.01 * seen:
            raise SystemExit(f"{names}: {unreadable:.0f} of the first {seen:.0f} frames could not "
                             f"be read (> 1%); fix or remove them")
        if data_wait > 0.1 and self.flushes > 1 and not self.warned and run.master:
            self.warned = True                   # the first flush pays for starting the workers
            tqdm.write(f"warning: {data_wait:.0%} of the time went to waiting for data (> 10%): "
                       f"raise --num-workers, or prepare .npy stacks (prep/ultrasound.py --npy), "
                       f"which load fastest")

    def close(self):
        self.flush()
        self.bar.close()
        if self.file is not None:
            self.file.close()

# End of shared block: log

# Copied from mae.py: checkpoints


def rng_state(gens):
    """This rank's random streams: torch's (CPU and CUDA), numpy's and python's global ones, and the
    method's torch.Generators `gens` (by name)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [np_state[1].tolist(), *np_state[2:]],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for k, g in gens.items():
        state[k] = g.get_state()
    return state


def set_rng_state(state, gens):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(("MT19937", np.array(state["numpy"][0], np.uint32), *state["numpy"][1:]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    for k, g in gens.items():
        g.set_state(state[k])


def save_run(cfg, run, step, encoder, tensors, state, gens, opt):
    """Write OUT/ckpt.safetensors: `encoder` is what probe.py, abmil.py and viz.py read; tensors,
    state, the optimizer and every rank's random streams are what --resume needs. Collective (the
    streams are gathered); the master writes, atomically (vit.save_checkpoint)."""
    streams = [rng_state(gens)]
    if run.ddp:
        streams = [None] * run.world
        dist.all_gather_object(streams, rng_state(gens))
    run.saved = step
    if not run.master:
        return
    opt_tensors, opt_skeleton = vit.pack_state(opt.state_dict(), "optim")
    rng_tensors, rng_skeleton = vit.pack_state(streams, "rng")
    state = {**state, "optim": opt_skeleton, "rng": rng_skeleton, "world": run.world,
             "data": run.data, "steps_per_epoch": run.steps_per_epoch,
             "data_position": divmod(step, run.steps_per_epoch)}
    tensors = {**tensors, **opt_tensors, **rng_tensors}
    vit.save_checkpoint(run.ckpt, encoder, method=METHOD, pool=POOL, mean=run.mean, std=run.std,
                        args=asdict(cfg), step=step, tensors=tensors, state=state)


def write_init(cfg, run, encoder):
    """OUT/init.safetensors: the encoder before any update, with the same metadata as
    ckpt.safetensors and no training state: the run's random twin for the evaluations. Written
    once, by a fresh run."""
    if run.master:
        vit.save_checkpoint(run.init, encoder, method=METHOD, pool=POOL, mean=run.mean, std=run.std,
                            args=asdict(cfg), step=0)


def resume(cfg, run, opt, gens):
    """Continue from --resume: check the checkpoint, restore the optimizer, this rank's random
    streams and the normalisation -> (tensors, meta); the method then loads its weights from
    tensors (load_tensors)."""
    path = cfg.resume
    try:
        tensors, meta = vit.load_checkpoint(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{e}; is it cut short (a copy, a full disk)? resume from an intact "
                         f"checkpoint, or start a new run in another --out") from None
    state = meta.get("state") or {}
    if meta.get("method") != METHOD or "rng" not in state:
        what = "a checkpoint"
        if meta.get("method") != METHOD:
            what = f"a {meta.get('method')} checkpoint"
        raise SystemExit(f"{path}: {what} without {METHOD}.py's training state; --resume continues "
                         f"a {METHOD}.py run from its OUT/ckpt.safetensors")
    was = meta.get("args") or {}
    keys = ("size", "depth", "patch_size", "img_size", "in_chans", "load_size", "batch_size",
            "seed")
    now = json.loads(json.dumps(asdict(cfg)))        # tuples as lists, as the metadata holds them
    changed = []
    for k in keys + ARCH_FLAGS:
        if was.get(k) != now[k]:
            changed.append(f"--{k.replace('_', '-')} {was.get(k)!r} (now {now[k]!r})")
    if changed:
        raise SystemExit(f"{path}: trained with {', '.join(changed)}; resume with the flags it was "
                         f"trained with")
    if state.get("data") != run.data or state.get("steps_per_epoch") != run.steps_per_epoch:
        old = state.get("data") or {}
        then = f"{old.get('frames')} frames (listing {str(old.get('fingerprint'))[:12]}, " \
               f"{state.get('steps_per_epoch')} steps per epoch)"
        now = f"{run.data['frames']} (listing {run.data['fingerprint'][:12]}, " \
              f"{run.steps_per_epoch} steps per epoch)"
        raise SystemExit(f"{path}: trained on {then}, the data now has {now}; resume on the data "
                         f"and processes it was trained with, or start a new run")
    try:
        opt.load_state_dict(vit.unpack_state(state["optim"], tensors))
    except (KeyError, ValueError) as e:
        raise SystemExit(f"{path}: its optimizer state does not fit ({e}); resume with the flags "
                         f"it was trained with") from None
    streams = vit.unpack_state(state["rng"], tensors)
    if len(streams) == run.world:
        set_rng_state(streams[run.rank], gens)
    elif run.master:
        print(f"{path}: written by {len(streams)} processes, resumed on {run.world}: new random "
              f"streams")
    run.mean = meta["mean"]
    run.std = meta["std"]
    if os.path.isfile(run.ckpt) and os.path.samefile(path, run.ckpt):
        run.saved = meta["step"]
    return tensors, meta


def load_tensors(module, tensors, prefix, path):
    """module's weights from the checkpoint tensors named prefix + its own names; a clean exit if
    they do not fit."""
    names = list(module.state_dict())
    missing = [prefix + k for k in names if prefix + k not in tensors]
    if missing:
        raise SystemExit(f"{path}: has no {', '.join(missing[:3])}; resume with the flags it was "
                         f"trained with")
    try:
        module.load_state_dict({k: tensors[prefix + k] for k in names})
    except RuntimeError as e:
        raise SystemExit(f"{path}: does not fit this model ({str(e)[:300]}); resume with the flags "
                         f"it was trained with") from None

# End of shared block: checkpoints

# Copied from mae.py: diagnostic


def diagnostic_frames(frames, cfg, run):
    """The fixed batch of the collapse diagnostic (master, --diag-every > 0; else None): up to 256
    frames spread evenly over the data, whole, resized to --img-size, normalised -> float (n, C,
    S, S) on the device."""
    if not run.master or not cfg.diag_every:
        return None
    ids = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), 256)).round().astype(np.int64))
    x = decoded(frames, ids, cfg, "diagnostic frames").to(run.device).float() / 255  # (n, C, L, L)
    size = (cfg.img_size, cfg.img_size)
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(run.mean, device=run.device).view(1, -1, 1, 1)
    std = torch.tensor(run.std, device=run.device).view(1, -1, 1, 1)
    return (x - mean) / std  # (n, C, S, S)


@torch.no_grad()
def collapse_diagnostic(encoder, x, pool):
    """Whether the representation is collapsing, on the fixed batch x: emb_std (the per-dimension
    std of the normalised pooled embeddings times sqrt(D): ~1 healthy, -> 0 collapsed, SimSiam
    section 4.1), rankme (the effective rank of the pooled embeddings, RankMe, Garrido et al.
    2023, eq. 1) and patch_std (the std across images of the layer-normed token at each position:
    -> 0 when every image gives the same map)."""
    training = encoder.training
    encoder.eval()
    # (n, prefix + N, D) final-normed tokens
    t = torch.cat([encoder(chunk).float() for chunk in x.split(64)])
    encoder.train(training)
    prefix = encoder.num_prefix
    D = t.shape[-1]
    z = t[:, 0] if pool == "cls" else t[:, prefix:].mean(1)              # (n, D) pooled
    emb_std = F.normalize(z, dim=-1).std(0).mean() * math.sqrt(D)
    s = torch.linalg.svdvals(z)
    p = s / s.sum() + 1e-7
    rankme = torch.exp(-(p * torch.log(p)).sum())
    patch_std = F.layer_norm(t[:, prefix:], (D,)).std(0).mean()  # same position, across images
    return {"emb_std": emb_std.item(), "rankme": rankme.item(), "patch_std": patch_std.item()}

# End of shared block: diagnostic


if __name__ == "__main__":
    train(parse_args())
