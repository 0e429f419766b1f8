"""Tests of prep/synthetic.py: determinism, label semantics, UltraBench-like layout, slides OpenSlide can read."""
import csv
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from prep.synthetic import make_slide, make_slides, make_ultrasound, ultrasound_frame, ultrasound_frames  # noqa: E402

openslide = pytest.importorskip("openslide")


def frame(seed, size=128, **kw):
    return ultrasound_frame(np.random.default_rng(seed), size, **kw)


def colour_pixels(img):
    """Pixels whose channels differ: what an annotation detector keys on."""
    return img.max(-1).astype(int) - img.min(-1) > 30


def auroc(score, y):
    ranks = np.argsort(np.argsort(score)) + 1
    n1, n0 = y.sum(), len(y) - y.sum()
    return (ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


# ---------------------------------------------------------------------------------------------- ultrasound


def test_frame_shapes_and_dtypes():
    f = frame(0, 96)
    assert f["image"].shape == (96, 96, 3) and f["image"].dtype == np.uint8
    assert f["gray_clean"].shape == (96, 96) and f["gray_clean"].dtype == np.uint8
    for k in ("organ_mask", "scan_mask", "lesion_mask"):
        assert f[k].shape == (96, 96) and f[k].dtype == bool
    assert f["fatty"] in (0, 1) and f["lesion"] in (0, 1)
    assert f["gray_clean"][~f["scan_mask"]].max() == 0      # black outside the fan
    assert f["gray_clean"][f["scan_mask"]].std() > 10       # speckled content inside


def test_determinism():
    a, b = frame(3, marks=True), frame(3, marks=True)
    for k in ("image", "gray_clean", "organ_mask", "scan_mask"):
        assert np.array_equal(a[k], b[k])
    x = ultrasound_frames(4, 64, seed=0)
    assert x.shape == (4, 64, 64) and x.dtype == np.uint8
    assert np.array_equal(x, ultrasound_frames(4, 64, seed=0))
    assert not np.array_equal(x, ultrasound_frames(4, 64, seed=1))
    assert np.array_equal(x[:2], ultrasound_frames(2, 64, seed=0))  # frame i depends only on (seed, i)
    assert not np.array_equal(x[0], x[1])


def test_marks_only_where_claimed():
    for s in range(6):
        with_marks, without = frame(s, marks=True), frame(s, marks=False)
        assert np.array_equal(with_marks["gray_clean"], without["gray_clean"])  # marks change nothing else
        g = without["image"]
        assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 0], g[..., 2])
        assert np.array_equal(g[..., 0], without["gray_clean"])
        c = colour_pixels(with_marks["image"])
        assert 0 < c.mean() < 0.05                           # present, and "minor" (< 5% of the image)
        assert np.array_equal(with_marks["image"][~c][:, 0], with_marks["gray_clean"][~c])


def test_masks_nested():
    for s in range(12):
        f = frame(s, lesion=1)
        assert not (f["organ_mask"] & ~f["scan_mask"]).any()
        assert f["organ_mask"].sum() > 0.1 * f["scan_mask"].sum()
        assert f["lesion_mask"].any() and not (f["lesion_mask"] & ~f["organ_mask"]).any()
        r = np.sqrt(f["lesion_mask"].sum() / np.pi) * 256 / 128   # equivalent radius, in 256-px units
        assert 8 < r < 30                                    # 16-28, shrunk to fit a small liver


def test_lesion_is_local():
    for s in range(6):
        on, off = frame(s, lesion=1), frame(s, lesion=0)
        assert np.array_equal(on["organ_mask"], off["organ_mask"]) and not off["lesion_mask"].any()
        diff = on["gray_clean"].astype(int) != off["gray_clean"]
        assert diff.any()
        ys, xs = np.nonzero(on["lesion_mask"])
        y0, y1, x0, x1 = ys.min() - 3, ys.max() + 3, xs.min() - 3, xs.max() + 3
        dy, dx = np.nonzero(diff)
        assert dy.min() >= y0 and dy.max() <= y1 and dx.min() >= x0 and dx.max() <= x1


def liver_and_cortex(f):
    """(liver area in px, mean grey of the liver - mean grey of the renal cortex) of one frame."""
    g, liver, cortex = f["gray_clean"].astype(float), f["organ_mask"], f["cortex_mask"]
    return liver.sum(), g[liver].mean() - (g[cortex].mean() if cortex.any() else np.nan)


def test_fatty_is_an_enlarged_liver_brighter_than_the_renal_cortex():
    # paired: same frames, only the label forced -> the label's effect alone
    pairs = np.array([[liver_and_cortex(frame(100 + s, fatty=v)) for v in (0, 1)] for s in range(20)])
    area, hri = pairs[..., 0], pairs[..., 1]                 # (20 frames, normal/fatty)
    assert (area[:, 1] > area[:, 0]).all()                   # hepatomegaly (the fan clips the largest) ...
    assert (area[:, 1] > 1.15 * area[:, 0]).mean() >= 0.9
    seen = ~np.isnan(hri).any(1)                             # the kidney inside the fan in both versions
    assert seen.mean() > 0.8
    assert (hri[seen, 1] > hri[seen, 0] + 5).mean() > 0.9    # ... and a liver brighter than the cortex
    # unpaired, as a probe sees it: no first-order statistic of the frame gives the label away
    fs = [frame(200 + s) for s in range(60)]
    y = np.array([f["fatty"] for f in fs])
    assert 10 < y.sum() < 50
    mean = np.array([f["gray_clean"][f["scan_mask"]].mean() for f in fs])
    rows = np.array([f["gray_clean"].mean(1) for f in fs])   # (60, 128) the depth profile
    depth_slope = rows[:, 64:].mean(1) - rows[:, :64].mean(1)
    assert 0.25 < auroc(mean, y) < 0.75
    assert 0.25 < auroc(depth_slope, y) < 0.75
    assert auroc(np.array([liver_and_cortex(f)[1] for f in fs]), y) > 0.9   # the relation does


def test_make_ultrasound_layout(tmp_path):
    rows = make_ultrasound(tmp_path, n=16, size=64, seed=0)
    assert len(rows) == 16
    with open(tmp_path / "labels.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["path"] for r in table] == [f"raw/frame_{i:05d}.png" for i in range(16)]
    raw = np.asarray(Image.open(tmp_path / table[0]["path"]))
    assert raw.shape == (64, 64, 3)
    mask = np.asarray(Image.open(tmp_path / "masks" / "frame_00000.png"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    for task, classes, col in (("fatty", ("normal", "fatty"), "fatty"), ("lesion", ("absent", "present"), "lesion")):
        for split in ("train", "val", "test"):
            for c, name in enumerate(classes):
                files = sorted(os.listdir(tmp_path / "tasks" / task / split / name))
                expect = sorted(r["path"][4:] for r in table if r["split"] == split and int(r[col]) == c)
                assert files and files == expect
    g = np.asarray(Image.open(tmp_path / "clean" / "frame_00000.png"))
    r0 = table[0]
    linked = tmp_path / "tasks" / "fatty" / r0["split"] / ("normal", "fatty")[int(r0["fatty"])] / "frame_00000.png"
    assert g.shape == (64, 64) and np.array_equal(g, np.asarray(Image.open(linked)))


# ------------------------------------------------------------------------------------------------- slides


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    return {fmt: make_slide(str(d / f"s.{fmt}"), np.random.default_rng(1), 1, fmt, size=(1024, 768))
            for fmt in ("svs", "tiff", "nompp")}


@pytest.mark.parametrize("fmt", ["svs", "tiff"])
def test_openslide_reads_mpp_and_levels(slides, fmt):
    s = openslide.OpenSlide(slides[fmt]["path"])
    assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
    assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25)
    assert s.level_count == 3 and s.dimensions == (1024, 768)
    assert s.level_downsamples == pytest.approx((1, 4, 16), rel=1e-3)   # no 2x level on purpose
    if fmt == "svs":
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == "40"
        assert "thumbnail" in s.associated_images
    else:
        assert s.properties["openslide.vendor"] == "generic-tiff"


def test_nompp_slide_has_no_mpp(slides):
    s = openslide.OpenSlide(slides["nompp"]["path"])
    assert openslide.PROPERTY_NAME_MPP_X not in s.properties and s.level_count == 3


def test_tissue_and_tumour_where_claimed(slides):
    info = slides["svs"]
    s = openslide.OpenSlide(info["path"])
    ys, xs = np.nonzero(info["tumour"])                      # 1/16-res map -> level-0 coordinates
    k = len(xs) // 2
    crop = np.asarray(s.read_region((int(xs[k]) * 16 - 64, int(ys[k]) * 16 - 64), 0, (128, 128)).convert("RGB"))
    assert crop.mean() < 200                                 # tissue, not glass
    nuclear = (crop[..., 0] < 150) & (crop[..., 2] > crop[..., 1])   # dark purple haematoxylin
    assert nuclear.mean() > 0.2                              # crowded tumour nuclei
    glass = np.asarray(s.read_region((0, 0), 0, (32, 32)).convert("RGB")).astype(int)
    assert abs(glass - 240).max() < 15                       # white-ish glass in the margin
    assert not slides["tiff"]["tumour"].any() or slides["tiff"]["label"] == 1


def test_make_slides_csv(tmp_path):
    rows = make_slides(tmp_path, n_slides=6, seed=0, size=(512, 384))
    with open(tmp_path / "slides.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [tuple(r.values()) for r in table] == [(a, b, str(c)) for a, b, c in rows]
    by_patient = {}
    for r in table:
        assert os.path.exists(tmp_path / r["slide"])
        by_patient.setdefault(r["patient"], set()).add(r["label"])
    assert all(len(v) == 1 for v in by_patient.values())    # a patient's slides share the label
    assert {r["slide"].rsplit(".", 1)[1] for r in table} == {"svs", "tiff"}
    assert {r["label"] for r in table} == {"0", "1"}


def test_a_reflector_beside_the_fan_casts_no_shadow_in_it():
    """Frame 422 of the seed-1 benchmark draws a liver stone outside the fan (an enlarged liver reaches past it):
    its shadow is clipped to nothing instead of failing to broadcast."""
    from prep.synthetic import _split_balanced
    rng = np.random.default_rng([2, 1])                     # the labels as make_ultrasound(seed=1) draws them
    fatty, lesion, _ = _split_balanced(rng, 2000)
    marks = rng.random(2000) < 0.3
    f = ultrasound_frame(np.random.default_rng([2, 1, 422]), 128, fatty[422], lesion[422], marks[422])
    assert f["gray_clean"][f["scan_mask"]].std() > 10
