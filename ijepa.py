"""I-JEPA pretraining (Assran et al. 2023) of a ViT, with the SALT / US-JEPA frozen teacher and LeJEPA's SIGReg.

The student encoder sees one context block; a narrow predictor, given its tokens and the positions of 4 target
blocks, predicts the target encoder's tokens there (one sequence per block). Nothing is reconstructed in pixels.

    python ijepa.py --data us_frames/ --out runs/ijepa                       # 1 GPU (or CPU)
    torchrun --standalone --nproc_per_node=8 ijepa.py --data us_frames/      # 8 GPUs on one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=ijepa --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        ijepa.py --data us_frames/                                           # 2 nodes: run this on both
    python ijepa.py --data us_frames/ --teacher runs/mae/ckpt.safetensors --out runs/usjepa   # SALT / US-JEPA
    python ijepa.py --data us_frames/ --sigreg 0.05 --out runs/ijepa_sigreg  # + SIGReg (paper appendix 0.D.4)
    python ijepa.py --data us_frames/ --resume runs/ijepa/ckpt.safetensors   # continue, same arguments
    python ijepa.py --size vit_tiny --img-size 64 --epochs 2                 # no --data: synthetic ultrasound

Defaults: the paper's ViT-S/16 recipe (Pretext Matters, Table 4: batch 128, predictor depth 8 x width 128 x 8 heads,
LR 2e-4 -> 1e-3 over 40 warmup epochs) on the official code (facebookresearch/ijepa@52c1ae9): multiblock masks (a
context block of scale 0.85-1, 4 targets of scale 0.15-0.2, aspect 0.75-1.5, min_keep 10), targets = F.layer_norm
of the EMA teacher's final-normed tokens, smooth-L1 (the paper says L2; train.py:295-313 uses smooth-L1), EMA
0.996 -> 1 linear, cosine LR to 1e-6, cosine WD 0.04 -> 0.4 (none on biases and norms), AdamW, bf16 autocast,
RandomResizedCrop(scale 0.3-1), no flips. The checkpoint's `encoder` (what probe.py / abmil.py / viz.py read; pool
"mean", there is no CLS token) is the target encoder.

What differs from the official code, and why:
- Masks keep the official quirks by default (one random number sets both scale and aspect ratio; positions use an
  exclusive bound, so at 224/16 the context is always the top-left 13x13 and the last row and column are never
  context or target; ijepa PRs #40/#59) so runs match the paper's setup. --fix-masks draws scale and aspect
  independently and lets blocks reach the last row/column. Sizes come from a generator seeded by (seed, step), as
  the official shared counter; positions and crops from (seed, rank, step): batches do not depend on the number
  of workers, and a resumed run sees the same ones.
- Warmup = min(--warmup-epochs, --warmup-frac x --epochs): the paper's 40 epochs assume a 300-epoch run (the
  official ratio), so a short run warms up for the same 13% instead of never leaving warmup. All schedules are
  functions of the step.
- Frames are padded to a square with black (an ultrasound fan keeps its whole field of view, unstretched) and
  resized to --load-size in the workers; the crop is taken for the whole batch on the device (grid_sample,
  bilinear, no antialiasing: little matters at the <= 1.14x downscale of 256 -> 224).
- No GradScaler (bf16 needs none). The loss is all-reduced for logging only, once per --log-every steps (one host
  sync, then the per-step JSONL lines); the NaN guard runs there and before every checkpoint, so a checkpoint
  never holds weights that saw a non-finite loss. The target encoder runs in eval mode (same values here).

SALT / US-JEPA (--teacher PATH): the target encoder is any pretext checkpoint (e.g. a short MAE run), frozen (eval,
no gradient, no EMA). Loss = L1 to the teacher's final-normed patch tokens, without the extra layer norm (SALT;
stable-pretraining salt.py); the predictor projects to the teacher's width, so sizes may differ. Its prefix tokens
(CLS, registers) are dropped; it runs at this --img-size (sincos/RoPE positions are exact on any grid, learned ones
interpolated) on the images re-normalised with its own mean/std (gray repeated for an RGB teacher). Its patch size
must equal --patch-size, or its tokens would not line up with the targets. The saved `encoder` is the student.

SIGReg (--sigreg LAMBDA; lejepa epps_pulley.py, slicing.py): N*W * mean over 1024 unit directions a of
sum_j w_j |ECF_{a.z}(t_j) - exp(-t_j^2/2)|^2, 17 points t_j in [0, 3], w_j = trapezoid weights on [-3, 3] folded by
symmetry times exp(-t_j^2/2); directions redrawn each step from (seed, step), the same on all ranks; ECF means
all-reduced (with gradient), so it is the statistic of the global batch. It regularises z = the mean of the
student's context tokens, one vector per image: LeJEPA's argument is about per-sample embeddings (one per view)
and the context is I-JEPA's only student view; the mean-pooled patch embedding is what the probes read; the EMA
teacher follows the student. Per-token SIGReg would treat ~150 correlated tokens of an image as independent
samples and push them apart. Loss = (1 - lambda) * prediction + lambda * SIGReg (LeJEPA Algorithm 1).
"""
import argparse
import copy
import inspect
import json
import math
import os
import random
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import vit
from vit import Block, sincos_2d

# -----------------------------------------------------------------------------
# config: every knob; parse_args() turns each field into --a-flag (bools: --flag/--no-flag)


@dataclass
class Config:
    # data
    data: str = ""                   # DIR of frames (png/jpg/bmp/tif incl. 16-bit and multi-page, .npy stacks)
    out: str = "runs/ijepa"
    in_chans: int = 1                # 1: grayscale ultrasound (paper 0.C), 3: RGB / H&E
    img_size: int = 224
    load_size: int = 0               # square size the workers decode to; 0 = img_size * 8/7 (256 for 224)
    crop_scale: tuple = (0.3, 1.0)   # RandomResizedCrop scale (official transforms.py)
    synthetic_frames: int = 512      # without --data: this many frames from prep/synthetic.py
    num_workers: int = 8
    # model
    size: str = "vit_small"
    depth: int = 0                   # 0 = the size's depth (12)
    patch_size: int = 16
    pred_depth: int = 8              # paper Table 4 (official configs: 12 x 384)
    pred_dim: int = 128
    pred_heads: int = 8
    # masks (official configs)
    npred: int = 4
    pred_scale: tuple = (0.15, 0.2)
    enc_scale: tuple = (0.85, 1.0)
    aspect: tuple = (0.75, 1.5)
    min_keep: int = 10
    fix_masks: bool = False          # corrected sampler instead of the official one (see the docstring)
    # SALT / SIGReg
    teacher: str = ""                # frozen teacher checkpoint (SALT / US-JEPA); empty = EMA teacher (I-JEPA)
    sigreg: float = 0.0              # SIGReg weight lambda; 0 = off
    sigreg_slices: int = 1024
    # optimisation (per step; an epoch is len(data) // batch_size steps)
    batch_size: int = 128            # global, split over ranks
    epochs: int = 300
    warmup_epochs: float = 40.0
    warmup_frac: float = 40 / 300    # warmup is at most this fraction of the run
    start_lr: float = 2e-4
    lr: float = 1e-3
    final_lr: float = 1e-6
    wd: float = 0.04
    final_wd: float = 0.4
    ema: tuple = (0.996, 1.0)
    # run
    save_every: int = 1000           # steps; 0 = only at the end
    log_every: int = 10              # steps between host syncs (loss, NaN guard, log lines)
    resume: str = ""
    max_steps: int = 0               # stop after this many steps (the schedules still span --epochs)
    seed: int = 0
    device: str = ""                 # "" = cuda if available, else cpu


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    notes = dict(re.findall(r"^ +(\w+): \w+ = .*?# (.*)$", inspect.getsource(Config), re.M))  # the comments above
    for f in fields(Config):
        name, h = "--" + f.name.replace("_", "-"), f"{notes.get(f.name, '')} [{f.default}]".replace("%", "%%")
        if isinstance(f.default, bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=h)
        elif isinstance(f.default, tuple):
            p.add_argument(name, type=float, nargs=2, default=f.default, metavar=("LO", "HI"), help=h)
        else:
            p.add_argument(name, type=type(f.default), default=f.default, help=h)
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()})

# -----------------------------------------------------------------------------
# data: frames decoded in workers to uint8 (C, L, L); crop + normalisation batched on the device

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")


class Frames:
    """Every frame under DIR (sorted, recursive; each tif page and each row of a .npy stack is a frame), or the
    synthetic ultrasound frames without DIR. load(i) -> uint8 (C, L, L), or None when the file cannot be read."""

    def __init__(self, cfg, L):
        self.root, self.C, self.L, self.array, self._npy = cfg.data, cfg.in_chans, L, None, {}
        if not cfg.data:
            try:
                from prep.synthetic import ultrasound_frames
            except ImportError:
                raise SystemExit("ijepa.py: no --data given and prep/synthetic.py is not beside this script; "
                                 "pass --data DIR with your frames") from None
            self.array = ultrasound_frames(cfg.synthetic_frames, size=L, seed=cfg.seed)   # (n, L, L)
            n = len(self.array)
            self.paths, self.index = np.array([b"synthetic"]), np.stack([np.zeros(n, np.int64), np.arange(n)], 1)
            return
        if not os.path.isdir(cfg.data):
            raise FileNotFoundError(f"--data {cfg.data}: no such directory")
        rel = []
        for root, dirs, names in os.walk(cfg.data, followlinks=True):
            dirs.sort()
            rel += [os.path.relpath(os.path.join(root, n), cfg.data) for n in sorted(names)
                    if n.lower().endswith(EXTS)]
        if not rel:
            raise FileNotFoundError(f"--data {cfg.data}: no {'/'.join(EXTS)} files under it")
        pages = np.array([self.count(os.path.join(cfg.data, r)) for r in rel])
        self.paths = np.array([r.encode() for r in rel])    # bytes array: no per-path Python objects in workers
        self.index = np.stack([np.repeat(np.arange(len(rel)), pages),
                               np.arange(pages.sum()) - np.repeat(np.cumsum(pages) - pages, pages)], 1)  # (N, 2)

    @staticmethod
    def count(path):
        if not path.lower().endswith((".tif", ".tiff", ".npy")):
            return 1                                     # png/jpg/bmp: one frame, not opened until loaded
        try:
            if path.endswith(".npy"):
                a = np.load(path, mmap_mode="r")
            else:
                with Image.open(path) as im:
                    return getattr(im, "n_frames", 1)
        except Exception:
            return 1                                     # unreadable: one frame that will fail (and be reported)
        if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (1, 3, 4)):
            raise ValueError(f"{path}: a .npy frame stack must be uint8 (N, H, W) or (N, H, W, C), got {a.dtype} "
                             f"{a.shape}; write it with prep/ or convert it")
        return len(a)

    def __len__(self):
        return len(self.index)

    def name(self, i):
        f, page = self.index[i]
        return os.path.join(self.root, self.paths[f].decode()) + (f"[{page}]" if page else "")

    def load(self, i):
        f, page = (int(v) for v in self.index[i])
        try:
            if self.array is not None:
                a = self.array[page]
            elif self.paths[f].endswith(b".npy"):
                if f not in self._npy:                   # memory-mapped once per worker
                    self._npy[f] = np.load(os.path.join(self.root, self.paths[f].decode()), mmap_mode="r")
                a = np.asarray(self._npy[f][page])
            else:
                with Image.open(os.path.join(self.root, self.paths[f].decode())) as im:
                    im.seek(page)
                    if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                        im = im.convert("RGB")
                    a = np.asarray(im)
            if a.ndim == 3:
                a = a[..., 0] if a.shape[2] < 3 else a[..., :3]    # gray+alpha / 1 channel -> gray; RGBA -> RGB
            if a.dtype != np.uint8:              # 16-bit by /257 (prep does any percentile mapping); floats in [0, 1]
                a = (np.clip(a * 255.0 if a.dtype.kind in "fb" else a / 257.0, 0, 255) + 0.5).astype(np.uint8)
            if self.C == 1 and a.ndim == 3:                # ITU-R 601 luma, as PIL's convert("L")
                a = ((a.astype(np.uint32) @ np.array([299, 587, 114], np.uint32) + 500) // 1000).astype(np.uint8)
            elif self.C == 3 and a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            H, W = a.shape[:2]
            S = max(H, W)
            sq = np.zeros((S, S) + a.shape[2:], np.uint8)   # pad to a square with black, centred
            sq[(S - H) // 2:(S - H) // 2 + H, (S - W) // 2:(S - W) // 2 + W] = a
            a = np.asarray(Image.fromarray(sq).resize((self.L, self.L), Image.BILINEAR))
            return torch.from_numpy(a.reshape(self.L, self.L, -1).transpose(2, 0, 1).copy())   # (C, L, L)
        except Exception:
            return None


def data_stats(frames, cfg, master):
    """Per-channel mean/std in [0, 1] units: DIR/stats.json (written by prep), else computed on the master rank from
    up to 2000 frames, written to DIR/stats.json (or --out/stats.json when DIR is read-only) and broadcast."""
    paths = [os.path.join(d, "stats.json") for d in (cfg.data, cfg.out)] if cfg.data else []
    C, stats = cfg.in_chans, None
    for p in filter(os.path.isfile, paths):
        with open(p) as f:
            s = json.load(f)
        if not (isinstance(s, dict) and len(s.get("mean", [])) in (1, C) and len(s.get("std", [])) == len(s["mean"])
                and min(s["std"]) > 0):
            raise ValueError(f"{p}: expected {{\"mean\": [...], \"std\": [...]}} with {C} values each for --in-chans "
                             f"{C} (or 1, used for every channel), std > 0; got {s}. Fix it, or delete it to recompute")
        stats = [s["mean"] * (C // len(s["mean"])), s["std"] * (C // len(s["std"]))]   # 1 value: a gray dataset
        break
    if stats is None and master:
        ids = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), 2000)).astype(np.int64))
        acc, n = torch.zeros(2, C, dtype=torch.float64), 0
        for x in map(frames.load, tqdm(ids, desc="mean/std")):
            if x is not None:
                x = x.reshape(C, -1).double() / 255
                acc, n = acc + torch.stack([x.mean(1), x.square().mean(1)]), n + 1
        if n == 0:
            raise RuntimeError(f"--data {cfg.data}: none of {len(ids)} sampled frames could be decoded")
        m1, m2 = acc / n
        stats = [m1.tolist(), (m2 - m1.square()).clamp_min(1e-12).sqrt().tolist()]
        for p in paths:                                              # DIR first, --out if DIR is read-only
            try:
                with open(p + ".tmp", "w") as f:
                    json.dump({"mean": stats[0], "std": stats[1]}, f)
                os.replace(p + ".tmp", p)
                print(f"wrote {p}")
                break
            except OSError:
                pass
    if dist.is_initialized():
        box = [stats]
        dist.broadcast_object_list(box, src=0)
        stats = box[0]
    return stats


def rrc_theta(rng, n, L, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop boxes (torchvision's 10 tries, then the full image) as affine_grid thetas (n, 2, 3)."""
    area = L * L * rng.uniform(*scale, (n, 10))
    ar = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, 10)))
    w, h = np.round(np.sqrt(area * ar)), np.round(np.sqrt(area / ar))                  # (n, 10)
    ok = (w > 0) & (w <= L) & (h > 0) & (h <= L)
    first = ok.argmax(1)
    w = np.where(ok.any(1), w[np.arange(n), first], L)
    h = np.where(ok.any(1), h[np.arange(n), first], L)
    top, left = np.floor(rng.random(n) * (L - h + 1)), np.floor(rng.random(n) * (L - w + 1))
    # output pixel centre u in [-1, 1] -> input (align_corners=False): x = w/L * u + (2 left + w)/L - 1
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0], theta[:, 0, 2] = w / L, (2 * left + w) / L - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / L, (2 * top + h) / L - 1
    return theta


def crop_normalize(imgs, theta, size, mean, std):
    """uint8 (B, C, L, L) + thetas (B, 2, 3) -> normalised float (B, C, size, size), bilinear, on imgs' device."""
    grid = F.affine_grid(theta, (imgs.shape[0], imgs.shape[1], size, size), align_corners=False)
    x = F.grid_sample(imgs.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x / 255 - mean) / std


def block_size(g, scale, aspect, H, W, fix):
    """official multiblock.py:55-72: one draw r sets both scale and aspect ratio (unless fix), h/w < H/W."""
    r = torch.rand(1, generator=g).item()
    s = scale[0] + r * (scale[1] - scale[0])
    if fix:
        r = torch.rand(1, generator=g).item()
    ar = aspect[0] + r * (aspect[1] - aspect[0])
    keep = int(H * W * s)
    h, w = int(round(math.sqrt(keep * ar))), int(round(math.sqrt(keep / ar)))
    return min(h, H - (not fix)), min(w, W - (not fix))   # official `while h >= H: h -= 1` (exclusive randint)


def multiblock(B, H, W, step, rank, cfg):
    """The official multiblock collator (multiblock.py:112-170) for one batch of B images on an H x W grid.

    -> masks_enc (B, Nctx) and masks_pred (M, B, Ntgt), int64 row-major patch indices. One target size and one
    context size per batch; M target blocks per image (they may overlap); one context block inside the
    complement of the targets (after 20 failed tries one more target constraint is dropped, as official); the
    context lists are truncated to the batch minimum (dropping their last patches).
    """
    g = torch.Generator().manual_seed(cfg.seed * 2 ** 32 + step)      # seed 0: the official counter value
    fix, M = int(cfg.fix_masks), cfg.npred
    ph, pw = block_size(g, cfg.pred_scale, cfg.aspect, H, W, fix)
    eh, ew = block_size(g, cfg.enc_scale, (1.0, 1.0), H, W, fix)
    if min(ph * pw, eh * ew) <= cfg.min_keep:
        raise ValueError(f"a {H}x{W} patch grid gives {ph}x{pw} target / {eh}x{ew} context blocks, not more than "
                         f"--min-keep {cfg.min_keep} patches: use a larger --img-size or a smaller --min-keep")
    rng = np.random.default_rng([cfg.seed, rank, step, 1])
    ys, xs = np.arange(H)[:, None], np.arange(W)

    def box(top, left, h, w):                                          # (...,) corners -> (..., H, W) bool
        top, left = top[..., None, None], left[..., None, None]
        return (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)

    top, left = rng.integers(0, H - ph + fix, (B, M)), rng.integers(0, W - pw + fix, (B, M))
    tgt = box(top, left, ph, pw)                                       # (B, M, H, W)
    masks_pred = ((top[..., None, None] + np.arange(ph)[:, None]) * W
                  + left[..., None, None] + np.arange(pw)).reshape(B, M, ph * pw)
    allowed = np.ones((B, M + 1, H, W), bool)                          # allowed[:, k]: outside the first k targets
    for k in range(M):
        allowed[:, k + 1] = allowed[:, k] & ~tgt[:, k]
    ctx, n_con, fails, todo = np.zeros((B, H, W), bool), np.full(B, M), np.zeros(B, np.int64), np.arange(B)
    while todo.size:
        c = box(rng.integers(0, H - eh + fix, todo.size), rng.integers(0, W - ew + fix, todo.size), eh, ew)
        c &= allowed[todo, n_con[todo]]
        ok = c.sum((1, 2)) > cfg.min_keep                             # official: strictly more than min_keep
        ctx[todo[ok]] = c[ok]
        todo = todo[~ok]
        fails[todo] += 1
        drop = todo[fails[todo] % 20 == 0]                             # "decreasing acceptable-regions"
        n_con[drop] = np.maximum(n_con[drop] - 1, 0)
    n = ctx.reshape(B, -1).sum(1).min()
    masks_enc = np.argsort(~ctx.reshape(B, -1), axis=1, kind="stable")[:, :n]   # first n True, row-major
    return torch.from_numpy(masks_enc), torch.from_numpy(np.ascontiguousarray(masks_pred.transpose(1, 0, 2)))


class Batches(torch.utils.data.Dataset):
    """Item bi = batch bi of this rank's shard of one epoch, decoded, with its crop thetas and masks (in workers).
    Sharding: a permutation seeded by (seed, epoch), rank r takes perm[r::world]; the rest is seeded by
    (seed, rank, step), so a batch does not depend on --num-workers or on where the run was resumed."""

    def __init__(self, frames, cfg, rank, world, epoch, ipe, b):
        self.frames, self.cfg, self.rank, self.epoch, self.ipe, self.b = frames, cfg, rank, epoch, ipe, b
        self.shard = np.random.default_rng([cfg.seed, epoch]).permutation(len(frames))[rank::world]

    def __len__(self):
        return self.ipe

    def __getitem__(self, bi):
        cfg, step = self.cfg, self.epoch * self.ipe + bi
        imgs, bad = [], []
        for i in self.shard[bi * self.b:(bi + 1) * self.b]:
            x = self.frames.load(i)
            if x is None:
                bad.append(self.frames.name(i))
            else:
                imgs.append(x)
        if not imgs:
            return dict(n=0, bad=bad)
        grid = cfg.img_size // cfg.patch_size
        masks_enc, masks_pred = multiblock(len(imgs), grid, grid, step, self.rank, cfg)
        theta = rrc_theta(np.random.default_rng([cfg.seed, self.rank, step, 0]), len(imgs), self.frames.L,
                          cfg.crop_scale)
        return dict(n=len(imgs), bad=bad, imgs=torch.stack(imgs), theta=torch.from_numpy(theta),
                    masks_enc=masks_enc, masks_pred=masks_pred)

# -----------------------------------------------------------------------------
# model: the student encoder is vit.ViT without CLS; the predictor is the official one on vit.Block


class Predictor(nn.Module):
    """official vision_transformer.py:220-326 (same parameter names): context tokens -> predicted target tokens.

    Each of the M target blocks is predicted in its own sequence [context ; the block's Nt mask tokens + their
    positions]: the context is repeated M times along the batch, block-major, so blocks never attend to each other."""

    def __init__(self, enc_dim, out_dim, grid, dim=128, depth=8, heads=8):
        super().__init__()
        self.predictor_embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.predictor_pos_embed = nn.Parameter(sincos_2d(dim, grid, grid)[None], requires_grad=False)  # (1, N, d)
        self.predictor_blocks = nn.ModuleList([Block(dim, heads, qkv_bias=True, ln_eps=1e-6) for _ in range(depth)])
        self.predictor_norm = nn.LayerNorm(dim, eps=1e-6)
        self.predictor_proj = nn.Linear(dim, out_dim)               # to the TARGET width (teacher's, for SALT)
        for m in self.modules():                                    # official effective init (helper.py:86-99)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, z, masks_enc, masks_pred):
        (B, Nc, _), (M, _, Nt) = z.shape, masks_pred.shape
        pos = self.predictor_pos_embed[0]                                    # (N, d)
        x = self.predictor_embed(z) + pos[masks_enc]                         # (B, Nc, d)
        q = self.mask_token + pos[masks_pred.reshape(M * B, Nt)]             # (M*B, Nt, d), block-major
        x = torch.cat([x.repeat(M, 1, 1), q.to(x.dtype)], dim=1)             # (M*B, Nc + Nt, d)
        for blk in self.predictor_blocks:
            x = blk(x)
        return self.predictor_proj(self.predictor_norm(x[:, Nc:]))           # (M*B, Nt, D_target)


class IJEPA(nn.Module):
    """Student encoder + predictor in one module, so DDP wraps (and all-reduces) them together."""

    def __init__(self, encoder, predictor):
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, x, masks_enc, masks_pred):
        z = self.encoder(x, ids_keep=masks_enc)             # (B, Nc, D) context tokens; pos added, then gathered
        return self.predictor(z, masks_enc, masks_pred), z

# -----------------------------------------------------------------------------
# SIGReg (LeJEPA) and the schedules


def mean_over_ranks(x):
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


class AllReduceMean(torch.autograd.Function):
    """Mean over ranks in forward and backward (LeJEPA utils.all_reduce): with DDP averaging the gradients, every
    rank then gets the gradient of the global statistic."""
    forward = staticmethod(lambda ctx, x: mean_over_ranks(x))
    backward = staticmethod(lambda ctx, g: mean_over_ranks(g))


def epps_pulley(x, t_max=3.0, n_points=17):
    """(N, S) projected samples -> (S,) Epps-Pulley statistics N*W * int |ECF(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt
    over [-t_max, t_max] by the trapezoid rule folded onto t >= 0 (lejepa epps_pulley.py:62-99)."""
    t = torch.linspace(0, t_max, n_points, device=x.device, dtype=x.dtype)
    phi = torch.exp(-t.square() / 2)                                 # N(0, 1) characteristic function
    w = torch.full_like(t, 2 * t_max / (n_points - 1))               # trapezoid weights, doubled for t < 0
    w[0] = w[-1] = t_max / (n_points - 1)                            # (int indices: no host-device copy)
    xt = x.unsqueeze(-1) * t                                         # (N, S, T)
    c, s, world = xt.cos().mean(0), xt.sin().mean(0), 1              # (S, T) each
    if dist.is_initialized():
        c, s, world = AllReduceMean.apply(c), AllReduceMean.apply(s), dist.get_world_size()
    return ((c - phi).square() + s.square()) @ (w * phi) * x.shape[0] * world


def sigreg(z, seed, step, slices=1024):
    """(N, D) embeddings -> sliced Epps-Pulley, mean over `slices` unit directions drawn from (seed, step)."""
    g = torch.Generator(device=z.device).manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    A = torch.randn(z.shape[1], slices, generator=g, device=z.device)
    return epps_pulley(z.float() @ (A / A.norm(dim=0))).mean()      # (N, S) projections


def warmup_steps(cfg, ipe):
    return round(min(cfg.warmup_epochs, cfg.warmup_frac * cfg.epochs) * ipe)


def schedules(cfg, step, total, warmup):
    """lr, wd, EMA momentum for iteration `step` (0-based) of `total` (official schedulers.py: step() runs before
    each iteration, so iteration i uses s = i + 1; train.py:228: momentum i-th value from ema[0])."""
    s = step + 1
    if s < warmup:
        lr = cfg.start_lr + s / warmup * (cfg.lr - cfg.start_lr)
    else:
        p = (s - warmup) / max(1, total - warmup)
        lr = max(cfg.final_lr, cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * p)))
    wd = cfg.final_wd + (cfg.wd - cfg.final_wd) * 0.5 * (1 + math.cos(math.pi * s / total))
    wd = max(cfg.final_wd, wd) if cfg.final_wd <= cfg.wd else min(cfg.final_wd, wd)
    return lr, wd, cfg.ema[0] + step * (cfg.ema[1] - cfg.ema[0]) / total

# -----------------------------------------------------------------------------
# building and one training step (shared by train() and benchmark())


def build(cfg, device):
    """-> model (student + predictor), teacher, teacher input affine (a, b) or None, optimizer."""
    if cfg.img_size % cfg.patch_size or cfg.in_chans not in (1, 3) or cfg.seed < 0:
        raise ValueError(f"need --img-size a multiple of --patch-size, --in-chans 1 or 3 and --seed >= 0, got "
                         f"{cfg.img_size}, {cfg.patch_size}, {cfg.in_chans}, {cfg.seed}")
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True                        # fixed-shape patch-embedding conv (train.py)
    kw = dict(depth=cfg.depth) if cfg.depth else {}
    torch.manual_seed(cfg.seed)                                      # the same initial weights on every rank
    student = vit.ViT(vit.vit_config(cfg.size, img_size=cfg.img_size, patch_size=cfg.patch_size,
                                     in_chans=cfg.in_chans, cls_token=False, pos_embed="sincos", **kw))
    affine = None
    if cfg.teacher:
        teacher, meta = vit.load_encoder(cfg.teacher)
        tc = teacher.cfg
        if tc.patch_size != cfg.patch_size or (tc.in_chans != cfg.in_chans and cfg.in_chans != 1):
            raise ValueError(f"{cfg.teacher}: teacher has patch {tc.patch_size} / {tc.in_chans} channels, this run "
                             f"--patch-size {cfg.patch_size} / --in-chans {cfg.in_chans}: the patch sizes must match "
                             f"(target tokens must line up) and the channels match (or a grayscale run, RGB teacher)")
        affine = tuple(torch.tensor(meta[k], device=device).view(1, -1, 1, 1) for k in ("mean", "std"))
    else:
        teacher = copy.deepcopy(student)                             # train.py:169
    predictor = Predictor(student.cfg.embed_dim, teacher.cfg.embed_dim, cfg.img_size // cfg.patch_size,
                          cfg.pred_dim, cfg.pred_depth, cfg.pred_heads)
    model = IJEPA(student, predictor).to(device)
    teacher.to(device).eval().requires_grad_(False)
    decay, no_decay = [], []                                         # helper.py:107-137: no WD on biases / norms
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if "bias" in n or p.ndim == 1 else decay).append(p)
    opt = torch.optim.AdamW([dict(params=decay), dict(params=no_decay, weight_decay=0.0, wd_exclude=True)],
                            lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=str(device).startswith("cuda"))
    return model, teacher, affine, opt


def train_step(cfg, step, fwd, model, teacher, opt, x, x_t, masks_enc, masks_pred, m, amp):
    """One optimizer step. -> detached (loss, prediction loss, sigreg) on the device; no host sync."""
    with amp:
        with torch.no_grad():
            h = teacher(x_t)[:, teacher.num_prefix:]                              # (B, N, Dt), final-normed
            if not cfg.teacher:
                h = F.layer_norm(h.float(), (h.shape[-1],))                        # train.py:297, eps 1e-5
            h = h[torch.arange(x.shape[0], device=x.device)[None, :, None], masks_pred].flatten(0, 1)  # (M*B, Nt, Dt)
        p, z = fwd(x, masks_enc, masks_pred)                                      # (M*B, Nt, Dt), (B, Nc, D)
        lp = F.l1_loss(p.float(), h.float()) if cfg.teacher else F.smooth_l1_loss(p.float(), h.float())
    sr = sigreg(z.float().mean(1), cfg.seed, step, cfg.sigreg_slices) if cfg.sigreg else lp.new_zeros(())
    loss = (1 - cfg.sigreg) * lp + cfg.sigreg * sr if cfg.sigreg else lp
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if not cfg.teacher:                                                           # EMA (train.py:332-336)
        with torch.no_grad():
            torch._foreach_lerp_(list(teacher.parameters()), list(model.encoder.parameters()), 1 - m)
    return torch.stack([loss.detach(), lp.detach(), sr.detach()])


def teacher_input(x, affine, std, mean):
    """SALT: the images as the teacher was trained to see them (its own mean/std, RGB from gray if needed)."""
    if affine is None:
        return x
    raw = (x * std + mean).expand(-1, affine[0].shape[1], -1, -1)     # (B, C_teacher, H, W) in [0, 1] units
    return (raw - affine[0]) / affine[1]

# -----------------------------------------------------------------------------
# training


def train(cfg):
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if cuda else "cpu"
    else:
        rank, world, device = 0, 1, cfg.device or ("cuda" if cuda else "cpu")
    on_cuda, master = device.startswith("cuda"), rank == 0
    if on_cuda:
        torch.cuda.set_device(device)
    ckpt, log_path = os.path.join(cfg.out, "ckpt.safetensors"), os.path.join(cfg.out, "log.jsonl")
    if os.path.exists(ckpt) and not cfg.resume:
        raise FileExistsError(f"{ckpt} exists: pass --resume {ckpt} to continue that run, or choose another --out")
    if cfg.teacher and os.path.abspath(cfg.teacher) == os.path.abspath(ckpt):
        raise ValueError(f"--teacher {cfg.teacher} is this run's output checkpoint; choose another --out")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks")
    b = cfg.batch_size // world
    os.makedirs(cfg.out, exist_ok=True)
    frames = Frames(cfg, cfg.load_size or round(cfg.img_size * 8 / 7))
    if frames.L < cfg.img_size:
        raise ValueError(f"--load-size {frames.L} is smaller than --img-size {cfg.img_size}")
    mean, std = data_stats(frames, cfg, master)
    ipe = len(frames) // world // b                                   # steps per epoch (drop_last)
    if ipe == 0:
        raise ValueError(f"{len(frames)} frames cannot fill a batch of {b} on {world} rank(s); lower --batch-size")
    total, warmup = ipe * cfg.epochs, warmup_steps(cfg, ipe)
    stop = min(total, cfg.max_steps) if cfg.max_steps else total
    model, teacher, affine, opt = build(cfg, device)
    torch.manual_seed(cfg.seed + rank)                                # per-rank RNG from here on
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    t_sum = sum(p.double().abs().sum().item() for p in teacher.parameters()) if cfg.teacher else 0.0  # SALT check
    start = 0
    if cfg.resume:
        t, meta = vit.load_checkpoint(cfg.resume)
        st = meta["state"]
        if meta["method"] != "ijepa" or "opt" not in st:
            raise ValueError(f"{cfg.resume}: not an ijepa.py training checkpoint (method {meta['method']!r}); "
                             f"--resume continues a run of this script, --teacher starts SALT from any checkpoint")
        for k in ("size", "depth", "patch_size", "img_size", "in_chans", "pred_depth", "pred_dim", "pred_heads",
                  "teacher"):
            if meta["args"].get(k) != getattr(cfg, k):
                raise ValueError(f"{cfg.resume}: saved with --{k.replace('_', '-')} {meta['args'].get(k)!r}, "
                                 f"this run has {getattr(cfg, k)!r}; pass the same value to resume")
        if (st["ipe"], st["frames"]) != (ipe, len(frames)):
            raise ValueError(f"{cfg.resume}: saved with {st['frames']} frames / {st['ipe']} steps per epoch, now "
                             f"{len(frames)} / {ipe}: the data or the number of ranks changed")
        if cfg.teacher and not math.isclose(st["teacher_sum"], t_sum, rel_tol=1e-9):
            raise ValueError(f"{cfg.teacher}: the teacher's weights changed since {cfg.resume} was written")
        sub = lambda pre: {k[len(pre):]: v for k, v in t.items() if k.startswith(pre)}   # noqa: E731
        model.encoder.load_state_dict(sub("encoder." if cfg.teacher else "student."))
        model.predictor.load_state_dict(sub("predictor."))
        if not cfg.teacher:
            teacher.load_state_dict(sub("encoder."))
        opt.load_state_dict(vit.unpack_state(st["opt"], t))
        start = st["step"]
        if master:                                                    # rank 0's generators (the only ones saved)
            torch.set_rng_state(t["rng.torch"])
            if on_cuda and "rng.cuda" in t:
                torch.cuda.set_rng_state(t["rng.cuda"])
            np.random.set_state((st["rng_numpy"][0], np.array(st["rng_numpy"][1], np.uint32), *st["rng_numpy"][2:]))
            random.setstate((st["rng_python"][0], tuple(st["rng_python"][1]), st["rng_python"][2]))
    if master and os.path.exists(log_path):                           # drop lines logged after the checkpoint
        with open(log_path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start]
        with open(log_path, "w") as f:
            f.writelines(keep)
    fwd = nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None,
                                              static_graph=True) if ddp else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()
    mean_t, std_t = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))
    if master:
        n_par = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        print(f"ijepa: {len(frames)} frames, {ipe} steps/epoch x {cfg.epochs} epochs (warmup {warmup}), {world} x "
              f"batch {b} on {device}, {n_par:.1f}M trainable, {'teacher ' + cfg.teacher if cfg.teacher else 'EMA'}"
              + (f", SIGReg {cfg.sigreg}" if cfg.sigreg else ""))
    bar = tqdm(total=stop, initial=start, disable=not master, dynamic_ncols=True)
    buf, rows, history, bad_files = [], [], [], []
    counts, t0 = np.zeros(3), time.time()                             # images; epoch-0 frames seen, unreadable

    def flush():
        """One host sync for the last steps: all-reduce, NaN guard, JSONL lines, tqdm, unreadable-file check."""
        nonlocal buf, rows, t0
        if not buf:
            return
        v = torch.cat([torch.stack(buf).double().flatten(), torch.tensor(counts, device=buf[0].device)])
        if ddp:
            dist.all_reduce(v)
        v = v.tolist()
        vals, (n_img, seen, n_bad) = np.array(v[:-3]).reshape(-1, 3) / world, v[-3:]
        ips, lines = n_img / max(time.time() - t0, 1e-9), []
        for (loss, lp, sr), (s, epoch, lr, wd, m) in zip(vals, rows):
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {s}: loss is {loss}")
            line = dict(step=s, epoch=epoch, loss=loss, lr=lr, wd=wd, img_per_s=ips)
            line.update({} if cfg.teacher else dict(momentum=m))
            line.update(dict(loss_pred=lp, sigreg=sr) if cfg.sigreg else {})
            lines.append(json.dumps(line) + "\n")
            history.append(float(loss))
        if master:
            with open(log_path, "a") as f:
                f.writelines(lines)
            bar.update(len(rows))
            bar.set_postfix(loss=f"{vals[-1][0]:.4f}", lr=f"{rows[-1][2]:.2e}", img_s=f"{ips:.0f}")
        if seen >= 100 and n_bad > 0.01 * seen:
            raise RuntimeError(f"{int(n_bad)} of the first {int(seen)} frames could not be decoded (> 1%), e.g. "
                               f"{bad_files[:5] or 'on another rank'}: fix or remove them")
        buf, rows, counts[0], t0 = [], [], 0, time.time()

    def save(step):
        flush()                                                       # raises on a non-finite loss: nothing saved
        if not master:
            return
        tensors, skel = vit.pack_state(opt.state_dict(), "opt")
        tensors.update({f"predictor.{k}": v for k, v in model.predictor.state_dict().items()})
        tensors.update({} if cfg.teacher else {f"student.{k}": v for k, v in model.encoder.state_dict().items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if on_cuda:
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        npst, pyst = np.random.get_state(), random.getstate()
        state = dict(opt=skel, step=step, epoch=step // ipe, batch=step % ipe, ipe=ipe, frames=len(frames),
                     world=world, teacher_sum=t_sum, rng_numpy=[npst[0], npst[1].tolist(), *npst[2:]],
                     rng_python=[pyst[0], list(pyst[1]), pyst[2]])
        vit.save_checkpoint(ckpt, model.encoder if cfg.teacher else teacher, method="ijepa", pool="mean",
                            mean=mean, std=std, args=asdict(cfg), step=step, tensors=tensors, state=state)

    step, saved = start, None
    while step < stop:
        epoch = step // ipe
        loader = torch.utils.data.DataLoader(Batches(frames, cfg, rank, world, epoch, ipe, b), batch_size=None,
                                             sampler=range(step % ipe, ipe), num_workers=cfg.num_workers,
                                             pin_memory=on_cuda)
        for batch in loader:
            for name in batch["bad"] if master else []:
                bar.write(f"skipping unreadable frame {name}")
            bad_files += batch["bad"][:max(0, 100 - len(bad_files))]
            counts += [batch["n"], *([batch["n"] + len(batch["bad"]), len(batch["bad"])] if epoch == 0 else [0, 0])]
            if batch["n"] == 0:
                raise RuntimeError(f"no frame of batch {step % ipe} of epoch {epoch} could be decoded: {batch['bad']}")
            lr, wd, m = schedules(cfg, step, total, warmup)
            for gr in opt.param_groups:
                gr["lr"], gr["weight_decay"] = lr, 0.0 if gr.get("wd_exclude") else wd
            imgs, theta, masks_enc, masks_pred = (batch[k].to(device, non_blocking=True)
                                                  for k in ("imgs", "theta", "masks_enc", "masks_pred"))
            x = crop_normalize(imgs, theta, cfg.img_size, mean_t, std_t)
            buf.append(train_step(cfg, step, fwd, model, teacher, opt, x, teacher_input(x, affine, std_t, mean_t),
                                  masks_enc, masks_pred, m, amp))
            step += 1
            rows.append((step, epoch, lr, wd, m))
            if step % cfg.log_every == 0:
                flush()
            if cfg.save_every and step % cfg.save_every == 0:
                save(step)
                saved = step
            if step >= stop:
                break
    if saved != step:
        save(step)
    bar.close()
    if master:
        print(f"saved {ckpt} at step {step}")
    if ddp:
        dist.destroy_process_group()
    return dict(losses=history, model=model, teacher=teacher, step=step)

# -----------------------------------------------------------------------------
# benchmark (bench.py train --method ijepa)


def vit_flops(n, D, depth, mlp=4.0):
    """Forward matmul FLOPs of `depth` pre-norm blocks on one sequence of n tokens of width D."""
    return depth * (2 * n * (4 + 2 * mlp) * D * D + 4 * n * n * D)


def benchmark(cfg, steps=20, warmup=5):
    """Training steps per second on a synthetic uint8 batch already on the device (masks made ahead, as the
    workers would): -> dict(img_per_s, flops_per_img), FLOPs counted as 3x forward for the trained parts."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, teacher, affine, opt = build(cfg, device)
    B, L, grid = cfg.batch_size, cfg.load_size or round(cfg.img_size * 8 / 7), cfg.img_size // cfg.patch_size
    imgs = torch.randint(0, 256, (B, cfg.in_chans, L, L), dtype=torch.uint8, device=device)
    mean_t = torch.full((1, cfg.in_chans, 1, 1), 0.2, device=device)
    std_t = torch.full((1, cfg.in_chans, 1, 1), 0.25, device=device)
    batches = [(torch.from_numpy(rrc_theta(np.random.default_rng([cfg.seed, i]), B, L, cfg.crop_scale)).to(device),
                *[t.to(device) for t in multiblock(B, grid, grid, i, 0, cfg)]) for i in range(8)]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        theta, masks_enc, masks_pred = batches[i % len(batches)]
        x = crop_normalize(imgs, theta, cfg.img_size, mean_t, std_t)
        out = train_step(cfg, i, model, model, teacher, opt, x, teacher_input(x, affine, std_t, mean_t),
                         masks_enc, masks_pred, 0.996, amp)
    out.tolist()                                                      # waits for the last step
    sync()
    dt = time.perf_counter() - t0
    D, Dt, Dp, N = model.encoder.cfg.embed_dim, teacher.cfg.embed_dim, cfg.pred_dim, grid * grid
    pe = 2 * cfg.in_chans * cfg.patch_size ** 2
    fl, nc_all = [], [me.shape[1] for _, me, _ in batches]
    for _, me, mp in batches:
        nc, (M, _, nt) = me.shape[1], mp.shape
        student = vit_flops(nc, D, model.encoder.cfg.depth) + pe * N * D
        pred = M * vit_flops(nc + nt, Dp, cfg.pred_depth) + 2 * nc * D * Dp + 2 * M * nt * Dp * Dt
        fl.append(3 * (student + pred) + vit_flops(N, Dt, teacher.cfg.depth) + pe * N * Dt)
    return dict(img_per_s=B * steps / dt, flops_per_img=float(np.mean(fl)), context_tokens=float(np.mean(nc_all)))


if __name__ == "__main__":
    train(parse_args())
