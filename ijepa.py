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

Defaults: the paper's ViT-S/16 recipe (Pretext Matters, Table 4) on the official code (facebookresearch/ijepa@52c1ae9):
targets = F.layer_norm of the EMA teacher's final-normed tokens, smooth-L1 (the paper says L2; train.py:295-313 uses
smooth-L1), EMA 0.996 -> 1, LR 2e-4 -> 1e-3 -> cosine 1e-6, cosine WD 0.04 -> 0.4 (none on biases and norms), AdamW,
bf16 autocast, no flips. The checkpoint's `encoder` (pool "mean": there is no CLS token) is the target encoder.

What differs from the official code, and why:
- Masks keep the official quirks by default (one random number sets both scale and aspect ratio; an exclusive bound
  on positions, so at 224/16 the context is always the top-left 13x13 and the last row and column are never used;
  ijepa PRs #40/#59) so runs match the paper's setup; --fix-masks corrects both. Sizes come from (seed, step), as the
  official shared counter, positions and crops from (seed, rank, step): independent of --num-workers and resuming.
- Warmup = min(--warmup-epochs, --warmup-frac x --epochs): the paper's 40 epochs assume 300, so a short run warms up
  for the same 13% instead of never leaving warmup. All schedules are functions of the step.
- Crops are cut for the whole batch on the device (grid_sample, bilinear, no antialiasing: little matters at the
  <= 1.14x downscale of 256 -> 224). The target encoder runs in eval mode (no dropout: the same values).
- No GradScaler (bf16 needs none). One host sync per --log-every steps and before each checkpoint (loss all-reduce,
  NaN guard, JSONL lines), so a checkpoint never holds weights that saw a non-finite loss.

SALT / US-JEPA (--teacher PATH): the target encoder is any pretext checkpoint (e.g. a short MAE run), frozen (eval,
no gradient, no EMA); loss = L1 to its final-normed patch tokens, no extra layer norm (SALT; stable-pretraining
salt.py). The predictor projects to its width, so sizes may differ; its patch size must equal --patch-size. It sees
this --img-size (sincos/RoPE exact on any grid, learned positions interpolated), normalised with its own mean/std
(gray repeated for RGB), prefix tokens dropped. The saved `encoder` is then the student.

SIGReg (--sigreg LAMBDA; lejepa epps_pulley.py, slicing.py): the Epps-Pulley statistic of 1024 random 1-D projections,
redrawn each step from (seed, step) alike on all ranks, ECF means all-reduced with gradient (the global batch's). It
regularises z = the mean of the student's context tokens, one vector per image: LeJEPA's argument is about per-sample
embeddings (one per view), the context is I-JEPA's only student view, the mean-pooled patch embedding is what the
probes read, and the EMA teacher follows the student; per-token SIGReg would treat ~150 correlated tokens of an image
as independent samples and push them apart. Loss = (1 - lambda) * prediction + lambda * SIGReg (LeJEPA Algorithm 1).
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
        self.root, self.C, self.L, self.stacks = cfg.data, cfg.in_chans, L, {}    # .npy stacks, mapped on first use
        if not cfg.data:
            try:
                from prep.synthetic import ultrasound_frames
            except ImportError:
                raise SystemExit("ijepa.py: no --data, and prep/ is not beside it; pass --data DIR of frames") from None
            self.stacks[0] = ultrasound_frames(cfg.synthetic_frames, size=L, seed=cfg.seed)   # (n, L, L)
            rel, pages = ["synthetic"], np.array([len(self.stacks[0])])
        else:
            rel = sorted(os.path.relpath(os.path.join(r, n), cfg.data) for r, _, names in
                         os.walk(cfg.data, followlinks=True) for n in names if n.lower().endswith(EXTS))
            if not rel:
                why = f"no {'/'.join(EXTS)} files under it" if os.path.isdir(cfg.data) else "no such directory"
                raise SystemExit(f"{cfg.data}: {why}; pass --data the folder that holds your frames")
            pages = np.array([self.count(os.path.join(cfg.data, r)) for r in rel])
        self.paths = np.array([r.encode() for r in rel])    # bytes array: no per-path Python objects in workers
        self.index = np.stack([np.repeat(np.arange(len(rel)), pages),                         # (N, 2): file, page
                               np.arange(pages.sum()) - np.repeat(np.cumsum(pages) - pages, pages)], 1)

    @staticmethod
    def count(path):
        """Frames in one file: tif pages, .npy rows (checked); 1 for png/jpg/bmp (not opened) and unreadable files."""
        try:
            if path.endswith(".npy"):
                a = np.load(path, mmap_mode="r")
            elif path.lower().endswith((".tif", ".tiff")):
                with Image.open(path) as im:
                    return getattr(im, "n_frames", 1)
            else:
                return 1
        except Exception:
            return 1                                     # unreadable: one frame that fails (and is reported) later
        if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (1, 3, 4)):
            raise SystemExit(f"{path}: a {a.dtype} {a.shape} stack; save frames as uint8 (N, H, W) or (N, H, W, C)")
        return len(a)

    def __len__(self):
        return len(self.index)

    def name(self, i):
        f, page = self.index[i]
        return os.path.join(self.root, self.paths[f].decode()) + (f"[{page}]" if page else "")

    def load(self, i):
        f, page = (int(v) for v in self.index[i])
        path = os.path.join(self.root, self.paths[f].decode())
        try:
            if f in self.stacks or path.endswith(".npy"):
                if f not in self.stacks:                                     # memory-mapped once per worker
                    self.stacks[f] = np.load(path, mmap_mode="r")
                im = Image.fromarray(np.ascontiguousarray(self.stacks[f][page]).squeeze())
            else:
                with Image.open(path) as fp:
                    fp.seek(page)
                    im = fp.copy()
            if im.mode.startswith("I") or im.mode == "F":    # 16-bit by /257: full range, no per-frame stretch
                a = np.asarray(im, dtype=np.float32) * (255 if im.mode == "F" else 1 / 257)   # float: [0, 1]
                im = Image.fromarray((a.clip(0, 255) + 0.5).astype(np.uint8))
            im = im.convert("L" if self.C == 1 else "RGB")          # RGB -> gray by PIL's "L"; gray repeated
            sq = Image.new(im.mode, (max(im.size),) * 2)            # pad to a square with black, centred: an
            sq.paste(im, ((sq.width - im.width) // 2, (sq.height - im.height) // 2))  # ultrasound fan keeps its shape
            a = np.asarray(sq.resize((self.L, self.L), Image.BILINEAR)).reshape(self.L, self.L, -1)   # (L, L, C)
            return torch.from_numpy(a.transpose(2, 0, 1).copy())                                     # (C, L, L)
        except Exception:
            return None


def data_stats(frames, cfg, master):
    """Per-channel mean/std in [0, 1] units: DIR/stats.json (written by prep), else computed on the master rank from
    up to 2000 frames, written to DIR/stats.json (or --out/stats.json when DIR is read-only) and broadcast."""
    paths = [os.path.join(d, "stats.json") for d in (cfg.data, cfg.out)] if cfg.data else []
    C, stats, p = cfg.in_chans, None, next(filter(os.path.isfile, paths), None)   # DIR's stats.json, else --out's
    if p:
        try:
            s = json.load(open(p))
            ok = len(s["mean"]) in (1, C) and len(s["std"]) == len(s["mean"]) and min(s["std"]) > 0
        except (ValueError, KeyError, TypeError):                    # not JSON, not a dict, no mean / std
            ok = False
        if not ok:
            raise SystemExit(f"{p}: needs {{\"mean\": [...], \"std\": [...]}} with {C} values each for --in-chans {C} "
                             f"(or 1, used for every channel), std > 0; fix it, or delete it to recompute")
        stats = [s["mean"] * (C // len(s["mean"])), s["std"] * (C // len(s["std"]))]   # 1 value: a gray dataset
    if stats is None and master:
        ids = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), 2000)).astype(np.int64))
        xs = (x.reshape(C, -1).double() / 255 for x in map(frames.load, tqdm(ids, desc="mean/std")) if x is not None)
        moments = [torch.stack([x.mean(1), x.square().mean(1)]) for x in xs]   # (2, C) per decodable frame
        if not moments:
            raise SystemExit(f"{cfg.data}: none of {len(ids)} sampled frames could be decoded; check the files")
        m1, m2 = torch.stack(moments).mean(0)
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
    box = [stats]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)                       # rank 0's stats to every rank
    return box[0]


def rrc_theta(rng, n, L, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop boxes (torchvision's 10 tries, then the full image) as affine_grid thetas (n, 2, 3)."""
    area = L * L * rng.uniform(*scale, (n, 10))
    ar = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, 10)))
    w, h = np.round(np.sqrt(area * ar)), np.round(np.sqrt(area / ar))                  # (n, 10)
    ok = (w > 0) & (w <= L) & (h > 0) & (h <= L)
    w, h = (np.where(ok.any(1), v[np.arange(n), ok.argmax(1)], L) for v in (w, h))     # the first try that fits
    top, left = np.floor(rng.random(n) * (L - h + 1)), np.floor(rng.random(n) * (L - w + 1))
    # output pixel centre u in [-1, 1] -> input (align_corners=False): x = w/L * u + (2 left + w - L)/L
    theta = np.stack([w, 0 * w, 2 * left + w - L, 0 * h, h, 2 * top + h - L], 1) / L                # (n, 6)
    return theta.reshape(n, 2, 3).astype(np.float32)                                              # (n, 2, 3)


def crop_normalize(imgs, theta, size, mean, std):
    """uint8 (B, C, L, L) + thetas (B, 2, 3) -> normalised float (B, C, size, size), bilinear, on imgs' device."""
    grid = F.affine_grid(theta, (imgs.shape[0], imgs.shape[1], size, size), align_corners=False)
    x = F.grid_sample(imgs.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x / 255 - mean) / std


def block_size(g, scale, aspect, H, W, fix):
    """official multiblock.py:55-72: one draw r sets both scale and aspect ratio (unless fix), h/w < H/W."""
    r = torch.rand(1, generator=g).item()
    s = scale[0] + r * (scale[1] - scale[0])
    r = torch.rand(1, generator=g).item() if fix else r             # official: the same r for the aspect ratio
    ar = aspect[0] + r * (aspect[1] - aspect[0])
    keep = int(H * W * s)
    h, w = int(round(math.sqrt(keep * ar))), int(round(math.sqrt(keep / ar)))
    return min(h, H - (not fix)), min(w, W - (not fix))   # official `while h >= H: h -= 1` (exclusive randint)


def multiblock(B, H, W, step, rank, cfg):
    """The official multiblock collator (multiblock.py:112-170) -> masks_enc (B, Nctx), masks_pred (M, B, Ntgt),
    row-major patch indices: one target and one context size per batch, M (overlapping) targets per image, one context
    block outside them (one constraint fewer after every 20 failed tries), contexts cut to the batch's shortest."""
    g = torch.Generator().manual_seed(cfg.seed * 2 ** 32 + step)      # seed 0: the official counter value
    fix, M = int(cfg.fix_masks), cfg.npred
    ph, pw = block_size(g, cfg.pred_scale, cfg.aspect, H, W, fix)
    eh, ew = block_size(g, cfg.enc_scale, (1.0, 1.0), H, W, fix)
    if min(ph * pw, eh * ew) <= cfg.min_keep:
        raise SystemExit(f"--img-size {H * cfg.patch_size}: {ph}x{pw} target / {eh}x{ew} context blocks on its {H}x{W} "
                         f"patch grid, not more than --min-keep {cfg.min_keep}; raise --img-size or lower --min-keep")
    rng = np.random.default_rng([cfg.seed, rank, step, 1])
    ys, xs = np.arange(H)[:, None], np.arange(W)

    def box(top, left, h, w):                                          # (...,) corners -> (..., H, W) bool
        top, left = top[..., None, None], left[..., None, None]
        return (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)

    top, left = rng.integers(0, H - ph + fix, (B, M)), rng.integers(0, W - pw + fix, (B, M))
    tgt = box(top, left, ph, pw)                                       # (B, M, H, W)
    masks_pred = np.nonzero(tgt.reshape(B * M, H * W))[1].reshape(B, M, ph * pw)   # row-major within each block
    allowed = ~np.stack([tgt[:, :k].any(1) for k in range(M + 1)], 1)   # (B, M + 1, H, W): outside the first k
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
    """Item bi = batch bi of this rank's shard (perm seeded by (seed, epoch), rank r takes perm[r::world]), decoded,
    with crop thetas and masks (seeded by (seed, rank, step): independent of --num-workers and resuming)."""

    def __init__(self, frames, cfg, rank, world, epoch, ipe, b):
        self.frames, self.cfg, self.rank, self.epoch, self.ipe, self.b = frames, cfg, rank, epoch, ipe, b
        self.shard = np.random.default_rng([cfg.seed, epoch]).permutation(len(frames))[rank::world]

    def __getitem__(self, bi):
        cfg, step, ids = self.cfg, self.epoch * self.ipe + bi, self.shard[bi * self.b:(bi + 1) * self.b]
        loaded = [self.frames.load(i) for i in ids]
        imgs = [x for x in loaded if x is not None]
        bad = [self.frames.name(i) for i, x in zip(ids, loaded) if x is None]
        if not imgs:
            return dict(n=0, bad=bad)
        grid = cfg.img_size // cfg.patch_size
        masks_enc, masks_pred = multiblock(len(imgs), grid, grid, step, self.rank, cfg)
        theta = rrc_theta(np.random.default_rng([cfg.seed, self.rank, step, 0]), len(imgs), self.frames.L,
                          cfg.crop_scale)
        return dict(n=len(imgs), bad=bad, imgs=torch.stack(imgs), theta=torch.from_numpy(theta),
                    masks_enc=masks_enc, masks_pred=masks_pred)

# -----------------------------------------------------------------------------
# model (the student is vit.ViT without CLS; the official predictor on vit.Block), SIGReg, schedules, one step


class Predictor(nn.Module):
    """official vision_transformer.py:220-326 (same names): context tokens -> predicted target tokens, each of the M
    blocks in its own sequence [context ; its Nt mask tokens + positions], block-major: blocks never see each other."""

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


class AllReduceMean(torch.autograd.Function):
    """Mean over ranks in forward and backward (LeJEPA utils.all_reduce): DDP then gets the global gradient."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x / dist.get_world_size()

    backward = forward                                               # the mean of the ranks' gradients


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


def build(cfg, device):
    """-> model (student + predictor), teacher, teacher input affine (a, b) or None, optimizer."""
    if (cfg.img_size % cfg.patch_size or 0 < cfg.load_size < cfg.img_size or cfg.in_chans not in (1, 3)
            or cfg.seed < 0 or cfg.size not in vit.SIZES):
        raise SystemExit(f"ijepa.py: pass an --img-size that is a multiple of --patch-size and <= --load-size (or "
                         f"--load-size 0), --in-chans 1 or 3, --seed >= 0, --size one of {sorted(vit.SIZES)}")
    cuda = str(device).startswith("cuda")              # TF32; autotuned fixed-shape patch-embedding conv (train.py)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = cuda
    multiblock(1, cfg.img_size // cfg.patch_size, cfg.img_size // cfg.patch_size, 0, 0, cfg)   # bad masks stop here
    torch.manual_seed(cfg.seed)                                      # the same initial weights on every rank
    student = vit.ViT(vit.vit_config(cfg.size, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                     depth=cfg.depth or vit.SIZES[cfg.size][1], cls_token=False, pos_embed="sincos"))
    if cfg.teacher:
        if not os.path.isfile(cfg.teacher):
            raise SystemExit(f"{cfg.teacher}: no such checkpoint; pass --teacher a pretext .safetensors checkpoint")
        teacher, meta = vit.load_encoder(cfg.teacher)
        if teacher.cfg.patch_size != cfg.patch_size or teacher.cfg.in_chans not in (cfg.in_chans, 3):
            raise SystemExit(f"{cfg.teacher}: patch {teacher.cfg.patch_size}, {teacher.cfg.in_chans} channels; the "
                             f"patch sizes must match (tokens line up) and the channels (RGB also serves --in-chans 1)")
        affine = tuple(torch.tensor(meta[k], device=device).view(1, -1, 1, 1) for k in ("mean", "std"))
    else:
        teacher, affine = copy.deepcopy(student), None               # train.py:169
    model = IJEPA(student, Predictor(student.cfg.embed_dim, teacher.cfg.embed_dim, cfg.img_size // cfg.patch_size,
                                     cfg.pred_dim, cfg.pred_depth, cfg.pred_heads)).to(device)
    teacher.to(device).eval().requires_grad_(False)
    ps = [p for p in model.parameters() if p.requires_grad]          # helper.py:107-137: no WD on biases / norms
    opt = torch.optim.AdamW([dict(params=[p for p in ps if p.ndim > 1]),
                             dict(params=[p for p in ps if p.ndim == 1], weight_decay=0.0, wd_exclude=True)],
                            lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=cuda)
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
    return ((x * std + mean).expand(-1, affine[0].shape[1], -1, -1) - affine[0]) / affine[1]   # (B, C_teacher, H, W)

# -----------------------------------------------------------------------------
# training, and the training-step benchmark (bench.py train --method ijepa)


def train(cfg):
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if ddp and cuda else cfg.device or ("cuda" if cuda else "cpu")
    on_cuda, master = device.startswith("cuda"), rank == 0
    if on_cuda:
        torch.cuda.set_device(device)
    ckpt, log_path = os.path.join(cfg.out, "ckpt.safetensors"), os.path.join(cfg.out, "log.jsonl")
    if os.path.exists(ckpt) and not cfg.resume:
        raise SystemExit(f"{ckpt} exists; pass --resume {ckpt} to continue that run, or choose another --out")
    if cfg.batch_size % world:
        raise SystemExit(f"ijepa.py: --batch-size {cfg.batch_size} is not divisible by the {world} ranks; change it")
    b = cfg.batch_size // world
    os.makedirs(cfg.out, exist_ok=True)
    frames = Frames(cfg, cfg.load_size or round(cfg.img_size * 8 / 7))
    mean, std = data_stats(frames, cfg, master)
    ipe = len(frames) // world // b                                   # steps per epoch (drop_last)
    if ipe == 0:
        raise SystemExit(f"{cfg.data or 'ijepa.py'}: {len(frames)} frames cannot fill one batch; lower --batch-size")
    total, warmup = ipe * cfg.epochs, warmup_steps(cfg, ipe)
    stop = min(total, cfg.max_steps) if cfg.max_steps else total
    model, teacher, affine, opt = build(cfg, device)
    torch.manual_seed(cfg.seed + rank)                                # per-rank RNG from here on
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    start = 0
    if cfg.resume:
        if not os.path.isfile(cfg.resume):
            raise SystemExit(f"{cfg.resume}: no such checkpoint; pass --resume OUT/ckpt.safetensors of the run")
        t, meta = vit.load_checkpoint(cfg.resume)
        st, was = meta["state"] or {}, meta["args"] or {}
        diff = [f"--{k.replace('_', '-')} {was.get(k)!r}" for k in ("size", "depth", "patch_size", "img_size",
                "in_chans", "pred_depth", "pred_dim", "pred_heads", "teacher") if was.get(k) != getattr(cfg, k)]
        if meta["method"] != "ijepa" or "skel" not in st or diff or (st["ipe"], st["frames"]) != (ipe, len(frames)):
            raise SystemExit(f"{cfg.resume}: saved by {meta['method']}.py, {', '.join(diff) or 'other data/ranks'}; "
                             f"--resume continues an ijepa.py run as it was (--teacher takes any checkpoint)")
        sub = lambda pre: {k[len(pre):]: v for k, v in t.items() if k.startswith(pre)}   # noqa: E731
        model.encoder.load_state_dict(sub("encoder." if cfg.teacher else "student."))
        model.predictor.load_state_dict(sub("predictor."))
        if not cfg.teacher:
            teacher.load_state_dict(sub("encoder."))
        s = vit.unpack_state(st["skel"], t)                          # optimizer and RNG states
        opt.load_state_dict(s["opt"])
        rng, start = s["rng"], st["step"]
        if master:                                                    # rank 0's generators (the only ones saved)
            torch.set_rng_state(rng["torch"])
            if on_cuda and rng["cuda"] is not None:
                torch.cuda.set_rng_state(rng["cuda"])
            np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], np.uint32), *rng["numpy"][2:]))
            random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    if master and os.path.exists(log_path):                           # drop lines logged after the checkpoint
        keep = [ln for ln in open(log_path) if ln.strip() and json.loads(ln)["step"] <= start]
        with open(log_path, "w") as f:
            f.writelines(keep)
    fwd = nn.parallel.DistributedDataParallel(model, static_graph=True) if ddp else model   # inputs already on device
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()
    mean_t, std_t = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))
    if master:
        n = sum(p.numel() for g in opt.param_groups for p in g["params"]) / 1e6
        print(f"ijepa: {len(frames)} frames, {ipe} steps/epoch x {cfg.epochs} epochs (warmup {warmup}), {world} x "
              f"batch {b} on {device}, {n:.1f}M trainable, teacher {cfg.teacher or 'EMA'}, SIGReg {cfg.sigreg}")
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
            dist.all_reduce(v)                                        # losses and unreadable counts of all ranks
        *vals, n_img, seen, n_bad = v.tolist()                        # 3 values per step, then the 3 counts
        vals = np.array(vals).reshape(-1, 3) / world                  # (steps, 3) means over ranks
        ips, lines = n_img / max(time.time() - t0, 1e-9), []
        for (loss, lp, sr), (s, epoch, lr, wd, m) in zip(vals, rows):
            if not math.isfinite(loss):
                raise SystemExit(f"step {s}: loss is {loss}")
            extra = ({} if cfg.teacher else dict(momentum=m)) | (dict(loss_pred=lp, sigreg=sr) if cfg.sigreg else {})
            lines.append(json.dumps(dict(step=s, epoch=epoch, loss=loss, lr=lr, wd=wd, **extra, img_per_s=ips)) + "\n")
            history.append(float(loss))
        if master:
            with open(log_path, "a") as f:
                f.writelines(lines)
            bar.update(len(rows))
            bar.set_postfix(loss=f"{vals[-1][0]:.4f}", lr=f"{rows[-1][2]:.2e}", img_s=f"{ips:.0f}")
        if seen >= 100 and n_bad > 0.01 * seen:
            raise SystemExit(f"{cfg.data}: {int(n_bad)} of the first {int(seen)} frames could not be decoded (> 1%), "
                             f"e.g. {bad_files[:5] or 'on another rank'}; fix or remove them")
        buf, rows, counts[0], t0 = [], [], 0, time.time()

    def save(step):
        flush()                                                       # stops on a non-finite loss: nothing saved
        if not master:
            return
        npst = np.random.get_state()
        rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if on_cuda else None,
                   numpy=[npst[0], npst[1].tolist(), *npst[2:]], python=random.getstate())
        tensors, skel = vit.pack_state(dict(opt=opt.state_dict(), rng=rng), "state")   # + a JSON-able skeleton
        tensors.update({f"predictor.{k}": v for k, v in model.predictor.state_dict().items()})
        tensors.update({} if cfg.teacher else {f"student.{k}": v for k, v in model.encoder.state_dict().items()})
        state = dict(skel=skel, step=step, epoch=step // ipe, batch=step % ipe, ipe=ipe, frames=len(frames))
        vit.save_checkpoint(ckpt, model.encoder if cfg.teacher else teacher, method="ijepa", pool="mean",
                            mean=mean, std=std, args=asdict(cfg), step=step, tensors=tensors, state=state)

    step = start
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
                raise SystemExit(f"{cfg.data}: no frame of a batch could be decoded ({batch['bad'][:3]}); fix them")
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
            if step == stop or cfg.save_every and step % cfg.save_every == 0:
                save(step)
            if step == stop:
                break
    bar.close()
    if master:
        print(f"saved {ckpt} at step {step}")
    if ddp:         # gloo can deadlock destroying a group whose worker still frees a Python-owned tensor: wait for it
        dist.barrier()
        dist.destroy_process_group()
    return dict(losses=history, model=model, teacher=teacher, step=step)


def benchmark(cfg, steps=20, warmup=5):
    """Training steps per second on a synthetic uint8 batch already on the device (masks made ahead, as the
    workers would): -> dict(img_per_s, flops_per_img, context_tokens), FLOPs = 3x forward for the trained parts."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, teacher, affine, opt = build(cfg, device)
    B, L, grid = cfg.batch_size, cfg.load_size or round(cfg.img_size * 8 / 7), cfg.img_size // cfg.patch_size
    imgs = torch.randint(0, 256, (B, cfg.in_chans, L, L), dtype=torch.uint8, device=device)
    batches = [(torch.from_numpy(rrc_theta(np.random.default_rng([cfg.seed, i]), B, L, cfg.crop_scale)).to(device),
                *[t.to(device) for t in multiblock(B, grid, grid, i, 0, cfg)]) for i in range(8)]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        theta, masks_enc, masks_pred = batches[i % len(batches)]
        x = crop_normalize(imgs, theta, cfg.img_size, 0.2, 0.25)     # any mean / std: the same work
        train_step(cfg, i, model, model, teacher, opt, x, teacher_input(x, affine, 0.25, 0.2), masks_enc,
                   masks_pred, 0.996, amp)
    sync()
    dt = time.perf_counter() - t0
    vit_flops = lambda n, D, depth: depth * (24 * n * D * D + 4 * n * n * D)  # noqa: E731 forward matmuls, n tokens
    D, Dt, Dp, N = model.encoder.cfg.embed_dim, teacher.cfg.embed_dim, cfg.pred_dim, grid * grid
    pe = 2 * cfg.in_chans * cfg.patch_size ** 2                       # patch embedding, per patch and out channel
    fl, nc = [], [me.shape[1] for _, me, _ in batches]
    for _, me, mp in batches:
        (M, _, nt), n = mp.shape, me.shape[1]
        student = vit_flops(n, D, model.encoder.cfg.depth) + pe * N * D
        pred = M * vit_flops(n + nt, Dp, cfg.pred_depth) + 2 * n * D * Dp + 2 * M * nt * Dp * Dt
        fl.append(3 * (student + pred) + vit_flops(N, Dt, teacher.cfg.depth) + pe * N * Dt)
    return dict(img_per_s=B * steps / dt, flops_per_img=float(np.mean(fl)), context_tokens=float(np.mean(nc)))


if __name__ == "__main__":
    train(parse_args())
