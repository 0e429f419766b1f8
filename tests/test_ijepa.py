"""ijepa.py: the official multiblock collator and its quirks, predictor order, loss, schedules and
EMA against the official formulas, SIGReg against scipy, SALT's frozen teacher, data decoding,
exact resume, the NaN guard and a 2-process gloo run."""
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.integrate import quad

import ijepa
import vit
from ijepa import Config, multiblock


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and several people run the suite at once on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(tmp, **kw):
    """A vit_tiny (depth 2) on 64 px, patch 8 (8 x 8 grid), predictor 2 x 64, 2 heads, CPU, no
    workers."""
    base = dict(size="vit_tiny", depth=2, img_size=64, patch_size=8, pred_depth=2, pred_dim=64, pred_heads=2,
                batch_size=8, min_keep=4, epochs=3, num_workers=0, device="cpu", log_every=2, save_every=0,
                diag_every=0, out=str(tmp / "run"), data=str(tmp / "data"))
    return Config(**{**base, **kw})


def frames_dir(path, n=24, size=48, seed=0):
    """A .npy stack of smooth random frames (what prep writes) and a stats.json."""
    path.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    low = g.uniform(0, 255, (n, 6, 6))
    x = [Image.fromarray(f.astype(np.uint8)).resize((size, size), Image.BICUBIC) for f in low]
    x = np.stack([np.asarray(f) for f in x])                        # (n, size, size)
    np.save(path / "frames.npy", x)
    (path / "stats.json").write_text(json.dumps({"mean": [0.5], "std": [0.25]}))
    return path


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(ln) for ln in f]

# -----------------------------------------------------------------------------
# masks


def official_block_size(k, scale, aspect, H, W):
    """multiblock.py:55-72 written out: generator seeded with the counter k, ONE uniform for scale
    and aspect."""
    g = torch.Generator()
    g.manual_seed(k)
    out = []
    for sc, ar in ((scale, aspect), ((0.85, 1.0), (1.0, 1.0))):
        r = torch.rand(1, generator=g).item()
        keep = int(H * W * (sc[0] + r * (sc[1] - sc[0])))
        a = ar[0] + r * (ar[1] - ar[0])
        h, w = int(round(math.sqrt(keep * a))), int(round(math.sqrt(keep / a)))
        while h >= H:
            h -= 1
        while w >= W:
            w -= 1
        out.append((h, w))
    return out


def test_block_sizes_match_official_counter_and_224_enumeration():
    cfg = Config()
    sizes = set()
    for k in range(200):
        g = torch.Generator().manual_seed(k)     # what multiblock() seeds with for seed 0, step k
        got = [ijepa.block_size(g, cfg.pred_scale, cfg.aspect, 14, 14, False),
               ijepa.block_size(g, cfg.enc_scale, (1.0, 1.0), 14, 14, False)]
        assert got == official_block_size(k, cfg.pred_scale, cfg.aspect, 14, 14)
        sizes.add(got[0])
        assert got[1] == (13, 13)  # 13 x 13 at 14 x 14 (multiblock.py:55-72)
    assert sizes == {(5, 6), (6, 5), (6, 6), (7, 5), (8, 5)}


def test_default_masks_reproduce_official_quirks():
    cfg = Config()
    for step in range(6):
        enc, pred = multiblock(16, 14, 14, step, 0, cfg)
        M, B, Nt = pred.shape
        assert (M, B) == (4, 16) and enc.dtype == pred.dtype == torch.int64
        r, c = enc // 14, enc % 14
        assert r.max() <= 12 and c.max() <= 12  # context: always the top-left 13 x 13
        # last row / column never a target either
        assert (pred // 14).max() <= 12 and (pred % 14).max() <= 12
        # the context is the 13 x 13 block minus the targets, truncated to the batch minimum (first
        # indices kept)
        full = []
        for b in range(B):
            m = np.zeros((14, 14), bool)
            m[:13, :13] = True
            m.flat[pred[:, b].flatten().numpy()] = False
            full.append(np.flatnonzero(m))
        n = min(len(f) for f in full)
        assert enc.shape == (B, n) and n > cfg.min_keep
        for b in range(B):
            np.testing.assert_array_equal(enc[b].numpy(), full[b][:n])
        assert any(len(f) > n for f in full)                          # truncation did happen


def test_fixed_masks_use_the_whole_grid_and_independent_draws():
    cfg = Config(fix_masks=True)
    seen_ctx, seen_tgt, sizes = np.zeros(196, bool), np.zeros(196, bool), set()
    for step in range(40):
        enc, pred = multiblock(8, 14, 14, step, 0, cfg)
        seen_ctx[enc.flatten().numpy()] = True
        seen_tgt[pred.flatten().numpy()] = True
        ctx = np.zeros((8, 196), bool)
        np.put_along_axis(ctx, enc.numpy(), True, axis=1)
        tgt = np.zeros((8, 196), bool)
        for m in range(4):
            np.put_along_axis(tgt, pred[m].numpy(), True, axis=1)
        assert not (ctx & tgt).any()  # context disjoint from every target
    last = np.r_[np.arange(13, 196, 14), np.arange(182, 196)]
    assert seen_ctx[last].any() and seen_tgt[last].all()
    # one shared draw allows only 5 target shapes at 14 x 14; independent scale and aspect draws
    # give more
    for k in range(200):
        g = torch.Generator().manual_seed(k)
        sizes.add(ijepa.block_size(g, cfg.pred_scale, cfg.aspect, 14, 14, True))
    assert len(sizes) > 8


def test_fallback_when_targets_leave_no_room_and_bad_grid():
    # targets of ~45% each: the context must drop target constraints (official "decreasing
    # acceptable-regions")
    cfg = Config(pred_scale=(0.45, 0.5), min_keep=4)
    enc, pred = multiblock(6, 8, 8, 0, 0, cfg)
    assert enc.shape[1] > cfg.min_keep and (enc[:, 1:] > enc[:, :-1]).all()
    with pytest.raises(SystemExit, match="min-keep"):
        multiblock(2, 4, 4, 0, 0, Config())  # 4 x 4 grid: blocks of <= 10 patches

# -----------------------------------------------------------------------------
# model, loss, schedules, EMA


def test_predictor_is_block_major_one_sequence_per_target():
    torch.manual_seed(0)
    P = ijepa.Predictor(32, 48, grid=8, dim=32, depth=2, heads=1).eval()
    z = torch.randn(3, 10, 32)
    enc = torch.stack([torch.randperm(64)[:10] for _ in range(3)])
    # (M, B, Nt)
    pred = torch.stack([torch.stack([torch.randperm(64)[:5] for _ in range(3)]) for _ in range(4)])
    out = P(z, enc, pred)
    assert out.shape == (4 * 3, 5, 48)
    pred2 = pred.clone()
    pred2[1, 0] = torch.randperm(64)[:5]  # move target block 1 of image 0
    z2 = z.clone()
    z2[2] += 1                                                       # change image 2's context
    d1 = (P(z, enc, pred2) - out).abs().amax((1, 2))
    d2 = (P(z2, enc, pred) - out).abs().amax((1, 2))
    assert d1[1 * 3 + 0] > 0 and (d1.index_fill(0, torch.tensor([3]), 0) == 0).all()
    assert set(torch.nonzero(d2).flatten().tolist()) == {2, 5, 8, 11}


def test_loss_is_smooth_l1_on_layernormed_teacher_and_ema_update(tmp_path):
    cfg = tiny(tmp_path)
    model, teacher, _, opt = ijepa.build(cfg, "cpu")
    for p in teacher.parameters():                                   # make teacher != student
        p.data.add_(0.01 * torch.randn_like(p))
    x = torch.randn(8, 1, 64, 64)
    enc, pred = multiblock(8, 8, 8, 3, 0, cfg)
    with torch.no_grad():
        h = F.layer_norm(teacher(x), (192,))                         # train.py:295-313
        tgt = torch.stack([torch.stack([h[b, pred[m, b]] for b in range(8)]) for m in range(4)]).flatten(0, 1)
        z = model.predictor(model.encoder(x, ids_keep=enc), enc, pred)
        ref = F.smooth_l1_loss(z, tgt)
    t_old = [p.clone() for p in teacher.parameters()]
    out = ijepa.train_step(cfg, 0, model, model, teacher, opt, x, x, enc, pred, 0.9, ijepa.nullcontext())
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-6)
    for t0, t, s in zip(t_old, teacher.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)  # theta_t <- m theta_t + (1 - m) theta_s
    groups = opt.param_groups  # no weight decay on biases and norms
    assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0
    assert any(p is model.predictor.mask_token for p in groups[0]["params"])


def test_cli_has_every_knob():
    assert ijepa.parse_args([]) == Config()
    c = ijepa.parse_args("--fix-masks --pred-scale 0.1 0.3 --sigreg 0.05 --teacher t.st".split())
    assert c.fix_masks and c.pred_scale == (0.1, 0.3) and c.sigreg == 0.05 and c.teacher == "t.st"


def test_schedules_match_official_schedulers():
    cfg = Config(epochs=5, warmup_epochs=2, warmup_frac=1.0)
    ipe = 7
    total, warm = ipe * cfg.epochs, ijepa.warmup_steps(cfg, ipe)
    assert warm == 14
    for i in range(total):  # schedulers.py: step() before iteration i
        s = i + 1
        if s < warm:
            lr = cfg.start_lr + s / warm * (cfg.lr - cfg.start_lr)
        else:
            t = (s - warm) / (total - warm)
            lr = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        end = cfg.weight_decay_end
        wd = min(end, end + (cfg.weight_decay - end) * 0.5 * (1 + math.cos(math.pi * s / total)))
        m = cfg.ema[0] + i * (cfg.ema[1] - cfg.ema[0]) / total
        got = ijepa.schedules(cfg, i, total, warm)
        assert np.allclose(got, (max(lr, cfg.min_lr), wd, m), rtol=0, atol=1e-15)
    first = cfg.start_lr + (cfg.lr - cfg.start_lr) / warm
    assert ijepa.schedules(cfg, 0, total, warm)[0] == pytest.approx(first)
    assert ijepa.schedules(cfg, total - 1, total, warm)[1:] == pytest.approx((0.4, 1 - 0.004 / total))
    # the paper's 40 warmup epochs: kept for 300 epochs, clipped to the same 13.3 % of a short run
    assert ijepa.warmup_steps(Config(), 10) == 400
    assert ijepa.warmup_steps(Config(epochs=30), 10) == 40

# -----------------------------------------------------------------------------
# SIGReg


def test_epps_pulley_matches_scipy_integration():
    g = np.random.default_rng(0)
    samples = (g.standard_normal(300), g.exponential(size=300), 3 * g.standard_normal(300),
               g.uniform(-2, 2, 300))
    for x in samples:
        got = ijepa.epps_pulley(torch.tensor(x)[:, None])[0].item()
        # noqa: E731
        f = lambda t: (((np.cos(t * x).mean() - np.exp(-t * t / 2)) ** 2 + np.sin(t * x).mean() ** 2)
                       * np.exp(-t * t / 2))
        assert got == pytest.approx(len(x) * quad(f, -3, 3, limit=200)[0], rel=2e-3)


def sigreg(z, seed, step, slices=1024):
    return ijepa.sigreg(z, ijepa.sigreg_directions(seed, step, z.shape[1], slices, z.device))


def test_sigreg_small_on_gaussian_large_otherwise_and_seeded():
    torch.manual_seed(0)
    gauss = sigreg(torch.randn(512, 64), seed=0, step=0)
    assert gauss < 2  # E = int (1 - e^{-t^2}) e^{-t^2/2} ~ 0.9
    for z in (torch.rand(512, 64), 0.1 * torch.randn(512, 64), torch.randn(512, 1).expand(512, 64) * 3):
        assert sigreg(z, seed=0, step=0) > 50 * gauss
    z = torch.randn(256, 32)
    assert sigreg(z, 0, 5) == sigreg(z, 0, 5) != sigreg(z, 0, 6)
    A = ijepa.sigreg_directions(0, 5, 32, 1024, "cpu")
    torch.testing.assert_close(A.norm(dim=0), torch.ones(1024))     # unit directions

# -----------------------------------------------------------------------------
# data


def frames_of(d, chans=1, size=32):
    paths, counts = ijepa.list_frames(str(d))
    return ijepa.Frames(paths, counts, chans, size)


def test_frames_decode_every_format_and_flag_bad_files(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    # wide: padded on top/bottom
    Image.fromarray(np.full((20, 40), 200, np.uint8)).save(d / "a_gray.png")
    red = np.dstack([np.full((16, 16), v, np.uint8) for v in (255, 0, 0)])
    Image.fromarray(red).save(d / "b_rgb.jpg", quality=100)
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(d / "c16.png")          # 16-bit
    pages = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (10, 250)]
    pages[0].save(d / "sub" / "d.tif", save_all=True, append_images=pages[1:])        # 2 pages
    np.save(d / "sub" / "e.npy", np.full((3, 16, 16, 3), 90, np.uint8))
    (d / "sub" / "f.png").write_bytes(b"not a png")
    fr = frames_of(d)
    assert len(fr) == 1 + 1 + 1 + 2 + 3 + 1
    items = [fr[i] for i in range(len(fr))]
    x = [t for t, ok, _ in items]
    assert [ok for _, ok, _ in items] == [True] * 8 + [False] and fr.name(len(fr) - 1).endswith("f.png")
    assert all(t.shape == (1, 32, 32) and t.dtype == torch.uint8 for t in x)
    assert x[0][0, 16, 16] == 200 and x[0][0, 0, 16] == 0  # letterboxed with black, not stretched
    assert abs(int(x[1][0, 16, 16]) - 76) <= 2                       # red -> luma 0.299
    assert x[2].min() == 255 and (x[3].max(), x[4].max()) == (10, 250) and x[5].max() == 90
    assert fr.name(4).endswith("d.tif [frame 1]")
    rgb = frames_of(d, chans=3)[0][0]
    assert rgb.shape == (3, 32, 32) and (rgb[0] == rgb[2]).all()
    np.save(d / "g.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(SystemExit, match="g.npy.*uint8"):
        ijepa.list_frames(str(d))
    with pytest.raises(SystemExit, match="nope: no such folder"):
        ijepa.list_frames(str(tmp_path / "nope"))
    (tmp_path / "e").mkdir()  # 16-bit: / 257, no per-frame stretch
    Image.fromarray(np.array([[25700, 12850], [25700, 12850]], np.uint16)).save(tmp_path / "e" / "h16.png")
    assert frames_of(tmp_path / "e", size=2)[0][0][0].tolist() == [[100, 50], [100, 50]]


def test_stats_computed_written_and_checked(tmp_path):
    d = frames_dir(tmp_path / "data")
    os.remove(d / "stats.json")
    cfg = tiny(tmp_path)
    paths, counts = ijepa.list_frames(cfg.data)
    fr = ijepa.Frames(paths, counts, 1, 32)
    data = {"frames": len(fr), "fingerprint": ijepa.fingerprint(cfg.data, paths, counts)}
    x = torch.stack([fr[i][0] for i in range(len(fr))]).double() / 255
    mean, std, _ = ijepa.resolve_stats(fr, cfg, data)
    assert mean == pytest.approx([x.mean().item()]) and std == pytest.approx([x.std(unbiased=False).item()])
    # into --out, with its provenance
    written = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert written["mean"] == mean
    assert written["frames"] == 24
    assert written["fingerprint"] == data["fingerprint"]
    (d / "stats.json").write_text(json.dumps({"mean": [0.5, 0.5], "std": [0.2, 0.2]}))
    with pytest.raises(SystemExit, match="stats.json.*--in-chans 1"):
        ijepa.resolve_stats(fr, cfg, data)
    (d / "stats.json").write_text('{"mean": [0.5')  # truncated JSON: the same clear exit
    with pytest.raises(SystemExit, match="stats.json.*delete it"):
        ijepa.resolve_stats(fr, cfg, data)
    syn = ijepa.Frames(["<synthetic>"], [6], 1, 32, arrays={"<synthetic>": np.zeros((6, 40, 40), np.uint8)})
    assert len(syn) == 6 and syn[5][0].shape == (1, 32, 32)


def test_crop_matches_slicing_and_stays_inside():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (3, 1, 40, 40), dtype=torch.uint8, generator=g)
    top, left = np.array([0, 5, 8]), np.array([0, 3, 8])           # 32 x 32 boxes -> no resampling
    theta = np.zeros((3, 2, 3), np.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = 32 / 40
    theta[:, 0, 2], theta[:, 1, 2] = (2 * left + 32) / 40 - 1, (2 * top + 32) / 40 - 1
    x = ijepa.crop_normalize(imgs, torch.from_numpy(theta), 32, 0.0, 1 / 255)
    for b in range(3):
        torch.testing.assert_close(x[b], imgs[b, :, top[b]:top[b] + 32, left[b]:left[b] + 32].float(),
                                   atol=1e-3, rtol=0)
    th = ijepa.rrc_theta(np.random.default_rng(0), 500, 256, (0.3, 1.0))
    lo, hi = th[:, :, 2] - th[:, [0, 1], [0, 1]], th[:, :, 2] + th[:, [0, 1], [0, 1]]
    assert lo.min() >= -1 - 1e-6 and hi.max() <= 1 + 1e-6
    area = th[:, 0, 0] * th[:, 1, 1]
    assert 0.29 < area.min() and area.max() <= 1 + 1e-6

# -----------------------------------------------------------------------------
# training runs: resume, SALT, guards, bad files, benchmark


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    frames_dir(tmp_path / "data")
    straight = ijepa.train(tiny(tmp_path, out=str(tmp_path / "a"), max_steps=4, sigreg=0.1))
    # workers too
    ijepa.train(tiny(tmp_path, out=str(tmp_path / "b"), max_steps=2, sigreg=0.1, num_workers=2))
    resumed = ijepa.train(tiny(tmp_path, out=str(tmp_path / "b"), max_steps=4, sigreg=0.1,
                               resume=str(tmp_path / "b" / "ckpt.safetensors")))
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]       # bit-exact on CPU, float32
    assert la[0]["epoch"] == 0 and la[3]["epoch"] == 1 and "momentum" in la[0] and "sigreg" in la[0]
    for m in ("teacher", "model"):
        for a, b in zip(straight[m].state_dict().values(), resumed[m].state_dict().values()):
            assert torch.equal(a, b)
    model, meta = vit.load_encoder(tmp_path / "b" / "ckpt.safetensors")
    assert meta["method"] == "ijepa"
    assert meta["pool"] == "mean"
    assert meta["step"] == 4
    assert meta["mean"] == [0.5]
    assert not model.cfg.cls_token and model.cfg.pos_embed == "sincos"
    with pytest.raises(SystemExit, match="--resume"):  # a finished run is never overwritten
        ijepa.train(tiny(tmp_path, out=str(tmp_path / "b")))
    with pytest.raises(SystemExit, match="--pred-dim"):
        resume = str(tmp_path / "b/ckpt.safetensors")
        ijepa.train(tiny(tmp_path, out=str(tmp_path / "b"), pred_dim=32, resume=resume))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    frames_dir(tmp_path / "data")
    ijepa.train(tiny(tmp_path, max_steps=2))
    ck = tmp_path / "run" / "ckpt.safetensors"
    with safe_open(str(ck), "pt") as f:
        meta = f.metadata()
    t = load_file(ck)
    t["predictor.predictor_proj.weight"][0, 0] = float("nan")
    save_file(t, ck, metadata=meta)
    digest = hashlib.sha256(ck.read_bytes()).hexdigest()
    with pytest.raises(SystemExit, match="step 3: loss is nan"):
        ijepa.train(tiny(tmp_path, max_steps=6, save_every=1, resume=str(ck)))
    assert hashlib.sha256(ck.read_bytes()).hexdigest() == digest


def test_salt_teacher_is_frozen_and_any_size(tmp_path):
    frames_dir(tmp_path / "data")
    # an RGB MAE-like teacher with CLS, another width and another training size / normalisation
    torch.manual_seed(1)
    t = vit.ViT(vit.ViTConfig(img_size=32, patch_size=8, in_chans=3, embed_dim=96, depth=1, num_heads=3))
    vit.save_checkpoint(tmp_path / "teacher.safetensors", t, method="mae", pool="cls", mean=[0.4] * 3,
                        std=[0.2] * 3)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    out = ijepa.train(tiny(tmp_path, max_steps=3, teacher=str(tmp_path / "teacher.safetensors")))
    teacher = out["teacher"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-identical after training steps
    assert out["model"].predictor.predictor_proj.out_features == 96
    log = losses(tmp_path / "run")
    assert len(log) == 3 and "momentum" not in log[0] and all(math.isfinite(r["loss"]) for r in log)
    student, meta = vit.load_encoder(tmp_path / "run" / "ckpt.safetensors")
    assert student.cfg.embed_dim == 192 and meta["args"]["teacher"].endswith("teacher.safetensors")
    # the teacher sees the images with its own normalisation, gray repeated to RGB
    x = torch.randn(2, 1, 8, 8)
    xt = ijepa.teacher_input(x, (torch.full((1, 3, 1, 1), 0.4), torch.full((1, 3, 1, 1), 0.2)), 0.25, 0.5)
    torch.testing.assert_close(xt, ((x * 0.25 + 0.5 - 0.4) / 0.2).expand(-1, 3, -1, -1))
    t16 = vit.ViT(vit.ViTConfig(img_size=32, patch_size=16, in_chans=1, embed_dim=64, depth=1, num_heads=2))
    vit.save_checkpoint(tmp_path / "t16.safetensors", t16, method="mae", pool="cls", mean=[0.4], std=[0.2])
    with pytest.raises(SystemExit, match="patch sizes must match"):
        ijepa.train(tiny(tmp_path, out=str(tmp_path / "c"), teacher=str(tmp_path / "t16.safetensors")))


def test_unreadable_files_are_skipped_then_stop_the_run(tmp_path, capsys):
    d = frames_dir(tmp_path / "data", n=150)
    (d / "bad0.png").write_bytes(b"junk")                           # frame 0 of 151: 0.7 %, skipped
    out = ijepa.train(tiny(tmp_path, batch_size=50, max_steps=3, log_every=1))
    used = np.random.default_rng([0, 0]).permutation(151)[:150]     # epoch 0's frames (seed 0)
    cap = capsys.readouterr()
    assert out["step"] == 3 and ("skipping unreadable" in cap.out + cap.err) == (0 in used)
    for i in range(1, 6):  # 6 of 156 frames (3.8 %) unreadable
        (d / f"bad{i}.png").write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"bad\d.png"):
        ijepa.train(tiny(tmp_path, out=str(tmp_path / "r2"), batch_size=52, log_every=1))


def test_benchmark_counts_flops_like_the_profiler(tmp_path, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode
    import kernels
    # the profiler does not count CPU SDPA: attention written as two matmuls it does count
    monkeypatch.setattr(kernels, "attention",
                        lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v)
    cfg = tiny(tmp_path)
    r = ijepa.benchmark(cfg, steps=1, warmup=1)
    assert r["img_per_s"] > 0
    model, teacher, _, opt = ijepa.build(cfg, "cpu")
    fl = []
    for i in range(8):                                               # the batches benchmark() times
        enc, pred = multiblock(8, 8, 8, i, 0, cfg)
        with FlopCounterMode(display=False) as fc:
            x = torch.randn(8, 1, 64, 64)
            ijepa.train_step(cfg, i, model, model, teacher, opt, x, torch.randn(8, 1, 64, 64),
                             enc, pred, 0.996, ijepa.nullcontext())
        fl.append(fc.get_total_flops() / 8)
    # the profiler's exact count; ours counts 3x forward for the whole student incl. the patch-embed
    # input grad
    assert r["flops_per_img"] == pytest.approx(np.mean(fl), rel=0.01)

# -----------------------------------------------------------------------------
# 2 processes, gloo


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path, torchrun):
    frames_dir(tmp_path / "data", n=32)
    args = ("--size vit_tiny --depth 2 --img-size 64 --patch-size 8 --pred-depth 2 --pred-dim 64 "
            "--pred-heads 2 --batch-size 8 --min-keep 4 --epochs 3 --num-workers 0 --device cpu "
            "--log-every 2 --save-every 0 --diag-every 0 --max-steps 3 --sigreg 0.2 "
            "--sigreg-slices 64").split()
    args += ["--out", str(tmp_path / "run"), "--data", str(tmp_path / "data")]
    p = torchrun(["tests/ddp_run.py", "ijepa", str(tmp_path), *args])
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 3
    for part in ("model", "teacher"):
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), f"{part}.{k}"  # identical weights on both ranks
    # SIGReg of the global batch, computed on two halves: same value and per-rank gradient W x the
    # global one
    m0, m1 = (torch.load(tmp_path / f"rank{r}.math.pt") for r in (0, 1))
    z = torch.randn(16, 32, generator=torch.Generator().manual_seed(7)).requires_grad_()
    full = sigreg(z, 0, 3, slices=16)
    full.backward()
    torch.testing.assert_close(m0["sigreg"], full.detach())
    torch.testing.assert_close(torch.cat([m0["grad"], m1["grad"]]), 2 * z.grad)
    assert len(losses(tmp_path / "run")) == 3


def test_the_teacher_is_pinned_by_its_weights_not_its_path(tmp_path):
    frames_dir(tmp_path / "data")
    path = tmp_path / "teacher.safetensors"
    torch.manual_seed(1)
    t = vit.ViT(vit.ViTConfig(img_size=32, patch_size=8, in_chans=1, embed_dim=96, depth=1, num_heads=3))
    vit.save_checkpoint(path, t, method="mae", pool="cls", mean=[0.4], std=[0.2], step=7)
    ijepa.train(tiny(tmp_path, max_steps=2, teacher=str(path)))
    ck = tmp_path / "run" / "ckpt.safetensors"
    pin = vit.load_checkpoint(ck)[1]["state"]["teacher"]
    old = hashlib.sha256(path.read_bytes()).hexdigest()
    assert pin == {"sha256": old, "method": "mae", "step": 7}
    # the same file spelled another way (and moved): the same weights, so the run continues
    os.makedirs(tmp_path / "moved")
    os.replace(path, tmp_path / "moved" / "teacher.safetensors")
    spelled = tmp_path / "moved" / ".." / "moved" / "teacher.safetensors"
    out = ijepa.train(tiny(tmp_path, max_steps=3, teacher=str(spelled), resume=str(ck)))
    assert out["step"] == 3
    # the teacher's run went on training in place: refused, naming both hashes
    with torch.no_grad():
        t.norm.weight.add_(0.1)
    vit.save_checkpoint(spelled, t, method="mae", pool="cls", mean=[0.4], std=[0.2], step=9)
    new = hashlib.sha256(spelled.read_bytes()).hexdigest()
    changed = f"weights changed since this run began: sha256 {old} .*step 7.*{new}"
    with pytest.raises(SystemExit, match=changed):
        ijepa.train(tiny(tmp_path, max_steps=4, teacher=str(spelled), resume=str(ck)))
    # this run's own checkpoint as its teacher, through a symbolic link: refused as the same file
    os.symlink(ck, tmp_path / "link.safetensors")
    with pytest.raises(SystemExit, match="is this run's own checkpoint"):
        ijepa.train(tiny(tmp_path, max_steps=4, teacher=str(tmp_path / "link.safetensors"), resume=str(ck)))
    with pytest.raises(SystemExit, match="trained with --teacher"):
        ijepa.train(tiny(tmp_path, max_steps=4, resume=str(ck)))
