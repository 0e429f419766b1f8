"""
Synthetic, seed-deterministic stand-ins for the two modalities of "Pretext Matters" (MAE vs DINOv3 vs I-JEPA).

Nothing here is downloaded: every pixel comes from numpy/scipy/pillow, so the whole pipeline (pretrain ->
preprocess -> probe -> analyses) runs and is tested on a laptop. The data is built so that the paper's claims
have something to bite on, not to be mistaken for real images.

Ultrasound (paper 3.3, 4.1, appendix 0.C; task folders laid out like UltraBench, Tupper et al. 2025)
  Each frame is simulated in *beam space* (depth x beam angle) and then scan-converted into a convex-probe fan,
  which is how a B-mode image is actually formed. Elements, and why they are there:
  - fan on black + `scan_mask`: percentile rescaling is done inside the scan region (US-JEPA, 0.C).
  - organs = wobbly ellipses with their own echo level and texture; the main one ("liver") is `organ_mask`,
    so the liver-segmentation AUROC of cosine-similarity maps (4.1, "Anatomical understanding") can be run.
  - multiplicative Rayleigh speckle, grain elongated along the lateral (beam-to-beam) axis, log-compressed:
    the high-magnitude, task-irrelevant noise that pixel reconstruction (MAE) has to spend capacity on (sec. 2).
  - depth attenuation = cumulative sum of a per-tissue attenuation coefficient along each beam, so fluid gives
    posterior enhancement and bright reflectors (stones, rib) cast acoustic shadows.
  - random gain / dynamic range per frame: the scanner-to-scanner brightness spread that the 2nd/98th
    percentile mapping of 0.C removes.
  - coloured calipers / dashed measure lines / cyan text on ~30% of raw frames: the "minor colored annotations
    removed via inpainting" (0.C). `gray_clean` is the same frame without them.
  Labels (two linear-probe tasks, 0.D.2):
  - fatty (GLOBAL, like the Fatty Liver task where I-JEPA wins, 5): two relations across the whole frame, the
    liver enlarged (hepatomegaly: both axes x 1.2-1.4, on a size that varies 1.6x between frames anyway) and
    brighter than the renal cortex below it (hepatorenal index: liver - cortex 5-9 dB, against -2..1.5 dB when
    normal; a kidney is in every frame). The liver's own echo level and attenuation, the gain, dynamic range
    and depth slope are drawn alike in both classes, so no first-order statistic gives the label away. An
    earlier version made fatty livers brighter and more attenuating: a 16 x 16 thumbnail then scored AUROC 98
    and a randomly initialised ViT 96 (1200 training frames), so pretraining could only lose. Now a thumbnail
    scores ~0.8, the grey-level histogram ~0.6 (logistic regression, 300 training frames).
  - lesion (LOCAL): one round hypo- or hyper-echoic nodule inside the liver, 16-28 px radius at 256 (4-7 px,
    under one 8 px patch, in the CPU demo's 64 px frames). Anechoic vessels (present in both classes) are the
    distractor. The lesion does not change attenuation, so with the same seed a lesion / no-lesion pair
    differs only around the nodule.
  Every component draws from its own child generator, so forcing fatty / lesion / marks does not change the
  rest of the frame.

Histopathology (paper 3.3, 4.2, appendix 0.C; openslide facts in pipelines.md 5)
  Pyramidal whole-slide images that OpenSlide opens with a real MPP: level downsamples 1, 4, 16 (no 2x level,
  like most TCGA 40x SVS, so 40x -> 20x means reading level 0 and halving), 256 px JPEG tiles, alternately an
  Aperio-style SVS (AppMag 40, MPP 0.25, thumbnail) and a generic tiled TIFF (resolution in centimetres).
  Colour is Beer-Lambert H&E: stain concentrations times Ruifrok-Johnston optical-density vectors.
  - white glass with a few irregular tissue pieces (tissue detection, patch filtering).
  - pink eosin stroma with fibre texture and sparse spindle nuclei; epithelial nests with round nuclei;
    lymphocytes (small, dark, condensed) as distractors in both classes.
  - label 1 = a "tumour region" covering part of the tissue where nuclei are larger, darker, pleomorphic,
    vesicular (dark rim, nucleolus) and crowded: nuclear morphology is what pathologists grade and what DINOv3
    captures (4.2, 5); being only part of the slide, it gives ABMIL attention something to localise.
  - per-slide stain strength / hue jitter, so stain normalisation (DeepPATH Reinhard, 0.C) has work to do.
  Patients: some have two slides, always with the same label (patient-level splits must keep them together).

Use:
  python prep/synthetic.py --out data/synthetic [--frames 600] [--size 256] [--slides 12] [--seed 0] [--nompp]
    -> data/synthetic/{raw,masks,scan,clean,tasks}/ + labels.csv, data/synthetic/slides/ (slide_*, slides.csv)
  ultrasound_frames(n, size, seed) -> (n, size, size) uint8, the default pretraining data when --data is absent.
"""
import argparse
import csv
import io
import math
import os
import shutil
import struct
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

# -----------------------------------------------------------------------------------------------------------
# ultrasound: geometry


@lru_cache(maxsize=8)
def _pixel_grid(size):
    """Cartesian pixel centres (y, x), float32, cached: every frame of a size shares them."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys, xs


class _Fan:
    """A convex-probe sector: apex above the image, beams fanning out over +-half radians.

    Beam space is an (n, n) grid: row i = depth r0 + i*dr, column j = angle -half + j*dth. sx < 1 squeezes the
    fan horizontally, as when a wide scanner image is resized to a square (the fan then fills the width).
    """

    def __init__(self, rng, size):
        self.n = n = size
        top = size * rng.uniform(0.03, 0.08)                 # probe face, on the centre line
        self.r0 = size * rng.uniform(0.15, 0.45)             # probe radius of curvature = apex distance
        self.ay, self.cx = top - self.r0, size / 2 - 0.5     # apex (above the image)
        self.r1 = size * rng.uniform(0.90, 0.98) - self.ay   # deepest sample
        self.half = math.radians(rng.uniform(30, 40))
        self.sx = min(1.0, 0.98 * size / (2 * self.r1 * math.sin(self.half)))
        self.dr, self.dth = (self.r1 - self.r0) / (n - 1), 2 * self.half / (n - 1)
        # Cartesian position of every beam-space sample: shapes are defined in image pixels and tested here
        r = (self.r0 + self.dr * np.arange(n, dtype=np.float32))[:, None]
        th = (-self.half + self.dth * np.arange(n, dtype=np.float32))[None, :]
        self.X = self.cx + self.sx * r * np.sin(th)          # (n, n)
        self.Y = self.ay + r * np.cos(th)                    # (n, n)

    def to_beam(self, x, y):
        """Image (x, y) -> fractional beam-space (i, j); works on scalars and arrays."""
        dx, dy = (x - self.cx) / self.sx, y - self.ay
        return (np.hypot(dx, dy) - self.r0) / self.dr, (np.arctan2(dx, dy) + self.half) / self.dth

    def window(self, x, y, rad):
        """Beam-space slices covering a disc of radius rad px around image (x, y) (small shapes only)."""
        i, j = self.to_beam(x, y)
        r = max(self.r0 + i * self.dr, 1.0)
        di = rad / (self.sx * self.dr) + 2                   # pixels per row/column are >= sx*dr, sx*r*dth
        dj = rad / (self.sx * r * self.dth) + 2
        lo_i, lo_j = max(int(i - di), 0), max(int(j - dj), 0)
        return slice(lo_i, max(int(i + di) + 2, lo_i)), slice(lo_j, max(int(j + dj) + 2, lo_j))


def _lowres_noise(rng, shape, cells):
    """Smooth unit-variance noise of shape (h, w): a coarse Gaussian grid (~cells across), bicubic-upsampled."""
    h, w = shape
    gh, gw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    g = rng.standard_normal((gh, gw), dtype=np.float32)
    up = np.asarray(Image.fromarray(g, "F").resize((w, h), Image.BICUBIC))
    return up * (1.0 / (up.std() + 1e-6))


def _blob(X, Y, cx, cy, a, b, ang, wobble, noise):
    """Normalised radius of a wobbly ellipse: < 1 inside, ~1 on the border. Borders wobble with `noise`."""
    c, s = math.cos(ang), math.sin(ang)
    dx, dy = X - cx, Y - cy
    u, v = (dx * c + dy * s) / a, (dy * c - dx * s) / b
    return np.sqrt(u * u + v * v) + wobble * noise


def _random_ellipse(rng, size, cx, cy, rmin, rmax, elong=(1.0, 1.6)):
    """(cx, cy, a, b, angle) with a in [rmin, rmax]*size/256 and b = a / elongation."""
    a = rng.uniform(rmin, rmax) * size / 256
    return cx, cy, a, a / rng.uniform(*elong), rng.uniform(0, math.pi)


# -----------------------------------------------------------------------------------------------------------
# ultrasound: one frame


def ultrasound_frame(rng, size=256, fatty=None, lesion=None, marks=None):
    """One synthetic B-mode frame. rng: np.random.Generator. fatty / lesion / marks: None = random.

    Returns dict: image (size, size, 3) uint8 RGB (grey + coloured marks if marks), gray_clean (size, size)
    uint8, organ_mask (liver) / scan_mask / lesion_mask / cortex_mask (renal cortex) (size, size) bool, fatty,
    lesion, marks (0/1 ints).
    """
    u = rng.random(3)
    fatty = int(u[0] < 0.5) if fatty is None else int(fatty)
    lesion = int(u[1] < 0.5) if lesion is None else int(lesion)
    marks = int(u[2] < 0.3) if marks is None else int(marks)
    # one child stream per component: forcing a flag never shifts the random numbers of the others
    r_geo, r_tis, r_fat, r_les, r_spk, r_mrk = [np.random.default_rng(s) for s in rng.integers(0, 2**63, 6)]
    n, k = size, size / 256                                  # k: lengths below are quoted at 256 px
    fan = _Fan(r_geo, size)
    X, Y = fan.X, fan.Y
    depth = np.linspace(0, 1, n, dtype=np.float32)[:, None]  # (n, 1), 0 = probe face, 1 = deepest sample

    # --- echo level map (dB below white) and attenuation coefficient (dB per unit depth), in beam space
    N1, N2, N3 = (_lowres_noise(r_tis, (n, n), c) for c in (5, 12, 40))  # organ-, texture-, grain-scale
    refl = r_tis.uniform(-27, -21) + 2.5 * N2 + 1.0 * N3     # deep background tissue
    d = depth + 0.012 * N1                                   # wavy layer boundaries of the abdominal wall
    fat_end = r_tis.uniform(0.04, 0.09)
    wall = fat_end + r_tis.uniform(0.05, 0.10)               # end of the muscle layer = fascia
    refl = np.where(d < fat_end, r_tis.uniform(-34, -29) + 1.5 * N3, refl)            # subcutaneous fat
    refl = np.where((d >= fat_end) & (d < wall), r_tis.uniform(-27, -22) + 2 * N3, refl)  # muscle
    refl = np.where(depth < 0.006, -12.0, refl)                                      # skin line
    refl = np.where(np.abs(d - wall) < 0.006, r_tis.uniform(-13, -8), refl)          # fascia
    att = np.zeros((n, n), np.float32)

    # liver: a big wobbly ellipse under the wall. Its echo level and attenuation are drawn the same way in both
    # classes, so no brightness histogram or depth profile of the frame gives the fatty label away; it lives in
    # the liver's extent (a steatotic liver is enlarged: hepatomegaly, both axes x 1.2-1.4) and in the kidney
    # below (the hepatorenal index), two relations across the whole frame.
    lx, ly = size * r_tis.uniform(0.35, 0.65), size * r_tis.uniform(0.50, 0.65)
    la, lb = size * r_tis.uniform(0.32, 0.50), size * r_tis.uniform(0.26, 0.38)
    grow = r_fat.uniform(1.2, 1.4)                           # drawn in both classes: the same stream either way
    if fatty:
        la, lb = la * grow, lb * grow
    lang = r_tis.uniform(-0.4, 0.4)
    q_liv = _blob(X, Y, lx, ly, la, lb, lang, 0.08, N1)
    liver = (q_liv < 1) & (d > wall + 0.01)
    level = r_tis.uniform(-24, -18)                          # parenchyma echo level (dB)
    alpha = r_tis.uniform(-3, 12)                            # attenuation (dB per unit depth), label-free
    refl = np.where(liver, level + 1.2 * N3 + 1.0 * N2, refl)
    refl = np.where(liver & (q_liv > 0.97), np.maximum(refl, level + 7), refl)        # capsule
    att = np.where(liver, alpha, att)
    organ = liver.copy()

    # kidney (every frame: the hepatorenal view): renal cortex, bright sinus fat, capsule. The cortex is drawn
    # relative to the liver: hepatorenal index HRI = liver - cortex level, 5-9 dB when fatty (the liver
    # markedly brighter than the cortex, the clinical sign of steatosis), -2..1.5 dB when normal (iso-echoic).
    hri = r_fat.uniform(5, 9) if fatty else r_fat.uniform(-2, 1.5)
    ka = size * r_tis.uniform(0.14, 0.20)
    kx, ky = lx, ly + 0.8 * lb
    for _ in range(16):                                      # a spot below / beside the liver, inside the fan
        ang = r_tis.uniform(0.6, 2.5)                        # direction from the liver centre, pointing deeper
        cx, cy = lx + 0.8 * la * math.cos(ang), ly + 0.8 * lb * math.sin(ang)
        i, j = fan.to_beam(np.array([cx - 0.6 * ka, cx + 0.6 * ka, cx]), np.array([cy, cy, cy + 0.6 * ka]))
        if i.min() >= 0 and i.max() <= n - 1 and j.min() >= 0 and j.max() <= n - 1:
            kx, ky = cx, cy
            break
    q_k = _blob(X, Y, kx, ky, ka, ka * r_tis.uniform(0.5, 0.65), r_tis.uniform(0, math.pi), 0.05, N2)
    kid = (q_k < 1) & (d > wall + 0.01)
    refl = np.where(kid, level - hri + 1.5 * N3, refl)
    refl = np.where(kid & (q_k < 0.5), r_tis.uniform(-16, -11) + 3 * N3, refl)  # sinus fat
    refl = np.where(kid & (q_k > 0.95), -12.0, refl)                             # capsule
    cortex = kid & (q_k >= 0.5) & (q_k <= 0.95)
    organ &= ~kid

    # anechoic fluid (vessels, sometimes a gallbladder): dark, and *less* attenuating -> posterior enhancement
    fluids = [_random_ellipse(r_tis, size, lx + la * r_tis.uniform(-0.6, 0.6), ly + lb * r_tis.uniform(-0.6, 0.6),
                              3, 9, (1.0, 3.0)) for _ in range(r_tis.integers(0, 4))]
    if r_tis.random() < 0.2:
        gx = lx + la * r_tis.uniform(-0.7, 0.7)              # gallbladder, near the liver's upper edge
        fluids.append(_random_ellipse(r_tis, size, gx, ly - 0.5 * lb, 14, 26, (1.4, 2.2)))
    for cx, cy, a, b, ang in fluids:
        si, sj = fan.window(cx, cy, a + 3)
        q = _blob(X[si, sj], Y[si, sj], cx, cy, a, b, ang, 0.0, 0.0)
        refl[si, sj] = np.where(q < 1, -48.0, np.where(q < 1.25, np.maximum(refl[si, sj], level + 5), refl[si, sj]))
        att[si, sj] = np.where(q < 1, -12.0, att[si, sj])

    # lesion: parameters are always drawn (same frame with or without it); centre chosen inside the liver
    les_mask = np.zeros((n, n), bool)
    rl = r_les.uniform(16, 28) * k
    hyper = r_les.random() < 0.5
    delta = r_les.uniform(6, 10) if hyper else -r_les.uniform(8, 14)
    cand = r_les.uniform(-0.7, 0.7, (32, 2))
    ring = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    lcx, lcy = lx, ly
    for scale in (1.0, 0.8, 0.6):                            # shrink if the liver is too small or clipped
        rad = rl * scale + 3
        ok = False
        for cxr, cyr in cand:
            cx, cy = lx + la * cxr, ly + lb * cyr
            i, j = fan.to_beam(cx + rad * np.cos(ring), cy + rad * np.sin(ring))
            i, j = np.rint(i).astype(int), np.rint(j).astype(int)
            if (i.min() >= 0) & (i.max() < n) & (j.min() >= 0) & (j.max() < n) and organ[i, j].all():
                lcx, lcy, rl, ok = cx, cy, rl * scale, True
                break
        if ok:
            break
    if lesion:
        si, sj = fan.window(lcx, lcy, rl + 2)
        q = _blob(X[si, sj], Y[si, sj], lcx, lcy, rl, rl * r_les.uniform(0.8, 1.0), r_les.uniform(0, math.pi), 0.0, 0.0)
        w = np.clip((1 - q) * rl / 1.5, 0, 1)                # ~1.5 px soft edge
        refl[si, sj] = refl[si, sj] * (1 - w) + w * (level + delta + 1.5 * N3[si, sj])
        les_mask[si, sj] = q < 1

    # --- image formation: speckle x echo level, minus accumulated attenuation, then log compression
    z = r_spk.standard_normal((2, n, n), dtype=np.float32)
    z = ndi.gaussian_filter(z[0] + 1j * z[1], (0.8, 2.0))   # complex Gaussian, grain elongated laterally
    amp = np.abs(z)
    speckle_db = 20 * np.log10(amp / amp.mean() + 1e-3)      # log-Rayleigh, std ~5.6 dB
    cum = np.cumsum(att, axis=0) * (1.0 / n)                 # dB lost on the way down each beam

    # bright reflectors with acoustic shadows: a stone in the liver, sometimes a rib at the fan's edge
    for p, where in ((0.35, "liver"), (0.25, "rib")):
        if r_tis.random() >= p:
            continue
        if where == "liver":
            bx, by = lx + la * r_tis.uniform(-0.5, 0.5), ly + lb * r_tis.uniform(-0.5, 0.4)
            srad = r_tis.uniform(2, 4) * k
        else:
            jj = int(r_tis.choice([int(4 * k), n - 1 - int(4 * k)]))  # a beam near one edge of the fan
            ii = int((wall + r_tis.uniform(0.0, 0.05)) * (n - 1))
            bx, by = float(X[ii, jj]), float(Y[ii, jj])
            srad = r_tis.uniform(4, 7) * k
        si, sj = fan.window(bx, by, srad)
        q = _blob(X[si, sj], Y[si, sj], bx, by, srad, srad * 0.7, r_tis.uniform(0, math.pi), 0.0, 0.0)
        refl[si, sj] = np.where(q < 1, -3.0, refl[si, sj])
        i0, j0 = fan.to_beam(bx, by)
        i0, j0 = int(min(max(i0, 0), n - 1)), int(round(float(j0)))
        wj = srad / (fan.sx * max(fan.r0 + i0 * fan.dr, 1) * fan.dth)  # shadow half-width in beams
        jl, jh = max(int(j0 - wj - 2), 0), min(int(j0 + wj + 3), n)
        jh = max(jh, jl)                                     # a reflector beside the fan casts no shadow in it
        prof = np.clip(1.5 - np.abs(np.arange(jl, jh) - j0) / max(wj, 1), 0, 1)  # soft lateral edges
        cum[i0:, jl:jh] += r_tis.uniform(12, 22) * prof

    gain, dyn = r_tis.normal(0, 3), r_tis.uniform(45, 60)   # scanner settings: brightness spread across frames
    tgc = r_tis.uniform(-5, 7) * depth                      # what time-gain compensation did not undo
    db = refl + speckle_db + gain - tgc - cum
    beam_img = np.clip((db + dyn) * (255.0 / dyn), 0, 255).astype(np.float32)

    # --- scan conversion: bilinear lookup of each pixel's (depth, angle); black outside the fan
    ys, xs = _pixel_grid(size)
    fi, fj = fan.to_beam(xs, ys)
    scan = (fi >= 0) & (fi <= n - 1) & (fj >= 0) & (fj <= n - 1)
    gray = np.zeros((size, size), np.uint8)
    gray[scan] = ndi.map_coordinates(beam_img, [fi[scan], fj[scan]], order=1, mode="nearest")
    ii, jj = np.clip(np.rint(fi), 0, n - 1).astype(np.intp), np.clip(np.rint(fj), 0, n - 1).astype(np.intp)
    organ_mask = organ[ii, jj] & scan
    lesion_mask = les_mask[ii, jj] & scan
    cortex_mask = cortex[ii, jj] & scan

    image = np.repeat(gray[:, :, None], 3, axis=2)
    if marks:
        _draw_marks(r_mrk, image, organ_mask, (lcx, lcy, rl) if lesion else None, size)
    return dict(image=image, gray_clean=gray, organ_mask=organ_mask, scan_mask=scan, lesion_mask=lesion_mask,
                cortex_mask=cortex_mask, fatty=fatty, lesion=lesion, marks=marks)


# -----------------------------------------------------------------------------------------------------------
# ultrasound: annotation overlays (what the inpainting step of appendix 0.C removes)

# 3x5 bitmaps for measurement text ("D1 2.31cm"); one string of 15 cells per glyph, rows top to bottom
_FONT = {
    "0": "###.#.##.#.####", "1": ".#.##..#..#.###", "2": "###..#####..###", "3": "###..####..####",
    "4": "#.##.####..#..#", "5": "####..###..####", "6": "####..####.####", "7": "###..#..#..#..#",
    "8": "####.#####.####", "9": "####.####..####", ".": "............#..", "c": "......####..###",
    "m": "......#######.#", "D": "##.#.##.##.###.", " ": "...............",
}
_COLOURS = dict(yellow=(255, 235, 0), green=(40, 230, 60), cyan=(30, 220, 240), orange=(255, 140, 0))


def _put(img, ys, xs, colour):
    keep = (ys >= 0) & (ys < img.shape[0]) & (xs >= 0) & (xs < img.shape[1])
    img[ys[keep], xs[keep]] = colour


def _draw_line(img, x0, y0, x1, y1, colour, dash=0):
    t = np.linspace(0, 1, int(max(abs(x1 - x0), abs(y1 - y0))) + 1)
    if dash:  # on for `dash` px, off for `dash` px
        t = t[(np.arange(len(t)) // dash) % 2 == 0]
    _put(img, np.rint(y0 + t * (y1 - y0)).astype(int), np.rint(x0 + t * (x1 - x0)).astype(int), colour)


def _draw_text(img, x, y, text, scale, colour):
    for c, ch in enumerate(text):
        cells = np.array([ch_ == "#" for ch_ in _FONT[ch]]).reshape(5, 3)
        cells = np.kron(cells, np.ones((scale, scale), bool))
        ys, xs = np.nonzero(cells)
        _put(img, ys + y, xs + x + c * 4 * scale, colour)


def _draw_marks(rng, img, organ_mask, les, size):
    """Calipers ('+') on the lesion edge (or two organ points), a dashed measure line, measurement text."""
    k = size / 256
    arm = max(2, int(round(rng.uniform(3, 5) * k)))
    if les is not None:  # calipers on the nodule's diameter, like TN5000 thyroid nodules (paper Fig. 3)
        cx, cy, r = les
        a = rng.uniform(0, math.pi)
        p = [(cx + r * math.cos(a), cy + r * math.sin(a)), (cx - r * math.cos(a), cy - r * math.sin(a))]
    else:
        ys, xs = np.nonzero(organ_mask)
        if len(xs) == 0:
            ys, xs = np.array([size // 2]), np.array([size // 2])
        idx = rng.integers(0, len(xs), 2)
        p = [(float(xs[i]), float(ys[i])) for i in idx]
    if rng.random() < 0.7:
        _draw_line(img, *p[0], *p[1], _COLOURS["green"], dash=max(2, int(3 * k)))
    for x, y in p:
        x, y = int(round(x)), int(round(y))
        _draw_line(img, x - arm, y, x + arm, y, _COLOURS["yellow"])
        _draw_line(img, x, y - arm, x, y + arm, _COLOURS["yellow"])
    if rng.random() < 0.8:
        scale = 1 if size < 200 else 2                     # ~10 px tall text at 224-256 px
        text = f"D1 {rng.uniform(0.3, 4.0):.2f}cm"
        x0 = int(rng.uniform(0.02, 0.55) * size)
        y0 = int(rng.choice([rng.uniform(0.01, 0.06), rng.uniform(0.88, 0.95)]) * size)
        _draw_text(img, x0, y0, text, scale, _COLOURS["cyan" if rng.random() < 0.7 else "orange"])


# -----------------------------------------------------------------------------------------------------------
# ultrasound: datasets


def ultrasound_frames(n, size=224, seed=0):
    """n clean grey frames (n, size, size) uint8; frame i depends only on (seed, i), so n=10 is a prefix of n=512.
    Stream 1 keeps pretraining frames disjoint from the labelled benchmark of make_ultrasound (stream 2)."""
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        out[i] = ultrasound_frame(np.random.default_rng([1, seed, i]), size, marks=False)["gray_clean"]
    return out


def _split_balanced(rng, n):
    """Labels and 60/20/20 splits such that every split holds every (fatty, lesion) combination (n >= 12)."""
    combo = rng.permutation(np.arange(n) % 4)                # balanced classes for both tasks, independent
    split = np.empty(n, dtype=object)
    for c in range(4):
        idx = rng.permutation(np.nonzero(combo == c)[0])
        m = len(idx)
        n_va = n_te = max(1, round(0.2 * m)) if m >= 3 else 0
        split[idx[: m - n_va - n_te]] = "train"
        split[idx[m - n_va - n_te: m - n_te]] = "val"
        split[idx[m - n_te:]] = "test"
    return combo // 2, combo % 2, split


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)                                    # task folders hold hard links: no extra disk
    except OSError:                                          # e.g. a filesystem without hard links
        with open(src, "rb") as f:
            data = f.read()
        with open(dst, "wb") as g:
            g.write(data)


def make_ultrasound(out_dir, n=600, size=256, seed=0, progress=None):
    """UltraBench-like folder: raw/ (RGB, marks on ~30%), masks/ (organ, 0/255), scan/ (fan, 0/255),
    clean/ (grey, no marks), tasks/{fatty,lesion}/{train,val,test}/{class}/ (links to clean/), labels.csv
    (path of the raw frame, labels, split). Those subfolders are replaced if they exist."""
    rng = np.random.default_rng([2, seed])
    fatty, lesion, split = _split_balanced(rng, n)
    marks = rng.random(n) < 0.3
    for sub in ("raw", "masks", "scan", "clean", "tasks"):  # regenerate from scratch: no stale frames or labels
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
        os.makedirs(os.path.join(out_dir, sub))
    for task, names in (("fatty", ("normal", "fatty")), ("lesion", ("absent", "present"))):
        for s in ("train", "val", "test"):
            for c in names:
                os.makedirs(os.path.join(out_dir, "tasks", task, s, c), exist_ok=True)
    rows = []
    for i in range(n):
        f = ultrasound_frame(np.random.default_rng([2, seed, i]), size, fatty[i], lesion[i], marks[i])
        name = f"frame_{i:05d}.png"
        Image.fromarray(f["image"]).save(os.path.join(out_dir, "raw", name), compress_level=1)
        Image.fromarray(f["organ_mask"].astype(np.uint8) * 255).save(os.path.join(out_dir, "masks", name))
        Image.fromarray(f["scan_mask"].astype(np.uint8) * 255).save(os.path.join(out_dir, "scan", name))
        clean = os.path.join(out_dir, "clean", name)
        Image.fromarray(f["gray_clean"]).save(clean, compress_level=1)
        _link_or_copy(clean, os.path.join(out_dir, "tasks", "fatty", split[i], ("normal", "fatty")[fatty[i]], name))
        _link_or_copy(clean, os.path.join(out_dir, "tasks", "lesion", split[i], ("absent", "present")[lesion[i]], name))
        rows.append((f"raw/{name}", int(fatty[i]), int(lesion[i]), split[i]))
        if progress is not None:
            progress.update(1)
    with open(os.path.join(out_dir, "labels.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "fatty", "lesion", "split"])
        w.writerows(rows)
    return rows


# -----------------------------------------------------------------------------------------------------------
# histopathology: a minimal pyramidal TIFF writer
#
# tifffile can only JPEG-compress through the optional `imagecodecs` package (and refuses pre-encoded tiles
# without it), so the tiles are encoded with Pillow and the TIFF directories are written here: classic
# little-endian TIFF, one directory per page. OpenSlide's rules (pipelines.md 5.2): page 0 tiled; further tiled
# pages with NewSubfileType=1 are pyramid levels; a stripped page in an Aperio file is an associated image.

TILE = 256


def _jpeg(a, quality=90):
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=quality, subsampling=2)  # 4:2:0 YCbCr, tagged below
    return b.getvalue()


def _tiles(a, fill):
    """JPEG tiles of a in row-major order, edge tiles padded with the background colour."""
    h, w = a.shape[:2]
    out = []
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            t = a[y:y + TILE, x:x + TILE]
            if t.shape[:2] != (TILE, TILE):
                pad = np.empty((TILE, TILE, 3), np.uint8)
                pad[:] = fill
                pad[:t.shape[0], :t.shape[1]] = t
                t = pad
            out.append(_jpeg(np.ascontiguousarray(t)))
    return out


def _write_tiff(path, pages, fill=(240, 240, 240)):
    """pages: dicts with img (h, w, 3) uint8, tiled (bool), reduced (bool), description (str|None), mpp (float|None)."""
    SHORT, LONG, RATIONAL, ASCII = 3, 4, 5, 2
    buf = bytearray(b"II*\x00\x00\x00\x00\x00")             # header; the first-directory offset is patched in
    prev = 4                                                 # where to write the offset of the next directory
    for p in pages:
        h, w = p["img"].shape[:2]
        blobs = _tiles(p["img"], fill) if p["tiled"] else [_jpeg(p["img"])]
        offsets = []
        for b in blobs:
            offsets.append(len(buf))
            buf += b + b"\x00" * (len(b) % 2)                # keep word alignment
        tags = [(254, LONG, [int(p.get("reduced", False))]), (256, LONG, [w]), (257, LONG, [h]),
                (258, SHORT, [8, 8, 8]), (259, SHORT, [7]), (262, SHORT, [6]),  # JPEG, YCbCr
                (277, SHORT, [3]), (284, SHORT, [1]), (530, SHORT, [2, 2])]      # RGB chunky, 4:2:0
        if p.get("description"):
            tags.append((270, ASCII, p["description"].encode() + b"\x00"))
        if p["tiled"]:
            tags += [(322, SHORT, [TILE]), (323, SHORT, [TILE]), (324, LONG, offsets),
                     (325, LONG, [len(b) for b in blobs])]
        else:
            tags += [(273, LONG, offsets), (278, LONG, [h]), (279, LONG, [len(blobs[0])])]
        if p.get("mpp"):  # pixels per centimetre; without ResolutionUnit=3 readers assume inches
            ppcm = round(1e4 / p["mpp"])
            tags += [(282, RATIONAL, [ppcm, 1]), (283, RATIONAL, [ppcm, 1]), (296, SHORT, [3])]
        tags.sort()
        ifd = len(buf)
        struct.pack_into("<I", buf, prev, ifd)
        extra = ifd + 2 + 12 * len(tags) + 4                 # values longer than 4 bytes go after the directory
        entries, values = bytearray(struct.pack("<H", len(tags))), bytearray()
        for tag, typ, val in tags:
            raw = val if typ == ASCII else struct.pack("<%d%s" % (len(val), "H" if typ == SHORT else "I"), *val)
            count = len(val) // 2 if typ == RATIONAL else len(val)
            if len(raw) <= 4:
                entries += struct.pack("<HHI", tag, typ, count) + raw.ljust(4, b"\x00")
            else:
                entries += struct.pack("<HHII", tag, typ, count, extra + len(values))
                values += raw + b"\x00" * (len(raw) % 2)
        prev = ifd + len(entries)
        buf += entries + b"\x00\x00\x00\x00" + values         # next-directory offset 0 = last, until patched
    with open(path, "wb") as f:
        f.write(buf)


# -----------------------------------------------------------------------------------------------------------
# histopathology: tissue, stains, nuclei

# optical density (log10) of one unit of stain: the reference H&E stain vectors of Macenko et al. (2009),
# haematoxylin blue-purple, eosin pink
_H_OD = np.array([0.5626, 0.7201, 0.4062])
_E_OD = np.array([0.2159, 0.8012, 0.5581])


def _upsample(a, w, h):
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), "F").resize((w, h), Image.BILINEAR))


def _nucleus(rng, kind, angle=None):
    """One nucleus stamp: (haematoxylin (s, s), coverage (s, s)). Sizes in level-0 px at 0.25 um/px."""
    if kind == "normal":      # epithelium: round-oval, ~7 um, fine even chromatin
        a, ecc, wob, dens, tex = rng.uniform(11, 15), rng.uniform(0.75, 0.95), 0.03, rng.uniform(0.55, 0.75), 0.08
    elif kind == "lymph":     # lymphocyte: small, round, condensed (dark, uniform)
        a, ecc, wob, dens, tex = rng.uniform(7, 9), rng.uniform(0.85, 1.0), 0.02, rng.uniform(1.0, 1.2), 0.04
    elif kind == "fibro":     # fibroblast: thin spindle along the fibres
        a, ecc, wob, dens, tex = rng.uniform(14, 22), rng.uniform(0.18, 0.28), 0.02, rng.uniform(0.8, 1.0), 0.05
    else:                     # tumour: large, pleomorphic, hyperchromatic, vesicular with nucleoli
        a, ecc, wob, dens, tex = rng.uniform(17, 30), rng.uniform(0.6, 0.95), rng.uniform(0.06, 0.15), \
            rng.uniform(0.8, 1.05), 0.15
    ang = rng.uniform(0, math.pi) if angle is None else angle
    s = 2 * int(a * (1 + 3 * wob) + 3) + 1
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) - s // 2
    c, si = math.cos(ang), math.sin(ang)
    u, v = (xx * c + yy * si) / a, (yy * c - xx * si) / (a * ecc)
    phi = np.arctan2(v, u)
    border = 1 + sum(wob * rng.uniform(0.3, 1) * np.cos(kk * phi + rng.uniform(0, 6.3)) for kk in (2, 3, 5))
    q = np.sqrt(u * u + v * v) / border                      # < 1 inside the (wobbly) nuclear membrane
    cover = np.clip((1 - q) * a * ecc / 1.2, 0, 1)           # ~1 px soft edge
    chrom = ndi.gaussian_filter(rng.standard_normal((s, s)).astype(np.float32), 1.0) * (tex / 0.28)  # blur std 0.28
    h = dens + chrom
    if kind == "tumour":                                     # vesicular: chromatin on the membrane, nucleoli
        h = h - 0.35 + 0.5 * (q > 0.75)
        for _ in range(rng.integers(1, 3)):
            ny, nx = rng.uniform(-0.4, 0.4, 2) * a * ecc
            h = h + 0.6 * (((yy - ny) ** 2 + (xx - nx) ** 2) < rng.uniform(2, 3.5) ** 2)
    return np.clip(h, 0, 3) * cover, cover


def _hex_points(rng, w, h, spacing, jitter):
    """Jittered hexagonal lattice over a w x h image: crowded-but-not-piled cells."""
    ys = np.arange(spacing / 2, h, spacing * 0.866)
    xs = np.arange(spacing / 2, w, spacing)
    gx = xs[None, :] + (np.arange(len(ys)) % 2)[:, None] * spacing / 2
    gy = np.broadcast_to(ys[:, None], gx.shape)
    p = np.stack([gx.ravel(), gy.ravel()], 1)
    return p + rng.uniform(-jitter, jitter, p.shape) * spacing


def make_slide(path, rng, label, fmt="svs", size=(4096, 3072), mpp=0.25):
    """Write one synthetic H&E slide. fmt: 'svs' (Aperio-style), 'tiff' (generic, cm resolution), 'nompp'
    (generic, no resolution at all). label 1 adds a tumour region. Returns dict with low-res (1/16) maps
    'tissue' and 'tumour' (bool) so callers/tests know where to look."""
    W, H = size
    w16, h16 = -(-W // 16), -(-H // 16)
    # --- where things are, at 1/16 resolution: tissue pieces, epithelial nests, the tumour region
    yy, xx = np.mgrid[0:h16, 0:w16].astype(np.float32)
    field = np.full((h16, w16), -1.0, np.float32)
    nz = _lowres_noise(rng, (h16, w16), 10)
    for _ in range(rng.integers(2, 5)):                      # 2-4 tissue pieces
        cx, cy = rng.uniform(0.25, 0.75) * w16, rng.uniform(0.25, 0.75) * h16
        a, b = rng.uniform(0.1, 0.22) * w16, rng.uniform(0.12, 0.28) * h16
        field = np.maximum(field, 1 - np.hypot((xx - cx) / a, (yy - cy) / b) + 0.25 * nz)
    border = np.minimum(np.minimum(xx, w16 - 1 - xx), np.minimum(yy, h16 - 1 - yy))
    field = np.minimum(field, border / (0.06 * min(w16, h16)) - 1)  # glass margin around the tissue
    edge = 2.0                                               # 1/16-res pixels from tissue edge to full colour
    tissue = field > 0
    epi_f = _lowres_noise(rng, (h16, w16), 14) - 0.4         # ~35% of tissue is epithelium
    tum_f = np.full((h16, w16), -1.0, np.float32)
    if label == 1:                                           # a tumour region over part of the tissue
        ty, tx = np.nonzero(field > 0.3)
        if len(tx) == 0:
            ty, tx = np.nonzero(tissue)
        k = rng.integers(len(tx))
        r = rng.uniform(0.12, 0.22) * max(w16, h16)
        tum_f = 1 - np.hypot(xx - tx[k], yy - ty[k]) / r + 0.3 * _lowres_noise(rng, (h16, w16), 12)
    tumour = tissue & (tum_f > 0)
    # --- stain concentration maps, built at 1/4 resolution (cheap) and upsampled once to level 0
    w4, h4 = -(-W // 4), -(-H // 4)
    t = np.clip(_upsample(field, w4, h4) * (16 / edge), 0, 1)  # tissue weight with soft edges
    epi = np.clip(_upsample(epi_f, w4, h4) * 8, 0, 1) * t
    tum = np.clip(_upsample(tum_f, w4, h4) * 8, 0, 1) * t
    # collagen fibres: noise smeared along x or y, mixed by a slowly varying orientation field, then made wavy
    n4 = rng.standard_normal((h4, w4), dtype=np.float32)
    orient = np.clip(_lowres_noise(rng, (h4, w4), 8) * 0.8 + 0.5, 0, 1)
    fib = orient * ndi.gaussian_filter(n4, (0.8, 6)) + (1 - orient) * ndi.gaussian_filter(n4, (6, 0.8))
    y4, x4 = np.mgrid[0:h4, 0:w4].astype(np.float32)
    wave = [3 * _lowres_noise(rng, (h4, w4), max(h4, w4) / 30) for _ in range(2)]
    fib = ndi.map_coordinates(fib, [y4 + wave[0], x4 + wave[1]], order=1, mode="reflect")
    fib = np.clip(0.5 + fib / (2.5 * fib.std()), 0, 1)
    stroma = t * (1 - np.maximum(epi, tum))
    Ec = stroma * (0.08 + 0.45 * fib) + epi * (1 - tum) * 0.25 + tum * 0.2   # pale clefts between fibres
    Hc = t * 0.05 + epi * (1 - tum) * 0.08 + tum * 0.14                     # faint cytoplasmic haematoxylin
    Ec, Hc = _upsample(Ec, W, H).copy(), _upsample(Hc, W, H).copy()          # writable level-0 maps
    # --- nuclei, stamped from a per-slide bank of shapes
    bank = {kd: [_nucleus(rng, kd) for _ in range(24)] for kd in ("normal", "lymph", "tumour")}
    bank["fibro_x"] = [_nucleus(rng, "fibro", rng.normal(0, 0.25)) for _ in range(16)]
    bank["fibro_y"] = [_nucleus(rng, "fibro", math.pi / 2 + rng.normal(0, 0.25)) for _ in range(16)]

    def lowres(a, p):  # value of a 1/16-res map at level-0 points p (x, y)
        return a[np.clip((p[:, 1] / 16).astype(int), 0, h16 - 1), np.clip((p[:, 0] / 16).astype(int), 0, w16 - 1)]

    pts = []
    p = _hex_points(rng, W, H, 34, 0.25)                     # epithelial nests (not inside the tumour)
    pts.append(("normal", p[lowres(tissue & (epi_f > 0.1) & ~tumour, p)]))
    p = _hex_points(rng, W, H, 46, 0.3)                      # tumour sheets: crowded, big nuclei
    pts.append(("tumour", p[lowres(tumour & (tum_f > 0.1), p)]))
    p = rng.uniform(0, 1, (int(W * H / 9000), 2)) * (W, H)  # stroma: sparse spindle cells
    p = p[lowres(tissue & (epi_f < -0.1) & ~tumour, p)]
    horiz = orient[np.clip((p[:, 1] / 4).astype(int), 0, h4 - 1), np.clip((p[:, 0] / 4).astype(int), 0, w4 - 1)] > 0.5
    pts += [("fibro_x", p[horiz]), ("fibro_y", p[~horiz])]
    c = rng.uniform(0, 1, (rng.integers(3, 8), 2)) * (W, H)  # lymphocyte clusters + scattered ones
    p = np.concatenate([c[rng.integers(len(c), size=60 * len(c))] + rng.normal(0, 60, (60 * len(c), 2)),
                        rng.uniform(0, 1, (int(W * H / 40000), 2)) * (W, H)])
    pts.append(("lymph", p[lowres(tissue, p)]))
    for kd, p in pts:
        for (x, y), i in zip(p.astype(int), rng.integers(0, len(bank[kd]), len(p))):
            h, cover = bank[kd][i]
            s = h.shape[0]
            x0, y0 = x - s // 2, y - s // 2
            if x0 < 0 or y0 < 0 or x0 + s > W or y0 + s > H:
                continue
            Hc[y0:y0 + s, x0:x0 + s] = np.maximum(Hc[y0:y0 + s, x0:x0 + s], h)
            Ec[y0:y0 + s, x0:x0 + s] *= 1 - 0.6 * cover
    # --- colour: Beer-Lambert through a per-slide jittered stain matrix, via a 256x256 lookup table
    hv = _H_OD * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03, 3)   # stain strength / hue vary by lab
    ev = _E_OD * rng.uniform(0.8, 1.2) + rng.normal(0, 0.03, 3)
    bg = np.array([240, 240, 240]) + rng.integers(-4, 5, 3)           # glass + lamp colour
    hq, eq = np.arange(256) / 64, np.arange(256) / 128               # Hc in [0, 4), Ec in [0, 2)
    od = hq[:, None, None] * hv + eq[None, :, None] * ev             # (256, 256, 3)
    lut = np.clip(bg * 10.0 ** -od, 0, 255).astype(np.uint8).reshape(-1, 3)
    idx = np.clip(Hc * 64, 0, 255).astype(np.int32) * 256 + np.clip(Ec * 128, 0, 255).astype(np.int32)
    rgb = lut[idx]                                                   # (H, W, 3) uint8
    del Hc, Ec, idx
    # --- pyramid 1, 4, 16 (box filter) and the file
    l1 = np.asarray(Image.fromarray(rgb).reduce(4))
    l2 = np.asarray(Image.fromarray(l1).reduce(4))
    fill = tuple(int(v) for v in bg)
    if fmt == "svs":
        desc = (f"Aperio Image Library v12.0.15 \r\n{W}x{H} [0,0 {W}x{H}] ({TILE}x{TILE}) JPEG/RGB Q=90"
                f"|AppMag = {10 / mpp:g}|MPP = {mpp}|Filename = {os.path.basename(path)}")  # 10 / mpp: 0.25 -> 40x
        pages = [dict(img=rgb, tiled=True, description=desc),
                 dict(img=l2, tiled=False, description="Aperio Image Library v12.0.15 thumbnail"),
                 dict(img=l1, tiled=True, reduced=True), dict(img=l2, tiled=True, reduced=True)]
    elif fmt in ("tiff", "nompp"):
        pages = [dict(img=rgb, tiled=True, mpp=mpp if fmt == "tiff" else None),
                 dict(img=l1, tiled=True, reduced=True), dict(img=l2, tiled=True, reduced=True)]
    else:
        raise ValueError(f"unknown slide format {fmt!r}")
    _write_tiff(path, pages, fill)
    return dict(path=path, label=int(label), fmt=fmt, tissue=tissue, tumour=tumour)


def make_slides(out_dir, n_slides=12, seed=0, size=(4096, 3072), nompp=False, progress=None):
    """n_slides slides alternating SVS / generic TIFF, balanced labels, ~1/3 of patients with two slides
    (same label). Writes out_dir/slides.csv (slide,patient,label); nompp=True adds out_dir/nompp.tiff (not in csv)."""
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):                            # regenerate from scratch: no stale slides
        if f.startswith("slide_") and f.endswith((".svs", ".tiff")) or f == "nompp.tiff":
            os.remove(os.path.join(out_dir, f))
    rng = np.random.default_rng([3, seed])
    patient_of, pid = [], 0
    while len(patient_of) < n_slides:
        k = 2 if rng.random() < 0.35 and len(patient_of) + 1 < n_slides else 1
        patient_of += [pid] * k
        pid += 1
    labels = rng.permutation(np.arange(pid) % 2)             # per patient, so patients never mix labels
    rows = []
    for i in range(n_slides):
        fmt = ("svs", "tiff")[i % 2]
        name = f"slide_{i:03d}.{fmt}"
        lab = int(labels[patient_of[i]])
        make_slide(os.path.join(out_dir, name), np.random.default_rng([3, seed, i]), lab, fmt, size)
        rows.append((name, f"P{patient_of[i]:03d}", lab))
        if progress is not None:
            progress.update(1)
    with open(os.path.join(out_dir, "slides.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "patient", "label"])
        w.writerows(rows)
    if nompp:
        make_slide(os.path.join(out_dir, "nompp.tiff"), np.random.default_rng([4, seed]), 0, "nompp", (1024, 768))
    return rows


# -----------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description="write the synthetic ultrasound benchmark and whole-slide images")
    ap.add_argument("--out", default="data/synthetic", help="output folder (ultrasound at the top, slides/ inside)")
    ap.add_argument("--frames", type=int, default=600, help="ultrasound frames (>= 12 so every split has every class)")
    ap.add_argument("--size", type=int, default=256, help="ultrasound frame size (px)")
    ap.add_argument("--slides", type=int, default=12, help="whole-slide images")
    ap.add_argument("--slide-size", type=int, nargs=2, default=(4096, 3072), metavar=("W", "H"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nompp", action="store_true", help="also write slides/nompp.tiff without resolution tags")
    args = ap.parse_args()
    us_dir, wsi_dir = args.out, os.path.join(args.out, "slides")  # out/labels.csv, out/slides/slides.csv
    with tqdm(total=args.frames, desc="ultrasound frames") as bar:
        rows = make_ultrasound(us_dir, args.frames, args.size, args.seed, progress=bar)
    print(f"wrote {len(rows)} frames to {us_dir} (raw/, masks/, scan/, clean/, tasks/fatty, tasks/lesion, labels.csv)")
    with tqdm(total=args.slides, desc="slides") as bar:
        rows = make_slides(wsi_dir, args.slides, args.seed, tuple(args.slide_size), args.nompp, progress=bar)
    n_pat = len({r[1] for r in rows})
    print(f"wrote {len(rows)} slides of {n_pat} patients to {wsi_dir} (slides.csv"
          + (", nompp.tiff)" if args.nompp else ")"))
