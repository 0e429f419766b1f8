"""MAE pretraining in one file: "Masked Autoencoders Are Scalable Vision Learners" (He et al., CVPR
2022).

A ViT encoder sees only a random 25% of the patches (plus CLS); a light decoder puts the encoded
visible tokens back in place among a learned mask token and predicts the pixels of every patch; the
loss is the MSE on the masked patches against per-patch normalised pixels (norm_pix_loss). Faithful
to facebookresearch/mae@efb2a80 (models_mae.py, main_pretrain.py, engine_pretrain.py,
util/lr_sched.py), cited below as file:line.

    python mae.py --data us_frames/                    # 1 GPU or CPU; no --data: synthetic
    torchrun --standalone --nproc_per_node=8 mae.py --data us_frames/ # 8 GPUs, global --batch-size
    python mae.py --size vit_tiny --depth 4 --img-size 64 --patch-size 8 --decoder-dim 128 \\
        --decoder-depth 2 --decoder-heads 4 --batch-size 32 --synthetic-frames 256 --epochs 80 \\
        --lr 1.5e-3 --vis                                  # CPU, a few minutes
    python mae.py --data us_frames/ --mask-type multiblock --out runs/salt_teacher   # SALT teacher
    python mae.py --data us_frames/ --resume runs/mae/ckpt.safetensors    # continue exactly

Writes OUT/ckpt.safetensors (`encoder.*` is what probe.py, abmil.py and viz.py read, pool "cls"; the
decoder, optimizer, data position and RNG states are there for --resume), OUT/init.safetensors (the
same encoder before any update: the run's random twin), OUT/log.jsonl (a line per step; the collapse
diagnostic every --diag-every steps), OUT/stats.json when it computes the normalisation, and with
--vis OUT/recon.png. `--help` lists every flag with its meaning and default.

As the official code: model, masking, loss, init, schedule, optimizer, decay groups, augmentation,
PRETRAIN.md's norm_pix_loss on and the paper's Table 4 (batch 256, blr 1.5e-4, 10 warmup epochs).
Different, and why:
- bf16 autocast, no GradScaler (official: fp16 + GradScaler, engine_pretrain.py:47,57): bf16 has
  fp32's exponent range, so no loss scaling and no step skipped for an overflow; on A100/H100 it is
  as fast as fp16.
- crops and flips run batched on the GPU (one affine grid per image, grid_sample bicubic) on frames
  the workers padded to a square with black and resized to --load-size; torchvision crops on the CPU
  (main_pretrain.py:123-127). A crop is never shrunk by more than load_size / img_size (256 / 224):
  the missing antialiasing hardly matters. The bicubic result is clamped to [0, 1] before
  normalising, as torchvision's PIL path clamps to uint8 (it is not rounded to 8 bits).
- --batch-size is global (official: per GPU, eff = batch * accum * world, main_pretrain.py:163-166).
- the loss reaches the host every --log-every steps, not every step (engine_pretrain.py:50-62 syncs
  each step); a non-finite loss still stops the run before anything is saved, naming the first bad
  step.
- DDP without find_unused_parameters (main_pretrain.py:175): every parameter gets a gradient here.
- the masked-token gathers use the `kernels.gather_tokens` op instead of a B x N x D repeated int64
  index.
- an unreadable frame is replaced by a readable one of its batch and reported (torchvision's loader
  stops); more than 1% of them in the first epoch stop the run.
- --mask-type multiblock is not in MAE: I-JEPA-style blocks for the SALT stage-1 teacher
  (multiblock_masking; per image, unlike stable-pretraining's port, which shares one mask and a
  0.85-1 context block over the batch).
- epochs default 100 (official argparse 400; the paper's ultrasound/pathology MAE converged by epoch
  20).

The file reads top to bottom: the config, the crops, the masks, the model and loss, one training
step and the training loop; then the plumbing mae.py, dino.py and ijepa.py share (frames,
normalisation statistics, command line, processes, log, checkpoints, collapse diagnostic), written
here and copied verbatim into the other two (DEVELOPERS.md; tests/check_copies.py keeps the copies
identical).
"""
import argparse
import hashlib
import inspect
import json
import math
import os
import random
import re
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import kernels
import vit
from vit import ViT, Block, sincos_2d, vit_config

METHOD = "mae"  # the names the shared plumbing below expects every method file to define
POOL = "cls"  # the checkpoint's pooling: probe.py reads the CLS token
# the method flags --resume must find as they were
ARCH_FLAGS = ("decoder_dim", "decoder_depth", "decoder_heads", "norm_pix_loss", "mask_type")

# -----------------------------------------------------------------------------
# config: every knob (paper Table 4, the official defaults); --help comes from the comments


@dataclass
class Config:
    # data
    data: str = ""                  # folder of frames (png/jpg/bmp/tif incl. 16-bit and multi-page,
                                    # .npy stacks); "" = synthetic ultrasound from prep/synthetic.py
    in_chans: int = 1               # 1 = grayscale (ultrasound), 3 = RGB (H&E)
    img_size: int = 224             # side of the training crops (px)
    load_size: int = 0              # each frame is decoded to this square; 0 = img_size * 8 // 7
    synthetic_frames: int = 1024    # frames of synthetic ultrasound without --data
    num_workers: int = 8            # data loader processes per rank
    crop_scale: tuple = (0.2, 1.0)  # RandomResizedCrop area range (main_pretrain.py:124)
    hflip: bool = True              # random horizontal flips
    # model
    size: str = "vit_small"         # ViT size: vit_tiny | vit_small | vit_base
    depth: int = 0                  # ViT blocks; 0 = the size's (12)
    patch_size: int = 16            # patch side (px)
    decoder_dim: int = 512          # decoder width (official 512 x 8 blocks x 16 heads,
                                    # models_mae.py:223-245; ViT-S ports also use 256 x 8 x 8,
                                    # SparK, or 384 x 4 x 6)
    decoder_depth: int = 8          # decoder blocks
    decoder_heads: int = 16         # decoder attention heads
    # pretext
    mask_type: str = "random"       # random (MAE) | multiblock (I-JEPA-style blocks, SALT stage-1
                                    # teacher)
    mask_ratio: float = 0.75        # fraction of the patches masked (random masking)
    num_blocks: int = 4             # multiblock: the masked set is the union of this many blocks
    block_scale: tuple = (0.15, 0.2)    # multiblock: block area, fraction of the grid (I-JEPA
                                        # pred_mask_scale)
    block_aspect: tuple = (0.75, 1.5)   # multiblock: block aspect ratio (I-JEPA aspect_ratio)
    norm_pix_loss: bool = True      # targets are each patch's pixels normalised by its mean/var
                                    # (PRETRAIN.md)
    # optimisation (paper Table 4: batch 256, lr 1.5e-4, warmup 10)
    batch_size: int = 256           # global batch, split over the ranks
    epochs: int = 100               # schedule length (official 400; the paper's MAE converged by
                                    # epoch 20)
    warmup_epochs: float = 10.0     # linear warmup from 0 (util/lr_sched.py:9-21)
    blr: float = 1.5e-4             # base lr: lr = blr * batch_size / 256
                                    # (main_pretrain.py:165-166)
    lr: float = 0.0                 # peak lr; 0 = from --blr
    min_lr: float = 0.0             # the cosine's end value
    weight_decay: float = 0.05      # AdamW weight decay, constant (none on biases and norms)
    betas: tuple = (0.9, 0.95)      # AdamW betas (main_pretrain.py:180)
    # run
    out: str = "runs/mae"           # run folder: ckpt.safetensors, init.safetensors, log.jsonl,
                                    # stats.json
    resume: str = ""                # continue the run of this ckpt.safetensors exactly (same flags
                                    # and data)
    max_steps: int = 0              # stop after this many steps (the schedule still spans
                                    # --epochs); 0 = all
    save_every: int = 1000          # steps between checkpoints (one is always written at the end)
    log_every: int = 10             # steps between host syncs (loss read, NaN guard); the log has
                                    # every step
    diag_every: int = 250           # steps between collapse diagnostics (also at step 0 and the
                                    # end); 0 = off
    seed: int = 0                   # seeds weights, data order, crops and masks
    device: str = ""                # cuda | cpu; "" = cuda when available (torchrun: one GPU per
                                    # process)
    compile: Optional[bool] = None  # torch.compile the model; unset = on for CUDA, off for CPU
    vis: bool = False               # also write OUT/recon.png with every checkpoint
    n_vis: int = 6                  # images in recon.png


def method_errors(cfg):
    """mae.py's own checks of the flags (check() below adds the common ones)."""
    n = (cfg.img_size // max(cfg.patch_size, 1)) ** 2
    errors = []
    if cfg.mask_type not in ("random", "multiblock"):
        errors.append(f"--mask-type is random or multiblock, not {cfg.mask_type!r}")
    if cfg.mask_type == "random" and not 0 < int(n * (1 - cfg.mask_ratio)) < n:
        errors.append(f"--mask-ratio {cfg.mask_ratio} must leave between 1 and {n - 1} of the {n} "
                      f"patches visible")
    if min(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.num_blocks, cfg.n_vis) < 1:
        errors.append("--decoder-dim, --decoder-depth, --decoder-heads, --num-blocks and --n-vis "
                      "must be >= 1")
    return errors

# -----------------------------------------------------------------------------
# crops: the workers decode + resize to uint8 (C, L, L); crops, flips and normalisation run batched
# on the device


def augment(x, mean, std, cfg, g):
    """uint8 (B, C, L, L) on the device -> normalised float (B, C, S, S), batched: torchvision's
    RandomResizedCrop (10 tries of area ~ U(crop_scale) and log aspect ~ U(log 3/4, log 4/3), the
    first that fits wins, else the whole frame) in continuous coordinates, one affine grid per
    image, and hflip."""
    B, C, L, _ = x.shape
    r = torch.rand(B, 10, 2, generator=g, device=x.device)          # (B, tries, [area, log ratio])
    area = cfg.crop_scale[0] + (cfg.crop_scale[1] - cfg.crop_scale[0]) * r[..., 0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * r[..., 1])
    w = (area * ratio).sqrt()  # (B, 10) as fractions of the frame side
    h = (area / ratio).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1, keepdim=True)                    # (B, 1) the first try that fits
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], 1.0)     # (B,)
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], 1.0)
    pos = torch.rand(B, 3, generator=g, device=x.device)            # (B, [left, top, flip])
    flip = torch.where(pos[:, 2] < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones_like(w)
    theta = torch.zeros(B, 2, 3, device=x.device)  # output [-1, 1]^2 -> input coordinates
    theta[:, 0, 0] = w * flip
    theta[:, 1, 1] = h
    theta[:, 0, 2] = (pos[:, 0] * (1 - w) + w / 2) * 2 - 1  # crop centre, grid_sample coordinates
    theta[:, 1, 2] = (pos[:, 1] * (1 - h) + h / 2) * 2 - 1
    # (B, S, S, 2)
    grid = F.affine_grid(theta, (B, C, cfg.img_size, cfg.img_size), align_corners=False)
    crops = F.grid_sample(x.float() / 255, grid, mode="bicubic", padding_mode="border",
                          align_corners=False)
    crops = crops.clamp(0, 1)                                       # as PIL's bicubic into uint8
    return (crops - mean.view(1, C, 1, 1)) / std.view(1, C, 1, 1)

# -----------------------------------------------------------------------------
# masking: ids_shuffle (B, N) puts the kept patches first; the first len_keep are the visible set


def random_masking(B, N, mask_ratio, g, device):
    """Per-sample random masking by argsort of uniform noise: small noise is kept
    (models_mae.py:123-148)."""
    len_keep = int(N * (1 - mask_ratio))
    noise = torch.rand(B, N, generator=g, device=device)            # (B, N) noise in [0, 1]
    return torch.argsort(noise, dim=1), len_keep                     # ids_shuffle (B, N)


def block_union(B, gh, gw, cfg, g):
    """(B, gh*gw) bool: per image the union of cfg.num_blocks target blocks (ijepa
    src/masks/multiblock.py:55-110), one block size per batch (scale and aspect drawn
    independently; I-JEPA drives both from one uniform), positions per image and block, the
    top-left corner from [0, g - h] inclusive (I-JEPA's exclusive bound never masks the last row
    and column: its PRs #40 / #59)."""
    s, a = torch.rand(2, generator=g).tolist()
    scale = cfg.block_scale[0] + (cfg.block_scale[1] - cfg.block_scale[0]) * s
    aspect = cfg.block_aspect[0] + (cfg.block_aspect[1] - cfg.block_aspect[0]) * a
    n = int(gh * gw * scale)
    h = min(max(round(math.sqrt(n * aspect)), 1), gh - 1)
    w = min(max(round(math.sqrt(n / aspect)), 1), gw - 1)
    top = torch.randint(0, gh - h + 1, (B, cfg.num_blocks, 1), generator=g)
    left = torch.randint(0, gw - w + 1, (B, cfg.num_blocks, 1), generator=g)
    rows = torch.arange(gh)
    cols = torch.arange(gw)
    in_rows = (rows >= top) & (rows < top + h)                       # (B, blocks, gh)
    in_cols = (cols >= left) & (cols < left + w)                     # (B, blocks, gw)
    return (in_rows[..., :, None] & in_cols[..., None, :]).any(1).reshape(B, gh * gw)   # (B, N)


def multiblock_masking(B, gh, gw, cfg, g):
    """Masked = the block union; visible = a random subset of the rest, as large as the batch
    minimum so that tensors stay rectangular (rest patches beyond it are masked and predicted
    too; I-JEPA truncates its context lists to the batch minimum likewise,
    multiblock.py:164-168). On the CPU, so len_keep needs no device sync."""
    blocks = block_union(B, gh, gw, cfg, g)                          # (B, N)
    len_keep = max(int((~blocks).sum(1).min()), 1)
    # visible patches sort first, in random order
    noise = torch.rand(B, gh * gw, generator=g) + blocks.float()
    return torch.argsort(noise, dim=1), len_keep


def sample_masks(cfg, B, g_dev, g_cpu, device):
    grid = cfg.img_size // cfg.patch_size
    if cfg.mask_type == "random":
        return random_masking(B, grid * grid, cfg.mask_ratio, g_dev, device)
    ids_shuffle, len_keep = multiblock_masking(B, grid, grid, cfg, g_cpu)
    return ids_shuffle.to(device, non_blocking=True), len_keep

# -----------------------------------------------------------------------------
# the model: vit.ViT encoder on the visible set + MAE decoder


def patchify(imgs, p):
    """(B, C, H, W) -> (B, N, p*p*C), each patch flattened in the official (p, q, c) order
    (models_mae.py:95-107)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)                    # (B, C, h, p, w, q)
    x = x.permute(0, 2, 4, 3, 5, 1)                                  # (B, h, w, p, q, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)              # (B, N, p*p*C)


def unpatchify(x, p, h, w):
    """(B, N, p*p*C) -> (B, C, h*p, w*p), the inverse of patchify (models_mae.py:109-121)."""
    B, N, D = x.shape
    x = x.reshape(B, h, w, p, p, D // (p * p))                      # (B, h, w, p, q, C)
    x = x.permute(0, 5, 1, 3, 2, 4)                                  # (B, C, h, p, w, q)
    return x.reshape(B, -1, h * p, w * p)                            # (B, C, H, W)


def pixel_targets(imgs, p, norm_pix):
    """Targets (B, N, p*p*C) in fp32 and the per-patch mean/var (models_mae.py:204-208; var is
    unbiased)."""
    target = patchify(imgs.float(), p)
    if not norm_pix:
        return target, None, None
    # (B, N, 1) each; unbiased, as Tensor.var
    var, mean = torch.var_mean(target, dim=-1, keepdim=True)
    return (target - mean) / (var + 1e-6) ** 0.5, mean, var


class MAE(nn.Module):
    """Encoder `encoder` (vit.ViT, CLS + sincos) and the decoder under the official names
    (models_mae.py:47-58)."""

    def __init__(self, cfg):
        super().__init__()
        depth = {"depth": cfg.depth} if cfg.depth else {}
        vcfg = vit_config(cfg.size, img_size=cfg.img_size, patch_size=cfg.patch_size,
                          in_chans=cfg.in_chans, cls_token=True, pos_embed="sincos", **depth)
        self.encoder = ViT(vcfg)
        self.p = cfg.patch_size
        self.norm_pix_loss = cfg.norm_pix_loss
        Dd = cfg.decoder_dim
        self.decoder_embed = nn.Linear(vcfg.embed_dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        # (1 + N, Dd), CLS row 0
        table = torch.cat([torch.zeros(1, Dd), sincos_2d(Dd, vcfg.grid, vcfg.grid)])
        # frozen (models_mae.py:52)
        self.decoder_pos_embed = nn.Parameter(table[None], requires_grad=False)
        blocks = [Block(Dd, cfg.decoder_heads, 4.0, qkv_bias=True, ln_eps=1e-6)
                  for _ in range(cfg.decoder_depth)]
        self.decoder_blocks = nn.ModuleList(blocks)
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        # decoder to patch pixels
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size ** 2 * cfg.in_chans)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """MAE's init (models_mae.py:65-93), replacing vit.py's trunc_normal one."""
        for m in self.modules():  # LayerNorms keep (1, 0), as there
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # "following official JAX ViT"; fused qkv too
                nn.init.zeros_(m.bias)
        proj = self.encoder.patch_embed.proj
        proj.reset_parameters()  # the conv bias keeps PyTorch's default init
        # weight like a Linear (:74-76)
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)                               # (B, 1 + K, Dd)
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, N + 1 - x.shape[1], -1)   # (B, N - K, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, N, Dd) in shuffled order, no CLS
        x_ = kernels.gather_tokens(x_, ids_restore)  # (B, N, Dd) unshuffled (models_mae.py:179)
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed     # (B, 1 + N, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]        # (B, N, p*p*C), CLS dropped

    def forward(self, imgs, ids_shuffle, len_keep):
        """-> (loss, pred (B, N, p*p*C), mask (B, N) with 1 = masked), as models_mae.py:216-220."""
        ids_restore = torch.argsort(ids_shuffle, dim=1)              # (B, N) where each patch went
        ids_keep = ids_shuffle[:, :len_keep].contiguous()            # (B, K) the visible set
        mask = (ids_restore >= len_keep).float()  # (B, N) the official unshuffled binary mask
        # (B, 1 + K, D): pos, gather, CLS, blocks, norm
        latent = self.encoder(imgs, ids_keep=ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        target, _, _ = pixel_targets(imgs, self.p, self.norm_pix_loss)
        loss = ((pred.float() - target) ** 2).mean(dim=-1)          # (B, N) mean loss per patch
        loss = (loss * mask).sum() / mask.sum()  # mean over the masked patches only
        return loss, pred, mask


def param_groups(model, weight_decay):
    """timm 0.3.2 add_weight_decay as main_pretrain.py:179 calls it (no skip list): no decay for 1-D
    parameters and biases, frozen ones (the sincos tables) left out; cls_token and mask_token are
    3-D: decayed, as there."""
    decay = []
    no_decay = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def lr_at(step, steps_per_epoch, peak, cfg):
    """Linear warmup from 0, then half-cycle cosine to min_lr, at the fractional epoch
    (util/lr_sched.py:9-21)."""
    e = step / steps_per_epoch
    if e < cfg.warmup_epochs:
        return peak * e / cfg.warmup_epochs
    t = (e - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def train_step(model, opt, imgs, ids_shuffle, len_keep, lr):
    """One AdamW step (engine_pretrain.py:28-62 without accumulation) -> the loss, detached, on the
    device."""
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=imgs.device.type == "cuda"):
        loss, _, _ = model(imgs, ids_shuffle, len_keep)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

# -----------------------------------------------------------------------------
# training


def batch_extras(cfg, n, step, rank):
    """What a loader worker adds to each batch: nothing for MAE (its masks are drawn on the device).
    """
    return {}


def train_loop(cfg, run):
    """MAE training on this rank (train() below sets up the processes) -> dict(step, losses, model).
    """
    frames = open_data(cfg, run)
    total = cfg.epochs * run.steps_per_epoch
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    peak = cfg.lr or cfg.blr * cfg.batch_size / 256
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw = MAE(cfg).to(run.device)
    model = raw
    if run.ddp:
        model = DDP(raw, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    opt = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=peak, betas=cfg.betas,
                            fused=run.device.type == "cuda")
    seed = cfg.seed + run.rank  # crops and random masks on the device,
    gens = {"g_dev": torch.Generator(run.device).manual_seed(seed),  # multiblock masks on the CPU
            "g_cpu": torch.Generator().manual_seed(seed)}
    step = 0
    if cfg.resume:
        tensors, meta = resume(cfg, run, opt, gens)
        load_tensors(raw, tensors, "", cfg.resume)
        step = meta["step"]
    else:
        frame_stats(frames, cfg, run)
        write_init(cfg, run, raw.encoder)
    mean = torch.tensor(run.mean, device=run.device)
    std = torch.tensor(run.std, device=run.device)
    forward = compiled(model, cfg, run.device)
    if run.master:
        n_enc = sum(p.numel() for p in raw.encoder.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        print(f"mae: {cfg.size} {n_enc / 1e6:.1f}M + decoder {(n_all - n_enc) / 1e6:.1f}M params | "
              f"{len(frames)} frames, {total} steps ({cfg.epochs} epochs), peak lr {peak:.2e} | "
              f"{run.world} x {run.device.type} | {cfg.mask_type} masks")
    if run.master and cfg.vis:  # fixed frames for recon.png: whole, unflipped
        picks = np.linspace(0, len(frames) - 1, min(cfg.n_vis, len(frames))).round()
        shown = [x for x, ok, _ in (frames[int(i)] for i in picks) if ok]
        whole = replace(cfg, crop_scale=(1, 1), hflip=False)
        shown = torch.stack(shown).to(run.device)                   # (V, C, L, L) uint8
        vis_imgs = augment(shown, mean, std, whole, torch.Generator(run.device))
    probe = diagnostic_frames(frames, cfg, run)  # None off the master or with --diag-every 0
    log = Log(cfg, run, step, end)
    if step == 0 and probe is not None:
        diag = collapse_diagnostic(raw.encoder, probe, POOL)
        log.line({"step": 0, "epoch": 0, "lr": 0.0, **diag})
    for batch in log.batches(batches(frames, cfg, run, step) if step < end else []):
        # (B, C, S, S)
        x = augment(batch["imgs"].to(run.device, non_blocking=True), mean, std, cfg, gens["g_dev"])
        ids_shuffle, len_keep = sample_masks(cfg, len(x), gens["g_dev"], gens["g_cpu"], run.device)
        lr = lr_at(step, run.steps_per_epoch, peak, cfg)
        loss = train_step(forward, opt, x, ids_shuffle, len_keep, lr)
        step += 1
        log.add(step, batch["epoch"], loss=loss, lr=lr, wd=cfg.weight_decay)
        if probe is not None and is_due(step, cfg.diag_every, end):
            log.diag(step, collapse_diagnostic(raw.encoder, probe, POOL))
        saving = is_due(step, cfg.save_every, end)
        if saving or is_due(step, cfg.log_every, end):
            log.flush()  # before any save: a NaN never reaches disk
        if saving:
            decoder = {k: v for k, v in raw.state_dict().items() if not k.startswith("encoder.")}
            save_run(cfg, run, step, raw.encoder, decoder, {}, gens, opt)
            if run.master and cfg.vis:
                save_recon(os.path.join(cfg.out, "recon.png"), raw, vis_imgs, cfg, mean, std)
        if step == end:
            break
    log.close()
    return {"step": step, "losses": log.losses, "model": raw}


@torch.no_grad()
def save_recon(path, raw, imgs, cfg, mean, std):
    """PNG grid, a row per image: original | masked input | reconstruction | reconstruction +
    visible patches. With norm_pix_loss each patch's true mean and variance are put back
    (brightness from the image, structure learned)."""
    B, C, S, _ = imgs.shape
    p = cfg.patch_size
    g = S // cfg.patch_size
    g_dev = torch.Generator(imgs.device).manual_seed(0)             # the same masks in every figure
    g_cpu = torch.Generator().manual_seed(0)
    ids_shuffle, len_keep = sample_masks(cfg, B, g_dev, g_cpu, imgs.device)
    _, pred, mask = raw(imgs, ids_shuffle, len_keep)
    pred = pred.float()
    if cfg.norm_pix_loss:
        _, m, v = pixel_targets(imgs, p, True)
        pred = pred * (v + 1e-6) ** 0.5 + m
    # (B, C, S, S) 1 = masked
    m_img = unpatchify(mask[..., None].expand(-1, -1, p * p * C), p, g, g)
    mean = mean.view(1, C, 1, 1)
    std = std.view(1, C, 1, 1)
    orig = (imgs.float() * std + mean).clamp(0, 1)                           # [0, 1] units
    rec = (unpatchify(pred, p, g, g) * std + mean).clamp(0, 1)               # (B, C, S, S)
    cols = [orig, orig * (1 - m_img) + 0.5 * m_img, rec, orig * (1 - m_img) + rec * m_img]
    # (B, 4, S, S, C)
    grid = (torch.stack(cols, 1) * 255).round().byte().permute(0, 1, 3, 4, 2).cpu().numpy()
    T = max(S, 128)  # tiles upscaled to >= 128 px to be legible
    gap = 4
    head = 16
    canvas = Image.new("RGB", (4 * T + 5 * gap, head + B * (T + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    masked = f"masked {1 - len_keep / g ** 2:.0%}"
    titles = ["original", masked, "reconstruction", "recon + visible"]
    for j, title in enumerate(titles):
        draw.text((gap + j * (T + gap) + 2, 2), title, fill=(0, 0, 0))
        for i in range(B):
            tile = Image.fromarray(grid[i, j].squeeze(-1) if C == 1 else grid[i, j])
            tile = tile.resize((T, T), Image.NEAREST)
            canvas.paste(tile.convert("RGB"), (gap + j * (T + gap), head + i * (T + gap)))
    canvas.save(path)

# -----------------------------------------------------------------------------
# benchmark (bench.py train --method mae)


def flops_per_img(cfg, len_keep):
    """Matmul FLOPs of one training step per image (2 per multiply-add; backward twice the forward,
    except the patch conv, whose input needs no gradient). Attention: q k^T and p v, 2 * 2 * T^2
    * D per block."""
    vc = vit_config(cfg.size, **({"depth": cfg.depth} if cfg.depth else {}))
    N = (cfg.img_size // cfg.patch_size) ** 2
    P = cfg.patch_size ** 2 * cfg.in_chans
    D = vc.embed_dim
    Dd = cfg.decoder_dim

    def blocks(T, d, depth, ratio=4.0):  # qkv + proj + mlp, then attention
        return depth * (2 * T * (4 * d * d + 2 * d * int(d * ratio)) + 4 * T * T * d)
    fwd = blocks(1 + len_keep, D, vc.depth, vc.mlp_ratio) + blocks(1 + N, Dd, cfg.decoder_depth)
    fwd += 2 * (1 + len_keep) * D * Dd + 2 * (1 + N) * Dd * P        # decoder_embed, decoder_pred
    return 3 * fwd + 2 * (2 * N * P * D)  # + patch conv forward and weight grad


def benchmark(cfg, steps=20, warmup=5):
    """Time train_step (masking, forward, backward, AdamW) on a synthetic normalised batch already
    on the device (--compile honoured). Crops run before it in training and are not timed (the
    official numbers use synthetic data on the GPU)."""
    check(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    model = MAE(cfg).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), betas=cfg.betas,
                            fused=device.type == "cuda")
    forward = compiled(model, cfg, device)
    g_dev = torch.Generator(device).manual_seed(0)
    g_cpu = torch.Generator().manual_seed(0)
    imgs = torch.randn(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        ids_shuffle, len_keep = sample_masks(cfg, cfg.batch_size, g_dev, g_cpu, device)
        train_step(forward, opt, imgs, ids_shuffle, len_keep, 1e-4)
    sync()
    return {"img_per_s": steps * cfg.batch_size / (time.perf_counter() - t0),
            "flops_per_img": flops_per_img(cfg, len_keep)}

# ==================================================================================================
# The plumbing mae.py, dino.py and ijepa.py share. Each block between "# Shared block: NAME" and
# "# End of shared block: NAME" is the origin of verbatim copies in the files it names; edit it
# here, then `make fix-copies` (tests/test_copies.py fails on any difference). The blocks use names
# every method file defines above them: Config, METHOD, POOL, ARCH_FLAGS, method_errors(cfg),
# batch_extras(cfg, n, step, rank), train_loop(cfg, run).

# Shared block: cli (origin; copies: dino.py, ijepa.py)


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

# Shared block: listing (origin; copies: dino.py, ijepa.py, prep/ultrasound.py)


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

# Shared block: frames (origin; copies: dino.py, ijepa.py)


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

# Shared block: stats (origin; copies: dino.py, ijepa.py)


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

# Shared block: processes (origin; copies: dino.py, ijepa.py)


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

# Shared block: log (origin; copies: dino.py, ijepa.py)


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

# Shared block: checkpoints (origin; copies: dino.py, ijepa.py)


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

# Shared block: diagnostic (origin; copies: dino.py, ijepa.py)


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
