"""Look inside pretrained encoders: attention, cosine-similarity and PCA maps, and the anchor segmentation score.

Paper section 4 (Figures 2-5, supplementary 0.D.3) and the liver analysis of section 4.1:

    # one PNG per image, one row per checkpoint: image | attention of every last-block head | cosine similarity
    # to each anchor (red X) | first three principal components of the patch features as RGB
    python viz.py maps runs/mae/ckpt.safetensors runs/dino/ckpt.safetensors runs/ijepa/ckpt.safetensors \
        --names MAE DINOv3 I-JEPA --images us/raw/0001.png us/raw/0002.png --anchor 120,140 60,90 --out runs/viz

    # section 4.1: per image, 3 anchors inside the organ mask -> AUROC of their similarity maps against the mask,
    # 5 anchors -> mean pairwise Pearson r of their maps; the two checkpoints compared by Wilcoxon signed-rank
    python viz.py segscore runs/ijepa/ckpt.safetensors runs/dino/ckpt.safetensors \
        --images us/raw --masks us/masks --out runs/viz/segscore.csv --seed 0

One image at a time, any size, on the GPU when there is one (`--device cpu` to force); no torchrun, it is fast.

What the maps are (the paper's visualisation code is not public; these are our choices, written down):
- Attention: the softmax of the last block, q and k after RoPE (vit.ViT.last_qk, kernels.attention_map), over
  ALL keys (CLS, registers, patches) as the model computes it; the map shows the patch keys. Query: the CLS
  token for models that have one (MAE, DINOv3) and the mean over the patch queries otherwise (I-JEPA), as in
  section 4; `--query cls|mean` forces one (0.D.3 compares both). Each head is min-max scaled for display,
  upsampled bilinearly and overlaid on the image (DINO's visualize_attention.py likewise takes
  attentions[0, :, 0, 1:] without renormalising over the patches).
- Cosine similarity: final-normed patch tokens (registers and CLS excluded), every patch against the anchor's
  patch (kernels.cosine_similarity). Shown on a FIXED range SIM_RANGE, not min-max, so that rows compare
  (MAE's "high similarity dispersed across the entire image", 0.D.3, stays visible).
- PCA: the first three principal components of the patch features (fitted per image, or on the patches of all
  images with --joint-pca, per checkpoint since feature spaces differ), each min-max scaled to [0, 1] over the
  fitted patches, shown as RGB (DINOv3 figures). Signs follow sklearn (largest |loading| positive).
- Input: the checkpoint's channels (grayscale / RGB) and mean/std; each side resized (bicubic) to the nearest
  multiple of the patch, at least one patch. Resizing, not padding: the model sees the whole image and nothing
  else, so every map covers exactly the image (vit.py handles any grid: sincos/RoPE per grid, learned
  tables interpolated). Anchors are pixel coordinates x,y of the ORIGINAL image, mapped to the patch they fall in;
  without --anchor, the image centre.

segscore (section 4.1, the liver of AUL in the paper):
- Anchors: pixels inside the mask, at least half a patch from its border (dropped when the organ is too thin) and
  at least one patch apart (each its own patch), drawn with rng (seed, crc32 of the image's path) so an image's
  anchors do not depend on which other images are there; the same anchors for both checkpoints (paired test).
  N_CORR are drawn; the first N_AUROC give the AUROC.
- AUROC at pixel level: the patch-grid similarity map upsampled bilinearly to the original image, the mask
  (pixels > 127) as label (sklearn roc_auc_score), averaged over the anchors. Pearson r at the patch level (the
  maps' native resolution; upsampling would only smooth them), averaged over the N_CORR*(N_CORR-1)/2 pairs.
- Images whose mask is empty, covers everything, or cannot host N_CORR anchors are kept in the CSV with a note
  and no scores; the Wilcoxon tests (scipy, two-sided, paired) use the images scored by both.
"""
import argparse
import csv
import json
import math
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import kernels
import vit

# -----------------------------------------------------------------------------
# knobs

TILE = 176                  # long side of each panel in the maps figure (px)
ALPHA = 0.6                 # opacity of the attention heatmap over the grayscale image
SIM_RANGE = (0.0, 1.0)      # colour range of cosine-similarity maps, fixed so rows compare; below clips to dark
UPSAMPLE = "bilinear"       # patch grid -> panel: bilinear (smooth) or nearest (one block per patch)
N_AUROC, N_CORR = 3, 5      # anchors per image for the AUROC and the Pearson coherence (section 4.1)
ATT_CHUNK = 1024            # query rows per attention_map call when averaging patch queries (bounds memory)
IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# two perceptual colormaps as 11 evenly spaced control points (matplotlib's viridis / inferno sampled at
# 0, 0.1, ..., 1), interpolated linearly into a 256-entry lookup table
VIRIDIS = [(68, 1, 84), (72, 36, 117), (65, 68, 135), (53, 95, 141), (42, 120, 142), (33, 145, 140),
           (34, 168, 132), (68, 191, 112), (122, 209, 81), (189, 223, 38), (253, 231, 37)]
INFERNO = [(0, 0, 4), (22, 11, 57), (66, 10, 104), (106, 23, 110), (147, 38, 103), (188, 55, 84),
           (221, 81, 58), (243, 120, 25), (252, 165, 10), (246, 215, 70), (252, 255, 164)]

# -----------------------------------------------------------------------------
# images


def load_image(path):
    """-> the PIL image (first frame), with an error naming the file when pillow cannot read it."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as e:        # UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: cannot read this image ({e})") from None
    return img


def image_array(img, chans):
    """PIL image -> uint8 (H, W, chans); 16-bit / float images scaled by their maximum first."""
    if chans not in (1, 3):
        raise ValueError(f"viz reads grayscale (in_chans 1) or RGB (in_chans 3) checkpoints, got in_chans {chans}")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((a * 255.0 / max(a.max(), 1e-12)).clip(0, 255).astype(np.uint8))
    a = np.asarray(img.convert("L" if chans == 1 else "RGB"))
    return a[..., None] if a.ndim == 2 else a


def input_size(W, H, patch):
    """Each side rounded (half up) to the nearest multiple of the patch, at least one patch -> (w, h)."""
    return max(patch, int(W / patch + 0.5) * patch), max(patch, int(H / patch + 0.5) * patch)


def preprocess(img, meta, device):
    """PIL image -> normalised model input (1, C, h, w) in the checkpoint's channels and mean/std."""
    patch, C = meta["vit"]["patch_size"], meta["in_chans"]
    a = image_array(img, C)                                           # (H, W, C) uint8
    w, h = input_size(a.shape[1], a.shape[0], patch)
    a = np.array(Image.fromarray(a.squeeze(-1) if C == 1 else a).resize((w, h), Image.BICUBIC)).reshape(h, w, C)
    x = torch.from_numpy(a).to(device).permute(2, 0, 1)[None].float() / 255.0   # (1, C, h, w)
    mean = torch.tensor(meta["mean"], device=device)[None, :, None, None]
    std = torch.tensor(meta["std"], device=device)[None, :, None, None]
    return (x - mean) / std


def check_anchor(xy, W, H, path):
    x, y = xy
    if not (0 <= x < W and 0 <= y < H):
        raise ValueError(f"anchor ({x:g}, {y:g}) is outside {path}, which is {W}x{H} pixels; anchors are pixel "
                         f"coordinates x,y of the original image with 0 <= x < {W} and 0 <= y < {H}")


def anchor_patch(xy, W, H, gw, gh):
    """Pixel (x, y) of a W x H image -> index of the patch it falls in on the gh x gw grid (row-major)."""
    col = min(int(xy[0] * gw / W), gw - 1)
    row = min(int(xy[1] * gh / H), gh - 1)
    return row * gw + col

# -----------------------------------------------------------------------------
# what the maps are made of


@torch.inference_mode()
def attention(model, x, query):
    """Last-block attention over all keys, (B, H, prefix + N): the CLS row, or the mean of the patch-query rows.

    Each returned row is a probability distribution (sums to one); the map is its patch part [..., prefix:].
    """
    q, k = model.last_qk(x)                                           # (B, H, P + N, Dh)
    P = model.num_prefix
    if query == "cls":
        return kernels.attention_map(q, k, torch.zeros(1, dtype=torch.long, device=q.device))[:, :, 0]
    if P == 0:                                                        # all queries are patches (I-JEPA)
        return kernels.attention_map(q, k)                            # (B, H, N) mean over queries
    rows = torch.arange(P, q.shape[2], device=q.device)              # patch queries only, not CLS / registers
    total = sum(kernels.attention_map(q, k, r).sum(2) for r in rows.split(ATT_CHUNK))  # (B, H, P + N)
    return total / len(rows)


@torch.inference_mode()
def patch_features(model, x):
    """(B, N, D) final-normed patch tokens (CLS and registers dropped), the features of section 4."""
    return model(x)[:, model.num_prefix:].float()


def similarity_maps(feats, idx):
    """feats (N, D), idx (A,) anchor patch indices -> (A, N) cosine similarity of every patch to each anchor."""
    return kernels.cosine_similarity(feats[None, idx], feats[None])[0]


def pca_fit(feats, k=3):
    """feats (M, D) -> (mean (D,), components (k, D) orthonormal, zero rows past rank); signs as sklearn's PCA."""
    feats = feats.double()
    mean = feats.mean(0)
    _, _, Vt = torch.linalg.svd(feats - mean, full_matrices=False)   # (min(M, D), D), by singular value
    Vt = Vt[:k]
    Vt = Vt * torch.sign(Vt.gather(1, Vt.abs().argmax(1, keepdim=True)))   # largest |loading| positive
    if len(Vt) < k:                                                   # fewer patches than components
        Vt = torch.cat([Vt, Vt.new_zeros(k - len(Vt), Vt.shape[1])])
    return mean, Vt


def pca_project(feats, fit):
    mean, comps = fit
    return (feats.double() - mean) @ comps.T                          # (M, k)


def minmax(z, lo, hi):
    """Scale each column of z (M, k) from [lo, hi] to [0, 1]; constant columns map to 0."""
    return ((z - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).float()

# -----------------------------------------------------------------------------
# drawing (pillow only)


def lut(stops):
    s = np.asarray(stops, dtype=np.float64)                           # (n, 3)
    pos, t = np.linspace(0, 1, len(s)), np.linspace(0, 1, 256)
    return np.stack([np.interp(t, pos, s[:, c]) for c in range(3)], 1).round().astype(np.uint8)  # (256, 3)


LUTS = {"viridis": lut(VIRIDIS), "inferno": lut(INFERNO)}


def colorize(v, cmap):
    """v (...) in [0, 1] -> uint8 (..., 3) RGB through the lookup table."""
    return LUTS[cmap][(np.clip(v, 0, 1) * 255).round().astype(np.int64)]


def upsample(m, th, tw):
    """(C, gh, gw) patch-grid map -> (C, th, tw) numpy at panel resolution."""
    m = torch.as_tensor(m, dtype=torch.float32)[None].cpu()
    kw = {"align_corners": False} if UPSAMPLE == "bilinear" else {}
    return F.interpolate(m, size=(th, tw), mode=UPSAMPLE, **kw)[0].numpy()


def font(size, bold=False):
    for name in (("DejaVuSans-Bold.ttf", "Arial Bold.ttf") if bold else ("DejaVuSans.ttf", "Arial.ttf")):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    return ImageFont.load_default(size=size)                          # pillow's own scalable font


def fit_text(draw, text, fnt, width):
    """Shorten text with an ellipsis until it fits in width pixels."""
    if draw.textlength(text, font=fnt) <= width:
        return text
    while text and draw.textlength(text + "…", font=fnt) > width:
        text = text[:-1]
    return text + "…"


def draw_x(draw, cx, cy, s=6):
    for w, col in ((5, (255, 255, 255)), (3, (230, 20, 20))):       # white halo, red X (paper's anchor mark)
        draw.line([(cx - s, cy - s), (cx + s, cy + s)], fill=col, width=w)
        draw.line([(cx - s, cy + s), (cx + s, cy - s)], fill=col, width=w)


def row_tiles(r, tw, th, W, H, anchors):
    """One checkpoint's panels: image, attention per head, cosine map per anchor, PCA -> list of PIL images."""
    base = np.asarray(Image.fromarray(r["image"].squeeze(-1) if r["image"].shape[-1] == 1 else r["image"])
                      .convert("RGB").resize((tw, th), Image.BICUBIC))           # (th, tw, 3)
    gray = base.mean(-1, keepdims=True)
    tiles = [Image.fromarray(base)]
    att = r["att"].flatten(1)                                         # (heads, N)
    lo, hi = att.min(1, keepdim=True).values, att.max(1, keepdim=True).values
    att = torch.where(hi - lo > 1e-6 * hi, (att - lo) / (hi - lo), 0.0)   # per head min-max; a flat head -> 0
    for a in upsample(att.reshape(r["att"].shape), th, tw):          # (th, tw) each
        tiles.append(Image.fromarray(((1 - ALPHA) * gray + ALPHA * colorize(a, "inferno")).astype(np.uint8)))
    lo, hi = SIM_RANGE
    for s, (x, y) in zip(upsample(r["sims"], th, tw), anchors):
        t = Image.fromarray(colorize((s - lo) / (hi - lo), "viridis"))
        draw_x(ImageDraw.Draw(t), (x + 0.5) * tw / W, (y + 0.5) * th / H)
        tiles.append(t)
    pca = upsample(r["pca"], th, tw).transpose(1, 2, 0)               # (th, tw, 3)
    tiles.append(Image.fromarray((pca * 255).round().astype(np.uint8)))
    return tiles


def figure(title, rows, W, H, anchors, joint):
    """rows: per checkpoint dict(name, query, image (H, W, C) uint8, att (heads, gh, gw), sims (A, gh, gw),
    pca (3, gh, gw)) -> the PIL figure: a title, column headers, a label column, one row per checkpoint, and
    colour bars. Rows with fewer heads leave those panels empty."""
    tw, th = max(1, round(TILE * W / max(W, H))), max(1, round(TILE * H / max(W, H)))
    tw, th = max(tw, 48), max(th, 48)                                 # very elongated images: keep panels visible
    nh = max(len(r["att"]) for r in rows)
    heads = [f"head {i + 1}" for i in range(nh)]
    cols = ["image"] + heads + [f"cos ({x:g}, {y:g})" for x, y in anchors] + ["PCA (joint)" if joint else "PCA"]
    M, G, LW, TH, HH, FH = 12, 4, 130, 30, 22, 46
    fig = Image.new("RGB", (M + LW + len(cols) * (tw + G) - G + M, M + TH + HH + len(rows) * (th + G) - G + FH + M),
                    (255, 255, 255))
    d = ImageDraw.Draw(fig)
    f_title, f_head, f_name, f_small = font(16, True), font(12), font(13, True), font(11)
    d.text((M, M), fit_text(d, title, f_title, fig.width - 2 * M), fill=(20, 20, 20), font=f_title)
    x0, y0 = M + LW, M + TH + HH
    for j, c in enumerate(cols):
        cx = x0 + j * (tw + G) + tw / 2
        d.text((cx, y0 - 4), fit_text(d, c, f_head, tw), fill=(60, 60, 60), font=f_head, anchor="md")
    for i, r in enumerate(rows):
        y = y0 + i * (th + G)
        d.text((M, y + th / 2 - 14), fit_text(d, r["name"], f_name, LW - 8), fill=(20, 20, 20), font=f_name,
               anchor="lm")
        for k, sub in enumerate((f"{r['query']} query", f"{r['grid'][1]}x{r['grid'][0]} patches")):
            d.text((M, y + th / 2 + 3 + 14 * k), sub, fill=(110, 110, 110), font=f_small, anchor="lm")
        tiles = row_tiles(r, tw, th, W, H, anchors)
        slots = [0] + [1 + h for h in range(len(r["att"]))] + list(range(1 + nh, len(cols)))
        for j, t in zip(slots, tiles):
            fig.paste(t, (x0 + j * (tw + G), y))
    # colour bars: attention (per-head min-max) and cosine similarity on its fixed range
    yb = y0 + len(rows) * (th + G) + 12
    bw = min(200, max(80, (fig.width - 2 * M - LW) // 4))
    for k, (label, cmap, lo_t, hi_t) in enumerate((("attention, per head", "inferno", "low", "high"),
                                                   ("cosine similarity", "viridis", f"{SIM_RANGE[0]:g}",
                                                    f"{SIM_RANGE[1]:g}"))):
        bx = x0 + k * (bw + 200)
        bar = np.repeat(colorize(np.linspace(0, 1, bw), cmap)[None], 10, 0)   # (10, bw, 3)
        fig.paste(Image.fromarray(bar), (int(bx), yb))
        d.text((bx - 6, yb + 5), lo_t, fill=(60, 60, 60), font=f_small, anchor="rm")
        d.text((bx + bw + 6, yb + 5), hi_t, fill=(60, 60, 60), font=f_small, anchor="lm")
        d.text((bx + bw / 2, yb + 14), label, fill=(60, 60, 60), font=f_small, anchor="mt")
    return fig


def save_png(img, path):
    """Atomic write: a crash never leaves a half-written figure in place of a previous one."""
    tmp = f"{path}.tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# maps


def default_names(paths, metas):
    """The method name; the checkpoint's folder added when two checkpoints share a method."""
    names = [m.get("method", Path(p).stem) for p, m in zip(paths, metas)]
    return [f"{n} ({Path(p).parent.name or Path(p).stem})" if names.count(n) > 1 else n
            for n, p in zip(names, paths)]


def maps(ckpts, images, out, anchors=None, query=None, joint_pca=False, names=None, device="cpu"):
    """Write one figure per image (out/<stem>.png), one row per checkpoint; -> list of written paths."""
    if names is not None and len(names) != len(ckpts):
        raise ValueError(f"--names gives {len(names)} names for {len(ckpts)} checkpoints; give one per checkpoint")
    imgs = [load_image(p) for p in images]
    if not anchors:                                                   # default: the image centre
        anchors_per = [[(im.size[0] // 2, im.size[1] // 2)] for im in imgs]
    else:
        for p, im in zip(images, imgs):
            for a in anchors:
                check_anchor(a, *im.size, p)
        anchors_per = [list(anchors)] * len(imgs)
    models = [vit.load_encoder(p, device) for p in ckpts]        # errors name the file
    names = names or default_names(ckpts, [m for _, m in models])
    queries = []
    for p, (model, meta) in zip(ckpts, models):
        q = query or ("cls" if model.cfg.cls_token else "mean")
        if q == "cls" and not model.cfg.cls_token:
            raise ValueError(f"{p}: --query cls but this encoder ({meta.get('method')}) has no CLS token; "
                             f"use --query mean")
        queries.append(q)

    # every checkpoint on every image: attention (heads, gh, gw), similarity (A, gh, gw), patch features (N, D)
    res = [[None] * len(imgs) for _ in models]
    for i in tqdm(range(len(imgs)), desc="maps", unit="img"):
        W, H = imgs[i].size
        for m, (model, meta) in enumerate(models):
            x = preprocess(imgs[i], meta, device)                     # (1, C, h, w)
            gh, gw = x.shape[2] // model.cfg.patch_size, x.shape[3] // model.cfg.patch_size
            att = attention(model, x, queries[m])[0, :, model.num_prefix:]           # (heads, N)
            feats = patch_features(model, x)[0]                                       # (N, D)
            idx = torch.tensor([anchor_patch(a, W, H, gw, gh) for a in anchors_per[i]], device=feats.device)
            sims = similarity_maps(feats, idx)                                        # (A, N)
            res[m][i] = dict(att=att.reshape(-1, gh, gw).float().cpu(),              # (heads, gh, gw)
                             sims=sims.reshape(-1, gh, gw).float().cpu(),            # (A, gh, gw)
                             feats=feats.cpu(), grid=(gh, gw),
                             image=image_array(imgs[i], meta["in_chans"]))

    # PCA: per image, or one fit (and one min-max range) over all images of a checkpoint
    for m in range(len(models)):
        for group in ([res[m]] if joint_pca else [[r] for r in res[m]]):
            f = torch.cat([r["feats"] for r in group])                # (M, D) the patches the PCA is fitted on
            fit = pca_fit(f)
            z = pca_project(f, fit)                                   # (M, 3)
            lo, hi = z.min(0).values, z.max(0).values
            for r in group:
                r["pca"] = minmax(pca_project(r["feats"], fit), lo, hi).T.reshape(3, *r["grid"])   # (3, gh, gw)

    os.makedirs(out, exist_ok=True)
    written, stems = [], {}
    for i, p in enumerate(images):
        W, H = imgs[i].size
        rows = [dict(name=names[m], query=queries[m], **res[m][i]) for m in range(len(models))]
        fig = figure(f"{Path(p).name}  ({W}x{H})", rows, W, H, anchors_per[i], joint_pca)
        stem = Path(p).stem
        stems[stem] = stems.get(stem, 0) + 1
        path = os.path.join(out, f"{stem}.png" if stems[stem] == 1 else f"{stem}_{stems[stem]}.png")
        save_png(fig, path)
        written.append(path)
    return written

# -----------------------------------------------------------------------------
# segscore (section 4.1)


def auroc(sim, mask):
    """sim, mask (H, W): AUROC with the mask as the label and the cosine similarity as the score."""
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(np.asarray(mask).ravel().astype(bool), np.asarray(sim, dtype=np.float64).ravel()))


def coherence(sims):
    """sims (A, M) similarity maps of A anchors -> mean Pearson r over the A(A-1)/2 pairs (nan if a map is flat)."""
    sims = np.asarray(sims, dtype=np.float64)
    if np.any(sims.std(1) == 0):
        return float("nan")
    r = np.corrcoef(sims)                                             # (A, A)
    return float(r[np.triu_indices(len(sims), 1)].mean())


def compare(a, b):
    """Paired two-sided Wilcoxon signed-rank test over images scored by both -> (n, statistic, p)."""
    from scipy.stats import wilcoxon
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any() or np.all(a[ok] == b[ok]):                        # no pairs, or no difference to rank
        return int(ok.sum()), float("nan"), float("nan")
    res = wilcoxon(a[ok], b[ok])
    return int(ok.sum()), float(res.statistic), float(res.pvalue)


def sample_anchors(mask, n, extent, rng):
    """n pixel anchors (x, y) inside the mask, half a patch from its border (dropped for thin organs) and a patch
    apart from each other (each in its own patch). extent = (pw, ph) patch size in image pixels. None if the
    mask cannot host n."""
    from scipy.ndimage import distance_transform_edt
    pw, ph = extent
    dist = distance_transform_edt(mask)                               # distance to the nearest background pixel
    for margin in (max(pw, ph) / 2, 0.5):
        ys, xs = np.nonzero(dist >= margin)
        chosen = []
        for i in rng.permutation(len(xs))[:20000]:                    # bounded: a thin mask cannot stall us
            x, y = int(xs[i]), int(ys[i])
            if all(abs(x - cx) >= pw or abs(y - cy) >= ph for cx, cy in chosen):
                chosen.append((x, y))
                if len(chosen) == n:
                    return chosen
    return None


def anchor_scores(feats, grid, anchors, mask):
    """feats (N, D) patch features on a gh x gw grid, anchors [(x, y)] pixels of the mask's image, mask (H, W) bool
    -> (mean AUROC of the first N_AUROC anchors' maps vs the mask, mean pairwise Pearson r of all anchors' maps)."""
    (gh, gw), (H, W) = grid, mask.shape
    idx = torch.tensor([anchor_patch(a, W, H, gw, gh) for a in anchors], device=feats.device)
    sims = similarity_maps(feats, idx).float()                        # (A, N)
    up = F.interpolate(sims[:N_AUROC].reshape(-1, 1, gh, gw), size=(H, W), mode="bilinear",
                       align_corners=False)[:, 0].cpu().numpy()       # (N_AUROC, H, W) at the mask's resolution
    return float(np.mean([auroc(s, mask) for s in up])), coherence(sims.cpu().numpy())


def image_scores(model, meta, img, mask, anchors, device):
    """One checkpoint on one image -> anchor_scores of its patch features."""
    x = preprocess(img, meta, device)                                 # (1, C, h, w)
    grid = (x.shape[2] // model.cfg.patch_size, x.shape[3] // model.cfg.patch_size)
    return anchor_scores(patch_features(model, x)[0], grid, anchors, mask)


def find_pairs(images_dir, masks_dir):
    """Every image under images_dir with its mask (same relative path and stem, any image extension)."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d, what in ((images_dir, "--images"), (masks_dir, "--masks")):
        if not d.is_dir():
            raise ValueError(f"{what} {d}: no such directory")
    imgs = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMG_EXTS and p.is_file())
    if not imgs:
        raise ValueError(f"--images {images_dir}: no images ({', '.join(IMG_EXTS)}) in it")
    pairs, missing = [], []
    for p in imgs:
        rel = p.relative_to(images_dir)
        cands = [masks_dir / rel.with_suffix(e) for e in IMG_EXTS + tuple(e.upper() for e in IMG_EXTS)]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            missing.append(f"{p} (expected {masks_dir / rel.with_suffix('.png')})")
        pairs.append((p, found))
    if missing:
        raise ValueError(f"no mask for {len(missing)} of {len(imgs)} images, e.g. " + "; ".join(missing[:3])
                         + f". Masks are PNGs (0 background, 255 organ) with the image's stem under {masks_dir}")
    for p, m in pairs:                                                # headers only: cheap, and fails early
        with Image.open(p) as a, Image.open(m) as b:
            # a mask at another resolution of the same frame (images resized by prep/ultrasound.py) is resized
            # to its image by nearest neighbour; another shape is another frame
            if a.size[0] * b.size[1] != a.size[1] * b.size[0]:
                raise ValueError(f"mask {m} is {b.size[0]}x{b.size[1]} pixels but its image {p} is "
                                 f"{a.size[0]}x{a.size[1]}; a mask must have its image's shape (the same "
                                 f"size, or the same aspect ratio at another resolution)")
    return pairs


def segscore(ckpt_a, ckpt_b, images_dir, masks_dir, out, seed=0, device="cpu"):
    """Section 4.1 on every (image, mask) pair; writes the per-image CSV -> (rows, summary dict)."""
    pairs = find_pairs(images_dir, masks_dir)
    models = [vit.load_encoder(p, device) for p in (ckpt_a, ckpt_b)]
    rows = []
    for img_path, mask_path in tqdm(pairs, desc="segscore", unit="img"):
        img, mimg = load_image(img_path), load_image(mask_path)
        W, H = img.size
        if mimg.size != img.size:                                     # same aspect ratio (find_pairs)
            mimg = mimg.resize(img.size, Image.NEAREST)
        mask = image_array(mimg, 1)[..., 0] > 127                     # (H, W) organ
        row = dict(image=str(img_path), mask=str(mask_path), width=W, height=H, anchors="", auroc_a="",
                   auroc_b="", pearson_a="", pearson_b="", note="")
        rows.append(row)
        if not mask.any() or mask.all():
            row["note"] = "mask is empty" if not mask.any() else "mask covers the whole image"
            continue
        # patch extent in image pixels: the coarser of the two checkpoints' grids
        ext = []
        for model, _ in models:
            p = model.cfg.patch_size
            w, h = input_size(W, H, p)
            ext.append((W / (w // p), H / (h // p)))
        extent = (max(e[0] for e in ext), max(e[1] for e in ext))
        rel = str(Path(img_path).relative_to(images_dir)).encode()
        anchors = sample_anchors(mask, N_CORR, extent, np.random.default_rng([seed, zlib.crc32(rel)]))
        if anchors is None:
            row["note"] = f"mask cannot host {N_CORR} anchors one patch apart"
            continue
        row["anchors"] = " ".join(f"{x}:{y}" for x, y in anchors)
        for tag, (model, meta) in zip("ab", models):
            row[f"auroc_{tag}"], row[f"pearson_{tag}"] = image_scores(model, meta, img, mask, anchors, device)
    skipped = [r for r in rows if r["note"]]
    for r in skipped:
        tqdm.write(f"skipped {r['image']}: {r['note']}")

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)

    col = lambda k: np.array([r[k] if r[k] != "" else np.nan for r in rows], dtype=np.float64)
    summary = {"n_images": len(rows), "n_skipped": len(skipped),
               "names": default_names([ckpt_a, ckpt_b], [meta for _, meta in models])}
    for score in ("auroc", "pearson"):
        for tag in "ab":
            summary[f"{score}_{tag}"] = col(f"{score}_{tag}")
        summary[f"{score}_test"] = compare(summary[f"{score}_a"], summary[f"{score}_b"])
    return rows, summary


def print_summary(summary, paths, out, seed):
    names = summary["names"]
    def med(v):
        v = v[np.isfinite(v)]
        if not len(v):
            return f"{'-':>22}"
        q1, q2, q3 = np.percentile(v, [25, 50, 75])
        return f"{q2:6.3f} [{q1:.3f}, {q3:.3f}]"

    def test(t):
        n, s, p = t
        return f"{'W=' + format(s, 'g'):>10} p={p:.3g}" if np.isfinite(p) else f"{'-':>10} p=-"
    print(f"\nsegscore: {summary['n_images']} images, {summary['n_skipped']} skipped, seed {seed}; "
          f"per-image CSV {out}")
    print(f"AUROC: {N_AUROC} anchors' similarity maps vs the mask (pixel level); "
          f"r: mean pairwise Pearson of {N_CORR} anchors' maps")
    w = max(24, *(len(n) + 3 for n in names))
    print(f"{'model':<{w}} {'AUROC median [IQR]':>24} {'Pearson r median [IQR]':>24}")
    for tag, n, p in zip("ab", names, paths):
        print(f"{tag.upper() + '  ' + n:<{w}} {med(summary['auroc_' + tag]):>24} {med(summary['pearson_' + tag]):>24}")
    n = summary["auroc_test"][0]
    print(f"{f'Wilcoxon A vs B (n={n})':<{w}} {test(summary['auroc_test']):>24} {test(summary['pearson_test']):>24}")
    for tag, p in zip("AB", paths):
        print(f"  {tag} = {p}")

# -----------------------------------------------------------------------------
# curves: loss, learning rate and the collapse diagnostics of runs' log.jsonl, one PNG

# (log field, panel title); the diagnostics are the methods' collapse diagnostic on a fixed batch (emb_std: std
# of the L2-normalised pooled embedding x sqrt(D), ~1 healthy, -> 0 collapsed, SimSiam 4.1; rankme: effective
# rank of the pooled features, Garrido et al. 2023 eq. 1; patch_std: std across images of the layer-normed
# token at one position, -> 0 when the tokens carry position only)
CURVES = (("loss", "loss"), ("lr", "learning rate"), ("emb_std", "emb_std (pooled embedding; ~1 healthy, 0 collapsed)"),
          ("rankme", "RankMe (effective rank of pooled features)"),
          ("patch_std", "patch_std (same position across images)"))
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]   # matplotlib's tab10
PANEL = (460, 250)          # plot area of one panel (px)


def read_log(run):
    """RUN folder (its log.jsonl) or a .jsonl file -> (path, records in file order). A cut-off last line, as a run
    killed mid-write leaves, is dropped with a note; any other line that is not a JSON object with a step is an
    error naming the file and line."""
    path = os.path.join(run, "log.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        where = f"{run}: no log.jsonl in this folder" if os.path.isdir(run) else f"{run}: no such file or folder"
        raise ValueError(f"{where}; pass a run folder (the --out of mae.py, dino.py or ijepa.py) or its log.jsonl")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:                                   # no newline after it: cut off mid-write
                print(f"viz.py: {path}: dropped the cut-off last line {i + 1}", file=sys.stderr)
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON ({line[:60]!r}); the log is damaged, remove "
                             f"that line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            raise ValueError(f"{path}: line {i + 1} has no numeric \"step\"; is this a pretext training log?")
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no logged steps (empty log); the run has not written a line yet")
    return path, records


def series(records, key):
    """-> steps (n,), values (n,) float64 of the records that hold a finite number under key (null = non-finite)."""
    pts = [(r["step"], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def bin_series(x, y, n, log):
    """Average consecutive points into at most n bins (in log space on a log axis): a 100k-step log stays a line."""
    if len(x) <= n:
        return x, y
    edges = np.linspace(0, len(x), n + 1).astype(np.int64)
    v = np.log10(y) if log else y
    xb = np.array([x[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    vb = np.array([v[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    return xb, (10 ** vb if log else vb)


def nice_ticks(lo, hi, n=5):
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi], about n of them."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def tick_label(v):
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:.4g}"


def axis_range(values, log):
    """(lo, hi) of the y axis: padded data range, whole decades on a log axis, never empty."""
    lo, hi = float(min(v.min() for v in values)), float(max(v.max() for v in values))
    if log:
        return 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi) + 1e-12)
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def draw_panel(fig, x0, y0, title, runs, key, fonts):
    """One panel at (x0, y0): frame, grid, ticks, a line per run (dots when few points); log y for a loss that
    spans more than a decade."""
    d = ImageDraw.Draw(fig)
    W, H = PANEL
    f_title, f_tick = fonts
    d.text((x0, y0 - 20), title, fill=(20, 20, 20), font=f_title)
    data = [(color, *series(recs, key)) for color, recs in runs]
    data = [(c, x, y) for c, x, y in data if len(x)]
    d.rectangle([x0, y0, x0 + W, y0 + H], outline=(90, 90, 90))
    if not data:
        d.text((x0 + W / 2, y0 + H / 2), f'no "{key}" in these logs', fill=(120, 120, 120), font=f_tick, anchor="mm")
        return
    ys = [y for _, _, y in data]
    log = key == "loss" and min(v.min() for v in ys) > 0 and max(v.max() for v in ys) > 10 * min(v.min() for v in ys)
    lo, hi = axis_range(ys, log)
    xlo = min(x.min() for _, x, _ in data)
    xhi = max(x.max() for _, x, _ in data)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    def px(x):
        return x0 + (x - xlo) / (xhi - xlo) * W

    def py(v):
        t = (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) if log else (v - lo) / (hi - lo)
        return y0 + H - t * H

    yt = [10.0 ** k for k in range(round(math.log10(lo)), round(math.log10(hi)) + 1)] if log else nice_ticks(lo, hi)
    for v in yt:
        if lo <= v <= hi:
            d.line([(x0 + 1, py(v)), (x0 + W - 1, py(v))], fill=(230, 230, 230))
            d.text((x0 - 5, py(v)), tick_label(v), fill=(60, 60, 60), font=f_tick, anchor="rm")
    for v in nice_ticks(xlo, xhi, 6):
        if xlo <= v <= xhi:
            d.line([(px(v), y0 + H), (px(v), y0 + H + 4)], fill=(90, 90, 90))
            d.text((px(v), y0 + H + 6), tick_label(v), fill=(60, 60, 60), font=f_tick, anchor="mt")
    d.text((x0 + W / 2, y0 + H + 22), "step", fill=(60, 60, 60), font=f_tick, anchor="mt")
    if log:
        d.text((x0 + W - 4, y0 + 4), "log scale", fill=(120, 120, 120), font=f_tick, anchor="rt")
    for color, x, y in data:
        xb, yb = bin_series(x, y, 2 * W, log)
        pts = [(px(a), py(b)) for a, b in zip(xb, yb)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2, joint="curve")
        if len(pts) <= 40:                                            # sparse (diagnostics): mark each point
            for cx, cy in pts:
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)


def curves(runs, out, names=None, title=None):
    """Draw the runs' loss, learning rate and collapse diagnostics into one PNG at `out`; -> out."""
    if names is not None and len(names) != len(runs):
        raise ValueError(f"--names gives {len(names)} names for {len(runs)} runs; give one per run")
    logs = [read_log(r) for r in runs]
    if names is None:
        names = [Path(p).parent.name or Path(p).stem for p, _ in logs]
    present = [(k, t) for k, t in CURVES if k in ("loss", "lr") or any(k in r for _, recs in logs for r in recs)]
    fonts = (font(13, True), font(11))
    W, H = PANEL
    M, LW, GAP_X, GAP_Y, TOP = 16, 56, 40, 76, 40
    cols = 2
    rows = -(-len(present) // cols)
    f_title, f_leg = font(16, True), font(12)
    # the legend: a swatch and a name per run, wrapped to the figure width
    fig_w = M + cols * (LW + W) + (cols - 1) * GAP_X + M
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items, x, line = [], 0, 0
    for i, n in enumerate(names):
        w = 22 + probe.textlength(n, font=f_leg) + 18
        if x + w > fig_w - 2 * M and x > 0:
            x, line = 0, line + 1
        items.append((x, line, n, PALETTE[i % len(PALETTE)]))
        x += w
    leg_h = 20 * (line + 1)
    fig_h = M + TOP + leg_h + 24 + rows * (H + GAP_Y) + M
    fig = Image.new("RGB", (int(fig_w), int(fig_h)), (255, 255, 255))
    d = ImageDraw.Draw(fig)
    d.text((M, M), fit_text(d, title or "training curves: " + ", ".join(names), f_title, fig_w - 2 * M),
           fill=(20, 20, 20), font=f_title)
    for x, line, n, color in items:
        ly = M + TOP + 20 * line
        d.line([(M + x, ly + 8), (M + x + 16, ly + 8)], fill=color, width=3)
        d.text((M + x + 22, ly + 8), n, fill=(20, 20, 20), font=f_leg, anchor="lm")
    runs_c = [(PALETTE[i % len(PALETTE)], recs) for i, (_, recs) in enumerate(logs)]
    for j, (key, ptitle) in enumerate(present):
        px0 = M + LW + (j % cols) * (LW + W + GAP_X)
        py0 = M + TOP + leg_h + 24 + (j // cols) * (H + GAP_Y)
        draw_panel(fig, px0, py0, ptitle, runs_c, key, fonts)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_png(fig, out)
    return out

# -----------------------------------------------------------------------------
# command line


def parse_anchor(s):
    try:
        x, y = (float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"anchor {s!r} is not x,y (pixel coordinates, e.g. 120,80)") from None
    return x, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("maps", help="attention / cosine-similarity / PCA maps, one PNG per image")
    a.add_argument("ckpts", nargs="+", metavar="CKPT", help="pretext checkpoints (.safetensors), one row each")
    a.add_argument("--images", nargs="+", required=True, metavar="IMG")
    a.add_argument("--out", default="runs/viz", metavar="DIR")
    a.add_argument("--anchor", nargs="+", action="extend", type=parse_anchor, metavar="X,Y",
                   help="anchor pixel(s) of the original image for cosine maps (default: the image centre)")
    a.add_argument("--query", choices=["cls", "mean"], help="force the attention query (default: CLS if any)")
    a.add_argument("--joint-pca", action="store_true", help="fit the PCA on all given images together")
    a.add_argument("--names", nargs="+", metavar="NAME", help="row labels, one per checkpoint")
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s = sub.add_parser("segscore", help="section 4.1: anchor AUROC and Pearson coherence, A vs B by Wilcoxon")
    s.add_argument("ckpt_a", metavar="CKPT_A")
    s.add_argument("ckpt_b", metavar="CKPT_B")
    s.add_argument("--images", required=True, metavar="DIR")
    s.add_argument("--masks", required=True, metavar="DIR",
                   help="PNG masks (0 / 255) with the images' stems, at the image's size or its aspect "
                   "ratio at another resolution (resized to it, nearest neighbour)")
    s.add_argument("--out", default="runs/viz/segscore.csv", metavar="CSV")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c = sub.add_parser("curves", help="loss, learning rate and collapse diagnostics of runs' log.jsonl, one PNG")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders (the --out of a method) or log.jsonl files")
    c.add_argument("--out", required=True, metavar="FILE.png")
    c.add_argument("--names", nargs="+", metavar="NAME", help="legend names, one per run (default: folder names)")
    c.add_argument("--title", help="figure title (default: the run names)")
    args = ap.parse_args(argv)
    if args.cmd == "curves":
        print(f"wrote {curves(args.runs, args.out, args.names, args.title)}")
    elif args.cmd == "maps":
        written = maps(args.ckpts, args.images, args.out, args.anchor, args.query, args.joint_pca, args.names,
                       args.device)
        print("\n".join(f"wrote {p}" for p in written))
    else:
        _, summary = segscore(args.ckpt_a, args.ckpt_b, args.images, args.masks, args.out, args.seed, args.device)
        print_summary(summary, [args.ckpt_a, args.ckpt_b], args.out, args.seed)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"viz.py: error: {e}")
