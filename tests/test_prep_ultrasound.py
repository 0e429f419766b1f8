"""prep/ultrasound.py: colour detection + harmonic inpainting against a dense Laplace solve and a linear ramp,
percentiles inside the scan region against numpy, and the file pipeline (multi-page / 16-bit / corrupt files,
name collisions, stats.json, resume, the .npy stack)."""
import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

import prep.ultrasound as us
from prep.ultrasound import Config, gray_and_marks, inpaint_harmonic, process_frame, scan_region

YELLOW, CYAN = (1.0, 0.92, 0.0), (0.12, 0.86, 0.94)


def ramp_frame(H=48, W=64):
    """Grey horizontal ramp (R = G = B) with a yellow '+' and a cyan bar drawn away from the border."""
    g = np.tile(np.linspace(0.2, 0.8, W, dtype=np.float32), (H, 1))
    img = np.repeat(g[..., None], 3, -1)
    drawn = np.zeros((H, W), bool)
    drawn[20, 14:25] = drawn[15:26, 19] = True                         # caliper '+'
    img[drawn] = YELLOW
    bar = np.zeros((H, W), bool)
    bar[8:10, 35:50] = True                                             # a line of "text"
    img[bar] = CYAN
    return g, img, drawn | bar


def test_coloured_marks_found_and_inpainted_grey_untouched():
    g, img, drawn = ramp_frame()
    gray, marks = gray_and_marks(img, chroma=0.1)
    assert np.array_equal(marks, drawn)                                 # every coloured pixel, no grey one
    np.testing.assert_allclose(gray[~drawn], g[~drawn], atol=1e-6)      # luma of grey = grey
    out = inpaint_harmonic(gray, marks)
    assert np.array_equal(out[~marks], gray[~marks])                    # unmasked pixels bit-identical
    # a linear ramp is harmonic, so the fill reproduces the grey under the marks (up to solver precision)
    np.testing.assert_allclose(out[marks], g[marks], atol=1e-5)
    # through the whole step with --dilate 2: a small ramp error at most, marks gone
    cfg = Config(size=0, dilate=2, max_marks=0.1)                       # the marks cover 7% of this small frame
    u8, notes = process_frame(img, cfg)
    ref, _ = process_frame(np.repeat(g[..., None], 3, -1), cfg)
    assert "inpainted" in notes and np.abs(u8.astype(int) - ref).max() <= 1


def test_inpaint_equals_dense_laplace_solve():
    rng = np.random.default_rng(0)
    gray = rng.random((9, 11)).astype(np.float32)
    mask = np.zeros((9, 11), bool)
    mask[0, 3:6] = mask[4, 0] = mask[3:7, 5] = mask[8, 10] = mask[5, 6] = True    # touching borders, corners
    idx = {p: i for i, p in enumerate(zip(*np.nonzero(mask)))}
    A, b = np.zeros((len(idx), len(idx))), np.zeros(len(idx))
    for (y, x), i in idx.items():                                       # sum over neighbours (u_p - u_q) = 0
        for y2, x2 in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= y2 < 9 and 0 <= x2 < 11:
                A[i, i] += 1
                if (y2, x2) in idx:
                    A[i, idx[(y2, x2)]] -= 1
                else:
                    b[i] += gray[y2, x2]
    u = np.linalg.solve(A, b)
    out = inpaint_harmonic(gray, mask)
    np.testing.assert_allclose([out[p] for p in idx], u, atol=1e-5)
    assert inpaint_harmonic(gray, np.ones_like(mask)) is gray           # nothing to anchor to: unchanged


def fan_frame(rng, H=80, W=96):
    """A bright disc (the 'scan') with an anechoic hole, on black, plus white text outside it."""
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - 45) ** 2 + (xx - 48) ** 2 < 30 ** 2
    hole = (yy - 45) ** 2 + (xx - 50) ** 2 < 5 ** 2
    g = np.zeros((H, W), np.float32)
    g[disc] = rng.uniform(0.1, 0.6, disc.sum())
    g[hole] = 0.0
    g[2:4, 2:30] = 1.0                                                  # text: thin, outside the scan
    return g, disc, hole


def test_percentiles_inside_the_scan_region():
    g, disc, hole = fan_frame(np.random.default_rng(1))
    region = scan_region(g, 0.02)
    assert region[hole].all() and not region[2:4, 2:30].any()           # hole filled, text excluded
    assert (region ^ disc).sum() < 0.02 * disc.sum()                    # the opening nibbles the rim at most
    u8, notes = process_frame(g, Config(size=0))
    lo, hi = np.percentile(g[region], [2, 98])
    ref = np.clip((g - lo) / (hi - lo), 0, 1) * 255
    assert not notes and np.abs(u8 - ref).max() <= 0.5 + 1e-3
    assert u8[0, 60] == 0 and u8[2, 10] == 255                          # background black, text saturates
    # no scan region at all (black frame): kept, flagged
    u8, notes = process_frame(np.zeros((32, 32), np.float32), Config(size=16))
    assert notes["not_rescaled"] == "no scan region" and u8.shape == (16, 16) and not u8.any()


def test_too_much_colour_is_not_inpainted():
    rng = np.random.default_rng(2)
    img = rng.random((32, 32, 3)).astype(np.float32)                    # a colour-Doppler-like frame
    _, notes = process_frame(img, Config(size=0))
    assert "too_much_colour" in notes and "inpainted" not in notes


def test_resize_pads_to_square_keeping_aspect():
    g = np.ones((20, 40), np.float32)
    out = us.resize(g, 40, pad=True)
    assert out.shape == (40, 40) and out[15:25].min() > 0.99 and out[:8].max() < 0.01 and out[-8:].max() < 0.01
    assert us.resize(g, 40, pad=False).min() > 0.99                      # squashed: all bright


def write_tree(root, rng):
    """A raw folder with the odd cases: marks, 16-bit, multi-page TIFF, a stem collision, a corrupt file."""
    os.makedirs(root / "a" / "b")
    g, _, _ = fan_frame(rng)
    rgb = np.repeat((g * 255).astype(np.uint8)[..., None], 3, -1)
    rgb[40, 30:50] = (255, 235, 0)
    Image.fromarray(rgb).save(root / "a" / "b" / "marked.png")
    Image.fromarray((g * 255).astype(np.uint8)).save(root / "a" / "grey8.png")
    Image.fromarray((g * 255).astype(np.uint16) * 257).save(root / "a" / "grey16.png")   # same frame, 16 bit
    pages = np.stack([(fan_frame(rng)[0] * 255).astype(np.uint8) for _ in range(3)])
    with tifffile.TiffWriter(root / "cine.tif") as tw:                 # a 3-page cine
        for page in pages:
            tw.write(page, photometric="minisblack")
    Image.fromarray((g * 255).astype(np.uint8)).save(root / "dup.png")
    Image.fromarray((g * 255).astype(np.uint8)).save(root / "dup.jpg", quality=95)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("ignored")
    return 8                                                            # frames: 1 + 1 + 1 + 3 + 1 + 1


def pixels_of(out):
    files = sorted(p for p in out.rglob("*.png"))
    return files, np.concatenate([np.asarray(Image.open(p)).ravel() / 255.0 for p in files])


def test_png_tree_stats_report_and_resume(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    n = write_tree(raw, np.random.default_rng(3))
    cfg = Config(src=str(raw), out=str(out), size=32, workers=2)
    rep = us.main(cfg)
    files, px = pixels_of(out)
    names = sorted(str(p.relative_to(out)) for p in files)
    assert names == sorted(["a/b/marked.png", "a/grey8.png", "a/grey16.png", "cine_p0000.png", "cine_p0001.png",
                            "cine_p0002.png", "dup_png.png", "dup_jpg.png"]) and rep["frames"] == n
    assert [f["path"] for f in rep["failed"]] == ["a/broken.png"]
    assert json.load(open(out / "report.json"))["failed"][0]["path"] == "a/broken.png"
    assert "a/broken.png" in capsys.readouterr().out
    assert rep["inpainted"] == 1 and not rep["notes"]                  # only exceptions are listed by name
    stats = json.load(open(out / "stats.json"))
    np.testing.assert_allclose([stats["mean"][0], stats["std"][0]], [px.mean(), px.std()], rtol=1e-9)
    assert np.array_equal(np.asarray(Image.open(out / "a/grey8.png")), np.asarray(Image.open(out / "a/grey16.png")))
    # rerun: nothing rewritten, same statistics; a deleted output is the only one redone
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    os.remove(out / "cine_p0002.png")
    rep2 = us.main(cfg)
    assert rep2["skipped_files"] == 5 and rep2["frames"] == n             # 6 files done before, cine redone
    for p in files:
        if "cine" not in p.name:
            assert p.stat().st_mtime_ns == mtimes[p]
    assert json.load(open(out / "stats.json")) == stats
    assert not list(out.rglob("*.tmp"))


def test_npy_stack_matches_pngs_and_resumes(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    n = write_tree(raw, np.random.default_rng(4))
    us.main(Config(src=str(raw), out=str(tmp_path / "png"), size=32, workers=1))
    # interrupted after two files (Ctrl-C), then resumed
    calls = {"n": 0}
    real = us.work_npy

    def flaky(job):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(job)
    monkeypatch.setattr(us, "work_npy", flaky)
    cfg = Config(src=str(raw), out=str(tmp_path / "npy"), size=32, workers=1, npy=True)
    with pytest.raises(KeyboardInterrupt):
        us.main(cfg)
    assert np.load(tmp_path / "npy" / "frames.done.npy").sum() >= 1
    monkeypatch.setattr(us, "work_npy", real)
    rep = us.main(cfg)
    assert rep["skipped_frames"] >= 1
    stack = np.load(tmp_path / "npy" / "frames.npy", mmap_mode="r")
    index = (tmp_path / "npy" / "frames.txt").read_text().split()
    assert stack.shape == (n, 32, 32) and stack.dtype == np.uint8 and len(index) == n
    assert "a/broken.png" not in index and "cine.tif#2" in index
    for k, rel in enumerate(index):                                     # frame k == the PNG of the same source
        stem, _, page = rel.partition("#")
        s, e = os.path.splitext(stem)
        name = f"{s}_p{int(page):04d}.png" if page else (f"{s}_{e[1:]}.png" if s == "dup" else f"{s}.png")
        assert np.array_equal(stack[k], np.asarray(Image.open(tmp_path / "png" / name))), rel
    a, b = (json.load(open(tmp_path / d / "stats.json")) for d in ("npy", "png"))
    assert a["mean"] == pytest.approx(b["mean"], rel=1e-12) and a["std"] == pytest.approx(b["std"], rel=1e-12)
    assert sorted(os.listdir(tmp_path / "npy")) == ["frames.npy", "frames.txt", "report.json", "stats.json"]
    assert not list((tmp_path / "npy").rglob("*.png"))                  # never both (the loaders read both)


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="not a folder"):
        us.main(Config(src=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no png"):
        us.main(Config(src=str(tmp_path / "empty"), out=str(tmp_path / "o")))
    with pytest.raises(SystemExit, match="--npy needs"):
        us.main(Config(src=str(tmp_path / "empty"), out=str(tmp_path / "o"), npy=True, size=0))


def test_stats_json_names_the_frames_the_method_scripts_list(tmp_path):
    """OUT/stats.json carries the frame count and the fingerprint that mae.py, dino.py and ijepa.py
    compute for OUT, so that they use it as it is, and recompute when OUT changes."""
    import importlib
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8)).save(raw / f"f{i}.png")
    for npy in (False, True):
        out = tmp_path / f"out{int(npy)}"
        us.main(Config(src=str(raw), out=str(out), size=24, workers=1, npy=npy))
        stats = json.load(open(out / "stats.json"))
        for name in ("mae", "dino", "ijepa"):
            mod = importlib.import_module(name)
            paths, counts = mod.list_frames(str(out))
            assert stats["frames"] == sum(counts) == 5
            assert stats["fingerprint"] == mod.fingerprint(str(out), paths, counts)
