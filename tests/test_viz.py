"""viz.py: attention against an explicit softmax, similarity, PCA against sklearn, section 4.1 scores against
sklearn / scipy, figures for odd image sizes, and errors that name the file."""
import csv
import json
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import pearsonr, wilcoxon
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

import viz
from vit import ViT, ViTConfig, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KINDS = {  # tiny stand-ins for the three methods' encoders: 8 px patches, 32 px training size
    "mae": (dict(), "cls"),
    "dino": (dict(num_reg=2, pos_embed="rope", layerscale=1e-5), "cls"),
    "ijepa": (dict(cls_token=False), "mean"),
}


def tiny(kind="mae", in_chans=1, **kw):
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=8, in_chans=in_chans, embed_dim=64, depth=2, num_heads=4,
                    **{**KINDS[kind][0], **kw})
    return ViT(cfg).eval()


def ckpt(tmp_path, kind="mae", in_chans=1, name=None, **kw):
    m = tiny(kind, in_chans, **kw)
    path = tmp_path / f"{name or kind}.safetensors"
    save_checkpoint(path, m, method=kind, pool=KINDS[kind][1], mean=[0.3] * in_chans, std=[0.2] * in_chans)
    return str(path)


def save_img(path, W, H, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (H, W, 3) if mode == "RGB" else (H, W), dtype=np.uint8)
    Image.fromarray(a, mode).save(path)
    return str(path)

# -----------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("kind,query", [("mae", "cls"), ("mae", "mean"), ("dino", "cls"), ("dino", "mean"),
                                        ("ijepa", "mean")])
def test_attention_rows_sum_to_one_and_match_explicit_softmax(kind, query, monkeypatch):
    m = tiny(kind)
    x = torch.randn(2, 1, 40, 24)                                     # 5 x 3 patches, not the training grid
    P = m.num_prefix
    q, k = m.last_qk(x)                                               # (B, H, P + N, Dh)
    ref = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)   # (B, H, P + N, P + N)
    ref = ref[:, :, 0] if query == "cls" else ref[:, :, P:].mean(2)  # CLS row, or mean over PATCH queries
    monkeypatch.setattr(viz, "ATT_CHUNK", 4)                          # several chunks of query rows
    att = viz.attention(m, x, query)
    assert att.shape == (2, 4, P + 15)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4))
    torch.testing.assert_close(att, ref, atol=1e-6, rtol=1e-5)
    if P:                                                             # prefix queries really are left out
        with_prefix = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1).mean(2)
        assert query == "cls" or not torch.allclose(att, with_prefix, atol=1e-6)

# -----------------------------------------------------------------------------
# cosine similarity and anchors


def test_anchor_own_similarity_is_one_and_anchor_maps_to_its_patch():
    m = tiny("dino")
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (53, 37), dtype=np.uint8))
    meta = {"vit": {"patch_size": 8}, "in_chans": 1, "mean": [0.3], "std": [0.2]}
    x = viz.preprocess(img, meta, "cpu")
    assert x.shape == (1, 1, 56, 40)                                  # 53 -> 56, 37 -> 40: nearest multiples of 8
    gh, gw = 7, 5
    feats = viz.patch_features(m, x)[0]                               # (35, 64)
    assert feats.shape == (35, 64)
    anchors = [(0, 0), (36, 52), (18.5, 26), (7, 9)]
    idx = [viz.anchor_patch(a, 37, 53, gw, gh) for a in anchors]
    assert idx[0] == 0 and idx[1] == 34                               # corners -> first and last patch
    assert idx[2] == 3 * gw + 2                                       # x 18.5/37*5 = 2.5, y 26/53*7 = 3.4
    sims = viz.similarity_maps(feats, torch.tensor(idx))              # (4, 35)
    torch.testing.assert_close(sims[torch.arange(4), idx], torch.ones(4))
    ref = torch.nn.functional.cosine_similarity(feats[idx][:, None], feats[None], dim=-1)
    torch.testing.assert_close(sims, ref, atol=1e-5, rtol=1e-5)

# -----------------------------------------------------------------------------
# PCA


def test_pca_matches_sklearn_and_recovers_a_dominant_direction():
    rng = np.random.default_rng(0)
    u = rng.normal(size=32)
    u /= np.linalg.norm(u)
    t = rng.normal(size=200)
    X = 10 * t[:, None] * u[None] + 0.1 * rng.normal(size=(200, 32))   # one dominant direction
    fit = viz.pca_fit(torch.tensor(X))
    z = viz.pca_project(torch.tensor(X), fit).numpy()
    np.testing.assert_allclose(z, PCA(3, svd_solver="full").fit_transform(X), atol=1e-8)   # incl. sign convention
    assert abs(np.dot(fit[1][0].numpy(), u)) > 0.999
    assert abs(np.corrcoef(z[:, 0], t)[0, 1]) > 0.999
    torch.testing.assert_close(fit[1] @ fit[1].T, torch.eye(3, dtype=torch.float64))   # orthonormal components


@pytest.mark.parametrize("M", [400, 2])
def test_pca_rgb_is_three_channels_in_unit_range(M):
    # unit-variance, uncorrelated features (no preferred direction) and fewer patches than components
    X = torch.tensor(np.random.default_rng(1).normal(size=(M, 16)))
    z = viz.pca_project(X, viz.pca_fit(X))
    rgb = viz.minmax(z, z.min(0).values, z.max(0).values)
    assert rgb.shape == (M, 3) and torch.isfinite(rgb).all()
    assert rgb.min() >= 0 and rgb.max() <= 1
    if M > 3:                                                         # each channel spans [0, 1]
        torch.testing.assert_close(rgb.min(0).values, torch.zeros(3))
        torch.testing.assert_close(rgb.max(0).values, torch.ones(3))
        assert z.var(0)[0] >= z.var(0)[1] >= z.var(0)[2]              # ordered by explained variance

# -----------------------------------------------------------------------------
# section 4.1 scores


def test_similarity_equal_to_the_mask_gives_auroc_one_and_full_coherence():
    gh, gw, p = 4, 5, 8
    H, W = gh * p, gw * p
    mask = np.zeros((H, W), bool)
    mask[: 3 * p] = True                                              # organ: the top three patch rows
    organ = np.repeat(np.arange(gh) < 3, gw)                          # (N,) the same mask on the patch grid
    feats = torch.tensor(np.where(organ[:, None], [1.0, 0, 0], [0, 1.0, 0]), dtype=torch.float32)  # (N, 3)
    anchors = [(3, 2), (20, 10), (35, 21), (12, 17), (27, 5)]
    au, r = viz.anchor_scores(feats, (gh, gw), anchors, mask)         # similarity = 1 in the organ, 0 outside
    assert au == 1.0 and r == pytest.approx(1.0)
    assert viz.auroc(mask.astype(float), mask) == 1.0
    assert viz.auroc(1 - mask.astype(float), mask) == 0.0
    s = np.random.default_rng(0).random((H, W))
    assert viz.auroc(s, mask) == pytest.approx(roc_auc_score(mask.ravel(), s.ravel()))


def test_coherence_is_the_mean_pairwise_pearson():
    sims = np.random.default_rng(0).random((5, 30))
    ref = np.mean([pearsonr(sims[i], sims[j])[0] for i in range(5) for j in range(i + 1, 5)])
    assert viz.coherence(sims) == pytest.approx(ref)
    assert math.isnan(viz.coherence(np.ones((5, 30))))                 # a flat map has no correlation


def test_wilcoxon_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.random(20), rng.random(20) + 0.1
    n, stat, p = viz.compare(a, b)
    ref = wilcoxon(a, b)
    assert n == 20 and stat == ref.statistic and p == ref.pvalue
    a[3], b[7] = np.nan, np.nan                                       # skipped images drop out pairwise
    keep = np.ones(20, bool)
    keep[[3, 7]] = False
    assert viz.compare(a, b) == (18, wilcoxon(a[keep], b[keep]).statistic, wilcoxon(a[keep], b[keep]).pvalue)
    assert math.isnan(viz.compare(a, a)[2])


def test_anchors_inside_mask_one_patch_apart_and_seeded():
    mask = np.zeros((60, 50), bool)
    mask[10:50, 5:45] = True
    a1 = viz.sample_anchors(mask, 5, (8, 8), np.random.default_rng([0, 1]))
    a2 = viz.sample_anchors(mask, 5, (8, 8), np.random.default_rng([0, 1]))
    assert a1 == a2 and len(a1) == 5
    for i, (x, y) in enumerate(a1):
        assert 13 <= y <= 46 and 8 <= x <= 41                          # inside, >= 4 px from the background
        for cx, cy in a1[i + 1:]:
            assert abs(x - cx) >= 8 or abs(y - cy) >= 8
    tiny_mask = np.zeros((60, 50), bool)
    tiny_mask[20:23, 20:23] = True
    assert viz.sample_anchors(tiny_mask, 5, (8, 8), np.random.default_rng(0)) is None

# -----------------------------------------------------------------------------
# end to end: figures and the segscore CLI


def test_maps_odd_sizes_three_kinds(tmp_path):
    cks = [ckpt(tmp_path, "mae"), ckpt(tmp_path, "dino", in_chans=3), ckpt(tmp_path, "ijepa")]
    imgs = [save_img(tmp_path / "odd.png", 37, 53), save_img(tmp_path / "small.png", 5, 7, "L")]
    Image.fromarray((np.arange(60 * 20, dtype=np.uint16).reshape(20, 60) * 50)).save(tmp_path / "deep.tif")
    imgs.append(str(tmp_path / "deep.tif"))                           # 16-bit grayscale, wide
    out = tmp_path / "figs"
    viz.main(["maps", *cks, "--images", *imgs, "--anchor", "2,3", "--anchor", "4.5,6", "--out", str(out),
              "--names", "MAE", "DINOv3", "I-JEPA", "--joint-pca"])
    for stem in ("odd", "small", "deep"):
        fig = np.asarray(Image.open(out / f"{stem}.png"))
        assert fig.ndim == 3 and fig.shape[2] == 3 and fig.shape[0] > 3 * 48
        red = (fig[..., 0] > 200) & (fig[..., 1] < 60) & (fig[..., 2] < 60)
        assert red.sum() > 3 * 2 * 10                                 # a red X per anchor per row
    assert not list(out.glob("*.tmp"))
    # default anchor (the centre), --query mean on a CLS model, no names
    viz.main(["maps", cks[0], "--images", imgs[0], "--query", "mean", "--out", str(tmp_path / "f2")])
    assert (tmp_path / "f2" / "odd.png").is_file()


def test_maps_errors_name_the_problem(tmp_path):
    ck, ij = ckpt(tmp_path, "mae"), ckpt(tmp_path, "ijepa")
    img = save_img(tmp_path / "a.png", 37, 53)
    with pytest.raises(ValueError, match=r"anchor \(40, 3\) is outside .*a\.png, which is 37x53"):
        viz.main(["maps", ck, "--images", img, "--anchor", "40,3", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"ijepa\.safetensors: --query cls but .* no CLS token"):
        viz.main(["maps", ij, "--images", img, "--query", "cls", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="2 names for 1 checkpoints"):
        viz.main(["maps", ck, "--images", img, "--names", "A", "B", "--out", str(tmp_path)])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.safetensors.*not a safetensors"):
        viz.main(["maps", str(junk), "--images", img, "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        viz.main(["maps", ck, "--images", img, "--anchor", "3;4"])


def make_seg_data(root, n=5):
    """Bright rectangles (the organ) on darker noise, with their 0/255 masks; odd sizes."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    (root / "mask").mkdir()
    for i in range(n):
        W, H = 44 + 3 * i, 50 - 2 * i
        img = rng.integers(0, 80, (H, W), dtype=np.uint8)
        mask = np.zeros((H, W), np.uint8)
        mask[6:H - 6, 5:W - 12] = 255
        img[mask > 0] += 120
        Image.fromarray(img).save(root / "img" / f"f{i}.png")
        Image.fromarray(mask).save(root / "mask" / f"f{i}.png")


def test_segscore_cli_writes_csv_and_summary(tmp_path, capsys):
    make_seg_data(tmp_path)
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "img" / "empty.png")
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "mask" / "empty.png")
    a, b = ckpt(tmp_path, "ijepa"), ckpt(tmp_path, "dino", in_chans=3)
    out = tmp_path / "s.csv"
    viz.main(["segscore", a, b, "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"),
              "--out", str(out), "--seed", "3"])
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 6
    empty = [r for r in rows if r["image"].endswith("empty.png")][0]
    assert empty["note"] == "mask is empty" and empty["auroc_a"] == ""
    scored = [r for r in rows if not r["note"]]
    assert len(scored) == 5
    for r in scored:
        mask = np.asarray(Image.open(r["mask"])) > 127
        xy = [tuple(map(int, s.split(":"))) for s in r["anchors"].split()]
        assert len(xy) == viz.N_CORR and all(mask[y, x] for x, y in xy)
        for k in ("auroc_a", "auroc_b", "pearson_a", "pearson_b"):
            assert -1 <= float(r[k]) <= 1
    text = capsys.readouterr().out
    ref = wilcoxon([float(r["auroc_a"]) for r in scored], [float(r["auroc_b"]) for r in scored])
    assert "Wilcoxon" in text and f"p={ref.pvalue:.3g}" in text and "ijepa" in text and "dino" in text
    # anchors: seeded by (seed, crc32 of the image's path under --images), the same for both checkpoints
    first = [r for r in rows if r["image"].endswith("f0.png")][0]
    mask = np.asarray(Image.open(first["mask"])) > 127
    ref = viz.sample_anchors(mask, viz.N_CORR, (44 / 6, 50 / 6), np.random.default_rng([3, zlib.crc32(b"f0.png")]))
    assert first["anchors"] == " ".join(f"{x}:{y}" for x, y in ref)


def test_segscore_errors_name_both_files(tmp_path):
    make_seg_data(tmp_path, n=2)
    a = ckpt(tmp_path, "mae")
    args = ["segscore", a, a, "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"),
            "--out", str(tmp_path / "s.csv")]
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "mask" / "f1.png")
    with pytest.raises(ValueError, match=r"mask .*f1\.png is 12x10 pixels but its image .*f1\.png is 47x48"):
        viz.main(args)
    (tmp_path / "mask" / "f1.png").unlink()
    with pytest.raises(ValueError, match=r"no mask for 1 of 2 images, e\.g\. .*img/f1\.png"):
        viz.main(args)
    assert not (tmp_path / "s.csv").exists()                          # nothing written on bad input
    with pytest.raises(ValueError, match="--masks .*nope: no such directory"):
        viz.main(args[:6] + [str(tmp_path / "nope")])


def test_segscore_takes_masks_at_another_resolution_of_the_same_shape(tmp_path):
    """Frames resized by prep/ultrasound.py keep the generator's full-size masks: a mask at twice the image's
    resolution is resized to it (nearest) and scores exactly as the mask at the image's size."""
    make_seg_data(tmp_path, n=3)
    (tmp_path / "mask2").mkdir()
    for m in sorted((tmp_path / "mask").glob("*.png")):
        with Image.open(m) as small:
            small.resize((2 * small.size[0], 2 * small.size[1]), Image.NEAREST).save(tmp_path / "mask2" / m.name)
    a = ckpt(tmp_path, "ijepa")
    rows = {}
    for d in ("mask", "mask2"):
        out = tmp_path / f"{d}.csv"
        viz.main(["segscore", a, a, "--images", str(tmp_path / "img"), "--masks", str(tmp_path / d), "--out",
                  str(out)])
        rows[d] = [{k: r[k] for k in ("anchors", "auroc_a", "pearson_a")} for r in csv.DictReader(open(out))]
    assert rows["mask"] == rows["mask2"] and len(rows["mask"]) == 3

# -----------------------------------------------------------------------------
# curves


def log_records(n=200, loss=lambda t: 10 ** (-3 * t), diag_every=20):
    """A contract-3 log: a step-0 diagnostic line, then one line per step, the diagnostic merged every diag_every."""
    recs = [{"step": 0, "epoch": 0, "lr": 0.0, "emb_std": 0.9, "rankme": 40.0, "patch_std": 0.3}]
    for s in range(1, n + 1):
        r = {"step": s, "epoch": 0, "loss": loss(s / n), "lr": 1e-3 * min(1.0, 4 * s / n), "wd": 0.04}
        if s % diag_every == 0:
            r.update(emb_std=0.9 - 0.5 * s / n, rankme=40.0 - 30 * s / n, patch_std=0.3 - 0.2 * s / n)
        recs.append(r)
    return recs


def write_log(run, recs, tail=""):
    run.mkdir(parents=True, exist_ok=True)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return str(run)


def colour_pixels(img, colour):
    a = np.asarray(img.convert("RGB")).astype(np.int64)
    ys, xs = np.nonzero((a == np.array(colour)).all(-1))
    return xs, ys


def test_curves_draws_every_run_and_every_logged_diagnostic(tmp_path, capsys):
    recs = log_records()
    recs[5]["loss"] = None                                            # step 5 non-finite: written as null (contract 3)
    a = write_log(tmp_path / "mae", recs)
    b = write_log(tmp_path / "dino", log_records(n=120, loss=lambda t: 12 - 2 * t))
    out = tmp_path / "figs" / "curves.png"
    viz.main(["curves", a, b + "/log.jsonl", "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    img = Image.open(out)
    for c in viz.PALETTE[:2]:                                         # each run's colour: legend and lines
        assert len(colour_pixels(img, c)[0]) > 200
    assert len(colour_pixels(img, viz.PALETTE[2])[0]) == 0            # no third run
    # five panels (loss, lr, emb_std, rankme, patch_std) in two columns: three rows; without diagnostics one row
    c = write_log(tmp_path / "old", [{k: v for k, v in r.items() if k not in ("emb_std", "rankme", "patch_std")}
                                     for r in log_records()])
    viz.curves([c], str(tmp_path / "old.png"))
    h3, h1 = img.size[1], Image.open(tmp_path / "old.png").size[1]
    assert h3 - h1 == 2 * (viz.PANEL[1] + 76)
    steps, loss = viz.series(recs, "loss")                            # null dropped, step 0 has no loss
    assert len(steps) == 199 and 0 not in steps and 5 not in steps and np.isfinite(loss).all()
    assert len(viz.series([{"step": 1, "loss": True}], "loss")[0]) == 0   # a bool is not a number


@pytest.mark.parametrize("loss,log", [(lambda t: 10 ** (-3 * t), True), (lambda t: 1.0 - 0.4 * t, False)])
def test_curves_loss_axis_is_log_when_it_spans_decades(loss, log):
    # exponential decay over 3 decades is a straight line only on a log axis, a linear ramp only on a linear one
    recs = log_records(n=300, loss=loss)
    fig = Image.new("RGB", (viz.PANEL[0] + 200, viz.PANEL[1] + 200), (255, 255, 255))
    viz.draw_panel(fig, 100, 60, "loss", [(viz.PALETTE[0], recs)], "loss", (viz.font(13, True), viz.font(11)))
    xs, ys = colour_pixels(fig, viz.PALETTE[0])
    assert xs.min() <= 102 and xs.max() >= 100 + viz.PANEL[0] - 2    # spans the panel's width
    fit = np.polyfit(xs, ys, 1)
    assert np.abs(ys - np.polyval(fit, xs)).max() < 3.0
    assert ys.max() - ys.min() > 0.8 * viz.PANEL[1]                  # the axis range follows the data


def test_curves_bad_logs_name_the_file(tmp_path, capsys):
    out = tmp_path / "c.png"
    out.write_bytes(b"previous figure")
    with pytest.raises(ValueError, match=r"nope: no such file or folder"):
        viz.main(["curves", str(tmp_path / "nope"), "--out", str(out)])
    (tmp_path / "norun").mkdir()
    with pytest.raises(ValueError, match=r"norun: no log\.jsonl in this folder"):
        viz.main(["curves", str(tmp_path / "norun"), "--out", str(out)])
    empty = write_log(tmp_path / "empty", [])
    with pytest.raises(ValueError, match=r"empty/log\.jsonl: no logged steps"):
        viz.main(["curves", empty, "--out", str(out)])
    recs = log_records(n=20)
    bad = tmp_path / "bad"
    write_log(bad, recs)
    lines = (bad / "log.jsonl").read_text().split("\n")
    lines[3] = lines[3][:10]                                          # damaged in the middle: an error, line 4
    (bad / "log.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"bad/log\.jsonl: line 4 is not JSON"):
        viz.main(["curves", str(bad), "--out", str(out)])
    write_log(tmp_path / "nostep", [{"loss": 1.0}])
    with pytest.raises(ValueError, match=r"line 1 has no numeric \"step\""):
        viz.main(["curves", str(tmp_path / "nostep"), "--out", str(out)])
    ok = write_log(tmp_path / "ok", recs)
    with pytest.raises(ValueError, match="2 names for 1 runs"):
        viz.main(["curves", ok, "--names", "A", "B", "--out", str(out)])
    assert out.read_bytes() == b"previous figure"                     # nothing written on bad input
    # a run killed mid-write: the cut-off last line is dropped with a note, the rest is drawn
    cut = write_log(tmp_path / "cut", recs, tail='{"step": 21, "loss": 0.')
    viz.main(["curves", cut, "--out", str(out)])
    assert "dropped the cut-off last line 22" in capsys.readouterr().err
    assert viz.read_log(cut)[1][-1]["step"] == 20
    assert Image.open(out).size[0] > 0


def test_curves_cli_error_is_a_message_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "viz.py"), "curves", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "c.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "viz.py: error:" in r.stderr and "nope" in r.stderr
    assert "Traceback" not in r.stderr
