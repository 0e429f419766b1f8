"""prep/wsi.py on synthetic slides (prep/synthetic.py): MPP, the 20x read, pixels against openslide's own read,
tissue detection, Reinhard in CIELab, resumable tiling with broken slides, the patient-level split."""
import csv
import json
import os
import subprocess
import sys
import types
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
import openslide
import pytest
from PIL import Image

from prep import wsi
from prep.synthetic import make_slide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    out = {}
    out["svs"] = make_slide(str(d / "s40.svs"), np.random.default_rng(0), 1, "svs", (3072, 2304))
    out["tiff"] = make_slide(str(d / "t40.tiff"), np.random.default_rng(1), 0, "tiff", (2048, 1536))
    out["nompp"] = make_slide(str(d / "nompp.tiff"), np.random.default_rng(2), 0, "nompp", (1024, 768))
    out["x80"] = make_slide(str(d / "x80.svs"), np.random.default_rng(3), 0, "svs", (2048, 1536), mpp=0.125)
    return d, out


def cfg_for(tmp_path, **kw):
    return replace(wsi.Config(), out=str(tmp_path / "patches"), workers=1, **kw)


def test_mpp_read_back_and_refusal(slides):
    _, s = slides
    for key in ("svs", "tiff"):
        mpp, source = wsi.slide_mpp(openslide.OpenSlide(s[key]["path"]))
        assert mpp == pytest.approx(0.25, abs=1e-4) and source == "openslide.mpp-x"
    assert wsi.slide_mpp(openslide.OpenSlide(s["nompp"]["path"]), override=0.5) == (0.5, "--mpp")
    with pytest.raises(ValueError, match="--mpp"):
        wsi.slide_mpp(openslide.OpenSlide(s["nompp"]["path"]))
    # the fallbacks, one property set at a time
    fake = lambda **p: types.SimpleNamespace(properties=p)
    assert wsi.slide_mpp(fake(**{"aperio.MPP": "0.2527"})) == (0.2527, "aperio.MPP")
    assert wsi.slide_mpp(fake(**{"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}))[0] == 0.25
    assert wsi.slide_mpp(fake(**{"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}))[0] == 0.25
    with pytest.raises(ValueError, match=r"objective power is 40x.*0\.25.*--mpp"):   # power alone is not enough
        wsi.slide_mpp(fake(**{"openslide.objective-power": "40", "tiff.XResolution": "72"}))


def test_20x_level_choice_and_read_size(slides):
    _, s = slides
    sl = openslide.OpenSlide(s["svs"]["path"])
    assert sl.level_downsamples == (1.0, 4.0, 16.0)                        # TCGA-like: no 2x level
    assert wsi.read_geometry(sl, 0.25, 0.5, 224) == (0, 448, 448.0)        # 40x: 448 px at level 0, halved
    sl80 = openslide.OpenSlide(s["x80"]["path"])
    assert wsi.read_geometry(sl80, 0.125, 0.5, 224) == (1, 224, 896.0)     # 80x: the 4x level is exactly 20x
    assert wsi.read_geometry(sl, 0.2525, 0.5, 224)[:2] == (0, 444)         # exact MPP sets the scale
    assert wsi.read_geometry(sl, 0.2, 0.5, 224)[:2] == (0, 560)
    assert wsi.read_geometry(sl, 0.5, 0.5, 224)[:2] == (0, 224)            # a 20x scan: no resize
    with pytest.raises(ValueError, match="coarser"):
        wsi.read_geometry(sl, 1.0, 0.5, 224)                               # 10x: would upsample


def test_patches_equal_openslide_read(slides, tmp_path):
    _, s = slides
    # 40x: 448 px at level 0 resized to 224; 80x with 112 px patches: 112 px at level 1 as they are
    for key, patch, level, read in (("svs", 224, 0, 448), ("x80", 112, 1, 112)):
        cfg = cfg_for(tmp_path, stain_norm=False, patch=patch)
        r = wsi.tile_slide(s[key]["path"], cfg.out, cfg)
        assert r["status"] == "done" and (r["level"], r["read_px"]) == (level, read)
        d = os.path.join(cfg.out, r["slide"])
        coords, patches = np.load(f"{d}/coords.npy"), np.load(f"{d}/patches.npy", mmap_mode="r")
        assert patches.dtype == np.uint8 and patches.shape == (len(coords), patch, patch, 3) and len(coords) >= 3
        assert coords.dtype == np.int64 and (coords % 448 == 0).all()
        sl = openslide.OpenSlide(s[key]["path"])
        for i in (0, len(coords) // 2, len(coords) - 1):
            ref = sl.read_region(tuple(int(v) for v in coords[i]), level, (read, read)).convert("RGB")
            if read != patch:
                ref = ref.resize((patch, patch), Image.LANCZOS)
            np.testing.assert_array_equal(patches[i], np.asarray(ref))
        meta = json.load(open(f"{d}/meta.json"))
        assert meta["n_patches"] == len(coords) and meta["stain_norm"] is None
        assert Image.open(f"{d}/thumb.png").size[0] >= 800


def test_tissue_kept_glass_dropped(slides, tmp_path):
    _, s = slides
    cfg = cfg_for(tmp_path, stain_norm=False)
    n_kept = 0
    for key in ("svs", "tiff"):
        r = wsi.tile_slide(s[key]["path"], cfg.out, cfg)
        coords = np.load(os.path.join(cfg.out, r["slide"], "coords.npy"))
        truth = s[key]["tissue"]                                          # (H/16, W/16) bool, the drawn tissue
        nx, ny = r["grid"]
        frac = truth[:ny * 28, :nx * 28].reshape(ny, 28, nx, 28).mean((1, 3))   # 448 level-0 px = 28 cells
        kept = np.zeros((ny, nx), bool)
        kept[coords[:, 1] // 448, coords[:, 0] // 448] = True
        assert len(coords) == kept.sum() == r["n_patches"]
        assert (frac[kept] > 0.3).all()                                   # every kept patch is mostly tissue
        assert not kept[frac == 0].any()                                  # no patch of pure glass
        assert kept[frac > 0.8].all()                                     # patches full of tissue are kept
        n_kept += len(coords)
    assert n_kept >= 5


def test_tissue_mask_on_a_drawn_thumbnail():
    cfg = wsi.Config(thumb_px=16)
    yy, xx = np.mgrid[0:200, 0:300]
    img = np.full((200, 300, 3), 242, np.uint8)                         # glass
    disk = (yy - 100) ** 2 + (xx - 120) ** 2 < 60 ** 2
    hole = (yy - 100) ** 2 + (xx - 120) ** 2 < 5 ** 2                   # 80 px < one patch (256 px): filled
    speck = (yy - 30) ** 2 + (xx - 260) ** 2 < 4 ** 2                   # 50 px < a quarter patch: dropped
    img[disk & ~hole] = (200, 120, 170)
    img[speck] = (120, 60, 150)
    rng = np.random.default_rng(0)
    img = np.clip(img + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
    mask = wsi.tissue_mask(img, cfg)
    assert mask[hole].all() and not mask[speck].any()
    assert (mask == disk).mean() > 0.99
    assert not wsi.tissue_mask(np.full((64, 64, 3), 240, np.uint8), cfg).any()   # all glass: nothing


def test_lab_matches_published_values_and_round_trips():
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [128, 128, 128]], np.uint8)
    ref = np.array([[53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793], [32.2970, 79.1875, -107.8602],
                    [100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.5850, 0.0, 0.0]])   # skimage.color.rgb2lab
    np.testing.assert_allclose(wsi.rgb2lab(rgb), ref, atol=6e-3)
    x = np.random.default_rng(0).integers(0, 256, (200_000, 3)).astype(np.uint8)
    np.testing.assert_array_equal(wsi.lab2rgb(wsi.rgb2lab(x)), x)
    assert (wsi.lab2rgb(np.array([[50.0, 0, 300]])) <= 255).all()         # out of gamut: clipped, no NaN


def test_reinhard_maps_tile_statistics_to_target(slides, tmp_path):
    _, s = slides
    cfg = cfg_for(tmp_path, stain_norm=False)
    r = wsi.tile_slide(s["svs"]["path"], cfg.out, cfg)
    tiles = np.load(os.path.join(cfg.out, r["slide"], "patches.npy"))[:4]
    target = [65.0, 20.0, -6.0, 12.0, 7.0, 4.0]
    out = wsi.reinhard(tiles, target)
    assert out.shape == tiles.shape and out.dtype == np.uint8
    lab = wsi.rgb2lab(out).reshape(len(out), -1, 3).astype(np.float64)
    np.testing.assert_allclose(lab.mean(1), np.broadcast_to(target[:3], (4, 3)), atol=0.6)
    np.testing.assert_allclose(lab.std(1), np.broadcast_to(target[3:], (4, 3)), rtol=0.06)
    before = wsi.rgb2lab(tiles).reshape(4, -1, 3)
    assert np.abs(before.mean(1) - target[:3]).max() > 3                  # it did move something
    flat = wsi.reinhard(np.full((1, 8, 8, 3), 200, np.uint8), target)     # std 0: target mean, no NaN
    np.testing.assert_allclose(wsi.rgb2lab(flat)[0, 0, 0], target[:3], atol=0.6)
    # the stored patches are the normalised reads
    cfg2 = cfg_for(tmp_path / "n", stain_target=",".join(map(str, target)))
    r2 = wsi.tile_slide(s["svs"]["path"], cfg2.out, cfg2)
    np.testing.assert_array_equal(np.load(os.path.join(cfg2.out, r2["slide"], "patches.npy"))[:4], out)


def test_tile_resumes_and_reports_broken_slides(slides, tmp_path):
    d, s = slides
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00" + b"\x00" * 100)                     # a truncated TIFF
    out = tmp_path / "p"
    os.makedirs(out / ".t40.partial")                                   # leftovers of a killed run
    (out / ".t40.partial" / "patches.npy").write_bytes(b"junk")
    inputs = [s["svs"]["path"], s["tiff"]["path"], s["nompp"]["path"], str(broken)]
    summary = wsi.tile(replace(wsi.Config(), out=str(out), workers=2), inputs)
    st = {r["slide"]: r for r in summary["slides"]}
    assert st["s40"]["status"] == st["t40"]["status"] == "done"
    assert st["nompp"]["status"] == "failed" and "nompp.tiff" in st["nompp"]["error"]
    assert "--mpp" in st["nompp"]["error"]
    assert st["broken"]["status"] == "failed" and "broken.svs" in st["broken"]["error"]
    assert sorted(os.listdir(out)) == ["s40", "summary.json", "t40"]     # no partial folder left anywhere
    assert json.load(open(out / "summary.json"))["counts"] == {"done": 2, "failed": 2}
    stamp = os.stat(out / "s40" / "patches.npy").st_mtime_ns
    # rerun: finished slides are skipped, the slide without MPP goes through with --mpp
    summary = wsi.tile(replace(wsi.Config(), out=str(out), workers=1, mpp=0.25), inputs[:3])
    st = {r["slide"]: r["status"] for r in summary["slides"]}
    assert st == {"s40": "already done", "t40": "already done", "nompp": "done"}
    assert os.stat(out / "s40" / "patches.npy").st_mtime_ns == stamp


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "patient", "label"])
        w.writerows(rows)


def test_patient_split_has_no_leakage(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for p in range(60):
        lab = ["LUAD", "LUSC", "other"][p % 3]
        rows += [(f"s{p}_{k}", f"P{p}", lab) for k in range(rng.integers(1, 4))]
    write_csv(tmp_path / "slides.csv", rows)
    out = tmp_path / "splits.csv"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prep", "wsi.py"), "split", str(tmp_path / "slides.csv"),
                        "--out", str(out), "--seed", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = list(csv.DictReader(open(out)))
    assert [g["slide"] for g in got] == [x[0] for x in rows]
    where = defaultdict(set)
    for g in got:
        where[g["patient"]].add(g["split"])
    assert all(len(v) == 1 for v in where.values())                     # no patient in two splits
    n = Counter(next(iter(v)) for v in where.values())
    assert (n["train"], n["val"], n["test"]) == (42, 6, 12)              # 70/10/20 of 60 patients
    per = Counter((g["split"], g["label"]) for g in got)
    assert all(per[s, lab] > 0 for s in ("train", "val", "test") for lab in ("LUAD", "LUSC", "other"))
    same = wsi.split_patients([dict(slide=a, patient=b, label=c) for a, b, c in rows], seed=3)
    assert same == {p: next(iter(v)) for p, v in where.items()}         # seeded
    assert wsi.split_patients([dict(slide=a, patient=b, label=c) for a, b, c in rows], seed=4) != same
    # tiny labels: 1 patient -> train, 2 -> no val/test guarantee, never a crash
    tiny = wsi.split_patients([dict(slide="a", patient="A", label="x"), dict(slide="b", patient="B", label="y"),
                               dict(slide="c", patient="C", label="y")])
    assert tiny["A"] == "train" and set(tiny) == {"A", "B", "C"}
    write_csv(tmp_path / "bad.csv", [])
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("slide,label\na,1\n")
    with pytest.raises(SystemExit, match="patient"):
        wsi.split(str(tmp_path / "bad.csv"), str(tmp_path / "x.csv"))


def test_corrupt_tile_drops_only_its_patches(slides, tmp_path):
    import shutil
    import tifffile
    _, s = slides
    cfg = cfg_for(tmp_path, stain_norm=False)
    clean = wsi.tile_slide(s["svs"]["path"], cfg.out, cfg)
    coords = np.load(os.path.join(cfg.out, "s40", "coords.npy"))
    patches = np.load(os.path.join(cfg.out, "s40", "patches.npy"))
    bad = str(tmp_path / "bad" / "s40.svs")
    os.makedirs(os.path.dirname(bad))
    shutil.copy(s["svs"]["path"], bad)
    with tifffile.TiffFile(bad) as t:                                   # level 0: 256 px JPEG tiles
        page = t.pages[0]
        x, y = coords[len(coords) // 2] + 300                           # a tile inside a kept patch
        i = (y // 256) * -(-page.shape[1] // 256) + x // 256
        offset = page.dataoffsets[i]
    with open(bad, "r+b") as f:
        f.seek(offset + 200)
        f.write(b"\xff\xd9" * 50)                                       # JPEG end markers mid-scan
    cfg2 = cfg_for(tmp_path / "b", stain_norm=False)
    r = wsi.tile_slide(bad, cfg2.out, cfg2)
    assert r["status"] == "done" and 1 <= r["n_unreadable"] <= 4        # a tile touches at most 2 x 2 patches
    got = np.load(os.path.join(cfg2.out, "s40", "coords.npy"))
    assert len(got) == clean["n_patches"] - r["n_unreadable"]
    keep = [k for k, c in enumerate(coords.tolist()) if c in got.tolist()]
    np.testing.assert_array_equal(np.load(os.path.join(cfg2.out, "s40", "patches.npy")), patches[keep])
