"""The one small Vision Transformer that every pretext method shares, and the checkpoint contract.

    model = vit_small(in_chans=1, cls_token=False)          # I-JEPA encoder
    tokens = model(imgs)                                    # (B, prefix + N, D), final-normed
    tokens = model(imgs, ids_keep=ids_keep)                 # only the kept patch tokens (MAE visible set)
    save_checkpoint("run/ckpt.safetensors", model, method="ijepa", pool="mean", mean=[.2], std=[.2], ...)
    model, meta = load_encoder("run/ckpt.safetensors")      # probe.py / abmil.py / viz.py

    python vit.py convert mae_pretrain_vit_base.pth --from mae --out mae_b16.safetensors   # official weights
    python vit.py demo                                                                     # smoke run

Layout follows timm's VisionTransformer so MAE, I-JEPA and timm weights map with at most a prefix strip
(the state dict of timm's `vit_small_patch16_224`): `cls_token`, `reg_token`, `pos_embed`, `patch_embed.proj`,
`blocks.{i}.norm1 / attn.qkv / attn.proj / ls1.gamma / norm2 / mlp.fc1 / mlp.fc2 / ls2.gamma`, `norm`.
Token order is [cls, registers, patches] as in DINOv3.

Positional encodings:
- `sincos`: fixed 2D sin-cos table (MAE util/pos_embed.py, I-JEPA vision_transformer.py:22-82): the first D/2
  channels encode the column (x), the last D/2 the row (y); each half is [sin(p w_k), cos(p w_k)],
  w_k = 10000^(-k/(D/4)). The CLS row is zero (MAE). Computed for whatever grid the input has, so any image
  size that is a multiple of the patch works without interpolation.
- `learned`: trainable table at `img_size`, bicubically interpolated for other grids (timm).
- `rope`: DINOv3 axial RoPE (dinov3 layers/rope_position_encoding.py): periods base^(4i/D_h) for i < D_h/4,
  patch-centre coordinates in [-1, 1], angles 2 pi c / p laid out [theta_y, theta_x] tiled twice, applied to
  the patch tokens' q and k only (CLS and registers untouched). Training-only coordinate rescaling
  (`rope_rescale`, log-uniform in [1/s, s], one draw per forward; DINOv3 draws one per block).

Attention, the masked-token gather and cosine similarity go through `kernels` (Triton on CUDA, PyTorch on CPU).
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

# -----------------------------------------------------------------------------
# config


@dataclass
class ViTConfig:
    img_size: int = 224          # training resolution (learned pos-embed size); other multiples of patch work
    patch_size: int = 16
    in_chans: int = 3            # 1 for grayscale ultrasound, 3 for RGB / H&E
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    cls_token: bool = True       # I-JEPA has none
    num_reg: int = 0             # register ("storage") tokens, DINOv3 uses 4
    pos_embed: str = "sincos"    # sincos | learned | rope
    rope_base: float = 100.0
    rope_rescale: float = 0.0    # s > 1 enables log-uniform coordinate rescaling in [1/s, s] in train mode
    layerscale: float = 0.0      # LayerScale init value (DINOv3 1e-5); 0 = no LayerScale
    drop_path: float = 0.0       # stochastic depth rate, the same for every block (as DINOv3)
    ln_eps: float = 1e-6         # MAE / I-JEPA / timm 1e-6, DINOv3 1e-5
    mask_token: bool = False     # learnable token replacing masked patches (DINOv3 iBOT)

    @property
    def grid(self):
        return self.img_size // self.patch_size

    @property
    def num_prefix(self):
        return int(self.cls_token) + self.num_reg


SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def vit_config(size="vit_small", **kw):
    if size not in SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(SIZES)}")
    d, depth, heads = SIZES[size]
    return ViTConfig(**{"embed_dim": d, "depth": depth, "num_heads": heads, **kw})  # kw may override depth


def vit_tiny(**kw):
    return ViT(vit_config("vit_tiny", **kw))


def vit_small(**kw):
    return ViT(vit_config("vit_small", **kw))


def vit_base(**kw):
    return ViT(vit_config("vit_base", **kw))

# -----------------------------------------------------------------------------
# positional encodings


def sincos_1d(dim, pos):
    """(M,) positions -> (M, dim) [sin(p w), cos(p w)], w_k = 10000^(-k/(dim/2)) (MAE util/pos_embed.py)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]                        # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim, gh, gw):
    """(gh*gw, dim) fixed table, row-major over the grid; first half encodes x (column), second half y (row)."""
    if dim % 4:
        raise ValueError(f"sincos positional embedding needs embed_dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, xs.flatten()), sincos_1d(dim // 2, ys.flatten())], dim=1)
    return emb.float()                                               # (gh*gw, dim)


class RopeEmbed(nn.Module):
    """DINOv3 axial RoPE; the buffer is named `periods` as in the official checkpoints (rope_embed.periods)."""

    def __init__(self, head_dim, base=100.0, rescale=0.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs head_dim divisible by 4, got {head_dim}")
        self.rescale = rescale
        n = head_dim // 4
        self.register_buffer("periods", base ** (2 * torch.arange(n, dtype=torch.float32) / (head_dim // 2)))

    def forward(self, gh, gw):
        """-> (sin, cos), each (gh*gw, head_dim), fp32."""
        dev = self.periods.device
        cy = (torch.arange(gh, device=dev, dtype=torch.float32) + 0.5) / gh * 2 - 1
        cx = (torch.arange(gw, device=dev, dtype=torch.float32) + 0.5) / gw * 2 - 1
        coords = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), dim=-1).reshape(-1, 2)  # (HW, 2) [y, x]
        if self.training and self.rescale > 1:
            # one log-uniform scale in [1/s, s] for both axes (dinov3 rope_position_encoding.py rescale_coords)
            log_s = math.log(self.rescale)
            coords = coords * torch.empty(1, device=dev).uniform_(-log_s, log_s).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None]   # (HW, 2, D/4)
        angles = angles.flatten(1).tile(2)                                      # (HW, D) [ty, tx, ty, tx]
        return angles.sin(), angles.cos()


def rope_apply(x, sin, cos):
    """x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a] on the last dim."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin

# -----------------------------------------------------------------------------
# blocks


class LayerScale(nn.Module):
    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, p, training):
    """Stochastic depth per sample (timm). DINOv3 drops a batch subset instead; the expectation is the same."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qk_v(self, x, rope=None, num_prefix=0):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                              # 3 x (B, H, N, Dh), strided views
        if rope is not None:
            sin, cos = rope                                               # (B or 1, 1, N - prefix, Dh)
            q = torch.cat([q[:, :, :num_prefix], rope_apply(q[:, :, num_prefix:], sin, cos).to(q.dtype)], 2)
            k = torch.cat([k[:, :, :num_prefix], rope_apply(k[:, :, num_prefix:], sin, cos).to(k.dtype)], 2)
        return q, k, v

    def forward(self, x, rope=None, num_prefix=0):
        B, N, D = x.shape
        q, k, v = self.qk_v(x, rope, num_prefix)
        x = kernels.attention(q, k, v)                                    # (B, H, N, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))              # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, dim, heads, mlp_ratio=4.0, qkv_bias=True, layerscale=0.0, drop_path=0.0, ln_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x, rope=None, num_prefix=0):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), rope, num_prefix)), self.drop_path, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)
        return x


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch}")
        return self.proj(x).flatten(2).transpose(1, 2)                    # (B, N, D)

# -----------------------------------------------------------------------------
# the ViT


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.pos_embed not in ("sincos", "learned", "rope"):
            raise ValueError(f"pos_embed must be sincos, learned or rope, got {cfg.pos_embed!r}")
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.cls_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_reg, D)) if cfg.num_reg else None
        self.mask_token = nn.Parameter(torch.zeros(1, D)) if cfg.mask_token else None
        n_pos = cfg.grid ** 2 + int(cfg.cls_token)     # the CLS row (zero for sincos) as MAE / timm
        if cfg.pos_embed == "sincos":
            # kept as a frozen parameter so that it appears in state dicts as MAE / I-JEPA store it
            table = sincos_2d(D, cfg.grid, cfg.grid)
            if cfg.cls_token:
                table = torch.cat([torch.zeros(1, D), table])
            self.pos_embed = nn.Parameter(table[None], requires_grad=False)   # (1, [1 +] N, D)
        elif cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, D))
        else:
            self.pos_embed = None
            self.rope_embed = RopeEmbed(D // cfg.num_heads, cfg.rope_base, cfg.rope_rescale)
        self.blocks = nn.ModuleList([
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.layerscale, cfg.drop_path, cfg.ln_eps)
            for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.init_weights()

    def init_weights(self):
        """timm / I-JEPA effective init: Linear and patch conv trunc_normal(0.02), zero bias, tokens normal(0.02)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for t in (self.cls_token, self.reg_token):
            if t is not None:
                nn.init.normal_(t, std=0.02)
        if self.cfg.pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def num_prefix(self):
        return self.cfg.num_prefix

    def patch_pos(self, gh, gw):
        """Positional table for the patch tokens of a gh x gw grid: (1, gh*gw, D); None for RoPE."""
        if self.pos_embed is None:
            return None
        if self.cfg.pos_embed == "sincos":
            if (gh, gw) == (self.cfg.grid, self.cfg.grid):
                return self.pos_embed[:, int(self.cfg.cls_token):]
            return sincos_2d(self.cfg.embed_dim, gh, gw).to(self.pos_embed)[None]
        table = self.pos_embed[:, int(self.cfg.cls_token):]                  # (1, g*g, D)
        if (gh, gw) == (self.cfg.grid, self.cfg.grid):
            return table
        g, D = self.cfg.grid, self.cfg.embed_dim
        table = table.reshape(1, g, g, D).permute(0, 3, 1, 2)                # (1, D, g, g)
        table = F.interpolate(table.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        return table.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, D)

    def prepare_tokens(self, x, ids_keep=None, mask=None):
        """Image -> tokens before the blocks: (B, prefix + K, D) and the RoPE (sin, cos) of the kept patches.

        ids_keep (B, K) int64 keeps only those patch tokens (after the positional embedding, as MAE and I-JEPA
        do), through the gather kernel. mask (B, N) bool replaces those patch embeddings by the mask token
        before positions are added (DINOv3 iBOT).
        """
        B, _, H, W = x.shape
        gh, gw = H // self.cfg.patch_size, W // self.cfg.patch_size
        x = self.patch_embed(x)                                              # (B, N, D)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("mask given but the ViT was built with mask_token=False")
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype)[None], x)
        pos = self.patch_pos(gh, gw)
        if ids_keep is not None:
            x = kernels.gather_tokens(x, ids_keep, pos)                      # (B, K, D), pos added then gathered
        elif pos is not None:
            x = x + pos
        rope = None
        if self.cfg.pos_embed == "rope":
            sin, cos = self.rope_embed(gh, gw)                               # (N, Dh) each
            if ids_keep is not None:
                sin, cos = sin[ids_keep], cos[ids_keep]                      # (B, K, Dh)
            else:
                sin, cos = sin[None], cos[None]                              # (1, N, Dh)
            rope = (sin[:, None].to(x.dtype), cos[:, None].to(x.dtype))      # (B|1, 1, K, Dh) broadcast over heads
        prefix = []
        if self.cls_token is not None:
            cls = self.cls_token
            if self.cfg.pos_embed != "rope":
                cls = cls + self.pos_embed[:, :1]                            # zero for sincos (MAE)
            prefix.append(cls.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if prefix:
            x = torch.cat(prefix + [x], dim=1)                               # (B, prefix + K, D)
        return x, rope

    def forward(self, x, ids_keep=None, mask=None, norm=True):
        """-> (B, prefix + K, D) tokens after the final LayerNorm (norm=False skips it)."""
        x, rope = self.prepare_tokens(x, ids_keep, mask)
        for blk in self.blocks:
            x = blk(x, rope, self.num_prefix)
        return self.norm(x) if norm else x

    def forward_tokens(self, x, rope=None):
        """Run the blocks and final norm on already prepared tokens (MAE's encoder, predictors)."""
        for blk in self.blocks:
            x = blk(x, rope, self.num_prefix)
        return self.norm(x)

    @torch.no_grad()
    def last_qk(self, x, ids_keep=None):
        """q, k (B, H, prefix + N, Dh) of the last block, RoPE applied, for attention maps (kernels.attention_map)."""
        x, rope = self.prepare_tokens(x, ids_keep)
        for blk in self.blocks[:-1]:
            x = blk(x, rope, self.num_prefix)
        last = self.blocks[-1]
        q, k, _ = last.attn.qk_v(last.norm1(x), rope, self.num_prefix)
        return q, k

    def embed(self, x, pool):
        """Image -> one vector per image: 'cls' token or 'mean' of patch tokens (registers excluded)."""
        t = self(x)
        if pool == "cls":
            if not self.cfg.cls_token:
                raise ValueError("pool='cls' but this ViT has no CLS token; use pool='mean'")
            return t[:, 0]
        if pool == "mean":
            return t[:, self.num_prefix:].mean(dim=1)
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")

# -----------------------------------------------------------------------------
# checkpoints: safetensors + a JSON "pretext" metadata entry


FORMAT = "pretext-checkpoint-1"


def pack_state(obj, prefix):
    """Nested dicts/lists with tensors (e.g. optimizer.state_dict()) -> ({name: tensor}, JSON-able skeleton)."""
    tensors = {}

    def walk(o, path):
        if torch.is_tensor(o):
            tensors[path] = o.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(o, dict):
            return {"__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in o.items()]}  # keeps int keys
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(o)]
        return o

    return tensors, walk(obj, prefix)


def unpack_state(skeleton, tensors):
    """Inverse of pack_state."""
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {k: unpack_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unpack_state(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(path, encoder, *, method, pool, mean, std, args=None, step=0, tensors=None, state=None):
    """Write a pretext checkpoint: `encoder.*` weights (+ any extra named tensors) and JSON metadata.

    The file is written to `path.tmp` and renamed over `path`, so a run killed while saving leaves the
    previous checkpoint intact.
    """
    from safetensors.torch import save_file
    if pool not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    cfg = encoder.cfg
    if len(mean) != cfg.in_chans or len(std) != cfg.in_chans:
        raise ValueError(f"mean/std need {cfg.in_chans} values (in_chans), got {mean} / {std}")
    out = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    for k, v in (tensors or {}).items():
        if k.startswith("encoder."):
            raise ValueError(f"extra tensor name {k!r} collides with the encoder's namespace")
        out[k] = v.detach().cpu().contiguous()
    meta = {"format": FORMAT, "method": method, "vit": asdict(cfg), "img_size": cfg.img_size,
            "in_chans": cfg.in_chans, "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "pool": pool, "step": int(step), "args": args or {}, "state": state or {}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    save_file(out, tmp, metadata={"pretext": json.dumps(meta)})
    with open(tmp, "rb") as f:                  # on disk before the rename: a power cut leaves either file whole
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """-> (tensors, meta) of a pretext checkpoint; a clear error for anything else."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            raw = (f.metadata() or {}).get("pretext")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e}). pretext checkpoints are written by mae.py, "
                         f"dino.py or ijepa.py; convert official weights with `python vit.py convert`") from None
    if raw is None:
        raise ValueError(f"{path}: a safetensors file without pretext metadata; convert it with "
                         f"`python vit.py convert {path} --from timm --out X.safetensors`")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its pretext metadata is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT!r})")
    return tensors, meta


def config_from_meta(meta):
    known = {f.name for f in fields(ViTConfig)}
    return ViTConfig(**{k: v for k, v in meta["vit"].items() if k in known})


def load_encoder(path, device="cpu"):
    """-> (ViT in eval mode with the checkpoint's encoder weights, metadata dict)."""
    tensors, meta = load_checkpoint(path)
    model = ViT(config_from_meta(meta))
    sd = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: encoder tensors do not fit its ViT config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {wrong[:5]})")
    model.load_state_dict(sd)
    return model.to(device).eval(), meta

# -----------------------------------------------------------------------------
# command line: `python vit.py demo` (a smoke run through every kernel op and the checkpoint contract)


def demo_main(argv=None):
    import argparse
    import glob
    import time

    import numpy as np
    from PIL import Image
    p = argparse.ArgumentParser(prog="vit.py demo", description="ViT-S forward/backward through every kernel op, "
                                "then a checkpoint written and reloaded")
    p.add_argument("--data", default="runs/demo/data", help="folder with frames (prep/synthetic.py output)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--size", default="vit_small", choices=sorted(SIZES))
    p.add_argument("--batch-size", type=int, default=4)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    files = sorted(glob.glob(os.path.join(a.data, "**", "*.png"), recursive=True))[: a.batch_size]
    if not files:
        raise SystemExit(f"no .png frames under {a.data}; run `python prep/synthetic.py --out {a.data}` first")
    imgs = np.stack([np.asarray(Image.open(f).convert("L").resize((224, 224), Image.BILINEAR)) for f in files])
    x = torch.from_numpy(imgs).float().div(255)[:, None].to(device)          # (B, 1, 224, 224)
    mean, std = x.mean().item(), x.std().item()
    x = (x - mean) / std
    print(f"{len(files)} frames from {a.data} on {device}")
    model = ViT(vit_config(a.size, in_chans=1)).to(device)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"{a.size}: {n_params / 1e6:.1f}M parameters, {model.cfg.grid ** 2} patches + CLS")
    t0 = time.time()
    kernels.reset_report()
    B, N = x.shape[0], model.cfg.grid ** 2
    ids_keep = torch.rand(B, N, device=device).argsort(1)[:, : N // 4]       # (B, 49) an MAE-style visible set
    tokens = model(x, ids_keep=ids_keep)                                     # gather + attention
    sim = kernels.cosine_similarity(tokens[:, 1:], tokens[:, 1:])            # (B, 49, 49)
    loss = tokens.pow(2).mean() + sim.mean()
    loss.backward()
    grad = sum(t.grad.norm() ** 2 for t in model.parameters() if t.grad is not None) ** 0.5
    print(f"forward+backward (gather, attention, cosine similarity): loss {loss.item():.4f}, "
          f"grad norm {grad.item():.3f}, {time.time() - t0:.2f}s")
    q, k = model.last_qk(x)
    att = kernels.attention_map(q, k, torch.tensor([0], device=device))      # (B, H, 1, N+1) CLS row
    print(f"attention map of the CLS query: {tuple(att.shape)}, rows sum to {att.sum(-1).mean().item():.4f}")
    print(f"kernels: {kernels.report_line()}")                               # the path each op took, and why
    path = os.path.join(a.out, "vit_demo.safetensors")
    save_checkpoint(path, model, method="demo", pool="cls", mean=[mean], std=[std], args=vars(a), step=0)
    model2, meta = load_encoder(path, device)
    model.eval()
    with torch.no_grad():
        diff = (model2(x) - model(x)).abs().max().item()
    print(f"checkpoint {path}: {os.path.getsize(path) / 1e6:.1f} MB, method={meta['method']} pool={meta['pool']}, "
          f"reloaded output max |diff| = {diff:.2e}")


# -----------------------------------------------------------------------------
# official checkpoints: `python vit.py convert SRC --from mae|ijepa|dinov3|timm --out X.safetensors`
#
# Key names and shapes: those of timm's VisionTransformer (vit_small_patch16_224), which MAE's models_mae.py and
# I-JEPA's src/models/vision_transformer.py follow (I-JEPA saves encoder / predictor / target_encoder with DDP's
# "module." prefix, src/train.py:248-260); DINOv3 (dinov3/models/vision_transformer.py) names the registers
# storage_tokens and masks the k part of the qkv bias. So MAE, I-JEPA and timm weights map by name; DINOv3 needs
# storage_tokens -> reg_token and its masked k-bias folded.
# Nothing is unpickled beyond tensors and plain containers: torch.load(weights_only=True), or safetensors.

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
OFFICIAL = {                  # source: (entry of the checkpoint that holds the encoder, pool the paper uses)
    "mae": ("model", "cls"),                 # mae util/misc.py save_model: {model, optimizer, epoch, scaler, args}
    "ijepa": ("target_encoder", "mean"),     # ijepa src/train.py:248-260; the paper probes the target encoder
    "dinov3": (None, "cls"),                 # hub backbones (dinov3_vits16_pretrain_*.pth): a bare state dict
    "timm": (None, "cls"),                   # pytorch_model.bin / model.safetensors: a bare state dict
}
HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}  # width -> heads, timm/MAE/I-JEPA ViTs
WRAPPERS = ("module.", "backbone.", "_orig_mod.")   # DDP (I-JEPA), DINO teacher (--key teacher), torch.compile


def read_official(path):
    """An official checkpoint file -> whatever it holds (dict of tensors, or of entries), never running code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    import argparse
    import pickle
    try:
        # MAE's checkpoints carry an argparse.Namespace (args); allowing it runs no code, it only sets attributes
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), str(e).splitlines()[0])
        why = why.split(" was not an allowed")[0]
        raise ValueError(f"{path}: torch.load(weights_only=True) refused it ({why}). pretext never unpickles "
                         f"arbitrary objects; in a session you trust, re-save only the weights, e.g. "
                         f"torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth')") from None
    except RuntimeError as e:
        raise ValueError(f"{path}: not a PyTorch checkpoint ({str(e).splitlines()[0]})") from None


def guess_source(obj):
    """Which official layout a loaded checkpoint looks like (for error messages), or None."""
    if not isinstance(obj, dict):
        return None
    if "target_encoder" in obj:
        return "ijepa"
    if isinstance(obj.get("model"), dict):
        return "mae"
    keys = {k.split(".", 1)[1] if k.startswith(WRAPPERS) else k for k in obj}
    if "storage_tokens" in keys or "rope_embed.periods" in keys:
        return "dinov3"
    if "pos_embed" in keys:
        return "timm"
    return None


def official_state_dict(obj, source, path, key=None):
    """Pick the encoder's entry (`model`, `target_encoder`, ...), strip wrapper prefixes, cast to float32."""
    guess = guess_source(obj)
    hint = f"; it looks like {guess} weights: use --from {guess}" if guess and guess != source else ""
    entry = key or OFFICIAL[source][0]
    if entry is not None:
        if not isinstance(obj, dict) or entry not in obj:
            found = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}: no {entry!r} entry (it holds {found}), so it is not an official {source} "
                             f"checkpoint{hint}")
        obj = obj[entry]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        found = [k for k, v in obj.items() if not torch.is_tensor(v)][:8] if isinstance(obj, dict) else type(obj)
        raise ValueError(f"{path}: expected a state dict of tensors{f' under {entry!r}' if entry else ''}, "
                         f"found non-tensor entries {found}{hint}")
    sd = {}
    for k, v in obj.items():
        for p in WRAPPERS:
            k = k[len(p):] if k.startswith(p) else k
        sd[k] = v.float()
    return sd


def convert_state_dict(sd, source, path="", img_size=None, num_heads=None):
    """Official names -> a ViT with those weights; the ViTConfig is read off the tensor shapes."""
    guess = guess_source(sd)
    hint = f"; it looks like {guess} weights: use --from {guess}" if guess and guess != source else ""
    if "patch_embed.proj.weight" not in sd:
        raise ValueError(f"{path}: no patch_embed.proj.weight, so not a ViT state dict{hint}")
    for bad, why in (("mlp.w1.weight", "a SwiGLU FFN (DINOv3 ViT-S+/H+/7B)"), ("mlp.fc1_g.weight", "a SwiGLU FFN"),
                     ("attn.q_norm.weight", "qk-norm"), ("fc_norm.weight", "fc_norm after pooling (no per-token "
                      "final norm)"), ("cls_norm.weight", "separate CLS / patch norms"), ("norm_pre.weight", "a "
                      "pre-norm (CLIP)")):
        if any(k.endswith(bad) for k in sd):
            raise ValueError(f"{path}: this ViT has {why}, which pretext's ViT does not implement; "
                             f"supported: plain ViT-S/B/L-style encoders")
    D, C, p, p2 = sd["patch_embed.proj.weight"].shape                     # (D, in_chans, p, p) conv
    if p != p2:
        raise ValueError(f"{path}: non-square patches {p}x{p2} are not supported")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    has_cls = "cls_token" in sd
    if source == "dinov3":
        if "pos_embed" in sd or "rope_embed.periods" not in sd:
            raise ValueError(f"{path}: DINOv3 backbones use RoPE (rope_embed.periods) and no pos_embed; this one "
                             f"{'has a pos_embed' if 'pos_embed' in sd else 'has no rope_embed.periods'}{hint}")
    elif "rope_embed.periods" in sd or "storage_tokens" in sd or "pos_embed" not in sd:
        raise ValueError(f"{path}: {source} ViTs have a pos_embed table and no RoPE / storage tokens{hint}")
    if source == "ijepa" and has_cls:
        raise ValueError(f"{path}: I-JEPA encoders have no CLS token but this one does{hint or '; try --from mae'}")
    if source == "mae" and not has_cls:
        raise ValueError(f"{path}: MAE encoders have a CLS token but this one has none{hint}")

    drop = {"mae": ("decoder_", "mask_token"), "timm": ("head.",), "ijepa": (),
            "dinov3": ("head.", "dino_head.", "ibot_head.")}[source]          # heads: not the encoder
    out = {}
    for k, v in sd.items():
        if k.startswith(drop) or k.endswith("attn.qkv.bias_mask"):
            continue
        out[{"storage_tokens": "reg_token"}.get(k, k)] = v
    for i in range(depth):
        # DINOv3 LinearKMaskedBias: the qkv bias is used as bias * bias_mask, the mask zeroing the k third
        # (dinov3 layers/attention.py, mask set in vision_transformer.py:45-48); fold it in
        m = sd.get(f"blocks.{i}.attn.qkv.bias_mask")
        if m is not None:
            if not torch.isfinite(m).all():   # the NaN placeholder of an uninitialised module: use the real mask
                m = torch.ones_like(m)
                m[D:2 * D] = 0
            out[f"blocks.{i}.attn.qkv.bias"] = out[f"blocks.{i}.attn.qkv.bias"] * m
    if "reg_token" in out and out["reg_token"].shape[1] == 0:
        del out["reg_token"]                                             # an empty (1, 0, D) storage-token tensor
    num_reg = out["reg_token"].shape[1] if "reg_token" in out else 0
    if "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(1, D)              # DINOv3 stores (1, D)

    if "rope_embed.periods" in out:
        periods = out["rope_embed.periods"]                              # (head_dim / 4,)
        heads = D // (4 * len(periods))
        # periods_i = base^(4i / head_dim) (RopeEmbed); the file's own periods are loaded either way
        base = float(periods[1] ** (D // heads / 4)) if len(periods) > 1 else 100.0
        kind, img = "rope", img_size or 224
    else:
        heads = num_heads or HEADS.get(D) or D // 64
        base = 100.0
        pos = out["pos_embed"]                                            # (1, rows, D)
        rows = pos.shape[1]
        # timm keeps a row per prefix token (cls [+ registers]) unless no_embed_class; I-JEPA has none
        n_pre = next((c for c in (int(has_cls) + num_reg, int(has_cls), 0)
                      if rows - c > 0 and math.isqrt(rows - c) ** 2 == rows - c), None)
        if n_pre is None:
            raise ValueError(f"{path}: pos_embed has {rows} rows, not a square grid plus prefix tokens")
        grid = math.isqrt(rows - n_pre)
        if n_pre > int(has_cls):   # registers got a pos row: fold it into the token (timm adds it, ViT does not)
            out["reg_token"] = out["reg_token"] + pos[:, int(has_cls):n_pre]
        cls_row = pos[:, :1] if has_cls and n_pre else pos.new_zeros(1, 1, D)
        table = torch.cat([cls_row, pos[:, n_pre:]], 1) if has_cls else pos[:, n_pre:]   # (1, [1 +] g*g, D)
        ref = sincos_2d(D, grid, grid) if D % 4 == 0 else None
        if ref is not None and has_cls:
            ref = torch.cat([torch.zeros(1, D), ref])
        sincos = ref is not None and torch.allclose(table[0], ref, atol=1e-4)
        if source in ("mae", "ijepa") and not sincos:
            print(f"note: {path}: pos_embed is not the 2D sin-cos table; kept as a learned table")
        out["pos_embed"] = table
        kind, img = ("sincos" if sincos else "learned"), grid * p
        if img_size and img_size != img:
            raise ValueError(f"{path}: its pos_embed is for {img} px images (grid {grid}), not --img-size "
                             f"{img_size}; convert without --img-size (other sizes are interpolated at run time)")
    if D % heads:
        raise ValueError(f"{path}: cannot infer the number of heads for width {D}; pass --heads")
    hidden = out["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in out else 4 * D
    cfg = ViTConfig(img_size=img, patch_size=p, in_chans=C, embed_dim=D, depth=depth, num_heads=heads,
                    mlp_ratio=hidden / D, qkv_bias="blocks.0.attn.qkv.bias" in out, cls_token=has_cls,
                    num_reg=num_reg, pos_embed=kind, rope_base=base,
                    layerscale=1e-5 if "blocks.0.ls1.gamma" in out else 0.0,   # any nonzero: the file sets gamma
                    ln_eps=1e-5 if source == "dinov3" else 1e-6, mask_token="mask_token" in out)
    model = ViT(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(out)), sorted(set(out) - set(expected))
    wrong = [f"{k}: {tuple(out[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in out and out[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: the {source} weights do not map onto pretext's ViT (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}){hint}")
    model.load_state_dict(out)
    return model.eval()


def convert_checkpoint(src, source, out, mean=None, std=None, img_size=None, num_heads=None, key=None):
    """Official weights -> a pretext checkpoint (method=source, pool as the paper evaluates that method)."""
    if source not in OFFICIAL:
        raise ValueError(f"--from must be one of {sorted(OFFICIAL)}, got {source!r}")
    sd = official_state_dict(read_official(src), source, src, key)
    model = convert_state_dict(sd, source, src, img_size, num_heads)
    C = model.cfg.in_chans
    mean = list(mean) if mean else (IMAGENET_MEAN if C == 3 else [sum(IMAGENET_MEAN) / 3] * C)
    std = list(std) if std else (IMAGENET_STD if C == 3 else [sum(IMAGENET_STD) / 3] * C)
    pool = OFFICIAL[source][1] if model.cfg.cls_token else "mean"
    save_checkpoint(out, model, method=source, pool=pool, mean=mean, std=std,
                    args={"converted_from": os.path.abspath(src), "from": source, "key": key or OFFICIAL[source][0]})
    return model, pool


def convert_main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="vit.py convert", description="official MAE / I-JEPA / DINOv3 / timm ViT "
                                "weights -> a pretext checkpoint that probe.py, abmil.py and viz.py read")
    p.add_argument("src", help="official checkpoint (.pth / .pth.tar / .bin / .safetensors)")
    p.add_argument("--from", dest="source", required=True, choices=sorted(OFFICIAL))
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel (default ImageNet)")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std per channel (default ImageNet)")
    p.add_argument("--img-size", type=int, help="input size recorded for RoPE models (default 224)")
    p.add_argument("--heads", type=int, help="attention heads when the width is not a standard ViT size")
    p.add_argument("--key", help="checkpoint entry holding the encoder (default: model / target_encoder / none)")
    a = p.parse_args(argv)
    try:
        model, pool = convert_checkpoint(a.src, a.source, a.out, a.mean, a.std, a.img_size, a.heads, a.key)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    c = model.cfg
    n = sum(t.numel() for t in model.parameters()) / 1e6
    print(f"{a.src} ({a.source}) -> {a.out}: {n:.1f}M parameters, embed {c.embed_dim}, depth {c.depth}, "
          f"heads {c.num_heads}, patch {c.patch_size}, img {c.img_size}, in_chans {c.in_chans}, "
          f"pos {c.pos_embed}, cls {c.cls_token}, registers {c.num_reg}, pool {pool}")


if __name__ == "__main__":
    import sys
    commands = {"demo": demo_main, "convert": convert_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: python vit.py {{{','.join(commands)}}} [options]")
    commands[sys.argv[1]](sys.argv[2:])
