"""MAE pretraining in one file: "Masked Autoencoders Are Scalable Vision Learners" (He et al., CVPR 2022).

A ViT encoder sees only a random 25% of the patches (plus CLS); a light decoder puts the encoded visible tokens
back in place among a learned mask token, and predicts the pixels of every patch; the loss is the MSE on the
masked patches against per-patch normalised pixels (norm_pix_loss). Faithful to facebookresearch/mae@efb2a80
(models_mae.py, main_pretrain.py, engine_pretrain.py, util/lr_sched.py), cited below as file:line.

    python mae.py --data us_frames/ --in-chans 1          # one GPU (or CPU); no --data: prep/synthetic.py frames
    torchrun --nproc_per_node=8 mae.py --data us_frames/ --in-chans 1         # 8 GPUs, --batch-size is global
    python mae.py --size vit_tiny --depth 4 --img-size 64 --patch-size 8 --decoder-dim 128 --decoder-depth 2 \
        --decoder-heads 4 --batch-size 32 --synthetic-frames 256 --epochs 80 --lr 1.5e-3 --vis   # CPU, ~3 min
    python mae.py --data us_frames/ --mask-type multiblock --out runs/salt_teacher   # SALT stage-1 teacher
    python mae.py --data us_frames/ --resume runs/mae/ckpt.safetensors       # continue exactly where it stopped

Writes OUT/ckpt.safetensors (`encoder.*` is what probe.py, abmil.py and viz.py read, pool "cls"; the decoder,
optimizer, data position and RNG states are there for --resume), OUT/log.jsonl and, with --vis, OUT/recon.png.

As the official code: model, masking, loss, init, schedule, optimizer, decay groups, augmentation, PRETRAIN.md's
norm_pix_loss on and the paper's Table 4 (batch 256, blr 1.5e-4, 10 warmup epochs). Different, and why:
- bf16 autocast, no GradScaler (official: fp16 + GradScaler, engine_pretrain.py:47,57): bf16 has fp32's exponent
  range, so no loss scaling and no step skipped for an overflow; on A100/H100 it is as fast as fp16.
- crops and flips run batched on the GPU (one affine grid per image, grid_sample bicubic) on frames the workers
  padded to a square with black and resized to --load-size; torchvision crops on the CPU (main_pretrain.py:123-127).
  A crop is never shrunk by more than load_size / img_size (256 / 224): the missing antialiasing hardly matters.
- --batch-size is global (official: per GPU, eff = batch * accum * world, main_pretrain.py:163-166).
- the loss reaches the host every --log-every steps, not every step (engine_pretrain.py:50-62 syncs each step);
  a non-finite loss still stops the run before anything is saved, naming the first bad step.
- DDP without find_unused_parameters (main_pretrain.py:175): every parameter gets a gradient here.
- the masked-token gathers use the `kernels.gather_tokens` op instead of a B x N x D repeated int64 index.
- --mask-type multiblock is not in MAE: I-JEPA-style blocks for the SALT stage-1 teacher (multiblock_masking;
  per image, unlike stable-pretraining's port, which shares one mask and a 0.85-1 context block over the batch).
- epochs default 100 (official argparse 400; the paper's ultrasound/pathology MAE converged by epoch 20).
"""
import argparse
import json
import math
import os
import random
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import kernels
from vit import ViT, Block, load_checkpoint, pack_state, save_checkpoint, sincos_2d, unpack_state, vit_config

# -----------------------------------------------------------------------------
# config: every knob, the paper's Table 4 / the official defaults


@dataclass
class Config:
    # data
    data: str = ""                  # folder of png/jpg/jpeg/bmp/tif/tiff/npy frames; "" = synthetic ultrasound
    in_chans: int = 1               # 1 grayscale ultrasound, 3 RGB / H&E
    img_size: int = 224
    load_size: int = 0              # workers resize every frame to this square; 0 = img_size * 8 // 7 (256)
    crop_scale: tuple = (0.2, 1.0)  # RandomResizedCrop area range (main_pretrain.py:124)
    hflip: bool = True
    synthetic_frames: int = 1024
    num_workers: int = 8
    # model
    size: str = "vit_small"         # vit_tiny | vit_small | vit_base
    depth: int = 0                  # 0 = the size's depth (12)
    patch_size: int = 16
    decoder_dim: int = 512          # official decoder 512 x 8 x 16 heads (models_mae.py:223-245); ViT-S ports
    decoder_depth: int = 8          # also use 256 x 8 x 8 (SparK) or 384 x 4 x 6 (stable-pretraining)
    decoder_heads: int = 16
    # pretext
    mask_type: str = "random"       # random (MAE) | multiblock (I-JEPA-style blocks, SALT stage 1)
    mask_ratio: float = 0.75        # random masking only
    num_blocks: int = 4             # multiblock: the masked set is the union of these target blocks
    block_scale: tuple = (0.15, 0.2)    # I-JEPA pred_mask_scale
    block_aspect: tuple = (0.75, 1.5)   # I-JEPA aspect_ratio
    norm_pix_loss: bool = True
    # optimisation (paper Table 4: batch 256, lr 1.5e-4, warmup 10)
    batch_size: int = 256           # global, split over ranks
    epochs: int = 100
    warmup_epochs: float = 10
    blr: float = 1.5e-4             # lr = blr * batch_size / 256 (main_pretrain.py:165-166)
    lr: float = 0.0                 # absolute peak lr; 0 = from blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)      # main_pretrain.py:180
    # run
    out: str = "runs/mae"
    save_every: int = 1000          # steps
    log_every: int = 10             # steps between host reads of the loss (log.jsonl still has every step)
    resume: str = ""
    max_steps: int = 0              # stop early (the schedule still follows --epochs)
    seed: int = 0
    device: str = ""                # "" = cuda if available, else cpu
    vis: bool = False               # write OUT/recon.png with every checkpoint
    n_vis: int = 6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MAE pretraining (see the docstring of mae.py)")
    special = {bool: {"action": argparse.BooleanOptionalAction}, tuple: {"type": float, "nargs": 2}}  # --no-flag
    for f in fields(Config):
        kw = special.get(type(f.default), {"type": type(f.default)})
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kw)
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()})


def check(cfg):
    """Refuse bad settings up front, naming the flag."""
    n = (cfg.img_size // cfg.patch_size) ** 2
    errors = [msg for bad, msg in [
        (cfg.in_chans not in (1, 3), f"--in-chans must be 1 or 3, got {cfg.in_chans}"),
        (cfg.img_size % cfg.patch_size, f"--img-size {cfg.img_size} is no multiple of --patch-size {cfg.patch_size}"),
        (cfg.mask_type not in ("random", "multiblock"), f"--mask-type is random or multiblock, not {cfg.mask_type!r}"),
        (cfg.mask_type == "random" and not 0 < int(n * (1 - cfg.mask_ratio)) < n,
         f"--mask-ratio {cfg.mask_ratio} must leave between 1 and {n - 1} of the {n} patches visible"),
        (min(cfg.batch_size, cfg.epochs, cfg.log_every, cfg.save_every) < 1,
         "--batch-size, --epochs, --log-every and --save-every must be >= 1")] if bad]
    if errors:
        raise SystemExit("mae.py: " + "; ".join(errors))

# -----------------------------------------------------------------------------
# data: workers decode + resize to uint8 (C, L, L); crops, flips and normalisation run batched on the device

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")


def list_frames(data):
    """Every frame file under `data` (recursive, sorted) and how many frames each holds."""
    if not os.path.isdir(data):
        raise SystemExit(f"{data}: no such folder; pass --data the folder that holds your frames")
    paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(data, followlinks=True) for f in fs
                   if f.lower().endswith(EXTS))
    if not paths:
        raise SystemExit(f"{data}: no {'/'.join(e[1:] for e in EXTS)} files under it; point --data at your frames")
    counts = [1] * len(paths)
    for j, p in enumerate(paths):
        if p.lower().endswith(".npy"):
            try:
                a = np.load(p, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise SystemExit(f"{p}: not a readable .npy file ({e}); remove it or rewrite it with np.save") from None
            if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (1, 3, 4)):
                raise SystemExit(f"{p}: a frame stack must be uint8 (N, H, W) or (N, H, W, C) with C 1, 3 or 4, "
                                 f"got {a.dtype} {a.shape}; convert it (e.g. np.save(p, a.astype(np.uint8)))")
            counts[j] = len(a)
        elif p.lower().endswith((".tif", ".tiff")):                  # each page of a multi-page tif is a frame
            with suppress(Exception), Image.open(p) as im:           # unreadable: reported when it is loaded
                counts[j] = getattr(im, "n_frames", 1)
    return paths, counts


class Frames(torch.utils.data.Dataset):
    """Frames of files (or of one in-memory uint8 stack) -> (uint8 (C, L, L), ok, index)."""

    def __init__(self, paths, counts, in_chans, load_size, arrays=None):
        self.paths, self.in_chans, self.L = paths, in_chans, load_size
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.arrays = dict(arrays or {})                             # .npy stacks, memory-mapped on first use

    def __len__(self):
        return int(self.starts[-1])

    def locate(self, i):                                             # frame i -> (file, frame within the file)
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.paths[f], i - int(self.starts[f])

    def __getitem__(self, i):
        path, page = self.locate(i)
        try:
            if path in self.arrays or path.lower().endswith(".npy"):
                if path not in self.arrays:
                    self.arrays[path] = np.load(path, mmap_mode="r")
                im = Image.fromarray(np.ascontiguousarray(self.arrays[path][page]).squeeze())
            else:
                with Image.open(path) as f:
                    f.seek(page)
                    im = f.copy()
            if im.mode.startswith("I") or im.mode == "F":            # 16-bit: / 257, the full range, no stretch
                a = np.asarray(im, dtype=np.float32) * (255 if im.mode == "F" else 1 / 257)   # float: [0, 1]
                im = Image.fromarray((a.clip(0, 255) + 0.5).astype(np.uint8))
            im = im.convert("L" if self.in_chans == 1 else "RGB")    # RGB -> gray by PIL's "L"; gray repeated
            sq = Image.new(im.mode, (max(im.size),) * 2)             # pad to a square with black, centred: a fan
            sq.paste(im, ((sq.width - im.width) // 2, (sq.height - im.height) // 2))   # keeps its aspect ratio
            a = np.asarray(sq.resize((self.L, self.L), Image.BICUBIC)).reshape(self.L, self.L, -1)   # (L, L, C)
            return torch.from_numpy(a.transpose(2, 0, 1).copy()), True, i                          # (C, L, L)
        except Exception:                                            # any decode error: flag it, the loop skips it
            return torch.zeros(self.in_chans, self.L, self.L, dtype=torch.uint8), False, i


def frame_stats(ds, data, out, master):
    """Per-channel mean/std in [0, 1] units: DATA/stats.json (or OUT/stats.json), else from <= 2000 frames."""
    paths = [os.path.join(d, "stats.json") for d in ((data, out) if data else ())]   # synthetic: always computed
    for p in filter(os.path.isfile, paths):
        try:
            s = json.load(open(p))
            mean, std = [float(v) for v in s["mean"]], [float(v) for v in s["std"]]
            assert len(mean) == len(std) == ds.in_chans and min(std) > 0
            return mean, std
        except (ValueError, KeyError, TypeError, AssertionError):
            raise SystemExit(f"{p}: needs {{\"mean\": [...], \"std\": [...]}} with {ds.in_chans} values each "
                             f"(std > 0) for --in-chans {ds.in_chans}; fix it, or delete it to recompute") from None
    idx = np.unique(np.linspace(0, len(ds) - 1, min(len(ds), 2000)).round().astype(np.int64))
    s = s2 = n = 0
    for i in tqdm(idx, desc="mean/std", disable=not master, leave=False):
        x, ok, _ = ds[int(i)]
        if ok:
            x = x.double() / 255                                     # (C, L, L)
            s, s2, n = s + x.sum((1, 2)), s2 + (x * x).sum((1, 2)), n + x[0].numel()
    if n == 0:
        raise SystemExit(f"{data}: none of {len(idx)} sampled frames could be read; check the files under it")
    mean, std = (s / n).tolist(), (s2 / n - (s / n) ** 2).clamp_min(1e-12).sqrt().tolist()
    for p in (paths if master else []):                              # prep usually writes it; else cache it
        try:                                                         # in DATA, or in OUT when DATA is read-only
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p + ".tmp", "w") as f:
                json.dump({"mean": mean, "std": std}, f)
            os.replace(p + ".tmp", p)
            break
        except OSError:
            pass
    return mean, std


def batches_from(epoch, batch, n, seed, rank, world, per_rank):
    """This rank's batches from data position (epoch, batch) on, endlessly: each epoch a permutation seeded by
    (seed, epoch), rank r takes perm[r::world], the same number of whole batches on every rank (drop_last)."""
    while True:
        perm = np.random.default_rng([seed, epoch]).permutation(n)[rank::world]
        n_batches = (n // world) // per_rank
        yield from perm[: n_batches * per_rank].reshape(n_batches, per_rank).tolist()[batch:]
        epoch, batch = epoch + 1, 0


def augment(x, mean, std, cfg, g):
    """uint8 (B, C, L, L) on the device -> normalised float (B, C, S, S), batched: torchvision's RandomResizedCrop
    (10 tries of area ~ U(crop_scale) and log aspect ~ U(log 3/4, log 4/3), the first that fits wins, else the whole
    frame) in continuous coordinates, one affine grid per image, and hflip."""
    B, C, L, _ = x.shape
    x = (x.float() / 255 - mean.view(1, C, 1, 1)) / std.view(1, C, 1, 1)
    r = torch.rand(B, 10, 2, generator=g, device=x.device)           # (B, tries, [area, log ratio])
    area = cfg.crop_scale[0] + (cfg.crop_scale[1] - cfg.crop_scale[0]) * r[..., 0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * r[..., 1])
    w, h = (area * ratio).sqrt(), (area / ratio).sqrt()              # (B, 10) as fractions of the frame side
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1, keepdim=True)                     # (B, 1) first try that fits
    w, h = (torch.where(fits.any(1), t.gather(1, first)[:, 0], 1.0) for t in (w, h))   # (B,) each
    pos = torch.rand(B, 3, generator=g, device=x.device)             # (B, [left, top, flip])
    flip = torch.where(pos[:, 2] < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones_like(w)
    theta = torch.zeros(B, 2, 3, device=x.device)                    # output [-1, 1]^2 -> input coordinates
    theta[:, 0, 0], theta[:, 1, 1] = w * flip, h
    theta[:, 0, 2] = (pos[:, 0] * (1 - w) + w / 2) * 2 - 1           # crop centre, grid_sample coordinates
    theta[:, 1, 2] = (pos[:, 1] * (1 - h) + h / 2) * 2 - 1
    grid = F.affine_grid(theta, (B, C, cfg.img_size, cfg.img_size), align_corners=False)   # (B, S, S, 2)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)

# -----------------------------------------------------------------------------
# masking: ids_shuffle (B, N) puts the kept patches first; the first len_keep are the visible set


def random_masking(B, N, mask_ratio, g, device):
    """Per-sample random masking by argsort of uniform noise: small noise is kept (models_mae.py:123-148)."""
    len_keep = int(N * (1 - mask_ratio))
    noise = torch.rand(B, N, generator=g, device=device)            # (B, N) noise in [0, 1]
    return torch.argsort(noise, dim=1), len_keep                     # ids_shuffle (B, N)


def block_union(B, gh, gw, cfg, g):
    """(B, gh*gw) bool: per image the union of cfg.num_blocks target blocks (ijepa src/masks/multiblock.py:55-110),
    one block size per batch (scale and aspect drawn independently; I-JEPA drives both from one uniform), positions
    per image and block, the top-left corner from [0, g - h] inclusive (I-JEPA's exclusive bound never masks the
    last row and column: its PRs #40 / #59)."""
    s, a = torch.rand(2, generator=g).tolist()
    scale = cfg.block_scale[0] + (cfg.block_scale[1] - cfg.block_scale[0]) * s
    aspect = cfg.block_aspect[0] + (cfg.block_aspect[1] - cfg.block_aspect[0]) * a
    n = int(gh * gw * scale)
    h = min(max(round(math.sqrt(n * aspect)), 1), gh - 1)
    w = min(max(round(math.sqrt(n / aspect)), 1), gw - 1)
    top = torch.randint(0, gh - h + 1, (B, cfg.num_blocks, 1), generator=g)
    left = torch.randint(0, gw - w + 1, (B, cfg.num_blocks, 1), generator=g)
    rows, cols = torch.arange(gh), torch.arange(gw)
    in_rows = (rows >= top) & (rows < top + h)                        # (B, blocks, gh)
    in_cols = (cols >= left) & (cols < left + w)                      # (B, blocks, gw)
    return (in_rows[..., :, None] & in_cols[..., None, :]).any(1).reshape(B, gh * gw)


def multiblock_masking(B, gh, gw, cfg, g):
    """Masked = the block union; visible = a random subset of the rest, as large as the batch minimum so that
    tensors stay rectangular (rest patches beyond it are masked and predicted too; I-JEPA truncates its context
    lists to the batch minimum likewise, multiblock.py:164-168). On the CPU, so len_keep needs no device sync."""
    blocks = block_union(B, gh, gw, cfg, g)                          # (B, N)
    len_keep = max(int((~blocks).sum(1).min()), 1)
    noise = torch.rand(B, gh * gw, generator=g) + blocks.float()     # visible patches sort first, in random order
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
    """(B, C, H, W) -> (B, N, p*p*C), each patch flattened in the official (p, q, c) order (models_mae.py:95-107)."""
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
    """Targets (B, N, p*p*C) in fp32 and the per-patch mean/var (models_mae.py:204-208; var is unbiased)."""
    target = patchify(imgs.float(), p)
    if not norm_pix:
        return target, None, None
    var, mean = torch.var_mean(target, dim=-1, keepdim=True)         # (B, N, 1) each; var unbiased, as Tensor.var
    return (target - mean) / (var + 1e-6) ** 0.5, mean, var


class MAE(nn.Module):
    """Encoder `encoder` (vit.ViT, CLS + sincos) and the decoder under the official names (models_mae.py:47-58)."""

    def __init__(self, cfg):
        super().__init__()
        vcfg = vit_config(cfg.size, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                          cls_token=True, pos_embed="sincos", **({"depth": cfg.depth} if cfg.depth else {}))
        self.encoder = ViT(vcfg)
        self.p, self.norm_pix_loss, Dd = cfg.patch_size, cfg.norm_pix_loss, cfg.decoder_dim
        self.decoder_embed = nn.Linear(vcfg.embed_dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        table = torch.cat([torch.zeros(1, Dd), sincos_2d(Dd, vcfg.grid, vcfg.grid)])  # (1 + N, Dd), CLS row zero
        self.decoder_pos_embed = nn.Parameter(table[None], requires_grad=False)      # frozen, as models_mae.py:52
        self.decoder_blocks = nn.ModuleList([Block(Dd, cfg.decoder_heads, 4.0, qkv_bias=True, ln_eps=1e-6)
                                             for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size ** 2 * cfg.in_chans)       # decoder to patch pixels
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """MAE's init (models_mae.py:65-93), replacing vit.py's trunc_normal one."""
        for m in self.modules():                                     # LayerNorms keep (1, 0), as there
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)                    # "following official JAX ViT"; fused qkv too
                nn.init.zeros_(m.bias)
        proj = self.encoder.patch_embed.proj
        proj.reset_parameters()                                      # the conv bias keeps PyTorch's default init
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))  # weight like a Linear (:74-76)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)                               # (B, 1 + K, Dd)
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, N + 1 - x.shape[1], -1)   # (B, N - K, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)               # (B, N, Dd) in shuffled order, no CLS
        x_ = kernels.gather_tokens(x_, ids_restore)                  # (B, N, Dd) unshuffled (models_mae.py:179)
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed     # (B, 1 + N, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]        # (B, N, p*p*C), CLS dropped

    def forward(self, imgs, ids_shuffle, len_keep):
        """-> (loss, pred (B, N, p*p*C), mask (B, N) with 1 = masked), as models_mae.py:216-220."""
        ids_restore = torch.argsort(ids_shuffle, dim=1)              # (B, N) where each patch went
        ids_keep = ids_shuffle[:, :len_keep].contiguous()            # (B, K) the visible set
        mask = (ids_restore >= len_keep).float()                     # (B, N) the official unshuffled binary mask
        latent = self.encoder(imgs, ids_keep=ids_keep)               # (B, 1 + K, D): pos, gather, CLS, blocks, norm
        pred = self.forward_decoder(latent, ids_restore)
        target, _, _ = pixel_targets(imgs, self.p, self.norm_pix_loss)
        loss = ((pred.float() - target) ** 2).mean(dim=-1)          # (B, N) mean loss per patch
        loss = (loss * mask).sum() / mask.sum()                      # mean over the masked patches only
        return loss, pred, mask


def param_groups(model, weight_decay):
    """timm 0.3.2 add_weight_decay as main_pretrain.py:179 calls it (no skip list): no decay for 1-D parameters
    and biases, frozen ones (the sincos tables) left out; cls_token and mask_token are 3-D: decayed, as there."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step, steps_per_epoch, peak, cfg):
    """Linear warmup from 0, then half-cycle cosine to min_lr, at the fractional epoch (util/lr_sched.py:9-21)."""
    e = step / steps_per_epoch
    if e < cfg.warmup_epochs:
        return peak * e / cfg.warmup_epochs
    t = (e - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def train_step(model, opt, imgs, ids_shuffle, len_keep, lr):
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=imgs.device.type == "cuda"):
        loss, _, _ = model(imgs, ids_shuffle, len_keep)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

# -----------------------------------------------------------------------------
# RNG state for exact resume, reconstruction figure


def rng_state(gens):
    """This rank's RNG states (torch CPU/CUDA, our generators, numpy, python), for vit.pack_state."""
    st = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in gens.items()}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    _, keys, *rest = np.random.get_state()                           # MT19937 keys, pos, has_gauss, gauss
    return {**st, "numpy": [keys.tolist(), *rest], "python": random.getstate()}


def set_rng_state(st, gens):
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    for k, g in gens.items():
        g.set_state(st[k])
    np.random.set_state(("MT19937", np.array(st["numpy"][0], np.uint32), *st["numpy"][1:]))
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))


@torch.no_grad()
def save_recon(path, raw, imgs, cfg, mean, std):
    """PNG grid, a row per image: original | masked input | reconstruction | reconstruction + visible patches. With
    norm_pix_loss each patch's true mean and variance are put back (brightness from the image, structure learned)."""
    B, C, S, _ = imgs.shape
    p, g = cfg.patch_size, S // cfg.patch_size
    ids_shuffle, len_keep = sample_masks(cfg, B, torch.Generator(imgs.device).manual_seed(0),
                                         torch.Generator().manual_seed(0), imgs.device)   # the same masks each time
    _, pred, mask = raw(imgs, ids_shuffle, len_keep)
    pred = pred.float()
    if cfg.norm_pix_loss:
        _, m, v = pixel_targets(imgs, p, True)
        pred = pred * (v + 1e-6) ** 0.5 + m
    m_img = unpatchify(mask[..., None].expand(-1, -1, p * p * C), p, g, g)   # (B, C, S, S) 1 = masked
    orig = (imgs.float() * std.view(1, C, 1, 1) + mean.view(1, C, 1, 1)).clamp(0, 1)             # [0, 1] units
    rec = (unpatchify(pred, p, g, g) * std.view(1, C, 1, 1) + mean.view(1, C, 1, 1)).clamp(0, 1)  # (B, C, S, S)
    cols = [orig, orig * (1 - m_img) + 0.5 * m_img, rec, orig * (1 - m_img) + rec * m_img]
    grid = (torch.stack(cols, 1) * 255).round().byte().permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, 4, S, S, C)
    T, gap, head = max(S, 128), 4, 16                                # tiles upscaled to >= 128 px to be legible
    canvas = Image.new("RGB", (4 * T + 5 * gap, head + B * (T + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(["original", f"masked {1 - len_keep / g ** 2:.0%}", "reconstruction", "recon + visible"]):
        draw.text((gap + j * (T + gap) + 2, 2), title, fill=(0, 0, 0))
        for i in range(B):
            tile = Image.fromarray(grid[i, j].squeeze(-1) if C == 1 else grid[i, j]).resize((T, T), Image.NEAREST)
            canvas.paste(tile.convert("RGB"), (gap + j * (T + gap), head + i * (T + gap)))
    canvas.save(path)

# -----------------------------------------------------------------------------
# training


def train(cfg):
    """Train; returns the unwrapped MAE model. Under torchrun (RANK set) every rank runs this."""
    check(cfg)
    ddp = int(os.environ.get("RANK", -1)) != -1                      # launched by torchrun
    rank, local, world = [int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")] if ddp else [0, 0, 1]
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    device = torch.device(cfg.device or ("cuda" if cuda else "cpu"))
    if ddp:                                                          # one process per GPU (nccl), or gloo on CPU
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    master = rank == 0
    ckpt, log_path = os.path.join(cfg.out, "ckpt.safetensors"), os.path.join(cfg.out, "log.jsonl")
    if os.path.exists(ckpt) and not cfg.resume:                      # never overwrite a finished or running run
        raise SystemExit(f"{ckpt} exists: pass --resume {ckpt} to continue that run, or choose another --out")
    if cfg.batch_size % world:
        raise SystemExit(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes; use a multiple")
    torch.manual_seed(cfg.seed)                                      # the same initial weights on every rank
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    # data
    load = cfg.load_size or cfg.img_size * 8 // 7
    if cfg.data:
        ds = Frames(*list_frames(cfg.data), cfg.in_chans, load)
    else:
        try:
            from prep.synthetic import ultrasound_frames
        except ImportError as e:
            raise SystemExit(f"no --data given and prep/synthetic.py cannot be imported ({e}); pass --data DIR "
                             f"with your frames, or run mae.py from the pretext repository (prep/ beside it)") from None
        stack = ultrasound_frames(cfg.synthetic_frames, size=load, seed=cfg.seed)   # (n, L, L) uint8
        ds = Frames(["<synthetic>"], [len(stack)], cfg.in_chans, load, arrays={"<synthetic>": stack})
    per_rank = cfg.batch_size // world
    steps_per_epoch = (len(ds) // world) // per_rank
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(ds)} frames do not fill one batch of {cfg.batch_size} ({world} processes); "
                         f"lower --batch-size or add data")
    total = cfg.epochs * steps_per_epoch
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    peak = cfg.lr or cfg.blr * cfg.batch_size / 256

    # model, optimizer, generators (crops + random masks on the device, multiblock masks on the CPU)
    model = raw = MAE(cfg).to(device)
    if ddp:
        model = DDP(raw, device_ids=[local] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=peak, betas=cfg.betas, fused=device.type == "cuda")
    gens = {k: torch.Generator(d).manual_seed(cfg.seed + rank) for k, d in (("g_dev", device), ("g_cpu", "cpu"))}
    step, epoch, batch = 0, 0, 0
    if cfg.resume:
        tensors, meta = load_checkpoint(cfg.resume)
        if meta["method"] != "mae" or "optim" not in meta["state"]:
            raise SystemExit(f"{cfg.resume}: a {meta['method']} checkpoint without training state; --resume needs "
                             f"one written by mae.py")
        try:
            raw.load_state_dict({k: tensors[k] for k in raw.state_dict()})
        except (KeyError, RuntimeError) as e:
            raise SystemExit(f"{cfg.resume}: does not fit this model ({str(e)[:300]}); pass the --size, --depth, "
                             f"--img-size, --in-chans and --decoder-* flags it was trained with") from None
        opt.load_state_dict(unpack_state(meta["state"]["optim"], tensors))
        st = meta["state"]
        step, epoch, batch, mean, std = meta["step"], st["epoch"], st["batch"], meta["mean"], meta["std"]
        if st["world"] == world:
            set_rng_state(unpack_state(st["rng"], tensors)[rank], gens)
        elif master:
            print(f"resuming on {world} processes from a run on {st['world']}: new random streams")
    else:
        mean, std = frame_stats(ds, cfg.data, cfg.out, master)
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)

    def save():
        gathered = [None] * world if ddp else [rng_state(gens)]     # every rank's RNG streams, for exact resume
        if ddp:
            dist.all_gather_object(gathered, rng_state(gens))
        if not master:
            return
        tensors, optim = pack_state(opt.state_dict(), "optim")
        rng_tensors, rng = pack_state(gathered, "rng")               # rng.<rank>.<stream>
        tensors.update(rng_tensors)
        tensors.update({k: v for k, v in raw.state_dict().items() if not k.startswith("encoder.")})  # decoder
        state = {"optim": optim, "rng": rng, "epoch": epoch, "batch": batch, "world": world}
        save_checkpoint(ckpt, raw.encoder, method="mae", pool="cls", mean=mean, std=std, args=asdict(cfg),
                        step=step, tensors=tensors, state=state)

    if master:
        os.makedirs(cfg.out, exist_ok=True)
        n_enc, n_all = (sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (raw.encoder, raw))
        print(f"mae: {cfg.size} {n_enc / 1e6:.1f}M + decoder {(n_all - n_enc) / 1e6:.1f}M params | {len(ds)} frames,"
              f" {total} steps ({cfg.epochs} epochs), peak lr {peak:.2e} | {world} x {device.type} | {cfg.mask_type}")
        if cfg.vis:                                                  # fixed frames for recon.png: whole, unflipped
            items = [ds[int(i)] for i in np.linspace(0, len(ds) - 1, min(cfg.n_vis, len(ds))).round()]
            x = torch.stack([x for x, ok, _ in items if ok]).to(device)                       # (V, C, L, L) uint8
            vis_imgs = augment(x, mean_t, std_t, replace(cfg, crop_scale=(1, 1), hflip=False), torch.Generator(device))
    if master and os.path.exists(log_path):                          # drop lines logged after the checkpoint
        keep = [ln for ln in open(log_path) if ln.endswith("}\n") and json.loads(ln)["step"] <= step]  # whole lines
        with open(log_path, "w") as f:
            f.writelines(keep)
    log = open(log_path, "a") if master else None
    pending, t_last = [], time.time()
    pbar = tqdm(total=end, initial=step, disable=not master, desc="mae", dynamic_ncols=True)

    def flush():
        """Log the pending losses (one host sync); stop on a non-finite loss or > 1% unreadable frames (all ranks)."""
        nonlocal pending, t_last
        v = torch.cat([torch.stack([p[3] for p in pending]), torch.tensor([n_seen, len(bad_names)], device=device)])
        if ddp:
            dist.all_reduce(v)
        (seen, n_bad), losses, now = v[-2:].tolist(), (v[:-2] / world).tolist(), time.time()
        ips = len(pending) * cfg.batch_size / (now - t_last)
        if master:
            for (s, e, lr, _), l in zip(pending, losses):
                log.write(json.dumps({"step": s, "epoch": e, "loss": l, "lr": lr, "wd": cfg.weight_decay,
                                      "img_per_s": round(ips, 1)}) + "\n")
            log.flush()
            pbar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{pending[-1][2]:.2e}", img_s=f"{ips:.0f}")
        bad = [(s, l) for (s, *_), l in zip(pending, losses) if not math.isfinite(l)]
        pending, t_last = [], now
        if bad:
            raise SystemExit(f"step {bad[0][0]}: loss is {bad[0][1]}")
        if seen >= 100 and n_bad > 0.01 * seen:
            raise SystemExit(f"{', '.join(bad_names[:5]) or 'files on other ranks'}: {n_bad:.0f} of the first "
                             f"{seen:.0f} frames could not be read (> 1%); fix or remove them")

    n_seen, bad_names = 0, []                                        # this rank's first-epoch counts
    batches = batches_from(epoch, batch, len(ds), cfg.seed, rank, world, per_rank)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda")
    for x, ok, idx in (loader if step < end else []):                # a finished run resumed: nothing to do
        names = ["%s [frame %d]" % ds.locate(i) for i in idx[~ok].tolist()]   # unreadable: report, skip them
        if epoch == 0:
            n_seen, bad_names = n_seen + len(ok), bad_names + names
        if names and master:
            tqdm.write("skipping unreadable " + ", ".join(names))
        x = x[ok] if names else x                                    # (no copy: x stays in pinned memory)
        if len(x) == 0:
            raise SystemExit(f"{names[0]}: unreadable, as is every frame of its batch; fix or remove them")
        x = augment(x.to(device, non_blocking=True), mean_t, std_t, cfg, gens["g_dev"])   # (b, C, S, S)
        ids_shuffle, len_keep = sample_masks(cfg, len(x), gens["g_dev"], gens["g_cpu"], device)
        lr = lr_at(step, steps_per_epoch, peak, cfg)
        loss = train_step(model, opt, x, ids_shuffle, len_keep, lr)
        step, batch = step + 1, batch + 1
        pending.append((step, epoch, lr, loss))
        epoch, batch = epoch + batch // steps_per_epoch, batch % steps_per_epoch   # data position of the next batch
        pbar.update()
        if step % cfg.log_every == 0 or step % cfg.save_every == 0 or step == end:
            flush()                                                  # before any save: a NaN never reaches disk
        if step % cfg.save_every == 0 or step == end:
            save()
            if master and cfg.vis:
                save_recon(os.path.join(cfg.out, "recon.png"), raw, vis_imgs, cfg, mean_t, std_t)
        if step == end:
            break
    pbar.close()
    if master:
        log.close()
    if ddp:         # gloo can deadlock destroying a group whose worker still frees a Python-owned tensor: wait for it
        dist.barrier()
        dist.destroy_process_group()
    return raw

# -----------------------------------------------------------------------------
# benchmark (bench.py train --method mae)


def flops_per_img(cfg, len_keep):
    """Matmul FLOPs of one training step per image (2 per multiply-add; backward twice the forward, except the
    patch conv, whose input needs no gradient). Attention: q k^T and p v, 2 * 2 * T^2 * D per block."""
    vc = vit_config(cfg.size, **({"depth": cfg.depth} if cfg.depth else {}))
    N, P = (cfg.img_size // cfg.patch_size) ** 2, cfg.patch_size ** 2 * cfg.in_chans
    D, Dd = vc.embed_dim, cfg.decoder_dim

    def blocks(T, d, depth, ratio=4.0):                              # qkv + proj + mlp, then attention
        return depth * (2 * T * (4 * d * d + 2 * d * int(d * ratio)) + 4 * T * T * d)
    fwd = blocks(1 + len_keep, D, vc.depth, vc.mlp_ratio) + blocks(1 + N, Dd, cfg.decoder_depth)
    fwd += 2 * (1 + len_keep) * D * Dd + 2 * (1 + N) * Dd * P          # decoder_embed, decoder_pred
    return 3 * fwd + 2 * (2 * N * P * D)                             # + patch conv forward and weight grad


def benchmark(cfg, steps=20, warmup=5):
    """Time train_step (masking, forward, backward, AdamW) on a synthetic normalised batch already on the device.
    Crops run before it in training and are not timed (the official numbers use synthetic data on the GPU)."""
    check(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    model = MAE(cfg).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), betas=cfg.betas, fused=device.type == "cuda")
    g_dev, g_cpu = torch.Generator(device).manual_seed(0), torch.Generator().manual_seed(0)
    imgs = torch.randn(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        ids_shuffle, len_keep = sample_masks(cfg, cfg.batch_size, g_dev, g_cpu, device)
        train_step(model, opt, imgs, ids_shuffle, len_keep, 1e-4)
    sync()
    return {"img_per_s": steps * cfg.batch_size / (time.perf_counter() - t0),
            "flops_per_img": flops_per_img(cfg, len_keep)}


if __name__ == "__main__":
    train(parse_args())
