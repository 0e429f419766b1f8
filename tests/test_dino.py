"""dino.py: Sinkhorn-Knopp, the DINO / iBOT / KoLeo losses against direct formulas, iBOT masks,
crops, schedules, RoPE on the prefix, decoding and data errors, exact resume, the NaN guard and a
2-process gloo run."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dino
import vit

TINY = ("--device cpu --in-chans 3 --size vit_tiny --depth 2 --img-size 32 --batch-size 4 --n-local 2 "
        "--n-prototypes 32 --head-hidden 32 --head-bottleneck 16 --num-workers 0 --epoch-length 0 "
        "--epochs 2 --warmup-epochs 0.5 --save-every 1000 --diag-every 0").split()


def tiny(out, *extra):
    return dino.parse_args(TINY + ["--out", str(out), *extra])


def make_frames(root, n=16, size=40, chans=3, seed=0):
    """n small PNG frames with structure (sine gratings + noise) so that crops differ."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        img = 128 + 100 * np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy + rng.random()))
        img = np.clip(img[..., None] + rng.normal(0, 20, (size, size, chans)), 0, 255).astype(np.uint8)
        Image.fromarray(img[..., 0] if chans == 1 else img).save(os.path.join(root, f"f{i:02d}.png"))
    return str(root)

# ----------------------------------------------------------------------------- Sinkhorn-Knopp and losses


def sinkhorn_official(logits, tau, n_iter=3):
    """dinov3 loss/dino_clstoken_loss.py:42-70 transcribed for one process, in float64."""
    Q = np.exp(logits.astype(np.float64) / tau).T
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(n_iter):
        Q /= Q.sum(axis=1, keepdims=True)
        Q /= K
        Q /= Q.sum(axis=0, keepdims=True)
        Q /= B
    return (Q * B).T


def test_sinkhorn_matches_official_and_marginals():
    torch.manual_seed(0)
    logits = torch.randn(64, 16) * 0.1 + torch.randn(16) * 0.05          # some prototypes favoured
    P = dino.sinkhorn_knopp(logits, 0.04)
    np.testing.assert_allclose(P.numpy(), sinkhorn_official(logits.numpy(), 0.04), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(P.sum(1), torch.ones(64))  # every sample's targets sum to 1
    cols = P.sum(0)  # each prototype ~ B/K = 4 samples
    soft = torch.softmax(logits / 0.04, 1).sum(0)
    # far more balanced than the softmax
    assert (cols - 4).abs().max() < 0.25 * (soft - 4).abs().max()
    P50 = dino.sinkhorn_knopp(logits, 0.04, n_iter=50)  # converged: both marginals exact
    torch.testing.assert_close(P50.sum(0), torch.full((16,), 4.0), rtol=1e-4, atol=1e-4)
    # logit/tau = 275: no overflow
    big = dino.sinkhorn_knopp(torch.full((4, 8), 10.0) + torch.eye(4, 8), 0.04)
    assert torch.isfinite(big).all()
    # no masked patch
    assert dino.sinkhorn_knopp(torch.zeros(0, 16), torch.tensor(0.04)).shape == (0, 16)


def test_dino_loss_direct_formula():
    torch.manual_seed(1)
    S, T, B, K, tau = 3, 2, 5, 7, 0.1
    s, t = torch.randn(S, B, K), torch.softmax(torch.randn(T, B, K), -1)
    ce = lambda a, b: -(b * torch.log_softmax(a / tau, -1)).sum()          # noqa: E731
    full = sum(ce(s[i, b], t[j, b]) for i in range(S) for j in range(T) for b in range(B)) / (S * T * B)
    off = sum(ce(s[i, b], t[j, b]) for i in range(S) for j in range(T) for b in range(B) if i != j)
    torch.testing.assert_close(dino.dino_loss(s, t, tau), full)
    torch.testing.assert_close(dino.dino_loss(s, t, tau, ignore_diagonal=True), off / ((S * T - 2) * B))


def test_ibot_loss_averages_over_all_crops():
    torch.manual_seed(2)
    n_crops, N, K, tau = 6, 9, 5, 0.1
    mask = torch.zeros(n_crops, N, dtype=torch.bool)
    mask[0, :3], mask[2, 4:9], mask[5, 1] = True, True, True               # crops 1, 3, 4 unmasked
    M = int(mask.sum())
    s, t = torch.randn(M, K), torch.softmax(torch.randn(M, K), -1)
    weight = (1 / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(mask)[mask]
    ce = -(t * torch.log_softmax(s / tau, -1)).sum(-1)
    owner = mask.nonzero()[:, 0]  # crop of each masked patch
    per_crop = [ce[owner == c].mean() for c in range(n_crops) if (owner == c).any()]
    torch.testing.assert_close(dino.ibot_loss(s, t, weight, n_crops, tau), sum(per_crop) / n_crops)


def test_koleo_direct_formula_and_gradient():
    torch.manual_seed(3)
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    xn = (x / x.norm(dim=1, keepdim=True)).detach().numpy()
    d = np.linalg.norm(xn[:, None] - xn[None], axis=-1) + np.diag(np.full(10, np.inf))
    nn_idx = d.argmin(1)
    ref = -np.mean(np.log(np.linalg.norm(xn - xn[nn_idx] + 1e-8, axis=1) + 1e-8))
    loss = dino.koleo_loss(x)
    assert abs(loss.item() - ref) < 1e-6
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

# ----------------------------------------------------------------------------- iBOT masks


def test_ibot_mask_counts_ratios_and_blocks():
    rng = np.random.default_rng(0)
    n, g = 16, 14
    m = dino.ibot_masks(rng, n, g)                                         # (16, 196)
    assert m.shape == (n, g * g) and m.dtype == torch.bool
    counts = sorted(m.sum(1).tolist())
    probs = torch.linspace(0.1, 0.5, n // 2 + 1)  # the official collate, verbatim
    assert counts == [0] * (n // 2) + sorted(int(g * g * probs[i + 1]) for i in range(n // 2))
    assert all(0.1 * 196 <= c <= 0.5 * 196 for c in counts if c)
    grid = m.view(n, g, g)                                                 # (n, g, g)
    nb = torch.zeros_like(grid)  # has a masked 4-neighbour
    nb[:, 1:] |= grid[:, :-1]
    nb[:, :-1] |= grid[:, 1:]
    nb[:, :, 1:] |= grid[:, :, :-1]
    nb[:, :, :-1] |= grid[:, :, 1:]
    assert (nb & grid).sum() / grid.sum() > 0.85  # blocks, not scattered patches
    assert torch.equal(m, dino.ibot_masks(np.random.default_rng(0), n, g))
    for count in range(4):  # 2 x 2 grid: exact counts, no hang
        assert dino.block_mask(np.random.default_rng(count), 2, count, 2).sum() == count


def test_batch_extras_masks_indices_and_weights():
    cfg = dino.parse_args(["--img-size", "64", "--device", "cpu"])
    extras = dino.batch_extras(cfg, 4, 5, 0)  # 4 frames: 8 global crops
    mask, idx, weight = extras["mask"], extras["mask_idx"], extras["weight"]
    assert mask.shape == (8, 16) and int(mask.sum(1).gt(0).sum()) == 4
    assert torch.equal(idx, mask.flatten().nonzero().flatten())
    for c in range(8):
        sel = (idx // 16) == c
        if sel.any():
            torch.testing.assert_close(weight[sel].sum(), torch.tensor(1.0))
    # seeded by (seed, rank, step)
    assert torch.equal(mask, dino.batch_extras(cfg, 4, 5, 0)["mask"])
    assert not torch.equal(mask, dino.batch_extras(cfg, 4, 5, 1)["mask"])
    assert not torch.equal(mask, dino.batch_extras(cfg, 4, 6, 0)["mask"])
    none = dino.batch_extras(dino.parse_args(["--img-size", "64", "--mask-sample-p", "0"]), 4, 0, 0)
    assert not none["mask"].any() and none["mask_idx"].numel() == 0 and none["weight"].numel() == 0


# ----------------------------------------------------------------------------- views


@pytest.mark.parametrize("scale", [(0.32, 1.0), (0.05, 0.32)])
def test_crop_boxes_areas_in_scale_range(scale):
    gen = torch.Generator().manual_seed(0)
    w, h, cx, cy = dino.crop_boxes(4000, scale, gen).unbind(1)
    area = w * h
    assert area.min() >= scale[0] - 1e-6 and area.max() <= scale[1] + 1e-6
    assert area.min() < scale[0] + 0.02 and area.max() > scale[1] - 0.02  # the whole range is used
    r = w / h
    assert r.min() >= 3 / 4 - 1e-5 and r.max() <= 4 / 3 + 1e-5
    assert (cx - w / 2).min() >= 0 and (cx + w / 2).max() <= 1 + 1e-6 and (cy - h / 2).min() >= 0
    full = dino.crop_boxes(5, (0.9, 1.0), gen, ratio=(2.0, 3.0))  # nothing fits: the whole image
    torch.testing.assert_close(full, torch.tensor([[1.0, 1.0, 0.5, 0.5]]).expand(5, 4))


def test_resized_crop_samples_the_box():
    L = 64
    ramp = ((torch.arange(L) + 0.5) / L).expand(1, 1, L, L).repeat(2, 1, 1, 1)  # value = x position
    boxes = torch.tensor([[0.25, 0.5, 0.5, 0.5], [0.5, 0.5, 0.3, 0.6]])
    out = dino.resized_crop(ramp, boxes, 16, torch.tensor([False, True]))
    torch.testing.assert_close(out[0, 0, 0, [0, -1]], torch.tensor([0.375 + 0.25 / 32, 0.625 - 0.25 / 32]),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1, 0, 0, [0, -1]], torch.tensor([0.55 - 0.5 / 32, 0.05 + 0.5 / 32]),
                               atol=1e-3, rtol=0)                             # flipped


@pytest.mark.parametrize("img,chans,local", [(224, 3, 96), (64, 1, 32), (32, 3, 16)])
def test_views_sizes_and_ops(img, chans, local):
    flags = ["--img-size", str(img), "--in-chans", str(chans), "--n-local", "3", "--device", "cpu"]
    cfg = dino.parse_args(flags)
    G, Lc = dino.crop_sizes(cfg)
    L = dino.load_size(cfg)
    assert (G, Lc) == (img, local) and L == img * 8 // 7
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, chans, L, L), dtype=torch.uint8)
    x_g, x_l = dino.make_views(frames, cfg, gen, torch.full((chans,), 0.5), torch.full((chans,), 0.25))
    assert x_g.shape == (4, chans, img, img) and x_l.shape == (6, chans, local, local)
    assert torch.isfinite(x_g).all() and x_g.min() >= -2 - 1e-5 and x_g.max() <= 2 + 1e-5
    y = torch.rand(5, chans, 12, 12)
    assert dino.gaussian_blur(y, 0.0, gen) is y
    assert torch.equal(dino.gaussian_blur(y, 1e-9, gen), y)  # one-hot kernels: exact identity
    assert dino.gaussian_blur(y, 1.0, gen).var() < y.var()
    many = torch.rand(1000, chans, 8, 8)
    blurred = (dino.gaussian_blur(many, 0.5, gen) != many).flatten(1).any(1).float().mean()
    assert 0.4 < blurred < 0.56  # p = 0.5 per image (sigma < 0.15 ~ none)
    j = dino.color_jitter(y, gen, p=1.0, gray_p=0.0)
    assert j.shape == y.shape and j.min() >= 0 and j.max() <= 1 and not torch.equal(j, y)
    grey = dino.color_jitter(y, gen, p=0.0, gray_p=1.0)
    if chans == 3:
        torch.testing.assert_close(grey[:, 0], 0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2])
        torch.testing.assert_close(grey[:, 0], grey[:, 2])
    else:
        torch.testing.assert_close(grey, y)  # saturation/hue/grayscale: identities

# ----------------------------------------------------------------------------- model, schedules, one step


def test_rope_leaves_cls_and_registers_untouched():
    default = dino.DINO(tiny("unused", "--depth", "1")).backbone
    # ssl_default_config.yaml:97,109
    assert default.num_prefix == 1 and default.cfg.rope_rescale == 0
    # the released ViT-S
    cfg = tiny("unused", "--depth", "1", "--num-reg", "4", "--rope-rescale", "2")
    bb = dino.DINO(cfg).backbone.train()
    assert bb.num_prefix == 5 and bb.cfg.pos_embed == "rope" and bb.mask_token is not None
    x, rope = bb.prepare_tokens(torch.randn(2, 3, 32, 32))
    attn = bb.blocks[0].attn
    q0, k0, _ = attn.qk_v(x)
    q1, k1, _ = attn.qk_v(x, rope, bb.num_prefix)
    assert torch.equal(q0[:, :, :5], q1[:, :, :5]) and torch.equal(k0[:, :, :5], k1[:, :, :5])
    assert not torch.allclose(q0[:, :, 5:], q1[:, :, 5:])


def test_param_groups_multipliers():
    cfg = tiny("unused", "--depth", "3")
    model = dino.DINO(cfg)
    mult = {id(p): (g["lr_mult"], g["wd_mult"], g["last_layer"]) for g in dino.param_groups(model, cfg)
            for p in g["params"]}
    named = dict(model.named_parameters())
    get = lambda n: mult[id(named[n])]                                     # noqa: E731
    assert get("backbone.patch_embed.proj.weight") == pytest.approx((0.9 ** 4 * 0.2, 1.0, False))
    # tokens decayed, as official
    assert get("backbone.cls_token")[:2] == pytest.approx((0.9 ** 4, 1.0))
    assert get("backbone.blocks.0.attn.qkv.weight")[0] == pytest.approx(0.9 ** 3)
    assert get("backbone.blocks.2.ls1.gamma") == pytest.approx((0.9, 0.0, False))
    assert get("backbone.norm.weight") == pytest.approx((1.0, 0.0, False))
    assert get("dino_head.mlp.0.bias") == (1.0, 0.0, False)
    assert get("ibot_head.last_layer.weight") == (1.0, 1.0, True)
    assert len(mult) == sum(1 for _ in model.parameters())


def cosine_official(base, final, total, warmup=0, start=0.0):
    """dinov3 train/cosine_lr_scheduler.py CosineScheduler (trunc_extra 0) as an array."""
    iters = np.arange(total - warmup)
    return np.concatenate([np.linspace(start, base, warmup),
                           final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


def test_schedules_match_official_and_clip():
    ref = cosine_official(1e-3, 1e-6, 50, warmup=10)
    assert np.allclose([dino.cosine(i, 50, 1e-3, 1e-6, warmup=10) for i in range(50)], ref, rtol=1e-12)
    assert dino.cosine(50, 50, 1e-3, 1e-6, warmup=10) == 1e-6
    assert np.allclose([dino.cosine(i, 40, 0.04, 0.4) for i in range(40)], cosine_official(0.04, 0.4, 40))
    # warmups of 10 epochs > run
    cfg = dino.parse_args(["--device", "cpu", "--epochs", "2", "--epoch-length", "5"])
    s = [dino.schedules(i, cfg, 5, 10) for i in range(12)]
    # warmup = whole run
    assert s[0]["lr"] == 0 and s[9]["lr"] == pytest.approx(1e-3) and s[11]["lr"] == 1e-6
    assert [round(v["tau_t"], 6) for v in s[:10:9]] == [0.04, 0.07] and s[11]["tau_t"] == 0.07
    # last layer frozen the first epoch
    assert s[4]["last_lr"] == 0 and s[5]["last_lr"] == s[5]["lr"] > 0
    assert s[0]["momentum"] == 0.992 and s[10]["momentum"] == 1.0 and s[0]["wd"] == pytest.approx(0.04)
    sq = dino.parse_args(["--device", "cpu", "--lr-scaling", "sqrt_wrt_1024", "--warmup-epochs", "0"])
    assert dino.schedules(0, sq, 10, 100)["lr"] == pytest.approx(1e-3 * 4 * math.sqrt(128 / 1024))


def test_train_step_weights_and_ema(tmp_path):
    cfg = tiny(tmp_path, "--n-local", "3")
    raw, teacher, opt = dino.build(cfg, torch.device("cpu"))
    raw.train()
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 3, 37, 37), dtype=torch.uint8)
    extras = dino.batch_extras(cfg, 4, 0, 0)
    masks = [extras[k] for k in ("mask", "mask_idx", "weight")]
    views = dino.make_views(frames, cfg, gen, torch.full((3,), 0.5), torch.full((3,), 0.25))
    old_t = [p.clone() for p in teacher.parameters()]
    sched = dict(lr=1e-3, last_lr=1e-3, wd=0.04, momentum=0.9, tau_t=0.05)
    loss, local, glob, koleo, ibot = dino.train_step(raw, raw, teacher, opt, views, masks, sched, cfg,
                                                     torch.autocast("cpu", enabled=False)).tolist()
    assert loss == pytest.approx((6 * local + 2 * glob) / 8 + 0.1 * 2 * koleo + ibot, rel=1e-5)
    assert 0 < ibot and 0 < local and 0 < glob
    for t0, t1, s in zip(old_t, teacher.parameters(), raw.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s)
    assert any(not torch.equal(a, b) for a, b in zip(old_t, teacher.parameters()))

# ----------------------------------------------------------------------------- data


def test_data_listing_formats_and_errors(tmp_path):
    d = tmp_path / "d"
    make_frames(d / "sub", n=2, chans=1)
    ramp = (np.arange(400).reshape(20, 20) * 100).astype(np.uint16)          # 0 .. 39900 of 65535
    pages = [Image.fromarray(ramp), Image.fromarray(np.full((20, 20), 257 * 200, np.uint16))]
    pages[0].save(d / "multi.tif", save_all=True, append_images=pages[1:])
    np.save(d / "stack.npy", np.zeros((3, 10, 12, 3), np.uint8))
    (d / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.full((10, 20), 255, np.uint8)).save(d / "wide.png")   # H 10, W 20
    paths, counts = dino.list_frames(str(d))
    assert counts == [1, 2, 3, 1, 1, 1]  # broken, tif pages, npy rows, pngs, wide
    ds = dino.Frames(paths, counts, 3, 24)
    frames = [ds[i] for i in range(len(ds))]
    assert [f[1] for f in frames] == [False] + [True] * 8 and ds.name(0).endswith("broken.png")
    assert ds.name(2).endswith("multi.tif [frame 1]")
    assert all(f[0].shape == (3, 24, 24) and f[0].dtype == torch.uint8 for f in frames)
    ref = Image.fromarray((ramp / 257 + 0.5).astype(np.uint8)).resize((24, 24), Image.BICUBIC)
    # 16-bit: /257
    assert torch.equal(frames[1][0], torch.tensor(np.asarray(ref)).expand(3, 24, 24))
    # the full range, no per-frame stretch
    assert (frames[1][0].max() < 160) and (frames[2][0] == 200).all()
    wide = frames[-1][0][0]  # padded to 20 x 20 with black rows
    assert (wide[:5] == 0).all() and (wide[-5:] == 0).all() and (wide[8:16] == 255).all()
    np.save(d / "bad.npy", np.zeros((3, 4, 4), np.float32))
    with pytest.raises(SystemExit, match="bad.npy.*uint8"):
        dino.list_frames(str(d))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match="empty: no png"):
        dino.list_frames(str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="missing: no such folder"):
        dino.list_frames(str(tmp_path / "missing"))
    # statistics: a one-value stats.json serves --in-chans 3 (gray frames), two values do not
    paths, counts = dino.list_frames(str(d / "sub"))
    ds = dino.Frames(paths, counts, 3, 24)
    data = {"frames": len(ds), "fingerprint": dino.fingerprint(str(d / "sub"), paths, counts)}
    cfg = dino.parse_args(["--data", str(d / "sub"), "--in-chans", "3", "--out", str(tmp_path / "o"),
                           "--num-workers", "0"])
    (d / "sub" / "stats.json").write_text(json.dumps({"mean": [0.5], "std": [0.2]}))
    assert dino.resolve_stats(ds, cfg, data)[:2] == ([0.5] * 3, [0.2] * 3)
    (d / "sub" / "stats.json").write_text(json.dumps({"mean": [0.5, 0.4], "std": [0.2, 0.2]}))
    with pytest.raises(SystemExit, match="stats.json: 2 mean and 2 std values; --in-chans 3 needs 3"):
        dino.resolve_stats(ds, cfg, data)
    (d / "sub" / "stats.json").unlink()  # computed, written into --out
    mean, std, _ = dino.resolve_stats(ds, cfg, data)
    x = torch.stack([ds[i][0] for i in range(2)]).double() / 255           # (2, 3, 24, 24)
    np.testing.assert_allclose(mean, x.mean((0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, x.transpose(0, 1).flatten(1).std(1, unbiased=False), rtol=1e-5)
    assert json.load(open(tmp_path / "o" / "stats.json"))["mean"] == pytest.approx(mean)


# ----------------------------------------------------------------------------- training runs


def test_resume_is_exact_and_checkpoint_loads(tmp_path):
    data = make_frames(tmp_path / "data", n=12, chans=1)  # 3 steps per epoch at batch 4
    a = dino.train(tiny(tmp_path / "a", "--data", data, "--in-chans", "1", "--max-steps", "5"))
    dino.train(tiny(tmp_path / "b", "--data", data, "--in-chans", "1", "--max-steps", "2"))
    c = dino.train(tiny(tmp_path / "b", "--data", data, "--in-chans", "1", "--max-steps", "5",
                        "--resume", str(tmp_path / "b" / "ckpt.safetensors")))
    assert len(a["losses"]) == 5 and len(c["losses"]) == 3
    assert c["losses"] == a["losses"][2:]  # bit-identical, across an epoch boundary
    for p, q in zip(a["teacher"].parameters(), c["teacher"].parameters()):
        assert torch.equal(p, q)
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    # step 4: the second pass
    assert [r["step"] for r in log] == list(range(1, 6)) and log[3]["epoch"] == 1
    assert {"loss", "lr", "wd", "momentum", "tau_t", "img_per_s", "data_wait", "ibot", "koleo"} <= set(log[0])
    enc, meta = vit.load_encoder(tmp_path / "a" / "ckpt.safetensors")
    assert meta["method"] == "dino" and meta["pool"] == "cls" and meta["step"] == 5 and meta["in_chans"] == 1
    assert meta["state"]["data_position"] == [1, 2]  # (epoch, batch) of step 5
    for (k, p), q in zip(a["teacher"].backbone.state_dict().items(), enc.state_dict().values()):
        assert torch.equal(p, q), k
    with pytest.raises(SystemExit, match=r"trained with --n-prototypes 32 \(now 64\)"):
        dino.train(tiny(tmp_path / "d", "--data", data, "--in-chans", "1", "--n-prototypes", "64",
                        "--resume", str(tmp_path / "a" / "ckpt.safetensors")))


def test_nan_stops_before_saving(tmp_path):
    data = make_frames(tmp_path / "data", n=8)
    cfg = tiny(tmp_path / "o", "--data", data, "--lr", "1e30", "--warmup-epochs", "0", "--save-every", "1")
    with pytest.raises(SystemExit, match=r"step 2: loss is (nan|inf); .*ckpt.safetensors \(step 1\) is kept"):
        dino.train(cfg)
    _, meta = vit.load_checkpoint(tmp_path / "o" / "ckpt.safetensors")
    assert meta["step"] == 1  # the last good checkpoint is intact


def test_unreadable_batch_stops(tmp_path):
    data = make_frames(tmp_path / "data", n=8)
    for i in np.random.default_rng([0, 0]).permutation(8)[:4]:  # the whole first batch of epoch 0
        (tmp_path / "data" / f"f{i:02d}.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="f0.*unreadable, as is every frame of its batch"):
        dino.train(tiny(tmp_path / "o", "--data", data))


def test_no_masked_patch_trains_with_ibot_zero(tmp_path):
    """--mask-sample-p 0: no global crop is masked, the iBOT term is 0 (as the official loss for
    empty masks)."""
    data = make_frames(tmp_path / "data", n=8)
    out = dino.train(tiny(tmp_path / "o", "--data", data, "--mask-sample-p", "0", "--max-steps", "2"))
    log = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")]
    assert out["step"] == 2 and [r["ibot"] for r in log] == [0.0, 0.0]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)


def test_two_process_gloo_identical_weights(tmp_path, torchrun):
    data = make_frames(tmp_path / "data", n=16)
    flags = [*TINY, "--out", str(tmp_path / "o"), "--data", data, "--batch-size", "8", "--max-steps", "2"]
    p = torchrun(["tests/ddp_run.py", "dino", str(tmp_path), *flags])
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    m0, m1 = (torch.load(tmp_path / f"rank{r}.math.pt") for r in (0, 1))
    logits = torch.randn(12, 10, generator=torch.Generator().manual_seed(5)) * 2
    torch.testing.assert_close(torch.cat([m0["sk"], m1["sk"]]), dino.sinkhorn_knopp(logits, 0.05))
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 2
    for part in ("student", "teacher"):
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), f"{part}.{k} differs between ranks"
    t, meta = vit.load_checkpoint(tmp_path / "o" / "ckpt.safetensors")
    assert meta["step"] == 2 and len(vit.unpack_state(meta["state"]["rng"], t)) == 2
    assert torch.equal(t["encoder.norm.weight"], r0["teacher"]["backbone.norm.weight"])
