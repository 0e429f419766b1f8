"""I-JEPA pretraining of a ViT ("Self-Supervised Learning from Images with a Joint-Embedding
Predictive Architecture", Assran et al., CVPR 2023), with the SALT / US-JEPA frozen teacher and
LeJEPA's SIGReg.

The student encoder sees one context block; a narrow predictor, given its tokens and the positions
of 4 target blocks, predicts the target encoder's tokens there (one sequence per block). Nothing is
reconstructed in pixels.

    python ijepa.py --data us_frames/ --out runs/ijepa                      # 1 GPU (or CPU)
    torchrun --standalone --nproc_per_node=8 ijepa.py --data us_frames/     # 8 GPUs on one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=ijepa --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 ijepa.py --data us_frames/               # 2 nodes: run on both
    python ijepa.py --data us_frames/ --teacher runs/mae/ckpt.safetensors \\
        --out runs/usjepa                                                   # SALT / US-JEPA
    python ijepa.py --data us_frames/ --sigreg 0.05 --out runs/sigreg   # + SIGReg (0.D.4)
    python ijepa.py --data us_frames/ --resume runs/ijepa/ckpt.safetensors  # continue, same flags
    python ijepa.py --size vit_tiny --img-size 64 --epochs 2                # no --data: synthetic

Writes OUT/ckpt.safetensors (`encoder.*`, pool "mean" as there is no CLS token, is the target
encoder, or the student with a frozen teacher; the student, predictor, AdamW state, data position
and RNG states are there for --resume), OUT/init.safetensors (that encoder before any update: the
run's random twin), OUT/log.jsonl (a line per step; the collapse diagnostic every --diag-every
steps) and OUT/stats.json when it computes the normalisation. `--help` lists every flag with its
meaning and default.

Defaults: the paper's ViT-S/16 recipe (Pretext Matters, Table 4) on the official code
(facebookresearch/ijepa@52c1ae9): targets = F.layer_norm of the EMA teacher's final-normed tokens,
smooth-L1 (the paper says L2; train.py:295-313 uses smooth-L1), EMA 0.996 -> 1, LR 2e-4 -> 1e-3 ->
cosine 1e-6, cosine WD 0.04 -> 0.4 (none on biases and norms), AdamW, bf16 autocast, no flips.

What differs from the official code, and why:
- Masks keep the official quirks by default (one random number sets both scale and aspect ratio; an
  exclusive bound on positions, so at 224/16 the context is always the top-left 13x13 and the last
  row and column are never used; ijepa PRs #40/#59) so runs match the paper's setup; --fix-masks
  corrects both. Sizes come from (seed, step), as the official shared counter, positions and crops
  from (seed, rank, step): independent of --num-workers and resuming.
- Warmup = min(--warmup-epochs, --warmup-frac x --epochs): the paper's 40 epochs assume 300, so a
  short run warms up for the same 13% instead of never leaving warmup. All schedules are functions
  of the step.
- Frames are padded to a square with black (an ultrasound fan keeps its aspect ratio) and resized in
  the workers (PIL bicubic); crops are then cut for the whole batch on the device (grid_sample,
  bilinear, as torchvision's default, no antialiasing: little matters at the <= 1.14x downscale of
  256 -> 224). The target encoder runs in eval mode (no dropout: the same values).
- No GradScaler (bf16 needs none). One host sync per --log-every steps and before each checkpoint
  (loss all-reduce, NaN guard, JSONL lines), so a checkpoint never holds weights that saw a
  non-finite loss.
- An unreadable frame is replaced by a readable one of its batch and reported (official: the loader
  stops); more than 1% of them in the first epoch stop the run.

SALT / US-JEPA (--teacher PATH): the target encoder is any pretext checkpoint (e.g. a short MAE
run), frozen (eval, no gradient, no EMA); loss = L1 to its final-normed patch tokens, no extra layer
norm (SALT; stable-pretraining salt.py). The predictor projects to its width, so sizes may differ;
its patch size must equal --patch-size. It sees this --img-size (sincos/RoPE exact on any grid,
learned positions interpolated), normalised with its own mean/std (gray repeated for RGB), prefix
tokens dropped. The saved `encoder` is then the student. The teacher is pinned: its sha256, method
and step go into the checkpoint, and --resume refuses a teacher file whose weights changed since (a
teacher run that went on training in place); this run's own checkpoint is refused as its teacher,
however its path is spelled.

SIGReg (--sigreg LAMBDA; lejepa epps_pulley.py, slicing.py): the Epps-Pulley statistic of 1024
random 1-D projections, redrawn each step from (seed, step) alike on all ranks, ECF means
all-reduced with gradient (the global batch's). It regularises z = the mean of the student's context
tokens, one vector per image: LeJEPA's argument is about per-sample embeddings (one per view), the
context is I-JEPA's only student view, the mean-pooled patch embedding is what the probes read, and
the EMA teacher follows the student; per-token SIGReg would treat ~150 correlated tokens of an image
as independent samples and push them apart. Loss = (1 - lambda) * prediction + lambda * SIGReg
(LeJEPA Algorithm 1).

The file reads top to bottom: the config, the crops and masks, the model, SIGReg, the schedules, one
training step and the training loop; then the plumbing mae.py, dino.py and ijepa.py share, copied
verbatim from mae.py (DEVELOPERS.md; tests/check_copies.py keeps the copies identical).
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
from vit import Block, sincos_2d

METHOD = "ijepa"  # the names the shared plumbing below expects every method file to define
POOL = "mean"  # the checkpoint's pooling: no CLS token, probe.py averages the patches
# the method flags --resume must find as they were
ARCH_FLAGS = ("pred_depth", "pred_dim", "pred_heads")

# -----------------------------------------------------------------------------
# config: every knob; defaults = paper Table 4 + the official configs; --help from the comments


@dataclass
class Config:
    # data
    data: str = ""                   # folder of frames (png/jpg/bmp/tif incl. 16-bit and
                                     # multi-page, .npy stacks); "" = synthetic ultrasound from
                                     # prep/synthetic.py
    in_chans: int = 1                # 1 = grayscale (ultrasound), 3 = RGB (H&E)
    img_size: int = 224              # side of the training crops (px)
    load_size: int = 0               # each frame is decoded to this square; 0 = img_size * 8 // 7
    synthetic_frames: int = 1024     # frames of synthetic ultrasound without --data
    num_workers: int = 8             # data loader processes per rank
    crop_scale: tuple = (0.3, 1.0)   # RandomResizedCrop area range (official transforms.py)
    # model
    size: str = "vit_small"          # ViT size: vit_tiny | vit_small | vit_base
    depth: int = 0                   # ViT blocks; 0 = the size's (12)
    patch_size: int = 16             # patch side (px)
    pred_depth: int = 8              # predictor blocks (paper Table 4; official configs: 12 x 384)
    pred_dim: int = 128              # predictor width
    pred_heads: int = 8              # predictor attention heads
    # masks (official configs)
    npred: int = 4                   # target blocks per image
    pred_scale: tuple = (0.15, 0.2)  # target block area, fraction of the grid
    enc_scale: tuple = (0.85, 1.0)   # context block area, fraction of the grid
    aspect: tuple = (0.75, 1.5)      # target block aspect ratio range
    min_keep: int = 10               # a block needs more than this many patches
    fix_masks: bool = False          # corrected sampler instead of the official one (see the
                                     # docstring)
    # SALT / SIGReg
    teacher: str = ""                # frozen teacher checkpoint (SALT / US-JEPA); "" = EMA teacher
                                     # (I-JEPA)
    sigreg: float = 0.0              # SIGReg weight lambda; 0 = off
    sigreg_slices: int = 1024        # random 1-D projections per step
    # optimisation (per step; an epoch is len(data) // batch_size steps)
    batch_size: int = 128            # global batch, split over the ranks
    epochs: int = 300                # schedule length
    warmup_epochs: float = 40.0      # linear lr warmup from --start-lr
    warmup_frac: float = 40 / 300    # the warmup is at most this fraction of the run
    start_lr: float = 2e-4           # lr at the start of the warmup
    lr: float = 1e-3                 # peak lr
    min_lr: float = 1e-6             # the cosine's end value (official final_lr)
    weight_decay: float = 0.04       # AdamW weight decay at the start (none on biases and norms)
    weight_decay_end: float = 0.4    # weight decay at the end of its cosine (official
                                     # final_weight_decay)
    ema: tuple = (0.996, 1.0)        # target encoder EMA momentum, linear from the first to the
                                     # second
    # run
    out: str = "runs/ijepa"          # run folder: ckpt.safetensors, init.safetensors, log.jsonl,
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
    seed: int = 0                    # seeds weights, data order, crops and masks
    device: str = ""                 # cuda | cpu; "" = cuda when available (torchrun: one GPU per
                                     # process)
    compile: Optional[bool] = None   # torch.compile the forward and loss; unset = on for CUDA, off
                                     # for CPU


def method_errors(cfg):
    """ijepa.py's own checks of the flags (check() below adds the common ones)."""
    errors = []
    if min(cfg.pred_depth, cfg.pred_dim, cfg.pred_heads, cfg.npred, cfg.sigreg_slices) < 1:
        errors.append("--pred-depth, --pred-dim, --pred-heads, --npred and --sigreg-slices must be "
                      ">= 1")
    if not 0 <= cfg.sigreg < 1:
        errors.append(f"--sigreg {cfg.sigreg}: lambda must be in [0, 1)")
    return errors

# -----------------------------------------------------------------------------
# crops and masks: drawn in the loader workers per batch; the crops are cut on the device


def rrc_theta(rng, n, L, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop boxes (torchvision's 10 tries, then the full image) as affine_grid thetas
    (n, 2, 3)."""
    area = L * L * rng.uniform(*scale, (n, 10))
    ar = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, 10)))
    w = np.round(np.sqrt(area * ar))                                                   # (n, 10)
    h = np.round(np.sqrt(area / ar))
    ok = (w > 0) & (w <= L) & (h > 0) & (h <= L)
    w = np.where(ok.any(1), w[np.arange(n), ok.argmax(1)], L)  # the first try that fits
    h = np.where(ok.any(1), h[np.arange(n), ok.argmax(1)], L)
    top = np.floor(rng.random(n) * (L - h + 1))
    left = np.floor(rng.random(n) * (L - w + 1))
    # output pixel centre u in [-1, 1] -> input (align_corners=False): x = w/L * u + (2 left + w -
    # L)/L
    theta = np.stack([w, 0 * w, 2 * left + w - L, 0 * h, h, 2 * top + h - L], 1) / L  # (n, 6)
    return theta.reshape(n, 2, 3).astype(np.float32)  # (n, 2, 3)


def crop_normalize(imgs, theta, size, mean, std):
    """uint8 (B, C, L, L) + thetas (B, 2, 3) -> normalised float (B, C, size, size), bilinear, on
    imgs' device."""
    grid = F.affine_grid(theta, (imgs.shape[0], imgs.shape[1], size, size), align_corners=False)
    x = F.grid_sample(imgs.float(), grid, mode="bilinear", padding_mode="border",
                      align_corners=False)
    return (x / 255 - mean) / std


def block_size(g, scale, aspect, H, W, fix):
    """official multiblock.py:55-72: one draw r sets both scale and aspect ratio (unless fix), h/w <
    H/W."""
    r = torch.rand(1, generator=g).item()
    s = scale[0] + r * (scale[1] - scale[0])
    if fix:
        r = torch.rand(1, generator=g).item()  # official: the same r for the aspect ratio
    ar = aspect[0] + r * (aspect[1] - aspect[0])
    keep = int(H * W * s)
    h = int(round(math.sqrt(keep * ar)))
    w = int(round(math.sqrt(keep / ar)))
    # official `while h >= H: h -= 1` (exclusive randint)
    return min(h, H - (not fix)), min(w, W - (not fix))


def multiblock(B, H, W, step, rank, cfg):
    """The official multiblock collator (multiblock.py:112-170) -> masks_enc (B, Nctx), masks_pred
    (M, B, Ntgt), row-major patch indices: one target and one context size per batch, M
    (overlapping) targets per image, one context block outside them (one constraint fewer after
    every 20 failed tries), contexts cut to the batch's shortest."""
    # seed 0: the official counter value
    g = torch.Generator().manual_seed(cfg.seed * 2 ** 32 + step)
    fix = int(cfg.fix_masks)
    M = cfg.npred
    ph, pw = block_size(g, cfg.pred_scale, cfg.aspect, H, W, fix)
    eh, ew = block_size(g, cfg.enc_scale, (1.0, 1.0), H, W, fix)
    if min(ph * pw, eh * ew) <= cfg.min_keep:
        raise SystemExit(f"--img-size {H * cfg.patch_size}: {ph}x{pw} target / {eh}x{ew} context "
                         f"blocks on its {H}x{W} patch grid, not more than --min-keep "
                         f"{cfg.min_keep}; raise --img-size or lower --min-keep")
    rng = np.random.default_rng([cfg.seed, rank, step, 1])
    ys = np.arange(H)[:, None]
    xs = np.arange(W)

    def box(top, left, h, w):  # (...,) corners -> (..., H, W) bool
        top = top[..., None, None]
        left = left[..., None, None]
        return (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)

    top = rng.integers(0, H - ph + fix, (B, M))
    left = rng.integers(0, W - pw + fix, (B, M))
    tgt = box(top, left, ph, pw)                                       # (B, M, H, W)
    # (B, M, ph*pw) patch indices, row-major within a block
    masks_pred = np.nonzero(tgt.reshape(B * M, H * W))[1].reshape(B, M, ph * pw)
    # (B, M + 1, H, W): outside the first k
    allowed = ~np.stack([tgt[:, :k].any(1) for k in range(M + 1)], 1)
    ctx = np.zeros((B, H, W), bool)
    n_con = np.full(B, M)  # target constraints still applied
    fails = np.zeros(B, np.int64)
    todo = np.arange(B)
    while todo.size:
        top = rng.integers(0, H - eh + fix, todo.size)
        left = rng.integers(0, W - ew + fix, todo.size)
        c = box(top, left, eh, ew)                                     # (todo, H, W)
        c &= allowed[todo, n_con[todo]]
        ok = c.sum((1, 2)) > cfg.min_keep  # official: strictly more than min_keep
        ctx[todo[ok]] = c[ok]
        todo = todo[~ok]
        fails[todo] += 1
        drop = todo[fails[todo] % 20 == 0]  # "decreasing acceptable-regions"
        n_con[drop] = np.maximum(n_con[drop] - 1, 0)
    n = ctx.reshape(B, -1).sum(1).min()  # the batch's shortest context: (B, H*W) -> count
    # (B, n): the first n context patches of each image, row-major
    masks_enc = np.argsort(~ctx.reshape(B, -1), axis=1, kind="stable")[:, :n]
    masks_pred = np.ascontiguousarray(masks_pred.transpose(1, 0, 2))    # (M, B, Ntgt)
    return torch.from_numpy(masks_enc), torch.from_numpy(masks_pred)


def batch_extras(cfg, n, step, rank):
    """In the loader workers, for a batch of n frames: its crop thetas and masks, seeded by (seed,
    rank, step), so independent of --num-workers and of resuming."""
    grid = cfg.img_size // cfg.patch_size
    masks_enc, masks_pred = multiblock(n, grid, grid, step, rank, cfg)
    rng = np.random.default_rng([cfg.seed, rank, step, 0])
    theta = rrc_theta(rng, n, load_size(cfg), cfg.crop_scale)
    return {"theta": torch.from_numpy(theta), "masks_enc": masks_enc, "masks_pred": masks_pred}

# -----------------------------------------------------------------------------
# model (the student is vit.ViT without CLS; the official predictor on vit.Block), SIGReg,
# schedules, one step


class Predictor(nn.Module):
    """official vision_transformer.py:220-326 (same names): context tokens -> predicted target
    tokens, each of the M blocks in its own sequence [context ; its Nt mask tokens + positions],
    block-major: blocks never see each other."""

    def __init__(self, enc_dim, out_dim, grid, dim=128, depth=8, heads=8):
        super().__init__()
        self.predictor_embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = sincos_2d(dim, grid, grid)[None]                             # (1, N, d)
        self.predictor_pos_embed = nn.Parameter(table, requires_grad=False)
        blocks = [Block(dim, heads, qkv_bias=True, ln_eps=1e-6) for _ in range(depth)]
        self.predictor_blocks = nn.ModuleList(blocks)
        self.predictor_norm = nn.LayerNorm(dim, eps=1e-6)
        self.predictor_proj = nn.Linear(dim, out_dim)  # to the TARGET width (the teacher's)
        for m in self.modules():  # official effective init (src/helper.py:86-99)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, z, masks_enc, masks_pred):
        B, Nc, _ = z.shape
        M, _, Nt = masks_pred.shape
        pos = self.predictor_pos_embed[0]                                    # (N, d)
        x = self.predictor_embed(z) + pos[masks_enc]                         # (B, Nc, d)
        q = self.mask_token + pos[masks_pred.reshape(M * B, Nt)]  # (M*B, Nt, d), block-major
        x = torch.cat([x.repeat(M, 1, 1), q.to(x.dtype)], dim=1)             # (M*B, Nc + Nt, d)
        for blk in self.predictor_blocks:
            x = blk(x)
        return self.predictor_proj(self.predictor_norm(x[:, Nc:]))           # (M*B, Nt, D_target)


class IJEPA(nn.Module):
    """Student encoder + predictor in one module, so DDP wraps (and all-reduces) them together."""

    def __init__(self, encoder, predictor):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, x, masks_enc, masks_pred):
        # (B, Nc, D) context tokens; pos added, then gathered
        z = self.encoder(x, ids_keep=masks_enc)
        return self.predictor(z, masks_enc, masks_pred), z


class AllReduceMean(torch.autograd.Function):
    """Mean over ranks in forward and backward (LeJEPA utils.all_reduce): DDP then gets the global
    gradient."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x / dist.get_world_size()

    backward = forward  # the mean of the ranks' gradients


def epps_pulley(x, t_max=3.0, n_points=17):
    """(N, S) projected samples -> (S,) Epps-Pulley statistics N*W * int |ECF(t) - exp(-t^2/2)|^2
    exp(-t^2/2) dt over [-t_max, t_max] by the trapezoid rule folded onto t >= 0 (lejepa
    epps_pulley.py:62-99)."""
    t = torch.linspace(0, t_max, n_points, device=x.device, dtype=x.dtype)
    phi = torch.exp(-t.square() / 2)  # N(0, 1) characteristic function
    w = torch.full_like(t, 2 * t_max / (n_points - 1))  # trapezoid weights, doubled for t < 0
    w[0] = t_max / (n_points - 1)  # (int indices: no host-device copy)
    w[-1] = t_max / (n_points - 1)
    xt = x.unsqueeze(-1) * t                                         # (N, S, T)
    c = xt.cos().mean(0)                                             # (S, T) each
    s = xt.sin().mean(0)
    world = 1
    if dist.is_initialized():
        c = AllReduceMean.apply(c)
        s = AllReduceMean.apply(s)
        world = dist.get_world_size()
    return ((c - phi).square() + s.square()) @ (w * phi) * x.shape[0] * world


def sigreg_directions(seed, step, dim, slices, device):
    """(dim, slices) unit directions of step `step`, drawn from (seed, step) alike on every rank."""
    s = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    g = torch.Generator(device=device).manual_seed(s)
    A = torch.randn(dim, slices, generator=g, device=device)
    return A / A.norm(dim=0)


def sigreg(z, A):
    """(N, D) embeddings, (D, S) directions -> the sliced Epps-Pulley statistic, the mean over the S
    slices."""
    return epps_pulley(z.float() @ A).mean()                        # (N, S) projections


def warmup_steps(cfg, ipe):
    return round(min(cfg.warmup_epochs, cfg.warmup_frac * cfg.epochs) * ipe)


def schedules(cfg, step, total, warmup):
    """lr, wd, EMA momentum for iteration `step` (0-based) of `total` (official schedulers.py:
    step() runs before each iteration, so iteration i uses s = i + 1; train.py:228: momentum i-th
    value from ema[0])."""
    s = step + 1
    if s < warmup:
        lr = cfg.start_lr + s / warmup * (cfg.lr - cfg.start_lr)
    else:
        p = (s - warmup) / max(1, total - warmup)
        lr = max(cfg.min_lr, cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * p)))
    end = cfg.weight_decay_end
    wd = end + (cfg.weight_decay - end) * 0.5 * (1 + math.cos(math.pi * s / total))
    wd = max(end, wd) if end <= cfg.weight_decay else min(end, wd)
    return lr, wd, cfg.ema[0] + step * (cfg.ema[1] - cfg.ema[0]) / total


def build(cfg, device):
    """-> model (student + predictor), teacher, teacher input affine (a, b) or None, optimizer."""
    # TF32; autotuned fixed-shape patch-embedding conv (train.py)
    cuda = str(device).startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32 = cuda
    torch.backends.cudnn.allow_tf32 = cuda
    torch.backends.cudnn.benchmark = cuda
    grid = cfg.img_size // cfg.patch_size
    multiblock(1, grid, grid, 0, 0, cfg)  # masks that cannot be drawn stop here
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    depth = cfg.depth or vit.SIZES[cfg.size][1]
    student = vit.ViT(vit.vit_config(cfg.size, img_size=cfg.img_size, patch_size=cfg.patch_size,
                                     in_chans=cfg.in_chans, depth=depth, cls_token=False,
                                     pos_embed="sincos"))
    if cfg.teacher:
        try:
            teacher, meta = vit.load_encoder(cfg.teacher)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--teacher: {e}") from None
        same_patch = teacher.cfg.patch_size == cfg.patch_size
        if not same_patch or teacher.cfg.in_chans not in (cfg.in_chans, 3):
            raise SystemExit(f"{cfg.teacher}: patch {teacher.cfg.patch_size}, "
                             f"{teacher.cfg.in_chans} channels; the patch sizes must match (tokens "
                             f"line up) and the channels (RGB also serves --in-chans 1)")
        affine = tuple(torch.tensor(meta[k], device=device).view(1, -1, 1, 1)    # (1, Ct, 1, 1)
                       for k in ("mean", "std"))
    else:
        teacher = copy.deepcopy(student)                             # train.py:169
        affine = None
    predictor = Predictor(student.cfg.embed_dim, teacher.cfg.embed_dim, grid, cfg.pred_dim,
                          cfg.pred_depth, cfg.pred_heads)
    model = IJEPA(student, predictor).to(device)
    teacher.to(device).eval().requires_grad_(False)
    # src/helper.py:107-137: no WD on biases / norms
    ps = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in ps if p.ndim > 1]),
              dict(params=[p for p in ps if p.ndim == 1], weight_decay=0.0, wd_exclude=True)]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=cuda)
    return model, teacher, affine, opt


def forward_loss(cfg, fwd, teacher, x, x_t, masks_enc, masks_pred, A):
    """Targets, prediction and loss, what --compile compiles -> (3,) [loss, prediction loss,
    sigreg]; A: the SIGReg directions (drawn outside, so that the compiled graph holds no
    host-side generator)."""
    with torch.no_grad():
        h = teacher(x_t)[:, teacher.num_prefix:]  # (B, N, Dt), final-normed
        if not cfg.teacher:
            h = F.layer_norm(h.float(), (h.shape[-1],))  # train.py:297, eps 1e-5
        rows = torch.arange(x.shape[0], device=x.device)[None, :, None]
        h = h[rows, masks_pred].flatten(0, 1)                                 # (M*B, Nt, Dt)
    p, z = fwd(x, masks_enc, masks_pred)  # (M*B, Nt, Dt), (B, Nc, D)
    if cfg.teacher:
        lp = F.l1_loss(p.float(), h.float())
    else:
        lp = F.smooth_l1_loss(p.float(), h.float())
    if not cfg.sigreg:
        return torch.stack([lp, lp, torch.zeros_like(lp)])
    with torch.autocast(x.device.type, enabled=False):                        # SIGReg in fp32
        sr = sigreg(z.float().mean(1), A)
    loss = (1 - cfg.sigreg) * lp + cfg.sigreg * sr
    return torch.stack([loss, lp, sr])


def train_step(cfg, step, fwd, model, teacher, opt, x, x_t, masks_enc, masks_pred, m, amp,
               loss_fn=forward_loss):
    """One optimizer step. -> detached (loss, prediction loss, sigreg) on the device; no host sync.
    """
    A = None
    if cfg.sigreg:
        D = model.encoder.cfg.embed_dim
        A = sigreg_directions(cfg.seed, step, D, cfg.sigreg_slices, x.device)
    with amp:
        terms = loss_fn(cfg, fwd, teacher, x, x_t, masks_enc, masks_pred, A)
    opt.zero_grad(set_to_none=True)
    terms[0].backward()
    opt.step()
    if not cfg.teacher:  # EMA (train.py:332-336)
        with torch.no_grad():
            student = list(model.encoder.parameters())
            torch._foreach_lerp_(list(teacher.parameters()), student, 1 - m)
    return terms.detach()


def teacher_input(x, affine, std, mean):
    """SALT: the images as the teacher was trained to see them (its own mean/std, RGB from gray if
    needed)."""
    if affine is None:
        return x
    # (B, Ct, H, W)
    return ((x * std + mean).expand(-1, affine[0].shape[1], -1, -1) - affine[0]) / affine[1]


def pin_teacher(cfg, run):
    """The frozen teacher's identity {sha256, method, step}; this run's own checkpoint is refused as
    its teacher, compared as files (os.path.samefile), however the path is spelled."""
    if not os.path.isfile(cfg.teacher):
        raise SystemExit(f"{cfg.teacher}: no such checkpoint; pass --teacher a pretext "
                         f".safetensors checkpoint")
    if os.path.isfile(run.ckpt) and os.path.samefile(cfg.teacher, run.ckpt):
        raise SystemExit(f"--teacher {cfg.teacher} is this run's own checkpoint {run.ckpt}: a run "
                         f"cannot be its own frozen teacher; pass the teacher run's checkpoint")
    h = hashlib.sha256()
    with open(cfg.teacher, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    try:
        _, meta = vit.load_checkpoint(cfg.teacher)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--teacher: {e}") from None
    return {"sha256": h.hexdigest(), "method": meta.get("method"), "step": meta.get("step")}

# -----------------------------------------------------------------------------
# training, and the training-step benchmark (bench.py train --method ijepa)


def train_loop(cfg, run):
    """I-JEPA training on this rank (train() below sets up the processes) -> dict(step, losses,
    model, teacher)."""
    frames = open_data(cfg, run)
    ipe = run.steps_per_epoch
    total = ipe * cfg.epochs
    warmup = warmup_steps(cfg, ipe)
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    pin = agree(run, lambda: pin_teacher(cfg, run)) if cfg.teacher else None
    model, teacher, affine, opt = build(cfg, run.device)
    torch.manual_seed(cfg.seed + run.rank)                           # per-rank RNG from here on
    np.random.seed(cfg.seed + run.rank)
    random.seed(cfg.seed + run.rank)
    step = 0
    if cfg.resume:
        tensors, meta = resume(cfg, run, opt, {})
        was = meta["state"].get("teacher")
        if bool(was) != bool(pin):
            raise SystemExit(f"{cfg.resume}: trained "
                             f"{'with --teacher' if was else 'without --teacher'}; resume with the "
                             f"teacher it was trained with")
        if pin and was["sha256"] != pin["sha256"]:
            raise SystemExit(f"--teacher {cfg.teacher}: its weights changed since this run began: "
                             f"sha256 {was['sha256']} ({was['method']} step {was['step']}) then, "
                             f"{pin['sha256']} ({pin['method']} step {pin['step']}) now; pass the "
                             f"teacher file the run was trained with (keep a copy of it), or start "
                             f"a new run")
        load_tensors(model.encoder, tensors, "encoder." if cfg.teacher else "student.", cfg.resume)
        load_tensors(model.predictor, tensors, "predictor.", cfg.resume)
        if not cfg.teacher:
            load_tensors(teacher, tensors, "encoder.", cfg.resume)
        step = meta["step"]
    else:
        frame_stats(frames, cfg, run)
        write_init(cfg, run, model.encoder if cfg.teacher else teacher)
    saved = model.encoder if cfg.teacher else teacher  # the encoder role probe.py reads
    fwd = model
    if run.ddp:
        # inputs already on the device
        fwd = nn.parallel.DistributedDataParallel(model, static_graph=True)
    loss_fn = compiled(forward_loss, cfg, run.device)
    amp = nullcontext()
    if run.device.type == "cuda":
        amp = torch.autocast("cuda", dtype=torch.bfloat16)
    mean = torch.tensor(run.mean, device=run.device).view(1, -1, 1, 1)
    std = torch.tensor(run.std, device=run.device).view(1, -1, 1, 1)
    if run.master:
        n = sum(p.numel() for g in opt.param_groups for p in g["params"]) / 1e6
        print(f"ijepa: {len(frames)} frames, {ipe} steps/epoch x {cfg.epochs} epochs (warmup "
              f"{warmup}), {run.world} x batch {run.per_rank} on {run.device}, {n:.1f}M trainable, "
              f"teacher {cfg.teacher or 'EMA'}, SIGReg {cfg.sigreg}")
    probe = diagnostic_frames(frames, cfg, run)                      # None off the master
    log = Log(cfg, run, step, end)
    if step == 0 and probe is not None:
        lr0 = schedules(cfg, 0, total, warmup)[0]
        log.line({"step": 0, "epoch": 0, "lr": lr0, **collapse_diagnostic(saved, probe, POOL)})
    for batch in log.batches(batches(frames, cfg, run, step) if step < end else []):
        lr, wd, m = schedules(cfg, step, total, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
            group["weight_decay"] = 0.0 if group.get("wd_exclude") else wd
        imgs, theta, masks_enc, masks_pred = (batch[k].to(run.device, non_blocking=True)
                                              for k in ("imgs", "theta", "masks_enc", "masks_pred"))
        x = crop_normalize(imgs, theta, cfg.img_size, mean, std)
        x_t = teacher_input(x, affine, std, mean)
        terms = train_step(cfg, step, fwd, model, teacher, opt, x, x_t, masks_enc, masks_pred, m,
                           amp, loss_fn)
        step += 1
        extra = {} if cfg.teacher else {"momentum": m}
        if cfg.sigreg:
            extra.update(loss_pred=terms[1], sigreg=terms[2])
        log.add(step, batch["epoch"], loss=terms[0], lr=lr, wd=wd, **extra)
        if probe is not None and is_due(step, cfg.diag_every, end):
            log.diag(step, collapse_diagnostic(saved, probe, POOL))
        saving = is_due(step, cfg.save_every, end)
        if saving or is_due(step, cfg.log_every, end):
            log.flush()  # before any save: a NaN never reaches disk
        if saving:
            tensors = {f"predictor.{k}": v for k, v in model.predictor.state_dict().items()}
            if not cfg.teacher:
                tensors.update({f"student.{k}": v for k, v in model.encoder.state_dict().items()})
            save_run(cfg, run, step, saved, tensors, {"teacher": pin}, {}, opt)
        if step == end:
            break
    log.close()
    if run.master:
        print(f"saved {run.ckpt} at step {step}")
    return {"step": step, "losses": log.losses, "model": model, "teacher": teacher}


def benchmark(cfg, steps=20, warmup=5):
    """Training steps per second on a synthetic uint8 batch already on the device (masks made ahead,
    as the workers would; --compile honoured): -> dict(img_per_s, flops_per_img, context_tokens),
    FLOPs = 3x forward for the trained parts."""
    check(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, teacher, affine, opt = build(cfg, device)
    B = cfg.batch_size
    L = load_size(cfg)
    grid = cfg.img_size // cfg.patch_size
    imgs = torch.randint(0, 256, (B, cfg.in_chans, L, L), dtype=torch.uint8, device=device)
    steps_in = []
    for i in range(8):
        extras = batch_extras(cfg, B, i, 0)
        steps_in.append([extras[k].to(device) for k in ("theta", "masks_enc", "masks_pred")])
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    loss_fn = compiled(forward_loss, cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        theta, masks_enc, masks_pred = steps_in[i % len(steps_in)]
        x = crop_normalize(imgs, theta, cfg.img_size, 0.2, 0.25)     # any mean / std: the same work
        x_t = teacher_input(x, affine, 0.25, 0.2)
        train_step(cfg, i, model, model, teacher, opt, x, x_t, masks_enc, masks_pred, 0.996, amp,
                   loss_fn)
    sync()
    dt = time.perf_counter() - t0

    def vit_flops(n, D, depth):                                      # forward matmuls of n tokens
        return depth * (24 * n * D * D + 4 * n * n * D)
    D = model.encoder.cfg.embed_dim
    Dt = teacher.cfg.embed_dim
    Dp = cfg.pred_dim
    N = grid * grid
    pe = 2 * cfg.in_chans * cfg.patch_size ** 2  # patch embedding, per patch and channel
    fl = []
    for _, me, mp in steps_in:
        M, _, nt = mp.shape
        n = me.shape[1]
        student = vit_flops(n, D, model.encoder.cfg.depth) + pe * N * D
        pred = M * vit_flops(n + nt, Dp, cfg.pred_depth) + 2 * n * D * Dp + 2 * M * nt * Dp * Dt
        fl.append(3 * (student + pred) + vit_flops(N, Dt, teacher.cfg.depth) + pe * N * Dt)
    context = [me.shape[1] for _, me, _ in steps_in]
    return dict(img_per_s=B * steps / dt, flops_per_img=float(np.mean(fl)),
                context_tokens=float(np.mean(context)))

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
