"""Whole-slide images -> 20x tissue patches for abmil.py (paper appendix 0.C), and patient-level splits.

    python prep/wsi.py tile slides/ --out patches/                 # every slide openslide reads under slides/
    python prep/wsi.py tile slides.csv --out patches/ --workers 8   # the `slide` column (paths beside the CSV)
    python prep/wsi.py tile a.svs b.ndpi --out patches/ --mpp 0.25  # slides without MPP metadata
    python prep/wsi.py split slides.csv --out splits.csv --seed 0   # 70/10/20 by patient, stratified by label

Per slide, patches/<slide>/ (slide = file name without extension), written into a hidden temporary folder and
renamed into place when complete, so a killed run never leaves a half slide; a rerun skips finished slides:
    coords.npy   (N, 2) int64, level-0 (x, y) of each patch's top-left corner (as CLAM / TRIDENT)
    patches.npy  (N, 224, 224, 3) uint8 RGB at 0.5 um/px, stain-normalised (memory-mapped by abmil.py)
    thumb.png    QC: the tissue thumbnail, the tissue outlined in green, every kept patch outlined in blue
    meta.json    MPP and where it came from, pyramid level, read size, grid, tissue fractions, timings
patches/summary.json lists every slide of the run: done / already done / failed with the error.

The steps (paper appendix 0.C: "patched at 224 x 224 pixels at 20x magnification ... stain-normalized using
DeepPath"):
1. MPP (microns per level-0 pixel): `openslide.mpp-x`, else `aperio.MPP`, else `tiff.XResolution` with
   `tiff.ResolutionUnit` centimeter or inch (the chain TRIDENT OpenSlideWSI.py:80-133 uses, minus its vendor
   comment parsing). `--mpp` overrides. A slide without any is refused, naming the slide and `--mpp`. The
   objective power alone is NOT turned into an MPP (TRIDENT and DeepPATH would use 10/power): scanners call
   0.23-0.27 um/px "40x", so the refusal message quotes 10/power for the user to confirm with `--mpp`.
2. 20x = 0.5 um/px (TRIDENT WSIPatcher.py:131-146). ds = 0.5 / MPP level-0 pixels per 20x pixel; the read level
   is the coarsest pyramid level with downsample <= ds, and round(224 ds / level_ds) px are read there and
   resized to 224 with LANCZOS (what DeepPATH gets from openslide's DeepZoomGenerator, deepzoom.py:170-196). A
   40x TCGA slide (levels 1/4/16, no 2x) reads 448 px at level 0 and halves it. The exact MPP sets the scale
   (0.2525 um/px reads 444 px); TRIDENT snaps to the magnification ratio instead (448). Non-overlapping grid
   in level-0 coordinates inside `openslide.bounds-*` when present (MRXS), else the whole level 0.
3. Tissue (CLAM WholeSlideImage.py:91-182, numpy/scipy instead of OpenCV): a thumbnail with `--thumb-px`
   pixels per patch side; HSV saturation, median filter, Otsu threshold (never below CLAM's fixed 8, so an
   all-glass thumbnail does not make Otsu split noise), closing, holes smaller than `--max-hole` patches filled,
   specks smaller than `--min-tissue` patches removed. A patch is kept when its tissue fraction >= 0.5
   (DeepPATH's default -B 50: at most 50% background). The grid is aligned with the thumbnail pixels, so the
   fraction is a plain block mean.
4. Reinhard stain normalisation per patch in CIELab, as DeepPATH 0b_tileLoop_deepzoom6.py:96-115: skimage's
   rgb2lab / lab2rgb (sRGB, D65, 2 degree observer; re-implemented here in numpy float32, skimage is not a
   dependency), each channel x' = (x - mean_tile) std_target / std_tile + mean_target with population std,
   L clipped to [0, 100], a and b to [-128, 127]. Target = DeepPATH's README example 57,22,-8,20,10,5 (L a b
   means, then stds). Differences: DeepPATH's `tmp[tmp < -128] = 128` is a bug (sets +128) and is fixed here;
   DeepPATH truncates with astype(uint8), which can turn 255 into 254 after the float round trip, here it rounds;
   a constant tile (std 0, DeepPATH divides by zero) only gets the target mean. `--no-stain-norm` switches it
   off.
5. Patches are stored at 224 px; abmil.py resizes them to 256 on the GPU when it embeds them ("resized to 256
   for inference"), so the files stay 224 px and any other inference size needs no re-tiling.

Broken slides (unreadable files, corrupt tiles, no MPP) are reported and skipped, the other slides go on. A
corrupt tile is re-read once after reopening the slide (OpenSlide errors are latching, pipelines.md section 5.1)
and dropped if it fails again. The work is one process per slide (`--workers`), each opening its own handle.

The split: all slides of a patient go to one split; patients are shuffled with `--seed` within each label
(the patient's majority label) and cut 70/10/20 per label, with at least one patient of each label in val
and in test when the label has 3 or more patients.
"""
import argparse
import csv
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SLIDE_EXTS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    out: str = "data/patches"     # one folder per slide is written here, plus summary.json
    mpp: float = 0.0              # microns per level-0 pixel for every slide; 0 = read it from the slide
    target_mpp: float = 0.5       # 20x (paper appendix 0.C; 10 / magnification as TRIDENT)
    patch: int = 224              # patch side at target_mpp (paper: 224, resized to 256 at inference)
    tissue_frac: float = 0.5      # keep a patch whose tissue fraction is at least this (DeepPATH -B 50)
    thumb_px: int = 16            # thumbnail pixels per patch side for tissue detection and QC
    sat_min: int = 8              # floor for the Otsu saturation threshold (CLAM's fixed sthresh 8)
    median: int = 7               # median filter on saturation, thumbnail px (CLAM mthresh 7)
    close: int = 4                # morphological closing, thumbnail px (CLAM close 4)
    min_tissue: float = 0.25      # drop tissue specks smaller than this many patch areas
    max_hole: float = 1.0         # fill holes in tissue smaller than this many patch areas (CLAM a_h)
    stain_norm: bool = True       # Reinhard to stain_target in CIELab (DeepPATH -N)
    stain_target: str = "57,22,-8,20,10,5"   # L, a, b means then stds (DeepPATH README example)
    workers: int = 4              # slides processed in parallel (one process and openslide handle each)
    overwrite: bool = False       # re-tile slides that are already done


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tile", help="tile slides into 20x tissue patches")
    t.add_argument("slides", nargs="+", help="slide files, folders (searched recursively) or CSVs with a "
                   "`slide` column")
    for f in fields(Config):
        name = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            t.add_argument(name, default=f.default, action=argparse.BooleanOptionalAction)
        else:
            t.add_argument(name, type=type(f.default), default=f.default)
    s = sub.add_parser("split", help="70/10/20 train/val/test split by patient")
    s.add_argument("csv", help="CSV with columns slide, patient, label")
    s.add_argument("--out", required=True, help="output CSV: slide, patient, label, split")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--frac", default="0.7,0.1,0.2", help="train,val,test fractions")
    return p.parse_args(argv)

# -----------------------------------------------------------------------------
# MPP and the 20x read geometry


def slide_mpp(slide, override=0.0):
    """-> (microns per level-0 pixel, where it came from). Refuses a slide without any, naming the fix."""
    if override > 0:
        return float(override), "--mpp"
    props = slide.properties
    for key in ("openslide.mpp-x", "aperio.MPP"):
        try:
            v = float(props.get(key, "nan"))
        except ValueError:
            continue
        if v > 0:
            return v, key
    # tiff resolution is pixels per unit (openslide >= 4.0 already turns it into mpp-x for generic TIFFs)
    unit = props.get("tiff.ResolutionUnit", "").lower()
    res = float(props.get("tiff.XResolution", "0") or 0)
    if res > 0 and unit in ("centimeter", "inch"):
        return (1e4 if unit == "centimeter" else 25400.0) / res, "tiff.XResolution"
    hint = ""
    power = props.get("openslide.objective-power")
    if power:
        hint = f" Its objective power is {power}x, conventionally {10 / float(power):g} um/px (10 / power)."
    raise ValueError(f"no microns-per-pixel metadata (openslide.mpp-x, aperio.MPP, tiff.XResolution "
                     f"with a unit).{hint} Pass the scanner's value with --mpp, e.g. --mpp 0.25 for 40x.")


def read_geometry(slide, mpp0, target_mpp, patch):
    """-> (level, read px at that level, level-0 px per patch step) for patches of `patch` px at target_mpp."""
    ds = target_mpp / mpp0                                   # level-0 px per target px, 2.0 for 40x -> 20x
    if ds < 0.9:
        raise ValueError(f"scanned at {mpp0:g} um/px, coarser than the {target_mpp:g} um/px target; patches "
                         f"would be upsampled (check the MPP or pass --mpp / --target-mpp)")
    # the coarsest level not coarser than the target; 1e-3 slack because downsamples are like 4.000089
    level = slide.get_best_level_for_downsample(ds * (1 + 1e-3))
    read = round(patch * ds / slide.level_downsamples[level])
    return level, read, patch * ds

# -----------------------------------------------------------------------------
# tissue detection on a thumbnail


def otsu(x):
    """Otsu threshold of uint8 values: foreground is x > t (as skimage.filters.threshold_otsu)."""
    p = np.bincount(x.ravel(), minlength=256).astype(np.float64)
    p /= p.sum()
    w0 = np.cumsum(p)                                        # weight of class x <= t
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))  # between-class variance
    sigma_b[~np.isfinite(sigma_b)] = -1
    return int(np.argmax(sigma_b)) if sigma_b.max() > 0 else 0


def tissue_mask(thumb, cfg):
    """(h, w, 3) uint8 thumbnail -> (h, w) bool tissue mask."""
    sat = np.asarray(Image.fromarray(thumb).convert("HSV"))[..., 1]   # white glass and black are both S = 0
    sat = ndimage.median_filter(sat, size=cfg.median)
    mask = sat > max(otsu(sat), cfg.sat_min)
    c = cfg.close
    mask = np.pad(mask, c, mode="edge")                      # so the closing does not erode at the border
    mask = ndimage.binary_closing(mask, structure=np.ones((c, c), bool))[c:-c, c:-c]
    area = cfg.thumb_px ** 2                                 # one patch in thumbnail pixels
    holes, n = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if n:
        small = np.bincount(holes.ravel())[1:] < cfg.max_hole * area
        mask |= np.concatenate([[False], small])[holes]
    blobs, n = ndimage.label(mask)
    if n:
        big = np.bincount(blobs.ravel())[1:] >= cfg.min_tissue * area
        mask &= np.concatenate([[False], big])[blobs]
    return mask

# -----------------------------------------------------------------------------
# Reinhard stain normalisation in CIELab (skimage.color conventions: sRGB, D65, 2 degree observer)


XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
# float32 throughout (the result is rounded to uint8 anyway): 4x faster than skimage's float64 here
SRGB_TO_LINEAR = np.where(np.arange(256) / 255 > 0.04045, ((np.arange(256) / 255 + 0.055) / 1.055) ** 2.4,
                          np.arange(256) / 255 / 12.92).astype(np.float32)   # exact for uint8, 256 entries
RGB_TO_XYZN = (XYZ_FROM_RGB / WHITE_D65[:, None]).T.astype(np.float32)          # linear RGB -> XYZ / white
XYZN_TO_RGB = (np.linalg.inv(XYZ_FROM_RGB) * WHITE_D65).T.astype(np.float32)


def rgb2lab(rgb):
    """uint8 (..., 3) sRGB -> float32 (..., 3) CIELab, L in [0, 100] (skimage.color.rgb2lab)."""
    xyz = SRGB_TO_LINEAR[rgb] @ RGB_TO_XYZN
    f = np.cbrt(xyz)
    low = xyz <= 0.008856
    f[low] = 7.787 * xyz[low] + 16 / 116
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab2rgb(lab):
    """float (..., 3) CIELab -> uint8 (..., 3) sRGB, rounded (skimage.color.lab2rgb, which clips z < 0)."""
    y = (lab[..., 0] + 16) / 116
    f = np.stack([lab[..., 1] / 500 + y, y, np.maximum(y - lab[..., 2] / 200, 0)], -1).astype(np.float32)
    xyz = f * f * f
    low = f <= 0.2068966
    xyz[low] = (f[low] - 16 / 116) / 7.787
    lin = (xyz @ XYZN_TO_RGB).clip(0, 1)
    rgb = np.where(lin > 0.0031308, 1.055 * lin ** np.float32(1 / 2.4) - 0.055, 12.92 * lin)
    return np.rint(rgb * 255).astype(np.uint8)


def reinhard(tiles, target):
    """uint8 (B, H, W, 3) -> uint8 (B, H, W, 3), each tile's Lab mean/std mapped to target (6 numbers)."""
    B, H, W, _ = tiles.shape
    lab = np.ascontiguousarray(rgb2lab(tiles).reshape(B, H * W, 3).transpose(0, 2, 1))  # (B, 3, HW), fast sums
    mean = lab.mean(-1, keepdims=True)                      # (B, 3, 1) per tile, as DeepPATH
    std = lab.std(-1, keepdims=True)                        # population std (np.std), as DeepPATH
    t_mean = np.asarray(target[:3], np.float32)[:, None]    # (3, 1)
    t_std = np.asarray(target[3:], np.float32)[:, None]
    scale = np.where(std > 0, t_std / np.where(std > 0, std, 1), 0)   # std 0: only move the mean
    lab = (lab - mean) * scale + t_mean
    lab[:, 0] = lab[:, 0].clip(0, 100)
    lab[:, 1:] = lab[:, 1:].clip(-128, 127)                 # DeepPATH sets < -128 to +128 (a bug)
    return lab2rgb(lab.transpose(0, 2, 1).reshape(B, H, W, 3))

# -----------------------------------------------------------------------------
# one slide


def read_patch(slide, xy, level, read, patch):
    """One patch as openslide reads it: RGBA composited on white (outside the slide is transparent), then
    LANCZOS-resized to patch px (DeepZoomGenerator's get_tile does the same, deepzoom.py:182-196)."""
    tile = np.asarray(slide.read_region(xy, level, (read, read)))           # (read, read, 4) RGBA
    rgb, alpha = tile[..., :3], tile[..., 3:]
    if (alpha < 255).any():
        rgb = np.rint(rgb * (alpha / 255) + 255 * (1 - alpha / 255)).astype(np.uint8)
    if read == patch:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((patch, patch), Image.LANCZOS))


def slide_bounds(slide):
    """(x, y, w, h) in level-0 px of the scanned area: openslide.bounds-* when present (MRXS), else level 0."""
    p = slide.properties
    if "openslide.bounds-width" in p:
        return tuple(int(p[f"openslide.bounds-{k}"]) for k in ("x", "y", "width", "height"))
    return (0, 0) + tuple(slide.dimensions)


def thumbnail(slide, bounds, tds, size):
    """(size[1], size[0], 3) uint8 view of the bounds region at tds level-0 px per pixel, on white."""
    bx, by, bw, bh = bounds
    lvl = slide.get_best_level_for_downsample(tds)
    lds = slide.level_downsamples[lvl]
    w, h = math.ceil(bw / lds), math.ceil(bh / lds)
    if w * h > 2.5e8:
        raise ValueError(f"its coarsest usable pyramid level is {w}x{h} px, too large for a thumbnail; convert "
                         f"it to a pyramidal TIFF (vips tiffsave in.tif out.tif --tile --pyramid)")
    region = slide.read_region((bx, by), lvl, (w, h))
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, region).convert("RGB").resize(size, Image.BOX))


def tile_slide(path, out_root, cfg):
    """Tile one slide into out_root/<slide>/ (atomically). -> dict for summary.json."""
    import openslide
    t0 = time.time()
    sid = os.path.splitext(os.path.basename(path))[0]
    final = os.path.join(out_root, sid)
    if os.path.exists(os.path.join(final, "meta.json")) and not cfg.overwrite:
        return {"slide": sid, "path": path, "status": "already done"}
    tmp = os.path.join(out_root, f".{sid}.partial")
    try:
        slide = openslide.OpenSlide(path)
        mpp0, mpp_source = slide_mpp(slide, cfg.mpp)
        level, read, step0 = read_geometry(slide, mpp0, cfg.target_mpp, cfg.patch)
        bx, by, bw, bh = bounds = slide_bounds(slide)
        nx, ny = int(bw // step0), int(bh // step0)          # whole patches only
        k = cfg.thumb_px
        tds = step0 / k                                      # level-0 px per thumbnail px; a patch = k x k px
        tsize = (max(nx * k, round(bw / tds)), max(ny * k, round(bh / tds)))
        thumb = thumbnail(slide, bounds, tds, tsize)         # (th, tw, 3)
        mask = tissue_mask(thumb, cfg)
        frac = mask[:ny * k, :nx * k].reshape(ny, k, nx, k).mean(axis=(1, 3))   # (ny, nx) tissue per patch
        gy, gx = np.nonzero(frac >= cfg.tissue_frac)         # row-major, as TRIDENT (disk locality)
        coords = np.stack([bx + np.round(gx * step0), by + np.round(gy * step0)], 1).astype(np.int64)  # (N, 2)

        shutil.rmtree(tmp, ignore_errors=True)               # leftovers of a killed run
        os.makedirs(tmp)
        patches = np.lib.format.open_memmap(os.path.join(tmp, "patches.npy"), mode="w+", dtype=np.uint8,
                                            shape=(len(coords), cfg.patch, cfg.patch, 3))
        good = np.ones(len(coords), bool)
        target = [float(v) for v in cfg.stain_target.split(",")]
        chunk = 16                                           # patches normalised together (fits in cache)
        for s in range(0, len(coords), chunk):
            for i in range(s, min(s + chunk, len(coords))):
                xy = (int(coords[i, 0]), int(coords[i, 1]))
                try:
                    patches[i] = read_patch(slide, xy, level, read, cfg.patch)
                except openslide.OpenSlideError:             # latching error: reopen and retry once
                    slide.close()
                    slide = openslide.OpenSlide(path)
                    try:
                        patches[i] = read_patch(slide, xy, level, read, cfg.patch)
                    except openslide.OpenSlideError:
                        good[i] = False
                        slide.close()
                        slide = openslide.OpenSlide(path)
            if cfg.stain_norm:
                patches[s:s + chunk] = reinhard(patches[s:s + chunk], target)
        patches.flush()
        if not good.all():                                   # rare: rewrite without the unreadable tiles
            kept = np.lib.format.open_memmap(os.path.join(tmp, "kept.npy"), mode="w+", dtype=np.uint8,
                                             shape=(int(good.sum()), cfg.patch, cfg.patch, 3))
            kept[:] = patches[good]
            kept.flush()
            del patches, kept
            os.replace(os.path.join(tmp, "kept.npy"), os.path.join(tmp, "patches.npy"))
            coords = coords[good]
        else:
            del patches
        np.save(os.path.join(tmp, "coords.npy"), coords)
        qc_image(thumb, mask, gx[good], gy[good], k).save(os.path.join(tmp, "thumb.png"))
        meta = {"slide": sid, "path": os.path.abspath(path), "vendor": slide.properties.get("openslide.vendor"),
                "mpp": mpp0, "mpp_source": mpp_source, "target_mpp": cfg.target_mpp, "patch": cfg.patch,
                "level": level, "level_downsample": slide.level_downsamples[level], "read_px": read,
                "step_level0": step0, "bounds": list(bounds), "grid": [nx, ny], "n_patches": len(coords),
                "n_unreadable": int((~good).sum()), "tissue_fraction": float(mask.mean()),
                "stain_norm": target if cfg.stain_norm else None, "seconds": round(time.time() - t0, 2)}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        slide.close()
        shutil.rmtree(final, ignore_errors=True)             # only reached with --overwrite or a stale folder
        os.replace(tmp, final)
        return {**meta, "status": "done"}
    except Exception as e:                                   # a broken slide must not stop the others
        shutil.rmtree(tmp, ignore_errors=True)
        msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        return {"slide": sid, "path": path, "status": "failed", "error": f"{path}: {msg}",
                "traceback": traceback.format_exc(limit=3)}


def qc_image(thumb, mask, gx, gy, k):
    """The thumbnail (enlarged to >= 800 px for small slides) with the tissue outline in green and each kept
    patch outlined in blue."""
    z = max(1, -(-800 // max(thumb.shape[:2])))
    edge = mask & ~ndimage.binary_erosion(mask, border_value=1)
    img = thumb.copy()
    img[edge] = (0, 170, 0)
    img = Image.fromarray(img).resize((thumb.shape[1] * z, thumb.shape[0] * z), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for i, j in zip(gx, gy):
        draw.rectangle([i * k * z, j * k * z, (i + 1) * k * z - 1, (j + 1) * k * z - 1], outline=(20, 60, 230))
    return img

# -----------------------------------------------------------------------------
# many slides


def find_slides(inputs):
    """Slide files from files, folders (recursive) and CSVs with a `slide` column (paths relative to the CSV)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, files in sorted(os.walk(item)):
                dirs.sort()
                paths += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(SLIDE_EXTS)]
        elif item.lower().endswith(".csv"):
            with open(item, newline="") as f:
                rows = list(csv.DictReader(f))
            if not rows or "slide" not in rows[0]:
                raise SystemExit(f"{item}: needs a `slide` column with slide file paths")
            base = os.path.dirname(os.path.abspath(item))
            for r in rows:
                p = r["slide"] if os.path.isabs(r["slide"]) else os.path.join(base, r["slide"])
                if not os.path.exists(p):
                    raise SystemExit(f"{item}: slide file {p} does not exist")
                paths.append(p)
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise SystemExit(f"{item}: no such slide file, folder or CSV")
    ids = Counter(os.path.splitext(os.path.basename(p))[0] for p in paths)
    dup = [s for s, n in ids.items() if n > 1]
    if dup:
        raise SystemExit(f"slide names must be unique (the output folder is the file name): {dup[:5]}")
    return paths


def _work(job):
    return tile_slide(*job)


def tile(cfg, inputs):
    from tqdm import tqdm
    try:
        target = [float(v) for v in cfg.stain_target.split(",")]
    except ValueError:
        target = []
    if len(target) != 6:
        raise SystemExit(f"--stain-target needs 6 numbers (L, a, b means then stds), got {cfg.stain_target!r}")
    paths = find_slides(inputs)
    if not paths:
        raise SystemExit(f"no slides found in {inputs} (extensions {', '.join(SLIDE_EXTS)})")
    os.makedirs(cfg.out, exist_ok=True)
    jobs = [(p, cfg.out, cfg) for p in paths]
    results = []
    bar = tqdm(total=len(jobs), desc="slides", unit="slide")
    if cfg.workers <= 1 or len(jobs) == 1:
        it = map(_work, jobs)
    else:
        pool = mp.get_context("spawn").Pool(min(cfg.workers, len(jobs)))
        it = pool.imap_unordered(_work, jobs)
    for r in it:
        results.append(r)
        if r["status"] == "failed":
            tqdm.write(f"FAILED {r['error']}")
        bar.set_postfix(patches=sum(r.get("n_patches", 0) for r in results))
        bar.update()
    bar.close()
    if cfg.workers > 1 and len(jobs) > 1:
        pool.close()
        pool.join()
    results.sort(key=lambda r: r["slide"])
    count = Counter(r["status"] for r in results)
    summary = {"config": asdict(cfg), "counts": dict(count),
               "n_patches": sum(r.get("n_patches", 0) for r in results), "slides": results}
    tmp = os.path.join(cfg.out, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(cfg.out, "summary.json"))
    print(f"{count['done']} tiled ({summary['n_patches']} patches), {count['already done']} already done, "
          f"{count['failed']} failed -> {os.path.join(cfg.out, 'summary.json')}")
    for r in results:
        if r["status"] == "failed":
            print(f"  failed: {r['error']}")
    return summary

# -----------------------------------------------------------------------------
# patient-level split


def read_table(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"slide", "patient", "label"} - set(rows[0] if rows else {})
    if missing:
        raise SystemExit(f"{path}: needs columns slide, patient, label (missing {sorted(missing)})")
    return rows


def split_patients(rows, seed=0, frac=(0.7, 0.1, 0.2)):
    """-> {patient: 'train' | 'val' | 'test'}, stratified by each patient's majority label."""
    labels = defaultdict(Counter)
    for r in rows:
        labels[r["patient"]][r["label"]] += 1
    by_label = defaultdict(list)
    for pat in sorted(labels):
        by_label[labels[pat].most_common(1)[0][0]].append(pat)
    rng = np.random.default_rng(seed)
    out = {}
    for lab in sorted(by_label):
        pats = [by_label[lab][i] for i in rng.permutation(len(by_label[lab]))]
        n = len(pats)
        n_val, n_test = round(frac[1] * n), round(frac[2] * n)
        if n >= 3:                                           # every label in val and test when possible
            n_val, n_test = max(1, n_val), max(1, n_test)
        n_train = n - n_val - n_test
        for i, pat in enumerate(pats):
            out[pat] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return out


def split(csv_in, out, seed=0, frac=(0.7, 0.1, 0.2)):
    rows = read_table(csv_in)
    where = split_patients(rows, seed, frac)
    tmp = out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["slide", "patient", "label", "split"])
        w.writeheader()
        for r in rows:
            w.writerow({"slide": r["slide"], "patient": r["patient"], "label": r["label"],
                        "split": where[r["patient"]]})
    os.replace(tmp, out)
    table = Counter((where[r["patient"]], r["label"]) for r in rows)
    labs = sorted({r["label"] for r in rows})
    print(f"{'split':<6} {'patients':>8} {'slides':>7}  " + "  ".join(f"{lab:>8}" for lab in labs))
    for s in ("train", "val", "test"):
        n_pat = sum(v == s for v in where.values())
        print(f"{s:<6} {n_pat:>8} {sum(table[s, lab] for lab in labs):>7}  "
              + "  ".join(f"{table[s, lab]:>8}" for lab in labs))
    print(f"-> {out}")
    return where


if __name__ == "__main__":
    args = parse_args()
    if args.cmd == "split":
        frac = tuple(float(v) for v in args.frac.split(","))
        if len(frac) != 3 or abs(sum(frac) - 1) > 1e-6:
            sys.exit(f"--frac needs three fractions summing to 1, got {args.frac}")
        split(args.csv, args.out, args.seed, frac)
    else:
        tile(Config(**{f.name: getattr(args, f.name) for f in fields(Config)}), args.slides)
