"""mae.py against the official MAE formulas (facebookresearch/mae@efb2a80, written out here), plus
the training contract: exact resume, a 2-process gloo run, the NaN guard, bad input, the
reconstruction figure."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import kernels
import mae
import vit


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and OpenMP spinning on a busy 2-core box is ~50x slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw):
    base = dict(size="vit_tiny", depth=2, img_size=32, patch_size=8, decoder_dim=64, decoder_depth=1,
                decoder_heads=4, batch_size=8, num_workers=0, device="cpu", epochs=2, warmup_epochs=1,
                log_every=2, save_every=1000, synthetic_frames=16, diag_every=0)
    return mae.Config(**{**base, **kw})


@pytest.fixture
def frames(tmp_path):
    """32 smooth random 36 x 36 frames (load size of 32 px training) as one .npy stack."""
    rng = np.random.default_rng(0)
    a = rng.random((32, 6, 6)).repeat(6, 1).repeat(6, 2) * 200 + rng.random((32, 36, 36)) * 55
    d = tmp_path / "data"
    d.mkdir()
    np.save(d / "frames.npy", a.astype(np.uint8))
    return d


def log_losses(out):
    """{step: loss} of the training lines of OUT/log.jsonl (the step-0 diagnostic line has no loss).
    """
    lines = map(json.loads, open(os.path.join(out, "log.jsonl")))
    return {r["step"]: r["loss"] for r in lines if "loss" in r}

# -----------------------------------------------------------------------------
# the official formulas, written out (models_mae.py)


def official_patchify(imgs, p):
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def official_loss(imgs, pred, mask, p, norm_pix):
    target = official_patchify(imgs, p)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def official_random_masking(noise, len_keep):
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones_like(noise)
    mask[:, :len_keep] = 0
    return ids_shuffle, ids_restore, torch.gather(mask, dim=1, index=ids_restore)

# -----------------------------------------------------------------------------
# masking


def test_random_masking_counts_inverse_and_independence():
    g = torch.Generator().manual_seed(0)
    ids_shuffle, len_keep = mae.random_masking(64, 196, 0.75, g, "cpu")
    assert len_keep == 49 and ids_shuffle.shape == (64, 196)
    assert (ids_shuffle.sort(1).values == torch.arange(196)).all()  # a permutation per sample
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    # restore inverts shuffle
    assert (torch.gather(ids_shuffle, 1, ids_restore) == torch.arange(196)).all()
    keep_sets = {tuple(sorted(r[:49].tolist())) for r in ids_shuffle}
    assert len(keep_sets) == 64  # every sample its own mask
    # the same noise through the official code gives the same shuffle and binary mask
    noise = torch.rand(4, 196, generator=torch.Generator().manual_seed(1))
    off_shuffle, off_restore, off_mask = official_random_masking(noise, 49)
    ours, k = mae.random_masking(4, 196, 0.75, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(ours, off_shuffle)
    assert torch.equal((torch.argsort(ours, 1) >= k).float(), off_mask) and (off_mask.sum(1) == 147).all()


@pytest.mark.parametrize("ratio,n,keep", [(0.75, 16, 4), (0.5, 49, 24), (0.9, 196, 19)])
def test_random_masking_len_keep_is_officials_int(ratio, n, keep):
    assert mae.random_masking(2, n, ratio, None, "cpu")[1] == keep == int(n * (1 - ratio))


def test_multiblock_masking_blocks_rectangular_and_edges():
    cfg = tiny(mask_type="multiblock")
    g = torch.Generator().manual_seed(0)
    blocks = mae.block_union(256, 14, 14, cfg, torch.Generator().manual_seed(0))     # (B, N)
    frac = blocks.float().mean(1)
    assert frac.min() >= 0.1 and frac.max() <= 0.85  # 1 to 4 blocks of ~15-20% overlapping
    grid = blocks.view(256, 14, 14)
    assert grid[:, -1, :].any() and grid[:, :, -1].any()  # last row/col reachable (I-JEPA: never)
    ids_shuffle, len_keep = mae.multiblock_masking(256, 14, 14, cfg, g)
    visible = (~blocks).sum(1)
    assert len_keep == visible.min()  # rectangular: the batch minimum
    ids_keep = ids_shuffle[:, :len_keep]
    assert not torch.gather(blocks, 1, ids_keep).any()  # never keeps a block patch
    fewest = visible.argmin()
    assert set(ids_keep[fewest].tolist()) == set((~blocks[fewest]).nonzero()[:, 0].tolist())
    assert len({tuple(sorted(r.tolist())) for r in ids_keep}) > 250         # per-image positions


def test_multiblock_trains(frames, tmp_path):
    out = mae.train(tiny(data=str(frames), out=str(tmp_path / "mb"), mask_type="multiblock", max_steps=2))
    assert set(log_losses(tmp_path / "mb")) == {1, 2} and isinstance(out["model"], mae.MAE)

# -----------------------------------------------------------------------------
# patchify, targets, loss, encoder and decoder against the official code


@pytest.mark.parametrize("C,H,W,p", [(3, 32, 32, 8), (1, 48, 32, 16), (3, 224, 224, 16)])
def test_patchify_official_order_and_round_trip(C, H, W, p):
    x = torch.randn(2, C, H, W)
    if H == W:
        torch.testing.assert_close(mae.patchify(x, p), official_patchify(x, p), rtol=0, atol=0)
    y = mae.patchify(x, p)
    assert y.shape == (2, (H // p) * (W // p), p * p * C)
    assert torch.equal(y[0, 1, :C], x[0, :, 0, p])  # channel fastest, (p, q, c)
    assert torch.equal(mae.unpatchify(y, p, H // p, W // p), x)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_official_and_ignores_visible(norm_pix):
    torch.manual_seed(0)
    cfg = tiny(in_chans=3, norm_pix_loss=norm_pix)
    model = mae.MAE(cfg)
    imgs = torch.randn(3, 3, 32, 32)
    ids_shuffle, k = mae.random_masking(3, 16, 0.75, torch.Generator().manual_seed(0), "cpu")
    loss, pred, mask = model(imgs, ids_shuffle, k)
    torch.testing.assert_close(loss, official_loss(imgs, pred, mask, 8, norm_pix))
    target, m, v = mae.pixel_targets(imgs, 8, norm_pix)
    if norm_pix:  # unbiased variance, eps 1e-6
        t = official_patchify(imgs, 8)
        torch.testing.assert_close(v[..., 0], t.var(-1, unbiased=True))
        ref = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** .5
        torch.testing.assert_close(target, ref)
    grad, = torch.autograd.grad(loss, pred)
    assert (grad[mask == 0] == 0).all() and (grad[mask == 1] != 0).any()   # masked patches only


def test_encoder_and_decoder_match_official_forward():
    torch.manual_seed(0)
    model = mae.MAE(tiny(in_chans=1))
    imgs = torch.randn(2, 1, 32, 32)
    ids_shuffle, k = mae.random_masking(2, 16, 0.75, torch.Generator().manual_seed(3), "cpu")
    ids_restore = torch.argsort(ids_shuffle, 1)
    enc = model.encoder
    # forward_encoder (models_mae.py:150-170): embed, + pos[1:], gather the kept, prepend cls +
    # pos[0], blocks
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_shuffle[:, :k].unsqueeze(-1).repeat(1, 1, x.shape[-1]))
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
    for blk in enc.blocks:
        x = blk(x)
    latent = enc.norm(x)
    torch.testing.assert_close(enc(imgs, ids_keep=ids_shuffle[:, :k]), latent)
    # forward_decoder (:172-196): embed, append mask tokens, unshuffle with a repeated index, cls
    # back, + pos
    y = model.decoder_embed(latent)
    mt = model.mask_token.repeat(2, 16 + 1 - y.shape[1], 1)
    y_ = torch.gather(torch.cat([y[:, 1:], mt], 1), 1, ids_restore.unsqueeze(-1).repeat(1, 1, y.shape[2]))
    y = torch.cat([y[:, :1], y_], 1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        y = blk(y)
    official = model.decoder_pred(model.decoder_norm(y))[:, 1:]
    torch.testing.assert_close(model.forward_decoder(latent, ids_restore), official)
    assert torch.equal(model.decoder_pos_embed[0, 0], torch.zeros(64))
    assert not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(model.decoder_pos_embed[0, 1:], vit.sincos_2d(64, 4, 4))


def test_init_is_maes():
    torch.manual_seed(0)
    model = mae.MAE(tiny(size="vit_small", depth=1, decoder_dim=128, in_chans=3))
    qkv = model.encoder.blocks[0].attn.qkv.weight  # (3D, D): xavier on the fused matrix
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    assert torch.equal(model.encoder.blocks[0].attn.qkv.bias, torch.zeros(3 * 384))
    w = model.encoder.patch_embed.proj.weight  # (D, C, p, p) xavier as (D, C p p)
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    b = model.encoder.patch_embed.proj.bias  # PyTorch default U(+-1/sqrt(fan_in))
    assert b.abs().max() <= 1 / math.sqrt(w[0].numel()) and b.abs().min() > 0
    for t in (model.encoder.cls_token, model.mask_token):
        assert 0.01 < t.std() < 0.03
    assert torch.equal(model.decoder_norm.weight, torch.ones(128))


def test_decay_groups_follow_timm_add_weight_decay():
    model = mae.MAE(tiny())
    no_decay, decay = mae.param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    name = {id(p): n for n, p in model.named_parameters()}
    nd, d = {name[id(p)] for p in no_decay["params"]}, {name[id(p)] for p in decay["params"]}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert n in ("encoder.pos_embed", "decoder_pos_embed") and n not in nd | d
        elif p.ndim == 1 or n.endswith(".bias"):
            assert n in nd
        else:
            assert n in d
    # 3-D/4-D: decayed
    assert {"encoder.cls_token", "mask_token", "encoder.patch_embed.proj.weight"} <= d
    assert {"encoder.norm.weight", "encoder.patch_embed.proj.bias", "decoder_pred.bias"} <= nd


def test_lr_schedule_is_officials_per_step():
    def official(epoch, lr, warmup, epochs, min_lr=0.0):                  # util/lr_sched.py:9-21
        if epoch < warmup:
            return lr * epoch / warmup
        return min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))
    for epochs, warmup, spe in [(20, 10, 7), (3, 1, 5), (100, 0, 3), (5, 10, 4)]:
        cfg = tiny(epochs=epochs, warmup_epochs=warmup)
        for step in range(epochs * spe):  # epoch = it / len(loader) + epoch
            ref = official(step / spe, 1.5e-4, warmup, epochs)
            assert mae.lr_at(step, spe, 1.5e-4, cfg) == pytest.approx(ref)
    cfg = tiny(epochs=20, warmup_epochs=10)
    assert mae.lr_at(0, 7, 1.0, cfg) == 0
    assert mae.lr_at(70, 7, 1.0, cfg) == 1.0
    assert mae.lr_at(139, 7, 1.0, cfg) < 1e-3

# -----------------------------------------------------------------------------
# data


def test_augment_full_crop_is_identity_and_flip_mirrors():
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor([0.4]), torch.tensor([0.2])
    ref = (x.float() / 255 - 0.4) / 0.2
    g = torch.Generator().manual_seed(0)
    out = mae.augment(x, mean, std, tiny(crop_scale=(1.0, 1.0), hflip=False), g)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    out = mae.augment(x, mean, std, tiny(crop_scale=(1.0, 1.0), hflip=True), torch.Generator().manual_seed(0))
    flipped = [torch.allclose(o, r.flip(-1), atol=1e-4) for o, r in zip(out, ref)]
    kept = [torch.allclose(o, r, atol=1e-4) for o, r in zip(out, ref)]
    assert all(f or k for f, k in zip(flipped, kept))
    # random crops of a ramp image (channel 0 = 8 * column, channel 1 = 8 * row): the output slopes
    # give each crop's width and height as fractions of the frame, which must follow
    # RandomResizedCrop's ranges
    ramp = torch.arange(32).mul(8).to(torch.uint8)
    x = torch.stack([ramp.expand(32, 32), ramp[:, None].expand(32, 32), ramp.expand(32, 32)])   # (3, 32, 32)
    x = x[None].repeat(256, 1, 1, 1)                                        # (256, 3, 32, 32)
    g = torch.Generator().manual_seed(1)
    out = mae.augment(x, torch.zeros(3), torch.ones(3) / 255, tiny(in_chans=3), g)
    w = (out[:, 0, 16, 4:28].diff().mean(-1) / 8)  # signed: negative when flipped
    h = (out[:, 1, 4:28, 16].diff(dim=-1).mean(-1) / 8)
    area, ratio = w.abs() * h, w.abs() / h
    assert (area > 0.2 - 0.02).all() and (area < 1 + 0.02).all() and area.min() < 0.3 and area.max() > 0.9
    assert (ratio > 3 / 4 - 0.03).all() and (ratio < 4 / 3 + 0.03).all() and (h > 0).all()
    assert 0.35 < (w < 0).float().mean() < 0.65                           # half of them flipped


def test_augment_clamps_the_bicubic_crop_to_the_frame_range():
    """Bicubic resampling overshoots at sharp edges; torchvision's PIL path rounds the crop into
    uint8, so its values stay in [0, 1], and ours are clamped there before normalising (the
    docstring's list of differences)."""
    x = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    x[..., ::2] = 255                                  # 1-px stripes: every crop resamples an edge
    out = mae.augment(x, torch.tensor([0.5]), torch.tensor([0.25]), tiny(), torch.Generator().manual_seed(0))
    pixels = out * 0.25 + 0.5                                               # back in [0, 1] units
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert pixels.min() < 1e-6 and pixels.max() > 1 - 1e-6  # the ends are reached, not squeezed


def test_frames_reads_pngs_multipage_16bit_tif_and_npy(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = 200, np.arange(30) * 8  # a wide frame, red + a green ramp
    Image.fromarray(rgb).save(tmp_path / "a.png")
    ramp = np.arange(400).reshape(20, 20)
    pages = [Image.fromarray((ramp * v).astype(np.uint16)) for v in (1, 164)]   # max 399 and 65436
    pages[0].save(tmp_path / "b.tif", save_all=True, append_images=pages[1:])
    np.save(tmp_path / "c.npy", np.zeros((3, 10, 10, 3), np.uint8))
    Image.fromarray(np.full((6, 4), 0.5, np.float32)).save(tmp_path / "d.tif")   # float, [0, 1]
    paths, counts = mae.list_frames(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["a.png", "b.tif", "c.npy", "d.tif"]
    assert counts == [1, 2, 3, 1]
    ds = mae.Frames(paths, counts, 1, 16)
    assert len(ds) == 7
    # the shared decoding (DEVELOPERS.md): PIL "L", padded to a square with black (centred), then
    # resized
    square = np.zeros((30, 30), np.uint8)
    square[5:25] = np.asarray(Image.fromarray(rgb).convert("L"))
    x, ok, i = ds[0]
    assert ok and x.shape == (1, 16, 16) and x.dtype == torch.uint8
    assert np.array_equal(x[0].numpy(), np.asarray(Image.fromarray(square).resize((16, 16), Image.BICUBIC)))
    # black bars above and below
    assert x[0, 0].max() == 0 and x[0, -1].max() == 0 and x[0, 8, 1:-1].min() > 50
    for i, v in zip((1, 2), (1, 164)):  # 16-bit: / 257, no per-frame stretch
        x, ok, _ = ds[i]
        ref = Image.fromarray((ramp * v / 257 + 0.5).astype(np.uint8)).resize((16, 16), Image.BICUBIC)
        assert ok and np.array_equal(x[0].numpy(), np.asarray(ref))
    assert ds[1][0].max() <= 2 and ds[2][0].max() >= 250
    x, ok, _ = ds[6]  # float 0.5 in a 6 x 4 frame, padded
    square = np.zeros((6, 6), np.uint8)
    square[:, 1:5] = 128
    assert ok
    assert np.array_equal(x[0].numpy(), np.asarray(Image.fromarray(square).resize((16, 16), Image.BICUBIC)))
    assert (x[0, :, 6:10] == 128).all() and x[0, :, 0].max() == 0 and x[0, :, -1].max() == 0
    assert ds.locate(2) == (paths[1], 1) and ds.locate(0) == (paths[0], 0) and ds.locate(5) == (paths[2], 2)
    x = mae.Frames(paths, counts, 3, 8)
    # gray repeated for --in-chans 3
    assert x[5][0].shape == (3, 8, 8) and (x[6][0][0] == x[6][0][2]).all()


def test_bad_input_is_refused_with_the_file_named(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        mae.list_frames(str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="no png"):
        mae.list_frames(str(tmp_path))
    np.save(tmp_path / "f.npy", np.zeros((2, 8, 8), np.float32))
    with pytest.raises(SystemExit, match="f.npy: a frame stack must be uint8"):
        mae.list_frames(str(tmp_path))
    with pytest.raises(SystemExit, match="--img-size 30 must be a multiple of --patch-size 8"):
        mae.train(tiny(img_size=30))
    with pytest.raises(SystemExit, match="mask-ratio"):
        mae.train(tiny(mask_ratio=1.0))


def test_stats_json_read_and_checked(frames, tmp_path):
    (frames / "stats.json").write_text(json.dumps({"mean": [0.1, 0.2], "std": [0.3, 0.3]}))
    with pytest.raises(SystemExit, match="stats.json: 2 mean and 2 std values; --in-chans 1 needs 1"):
        mae.train(tiny(data=str(frames), out=str(tmp_path / "o"), max_steps=1))
    os.remove(frames / "stats.json")
    mae.train(tiny(data=str(frames), out=str(tmp_path / "o"), max_steps=1))
    assert not (frames / "stats.json").exists()  # the data folder is left alone
    s = json.load(open(tmp_path / "o" / "stats.json"))  # computed, written into --out
    a = np.load(frames / "frames.npy").astype(np.float64) / 255
    np.testing.assert_allclose(s["mean"], [a.mean()], rtol=1e-6)
    np.testing.assert_allclose(s["std"], [a.std()], rtol=1e-6)


def test_unreadable_files_skipped_then_stop_above_one_percent(tmp_path, capsys):
    d = tmp_path / "pngs"
    d.mkdir()
    for i in range(120):
        Image.fromarray(np.full((12, 12), i, np.uint8)).save(d / f"{i:03d}.png")
    (d / "050.png").write_bytes(b"not a png")
    mae.train(tiny(data=str(d), out=str(tmp_path / "a"), batch_size=8, epochs=1, max_steps=15, img_size=8,
                   patch_size=4, mask_ratio=0.5))
    assert f"skipping unreadable {d / '050.png'}" in capsys.readouterr().out
    assert len(log_losses(tmp_path / "a")) == 15
    (d / "051.png").write_bytes(b"")                                       # 2 of 120 > 1%
    with pytest.raises(SystemExit, match=r"050.png.*051.png.*: 2 of the first \d+ frames could not be read "
                                         r"\(> 1%\); fix or remove them"):
        mae.train(tiny(data=str(d), out=str(tmp_path / "b"), batch_size=8, epochs=1, img_size=8, patch_size=4,
                       mask_ratio=0.5))

def flags(cfg):
    """A Config as command-line flags (for a torchrun launch)."""
    out = []
    for k, v in vars(cfg).items():
        if v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)]
    return out


def test_unreadable_counts_are_summed_over_ranks(tmp_path, torchrun):
    """120 frames on 2 ranks: each sees 60 (< 100, the rule's minimum) but together 120, 2 of them
    bad (> 1%). Both ranks stop at the same step and tear their process group down (no abort at
    exit)."""
    d = tmp_path / "pngs"
    d.mkdir()
    for i in range(120):
        Image.fromarray(np.full((12, 12), i, np.uint8)).save(d / f"{i:03d}.png")
    (d / "050.png").write_bytes(b"not a png")
    (d / "051.png").write_bytes(b"")
    cfg = tiny(data=str(d), out=str(tmp_path / "u"), batch_size=8, epochs=1, img_size=8, patch_size=4,
               mask_ratio=0.5)
    p = torchrun(["tests/ddp_run.py", "mae", str(tmp_path), *flags(cfg)])
    assert p.returncode == 0, p.stderr[-3000:]
    for r in (0, 1):  # every rank stops, at the same step
        msg = (tmp_path / f"rank{r}.exit").read_text()
        assert re.search(r"2 of the first 1\d\d frames could not be read \(> 1%\)", msg)
    assert "terminate called" not in p.stderr and not (tmp_path / "u/ckpt.safetensors").exists()
    # the abort above came now and then; a group left behind is what caused it, every time
    assert [(tmp_path / f"rank{r}.group").read_text() for r in (0, 1)] == ["destroyed"] * 2

# -----------------------------------------------------------------------------
# training contract: resume, DDP, NaN guard, checkpoint, figure, benchmark


@pytest.mark.parametrize("mask_type", ["random", "multiblock"])
def test_exact_resume(frames, tmp_path, mask_type):
    kw = dict(data=str(frames), mask_type=mask_type, lr=1e-3)
    mae.train(tiny(out=str(tmp_path / "straight"), max_steps=6, **kw))
    mae.train(tiny(out=str(tmp_path / "split"), max_steps=3, **kw))
    resume = str(tmp_path / "split/ckpt.safetensors")
    mae.train(tiny(out=str(tmp_path / "split"), max_steps=6, resume=resume, **kw))
    straight, split = log_losses(tmp_path / "straight"), log_losses(tmp_path / "split")
    # bit-identical, across an epoch edge
    assert list(split) == [1, 2, 3, 4, 5, 6] and split == straight
    assert len(set(straight.values())) == 6


def test_existing_run_is_not_overwritten_and_resume_rewrites_later_log_lines(frames, tmp_path):
    out = tmp_path / "r"
    mae.train(tiny(data=str(frames), out=str(out), max_steps=2))
    before = (out / "ckpt.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="holds a run .*ckpt.safetensors.*: pass --resume"):
        mae.train(tiny(data=str(frames), out=str(out), max_steps=4))
    assert (out / "ckpt.safetensors").read_bytes() == before
    with open(out / "log.jsonl", "a") as f:  # a run killed after its checkpoint
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')  # cut off mid-line
    mae.train(tiny(data=str(frames), out=str(out), max_steps=4, resume=str(out / "ckpt.safetensors")))
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == [1, 2, 3, 4] and log_losses(out)[3] != 9.0


def test_two_process_gloo_run_keeps_ranks_identical(frames, tmp_path, torchrun):
    cfg = tiny(data=str(frames), out=str(tmp_path / "ddp"), max_steps=3, lr=1e-3)
    p = torchrun(["tests/ddp_run.py", "mae", str(tmp_path), *flags(cfg)])
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    a, b = r0["model"], r1["model"]
    torch.manual_seed(0)
    init = mae.MAE(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights on both ranks
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 3
    assert not torch.equal(a["encoder.blocks.0.attn.qkv.weight"], init["encoder.blocks.0.attn.qkv.weight"])
    tensors, meta = vit.load_checkpoint(tmp_path / "ddp/ckpt.safetensors")
    assert meta["state"]["world"] == 2 and "rng.1.g_dev" in tensors and "rng.0.g_dev" in tensors
    # per-rank crop/mask streams
    assert not torch.equal(tensors["rng.0.g_dev"], tensors["rng.1.g_dev"])
    assert torch.equal(tensors["encoder.blocks.0.attn.qkv.weight"], a["encoder.blocks.0.attn.qkv.weight"])
    assert sorted(log_losses(tmp_path / "ddp")) == [1, 2, 3]
    assert [(tmp_path / f"rank{r}.group").read_text() for r in (0, 1)] == ["destroyed"] * 2


def test_nan_loss_stops_before_saving(frames, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match=r"step \d+: loss is (nan|inf)"):
        mae.train(tiny(data=str(frames), out=str(out), lr=1e30, warmup_epochs=0, save_every=1, log_every=1))
    _, meta = vit.load_checkpoint(out / "ckpt.safetensors")
    losses = log_losses(out)
    bad = min(s for s, l in losses.items() if l is None)  # non-finite: null in the JSON
    assert meta["step"] == bad - 1 and all(math.isfinite(losses[s]) for s in range(1, bad))


def test_checkpoint_is_what_probe_reads(frames, tmp_path):
    mae.train(tiny(data=str(frames), out=str(tmp_path / "c"), max_steps=2))
    enc, meta = vit.load_encoder(tmp_path / "c/ckpt.safetensors")
    assert meta["method"] == "mae" and meta["pool"] == "cls" and meta["step"] == 2 and meta["in_chans"] == 1
    assert meta["args"]["decoder_dim"] == 64 and len(meta["mean"]) == 1
    assert enc.embed(torch.randn(2, 1, 32, 32), meta["pool"]).shape == (2, 192)
    tensors, _ = vit.load_checkpoint(tmp_path / "c/ckpt.safetensors")
    assert "decoder_pred.weight" in tensors and "mask_token" in tensors and "optim.state.0.exp_avg" in tensors


def test_synthetic_default_data(tmp_path):
    mae.train(tiny(out=str(tmp_path / "s"), max_steps=1))
    assert list(log_losses(tmp_path / "s")) == [1]


def test_recon_figure(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(norm_pix_loss=False)
    model = mae.MAE(cfg)
    imgs = torch.randn(2, 1, 32, 32).clamp(-1.5, 1.5)
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])
    mae.save_recon(str(tmp_path / "r.png"), model, imgs, cfg, mean, std)
    im = np.asarray(Image.open(tmp_path / "r.png").convert("L")).astype(int)
    T, gap, head = 128, 4, 16
    assert im.shape == (head + 2 * (T + gap) + gap, 4 * T + 5 * gap)
    ids_shuffle, k = mae.random_masking(2, 16, 0.75, torch.Generator().manual_seed(0), "cpu")
    masked = torch.argsort(ids_shuffle, 1) >= k  # the masks the figure used
    # (2, 128, 128)
    m = masked.view(2, 4, 4).repeat_interleave(32, 1).repeat_interleave(32, 2).numpy()
    for i in range(2):
        tile = [im[head + i * (T + gap):head + i * (T + gap) + T, gap + j * (T + gap):gap + j * (T + gap) + T]
                for j in range(4)]
        assert (tile[1][m[i]] == 128).all() and (tile[1][~m[i]] == tile[0][~m[i]]).all()
        assert (tile[3][~m[i]] == tile[0][~m[i]]).all() and (tile[3][m[i]] == tile[2][m[i]]).all()
        assert not (tile[2][m[i]] == tile[0][m[i]]).all()  # an untrained guess, not the image


def test_vis_flag_writes_png(frames, tmp_path):
    mae.train(tiny(data=str(frames), out=str(tmp_path / "v"), max_steps=2, vis=True, n_vis=3))
    assert Image.open(tmp_path / "v/recon.png").size == (4 * 128 + 5 * 4, 16 + 3 * 132 + 4)


def test_benchmark_and_flops_match_flop_counter(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode
    cfg = tiny(in_chans=3, batch_size=4)
    out = mae.benchmark(cfg, steps=2, warmup=1)
    assert out["img_per_s"] > 0
    # count every matmul, attention included, by running attention as explicit matmuls
    def explicit(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / 8, -1) @ v
    monkeypatch.setattr(kernels, "attention", explicit)
    model = mae.MAE(cfg)
    ids, k = mae.random_masking(4, 16, 0.75, None, "cpu")
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(4, 3, 32, 32), ids, k)[0].backward()
    assert out["flops_per_img"] == fc.get_total_flops() / 4 == mae.flops_per_img(cfg, k)


def test_parse_args_bools_and_tuples():
    cfg = mae.parse_args(["--no-norm-pix-loss", "--block-scale", "0.1", "0.3", "--decoder-dim", "256",
                          "--mask-type", "multiblock"])
    assert cfg.norm_pix_loss is False and cfg.block_scale == (0.1, 0.3) and cfg.decoder_dim == 256
    assert mae.parse_args([]) == mae.Config()
    d = mae.Config()
    assert (d.batch_size, d.blr, d.warmup_epochs, d.betas, d.weight_decay, d.mask_ratio) == \
        (256, 1.5e-4, 10, (0.9, 0.95), 0.05, 0.75)
    assert (d.decoder_dim, d.decoder_depth, d.decoder_heads, d.norm_pix_loss) == (512, 8, 16, True)
