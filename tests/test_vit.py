"""vit.py: positional encodings against the official formulas, ids_keep, registers, sizes."""
import math

import numpy as np
import pytest
import torch

import kernels
from vit import ViT, ViTConfig, RopeEmbed, rope_apply, sincos_2d, vit_config, vit_small, vit_tiny


def mae_sincos_numpy(D, gh, gw):
    """MAE util/pos_embed.py's formula, written out in numpy (grid = meshgrid(w, h): grid[0] is the column)."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    return np.concatenate([one(D // 2, grid[0]), one(D // 2, grid[1])], axis=1)


@pytest.mark.parametrize("D,gh,gw", [(384, 14, 14), (192, 10, 14), (64, 1, 1)])
def test_sincos_matches_mae_formula(D, gh, gw):
    np.testing.assert_allclose(sincos_2d(D, gh, gw).numpy(), mae_sincos_numpy(D, gh, gw), atol=1e-6)


def test_sincos_pos_embed_layout_and_frozen():
    m = vit_tiny(img_size=64)
    assert m.pos_embed.shape == (1, 1 + 16, 192) and not m.pos_embed.requires_grad
    assert torch.equal(m.pos_embed[0, 0], torch.zeros(192))                 # CLS row is zero (MAE)
    m2 = vit_tiny(img_size=64, cls_token=False)
    assert m2.pos_embed.shape == (1, 16, 192)                               # I-JEPA: no CLS row


def dinov3_rope(head_dim, base, gh, gw):
    """DINOv3 rope_position_encoding.py written out: periods, separate coords, [ty, tx] tiled twice."""
    periods = base ** (2 * np.arange(head_dim // 4) / (head_dim // 2))
    cy = 2 * (np.arange(gh) + 0.5) / gh - 1
    cx = 2 * (np.arange(gw) + 0.5) / gw - 1
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    coords = np.stack([yy.ravel(), xx.ravel()], axis=-1)                    # (HW, 2)
    ang = 2 * np.pi * coords[:, :, None] / periods[None, None]               # (HW, 2, D/4)
    ang = np.tile(ang.reshape(len(coords), -1), 2)                           # (HW, D)
    return np.sin(ang), np.cos(ang)


def test_rope_matches_dinov3_formula():
    r = RopeEmbed(64, base=100.0).eval()
    assert r.periods.shape == (16,)
    np.testing.assert_allclose(r.periods.numpy(), 100 ** (np.arange(16) / 16), rtol=1e-6)
    sin, cos = r(5, 7)
    s_ref, c_ref = dinov3_rope(64, 100.0, 5, 7)
    np.testing.assert_allclose(sin.numpy(), s_ref, atol=1e-5)
    np.testing.assert_allclose(cos.numpy(), c_ref, atol=1e-5)


def test_rope_apply_rotates_pairs_and_is_relative():
    x = torch.randn(10, 8)
    theta = torch.rand(10, 4) * 6
    sin, cos = theta.tile(2).sin(), theta.tile(2).cos()
    y = rope_apply(x, sin, cos)
    z = torch.complex(x[:, :4], x[:, 4:]) * torch.exp(1j * theta)            # pair (j, j + D/2) rotated by theta_j
    torch.testing.assert_close(y, torch.cat([z.real, z.imag], 1))
    # scores depend only on the angle difference: shifting every angle leaves q.k unchanged
    q, k = torch.randn(8), torch.randn(8)
    a1, a2, d = torch.rand(4), torch.rand(4), torch.rand(4)
    f = lambda v, a: rope_apply(v, a.tile(2).sin(), a.tile(2).cos())
    torch.testing.assert_close(f(q, a1) @ f(k, a2), f(q, a1 + d) @ f(k, a2 + d), atol=1e-5, rtol=1e-5)


def test_rope_leaves_cls_and_registers_untouched():
    m = vit_tiny(img_size=32, pos_embed="rope", num_reg=4).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens, rope = m.prepare_tokens(x)
    attn = m.blocks[0].attn
    h = m.blocks[0].norm1(tokens)
    q, k, _ = attn.qk_v(h, rope, m.num_prefix)
    raw = attn.qkv(h).reshape(2, tokens.shape[1], 3, 3, 64).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(q[:, :, :5], raw[0][:, :, :5])               # CLS + 4 registers: no rotation
    torch.testing.assert_close(k[:, :, :5], raw[1][:, :, :5])
    assert not torch.allclose(q[:, :, 5:], raw[0][:, :, 5:])


def test_rope_rescale_only_in_train_mode():
    r = RopeEmbed(64, rescale=2.0)
    r.eval()
    assert torch.equal(r(4, 4)[0], r(4, 4)[0])
    r.train()
    torch.manual_seed(0)
    assert not torch.equal(r(4, 4)[0], r(4, 4)[0])


@pytest.mark.parametrize("pos", ["sincos", "learned", "rope"])
def test_ids_keep_equals_gathering_by_hand(pos):
    torch.manual_seed(0)
    m = ViT(ViTConfig(img_size=64, embed_dim=64, depth=2, num_heads=2, pos_embed=pos, num_reg=2)).eval()
    x = torch.randn(3, 3, 64, 64)
    ids_keep = torch.stack([torch.randperm(16)[:5] for _ in range(3)])      # (B, K)
    got = m(x, ids_keep=ids_keep)
    # by hand: embed all patches, add positions, take the kept rows, prepend CLS + registers, run the blocks
    t = m.patch_embed(x)
    if pos != "rope":
        t = t + m.patch_pos(4, 4)
    t = torch.stack([t[b, ids_keep[b]] for b in range(3)])
    rope = None
    if pos == "rope":
        sin, cos = m.rope_embed(4, 4)
        rope = (torch.stack([sin[i] for i in ids_keep])[:, None], torch.stack([cos[i] for i in ids_keep])[:, None])
    cls = m.cls_token + (m.pos_embed[:, :1] if pos != "rope" else 0)
    t = torch.cat([cls.expand(3, -1, -1), m.reg_token.expand(3, -1, -1), t], 1)
    for blk in m.blocks:
        t = blk(t, rope, 3)
    torch.testing.assert_close(got, m.norm(t), atol=1e-5, rtol=1e-5)
    assert got.shape == (3, 3 + 5, 64)


def test_any_multiple_of_patch_and_interpolation():
    for pos in ("sincos", "learned", "rope"):
        m = vit_tiny(img_size=64, pos_embed=pos, depth=1).eval()
        for hw in [(64, 64), (32, 48), (16, 16), (96, 80)]:
            out = m(torch.randn(1, 3, *hw))
            assert out.shape == (1, 1 + hw[0] // 16 * hw[1] // 16, 192)
    m = vit_tiny(img_size=64, pos_embed="learned", depth=1)
    torch.testing.assert_close(m.patch_pos(4, 4), m.pos_embed[:, 1:])       # same grid: the table itself
    big = m.patch_pos(8, 8).reshape(8, 8, -1)
    assert big.shape == (8, 8, 192)
    # bicubic upsampling of a smooth (linear) table stays close to the linear ramp
    with torch.no_grad():
        ramp = torch.linspace(-1, 1, 4)
        m.pos_embed[:, 1:] = (ramp[:, None, None] + 0 * ramp[None, :, None]).expand(4, 4, 192).reshape(1, 16, 192)
    up = m.patch_pos(8, 8).reshape(8, 8, 192)[:, 3, 0]
    assert torch.all(up[1:] >= up[:-1] - 1e-6)                              # monotone in the row direction
    with pytest.raises(ValueError, match="multiple of the patch"):
        m(torch.randn(1, 3, 40, 64))


def test_sizes_and_param_count():
    assert vit_config("vit_tiny").embed_dim == 192 and vit_config("vit_base").num_heads == 12
    n = sum(p.numel() for p in vit_small(cls_token=True, pos_embed="learned").parameters())
    assert abs(n - 21.7e6) < 0.2e6                                          # timm vit_small_patch16_224 minus head
    with pytest.raises(ValueError, match="unknown ViT size"):
        vit_config("vit_huge")


def test_state_dict_names_follow_timm():
    m = vit_small(num_reg=4, layerscale=1e-5, pos_embed="learned")
    keys = set(m.state_dict())
    for k in ["cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
              "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
              "blocks.0.attn.proj.weight", "blocks.0.ls1.gamma", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
              "blocks.11.mlp.fc2.bias", "blocks.11.ls2.gamma", "norm.weight", "norm.bias"]:
        assert k in keys, k
    assert "rope_embed.periods" in vit_small(pos_embed="rope").state_dict()


def test_mask_token_and_in_chans_1():
    m = vit_tiny(img_size=32, in_chans=1, mask_token=True, depth=1).eval()
    x = torch.randn(2, 1, 32, 32)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = True
    a, b = m(x), m(x, mask=mask)
    assert torch.allclose(a[1], b[1]) and not torch.allclose(a[0], b[0])
    with pytest.raises(ValueError, match="mask_token"):
        vit_tiny(img_size=32, depth=1)(torch.randn(1, 3, 32, 32), mask=torch.ones(1, 4, dtype=torch.bool))


def test_last_qk_reproduces_attention():
    m = vit_tiny(img_size=48, depth=2).eval()
    x = torch.randn(2, 3, 48, 48)
    q, k = m.last_qk(x)
    assert q.shape == (2, 3, 10, 64)
    p = kernels.attention_map(q, k, torch.tensor([0]))[:, :, 0]              # CLS row
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3))
    # feeding the same q, k and the block's v through attention reproduces the block's output
    t, rope = m.prepare_tokens(x)
    t = m.blocks[0](t)
    blk = m.blocks[1]
    _, _, v = blk.attn.qk_v(blk.norm1(t))
    o = blk.attn.proj(kernels.attention(q, k, v).transpose(1, 2).reshape(2, 10, 192))
    torch.testing.assert_close(o, blk.attn(blk.norm1(t)), atol=1e-5, rtol=1e-5)


def test_embed_pooling():
    m = vit_tiny(img_size=32, depth=1, num_reg=2).eval()
    x = torch.randn(2, 3, 32, 32)
    t = m(x)
    torch.testing.assert_close(m.embed(x, "cls"), t[:, 0])
    torch.testing.assert_close(m.embed(x, "mean"), t[:, 3:].mean(1))
    with pytest.raises(ValueError, match="no CLS"):
        vit_tiny(img_size=32, depth=1, cls_token=False).embed(x, "cls")
