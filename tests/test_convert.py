"""vit.py convert: official MAE / I-JEPA / DINOv3 / timm state dicts (key names and shapes as in
ssl-methods.md section 1, tiny dims) -> pretext checkpoints whose forward equals an independent forward
written from the official code paths; wrong sources are refused with a message naming the right one."""
import argparse
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vit
from vit import convert_checkpoint, convert_main, load_encoder

ROOT = __file__.rsplit("/tests/", 1)[0]


def mae_sincos(D, g, cls):
    """MAE util/pos_embed.py get_2d_sincos_pos_embed in numpy: grid = meshgrid(w, h), emb = [emb(x), emb(y)]."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64))
    emb = np.concatenate([one(D // 2, grid[0]), one(D // 2, grid[1])], axis=1)
    if cls:
        emb = np.concatenate([np.zeros([1, D]), emb], axis=0)
    return torch.from_numpy(emb).float()[None]


def blocks(D, depth, ls=False, kmask=False, hidden=None, g=None):
    g = g or torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2   # noqa: E731
    sd = {}
    hidden = hidden or 4 * D
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                   b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(hidden, D),
                   b + "mlp.fc1.bias": r(hidden), b + "mlp.fc2.weight": r(D, hidden), b + "mlp.fc2.bias": r(D)})
        if ls:
            sd.update({b + "ls1.gamma": 1 + r(D), b + "ls2.gamma": 1 + r(D)})
        if kmask:
            m = torch.ones(3 * D)
            m[D:2 * D] = 0
            sd[b + "attn.qkv.bias_mask"] = m
    sd.update({"norm.weight": 1 + r(D), "norm.bias": r(D)})
    return sd


def patch(D, C, p, g=None):
    g = g or torch.Generator().manual_seed(2)
    return {"patch_embed.proj.weight": torch.randn(D, C, p, p, generator=g) * 0.1,
            "patch_embed.proj.bias": torch.randn(D, generator=g) * 0.1}


def official_forward(sd, x, style, heads):
    """Encoder forward written from the official code paths, straight from the official state dict.

    timm/MAE: cat([cls, reg]) then + pos_embed (rows for prefix tokens too); timm no_embed_class: + pos on the
    patches, then cat; I-JEPA: + pos, no CLS; DINOv3: cat([cls, storage, patches]), RoPE on the patch q/k with
    the file's periods (rope_position_encoding.py), qkv bias * bias_mask, LayerScale, LayerNorm eps 1e-5."""
    W = sd["patch_embed.proj.weight"]
    p = W.shape[-1]
    t = F.conv2d(x, W, sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)   # (B, N, D)
    B, N, D = t.shape
    gh, gw = x.shape[2] // p, x.shape[3] // p
    prefix = [sd["cls_token"].expand(B, -1, -1)] if "cls_token" in sd else []
    reg = sd.get("reg_token", sd.get("storage_tokens"))
    prefix += [reg.expand(B, -1, -1)] if reg is not None else []
    if style == "embed_class":
        t = torch.cat(prefix + [t], 1) + sd["pos_embed"]
    elif style == "no_embed_class":
        t = torch.cat(prefix + [t + sd["pos_embed"]], 1)
    else:  # dinov3
        t = torch.cat(prefix + [t], 1)
    P = t.shape[1] - N
    rope = None
    if style == "dinov3":
        periods = sd["rope_embed.periods"]
        cy = torch.arange(0.5, gh) / gh * 2 - 1
        cx = torch.arange(0.5, gw) / gw * 2 - 1
        coords = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), -1).flatten(0, 1)        # (HW, 2)
        ang = (2 * math.pi * coords[:, :, None] / periods[None, None]).flatten(1).tile(2)     # (HW, Dh)
        rope = ang.sin(), ang.cos()
    eps = 1e-5 if style == "dinov3" else 1e-6
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = lambda n: sd[f"blocks.{i}.{n}"]   # noqa: E731
        h = F.layer_norm(t, (D,), b("norm1.weight"), b("norm1.bias"), eps)
        bias = b("attn.qkv.bias") * sd.get(f"blocks.{i}.attn.qkv.bias_mask", 1.0)
        q, k, v = F.linear(h, b("attn.qkv.weight"), bias).reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            sin, cos = rope
            rot = lambda z: torch.cat([-z.chunk(2, -1)[1], z.chunk(2, -1)[0]], -1)   # noqa: E731
            q = torch.cat([q[:, :, :P], q[:, :, P:] * cos + rot(q[:, :, P:]) * sin], 2)
            k = torch.cat([k[:, :, :P], k[:, :, P:] * cos + rot(k[:, :, P:]) * sin], 2)
        a = ((q @ k.transpose(-1, -2)) * (D // heads) ** -0.5).softmax(-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(B, -1, D), b("attn.proj.weight"), b("attn.proj.bias"))
        t = t + a * sd.get(f"blocks.{i}.ls1.gamma", 1.0)
        h = F.layer_norm(t, (D,), b("norm2.weight"), b("norm2.bias"), eps)
        m = F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias")))
        m = F.linear(m, b("mlp.fc2.weight"), b("mlp.fc2.bias"))
        t = t + m * sd.get(f"blocks.{i}.ls2.gamma", 1.0)
    return F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps)


def check_same(path, sd, style, heads, C=3, size=32):
    model, meta = load_encoder(path)
    x = torch.randn(2, C, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(sd, x, style, heads), atol=2e-5, rtol=1e-4)
    return model, meta


def test_mae_pretrain_checkpoint(tmp_path):
    D, p, g = 192, 8, 4                                                   # heads 3 from the width (ViT-Ti)
    enc = {"cls_token": torch.randn(1, 1, D) * 0.1, "pos_embed": mae_sincos(D, g, cls=True),
           **patch(D, 3, p), **blocks(D, 2)}
    dec = {"mask_token": torch.randn(1, 1, 64), "decoder_embed.weight": torch.randn(64, D),
           "decoder_pos_embed": torch.zeros(1, 1 + g * g, 64), "decoder_blocks.0.norm1.weight": torch.ones(64),
           "decoder_norm.weight": torch.ones(64), "decoder_pred.weight": torch.randn(p * p * 3, 64)}
    src = tmp_path / "checkpoint-799.pth"
    torch.save({"model": {**enc, **dec}, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "epoch": 799,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75)}, src)
    out = tmp_path / "mae.safetensors"
    convert_main([str(src), "--from", "mae", "--out", str(out)])
    model, meta = check_same(out, enc, "embed_class", heads=3)
    c = model.cfg
    assert (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.img_size, c.in_chans) == (D, 2, 3, p, 32, 3)
    assert c.pos_embed == "sincos" and c.cls_token and c.num_reg == 0 and c.ln_eps == 1e-6 and not c.mask_token
    assert meta["pool"] == "cls" and meta["method"] == "mae"
    assert meta["mean"] == vit.IMAGENET_MEAN and meta["std"] == vit.IMAGENET_STD
    # sincos is recomputed for other grids: 48 px gives a 6x6 grid without interpolation
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ref = official_forward({**enc, "pos_embed": mae_sincos(D, 6, cls=True)}, x, "embed_class", 3)
        torch.testing.assert_close(model(x), ref, atol=2e-5, rtol=1e-4)


def test_ijepa_takes_target_encoder_and_strips_module(tmp_path):
    D, p, g = 192, 16, 2
    tgt = {"pos_embed": mae_sincos(D, g, cls=False), **patch(D, 1, p), **blocks(D, 3)}
    ctx = {k: v + 1 for k, v in tgt.items()}                               # the context encoder must not be used
    wrap = lambda sd: {f"module.{k}": v for k, v in sd.items()}            # noqa: E731  DDP-wrapped (train.py)
    src = tmp_path / "in1k-latest.pth.tar"
    torch.save({"encoder": wrap(ctx), "predictor": {"module.predictor_embed.weight": torch.randn(8, D)},
                "target_encoder": wrap(tgt), "opt": {"state": {}, "param_groups": []}, "scaler": None,
                "epoch": 1, "loss": 0.31, "batch_size": 4, "world_size": 1, "lr": 1e-3}, src)
    out = tmp_path / "ijepa.safetensors"
    model, pool = convert_checkpoint(src, "ijepa", out, mean=[0.2], std=[0.25])
    m2, meta = check_same(out, tgt, "embed_class", heads=3, C=1)
    assert meta["pool"] == "mean" and not m2.cfg.cls_token and m2.cfg.pos_embed == "sincos" and m2.cfg.in_chans == 1
    assert meta["mean"] == [0.2] and meta["std"] == [0.25]


def dinov3_state_dict(D=64, heads=4, R=4, depth=2, p=8):
    hd = D // heads
    periods = 100.0 ** (2 * torch.arange(hd // 4).float() / (hd // 2))   # rope_position_encoding.py, base 100
    return {"cls_token": torch.randn(1, 1, D) * 0.5, "storage_tokens": torch.randn(1, R, D) * 0.5,
            "mask_token": torch.zeros(1, D), "rope_embed.periods": periods,
            **patch(D, 3, p), **blocks(D, depth, ls=True, kmask=True)}


def test_dinov3_backbone(tmp_path):
    sd = dinov3_state_dict()
    src = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(sd, src)
    out = tmp_path / "dinov3.safetensors"
    convert_main([str(src), "--from", "dinov3", "--out", str(out), "--img-size", "32"])
    model, meta = check_same(out, sd, "dinov3", heads=4)
    c = model.cfg
    assert c.num_heads == 4 and c.num_reg == 4 and c.pos_embed == "rope" and c.ln_eps == 1e-5 and c.mask_token
    assert c.layerscale and abs(c.rope_base - 100.0) < 1e-3 and c.img_size == 32 and meta["pool"] == "cls"
    qkv_b = model.blocks[0].attn.qkv.bias
    assert torch.all(qkv_b[64:128] == 0) and torch.equal(qkv_b[:64], sd["blocks.0.attn.qkv.bias"][:64])
    # RoPE at another grid (48 px) still matches: periods come from the file
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(sd, x, "dinov3", 4), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["plain", "reg_embed_class", "reg_no_embed_class"])
def test_timm_vit(tmp_path, variant):
    D, p, g, R = 192, 8, 4, 2
    gen = torch.Generator().manual_seed(5)
    sd = {"cls_token": torch.randn(1, 1, D, generator=gen) * 0.3, **patch(D, 3, p), **blocks(D, 2, ls=True),
          "head.weight": torch.randn(10, D), "head.bias": torch.zeros(10)}
    rows = g * g + 1
    if variant != "plain":
        sd["reg_token"] = torch.randn(1, R, D, generator=gen) * 0.3
        rows = g * g + (1 + R if variant == "reg_embed_class" else 0)
    sd["pos_embed"] = torch.randn(1, rows, D, generator=gen) * 0.3
    src = tmp_path / "model.safetensors"
    save_file(sd, src)
    out = tmp_path / "timm.safetensors"
    convert_checkpoint(src, "timm", out)
    style = "no_embed_class" if variant == "reg_no_embed_class" else "embed_class"
    model, meta = check_same(out, {k: v for k, v in sd.items() if not k.startswith("head")}, style, heads=3)
    assert model.cfg.pos_embed == "learned" and model.cfg.num_reg == (0 if variant == "plain" else R)
    assert meta["pool"] == "cls"


@pytest.mark.parametrize("make,source,expect", [
    ("mae", "ijepa", "no 'target_encoder' entry.*use --from mae"),
    ("ijepa", "mae", "no 'model' entry.*use --from ijepa"),
    ("dinov3", "timm", "pos_embed table and no RoPE.*use --from dinov3"),
    ("timm", "dinov3", "DINOv3 backbones use RoPE.*has a pos_embed.*use --from timm"),
    ("mae_flat", "ijepa", "no 'target_encoder' entry"),
    ("swiglu", "dinov3", "SwiGLU"),
    ("ijepa_as_timm_with_cls", "ijepa", "no CLS token but this one does"),
])
def test_refuses_wrong_source(tmp_path, make, source, expect):
    D = 64
    base = {**patch(D, 3, 8), **blocks(D, 1)}
    objs = {
        "mae": {"model": {"cls_token": torch.zeros(1, 1, D), "pos_embed": torch.zeros(1, 17, D), **base}},
        "ijepa": {"target_encoder": {"module.pos_embed": torch.zeros(1, 16, D), **base}, "encoder": {}},
        "dinov3": dinov3_state_dict(),
        "timm": {"cls_token": torch.zeros(1, 1, D), "pos_embed": torch.zeros(1, 17, D), **base},
        "mae_flat": {"cls_token": torch.zeros(1, 1, D), "pos_embed": torch.zeros(1, 17, D), **base},
        "swiglu": {**{k.replace("mlp.fc1", "mlp.w1"): v for k, v in dinov3_state_dict().items()}},
        "ijepa_as_timm_with_cls": {"target_encoder": {"cls_token": torch.zeros(1, 1, D),
                                                       "pos_embed": torch.zeros(1, 17, D), **base}},
    }
    src = tmp_path / f"{make}.pth"
    torch.save(objs[make], src)
    with pytest.raises(ValueError, match=expect):
        convert_checkpoint(src, source, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


class NotATensor:
    pass


def test_never_unpickles_arbitrary_objects(tmp_path):
    src = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "thing": NotATensor()}, src)
    with pytest.raises(ValueError, match=r"weights_only=True\) refused.*NotATensor"):
        convert_checkpoint(src, "mae", tmp_path / "x.safetensors")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        convert_checkpoint(junk, "timm", tmp_path / "x.safetensors")
    with pytest.raises(SystemExit, match="no such file"):
        convert_main([str(tmp_path / "missing.pth"), "--from", "timm", "--out", str(tmp_path / "x.safetensors")])


def test_command_line_is_wired(tmp_path):
    sd = dinov3_state_dict(depth=1)
    torch.save(sd, tmp_path / "d.pth")
    r = subprocess.run([sys.executable, "vit.py", "convert", str(tmp_path / "d.pth"), "--from", "dinov3",
                        "--out", str(tmp_path / "d.safetensors")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "registers 4" in r.stdout and (tmp_path / "d.safetensors").exists()
