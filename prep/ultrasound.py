"""Raw ultrasound frames -> pretraining frames, as the paper's appendix 0.C (the US-JEPA recipe):
grayscale, coloured annotations inpainted, 2nd/98th-percentile rescale inside the scan region, resize,
and the data set's mean/std written beside the output (mae.py / dino.py / ijepa.py read OUT/stats.json).

    python prep/ultrasound.py RAW_DIR --out data/us_frames                  # PNGs mirroring RAW_DIR
    python prep/ultrasound.py RAW_DIR --out data/us_frames --npy --workers 32   # one uint8 (N, H, W) stack
    torchrun --nproc_per_node=8 ijepa.py --data data/us_frames

Input: every png/jpg/jpeg/bmp/tif/tiff under RAW_DIR (recursive, sorted). A multi-page TIFF is several frames;
8- and 16-bit, grey, RGB(A) and palette images are read into [0, 1] (16-bit by / 65535: the percentile
rescale below sets the final range, so a 12-bit signal in a 16-bit container comes out the same). DICOM is out
of scope (export frames first).

Per frame, in this order:
1. Coloured pixels: chroma max(R,G,B) - min(R,G,B) > --chroma (grey ultrasound has R = G = B, up to JPEG
   noise), the mask dilated by --dilate px to catch anti-aliased edges. Grayscale = ITU-R 601 luma.
2. Inpainting (only when the mask covers <= --max-marks of the frame, as US-JEPA inpaints only "minor"
   annotations; colour Doppler / elastography frames are kept as luma and listed in report.json): harmonic
   inpainting, i.e. the masked pixels u solve Laplace's equation on the 4-neighbour grid,
   sum_{q ~ p} (u_p - u_q) = 0, with the surrounding grey values as Dirichlet boundary. One sparse linear
   system (scipy.sparse.linalg.spsolve) per frame. It is the smoothest fill (no new edges or texture), exact
   for linear ramps, and needs no OpenCV (cv2.inpaint TELEA, which pipelines.md 4.4 suggests, propagates
   edges a little better; the difference on thin calipers and text is small).
3. Scan region: pixels brighter than --black, morphologically opened (3x3, twice: removes text and lines
   outside the fan), the largest connected component, holes filled (anechoic cysts inside the fan belong to
   it). The 2nd/98th percentiles of the grey values inside it (coloured / inpainted pixels left out) map to
   0/1, clipped, applied to the whole frame (black background stays black). Frames without a region, or
   with p98 == p2, are kept unscaled and listed.
4. Resize to --size x --size: padded to a square with black first (keeps the aspect ratio; the background is
   black anyway), or squashed with --no-pad; PIL bilinear, antialiased. --size 0 keeps the size (PNG only).

Output: OUT/<same relative path>.png (multi-page: <stem>_p0000.png ...; when a.jpg and a.png share a
folder: a_jpg.png, a_png.png), or with --npy a single OUT/frames.npy (uint8 (N, H, W), memory-mapped by the
method scripts) with OUT/frames.txt naming each frame's source (path, path#page for multi-page files). PNGs
and the stack are never both written: the method scripts read every image AND every .npy under --data.
OUT/stats.json = {"mean": [m], "std": [s], "frames": n, "fingerprint": sha256} in [0, 1] units over every
output pixel (padding included: the network sees it too); "frames" and "fingerprint" identify the frames it
describes (the listing of OUT the method scripts make), so that they recompute the statistics when OUT
changes. OUT/report.json lists unreadable files (with the error), frames not inpainted because of too much
colour, and frames not rescaled.

Fast and restartable: --workers processes; every PNG is written to a temporary name and renamed, so an
existing output is complete and is skipped on a rerun (its pixels still enter the statistics). The --npy stack
is filled in place (OUT/frames.npy.partial + OUT/frames.done.npy, flushed every few seconds) and renamed when
complete. An unreadable file never stops the run.

Differs from the paper: it does not say which inpainting, colour threshold or resize it used; the choices
above are ours and documented. The paper standardises downstream images with these pretraining statistics,
which probe.py does through the checkpoint's mean/std.
"""
import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from scipy.sparse import csr_matrix
from scipy.sparse.linalg import spsolve

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Config:
    src: str = ""               # folder of raw frames (positional)
    out: str = "data/us_frames"  # output folder; stats.json and report.json go here
    size: int = 224             # output side (px); 0 keeps each frame's size (PNG output only)
    pad: bool = True            # pad to a square with black before resizing (else squash the aspect ratio)
    chroma: float = 0.10        # coloured pixel: max(R,G,B) - min(R,G,B) above this ([0, 1] units; 0.1 = 25/255)
    dilate: int = 2             # grow the colour mask by this many px
    max_marks: float = 0.05     # inpaint only if the dilated colour mask covers at most this fraction
    black: float = 0.02         # scan region: brighter than this ([0, 1] units), before the morphology
    p_low: float = 2.0          # percentiles mapped to 0 and 1 (paper 0.C: 2nd / 98th)
    p_high: float = 98.0
    npy: bool = False           # write OUT/frames.npy (+ frames.txt) instead of PNGs
    workers: int = os.cpu_count() or 1
    compress: int = 1           # PNG compress_level (1: fast; ultrasound speckle compresses poorly anyway)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        if f.name == "src":
            p.add_argument("src", help="folder of raw frames")
        elif isinstance(f.default, bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    return Config(**vars(p.parse_args(argv)))

# -----------------------------------------------------------------------------
# reading


def to_unit(a):
    """An image array of any integer / float type -> float32 in [0, 1]."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535
    if a.dtype == bool:
        return a.astype(np.float32)
    a = a.astype(np.float32)
    if np.issubdtype(a.dtype, np.floating) and a.min() >= 0 and a.max() <= 1:
        return a
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 65535:             # 16-bit data held in 32-bit ints (PIL mode "I")
        return a / (255 if hi <= 255 else 65535)
    return (a - lo) / max(hi - lo, 1e-12)


def tiff_pages(path):
    import tifffile
    with tifffile.TiffFile(path) as tf:
        return len(tf.pages)


def read_frames(path):
    """-> list of float32 frames in [0, 1], each (H, W) grey or (H, W, 3) RGB. Raises on unreadable files."""
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile
        frames = []
        with tifffile.TiffFile(path) as tf:
            for page in tf.pages:
                a = page.asarray()
                if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
                    a = np.moveaxis(a, 0, -1)                          # planar (C, H, W) -> (H, W, C)
                frames.append(a)
    else:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif im.mode in ("LA", "1"):
                im = im.convert("L")
            frames = [np.asarray(im)]
    out = []
    for a in frames:
        if a.ndim == 3 and a.shape[-1] == 4:
            a = a[..., :3]                                              # drop alpha
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)) or min(a.shape[:2]) < 2:
            raise ValueError(f"unsupported image shape {a.shape}")
        out.append(to_unit(a))
    return out

# -----------------------------------------------------------------------------
# the per-frame steps


def gray_and_marks(img, chroma):
    """(H, W[, 3]) in [0, 1] -> luma (H, W) and the coloured-pixel mask (H, W) bool."""
    if img.ndim == 2:
        return img, np.zeros(img.shape, bool)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    gray = 0.299 * r + 0.587 * g + 0.114 * b                            # (H, W) ITU-R 601, as PIL "L"
    return gray, (np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)) > chroma


def inpaint_harmonic(gray, mask):
    """Fill gray[mask] with the discrete harmonic function whose boundary values are the unmasked neighbours.

    For every masked pixel p: deg(p) u_p - sum_{masked q ~ p} u_q = sum_{unmasked q ~ p} gray_q, with 4-neighbours
    inside the image (deg = their number). Each masked component touches an unmasked pixel unless the whole
    frame is masked, so the system is symmetric positive definite."""
    ys, xs = np.nonzero(mask)
    n = len(ys)
    if n == 0 or n == mask.size:
        return gray
    H, W = gray.shape
    idx = np.full((H, W), -1, np.int64)
    idx[ys, xs] = np.arange(n)
    diag, rhs = np.zeros(n), np.zeros(n)
    rows, cols = [np.arange(n)], [np.arange(n)]
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        y2, x2 = ys + dy, xs + dx
        inside = (y2 >= 0) & (y2 < H) & (x2 >= 0) & (x2 < W)
        p = np.nonzero(inside)[0]
        q = idx[y2[inside], x2[inside]]
        diag[p] += 1
        rows.append(p[q >= 0])
        cols.append(q[q >= 0])
        np.add.at(rhs, p[q < 0], gray[y2[inside][q < 0], x2[inside][q < 0]])
    vals = np.concatenate([diag, -np.ones(sum(len(r) for r in rows[1:]))])
    A = csr_matrix((vals, (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    out = gray.copy()
    out[ys, xs] = spsolve(A.tocsc(), rhs)
    return out


def scan_region(gray, black):
    """Largest bright connected component after a small opening, holes filled; None if there is none."""
    m = ndi.binary_opening(gray > black, structure=np.ones((3, 3), bool), iterations=2)
    lab, n = ndi.label(m)
    if n == 0:
        return None
    largest = lab == 1 + np.bincount(lab.ravel())[1:].argmax()
    bg, _ = ndi.label(~largest)                                         # holes: background parts off the border
    edge = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
    return largest | ~np.isin(bg, edge[edge > 0]) & (bg > 0)


def resize(gray, size, pad):
    """float (H, W) -> float (size, size): black padding to a square (pad) or squash, PIL bilinear."""
    if size <= 0:
        return gray
    if pad and gray.shape[0] != gray.shape[1]:
        H, W = gray.shape
        S = max(H, W)
        sq = np.zeros((S, S), np.float32)
        sq[(S - H) // 2:(S - H) // 2 + H, (S - W) // 2:(S - W) // 2 + W] = gray   # centred
        gray = sq
    return np.asarray(Image.fromarray(gray.astype(np.float32), "F").resize((size, size), Image.BILINEAR))


def process_frame(img, cfg):
    """One frame in [0, 1] -> (uint8 (size, size) frame, notes). The whole of appendix 0.C."""
    notes = {}
    gray, marks = gray_and_marks(img, cfg.chroma)
    if marks.any():
        marks = ndi.binary_dilation(marks, iterations=cfg.dilate) if cfg.dilate else marks
        frac = float(marks.mean())
        if frac <= cfg.max_marks:
            gray = inpaint_harmonic(gray, marks)
            notes["inpainted"] = frac
        else:
            notes["too_much_colour"] = frac
    region = scan_region(gray, cfg.black)
    if region is not None and (region & ~marks).any():
        region &= ~marks                    # percentiles of real echoes only, not of the filled-in or colour pixels
    lo, hi = np.percentile(gray[region], [cfg.p_low, cfg.p_high]) if region is not None else (0.0, 0.0)
    if hi - lo > 1e-6:
        gray = np.clip((gray - lo) / (hi - lo), 0, 1)
    else:
        notes["not_rescaled"] = "no scan region" if region is None else "flat scan region"
    gray = resize(gray, cfg.size, cfg.pad)
    return np.clip(np.rint(gray * 255), 0, 255).astype(np.uint8), notes

# -----------------------------------------------------------------------------
# files: planning, workers, the PNG and the .npy writers


def list_inputs(src, out):
    """Sorted relative paths of every image under src (the output folder excluded if it is inside src)."""
    src, out = os.path.abspath(src), os.path.abspath(out)
    rels = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(root, d)) != out)
        rels += [os.path.relpath(os.path.join(root, f), src) for f in files if f.lower().endswith(EXTS)]
    return sorted(rels)


def output_stems(rels):
    """rel path -> output stem (no extension): the same path, or stem_ext where two files share a stem."""
    count = {}
    for r in rels:
        count[os.path.splitext(r)[0]] = count.get(os.path.splitext(r)[0], 0) + 1
    stems = {}
    for r in rels:
        s, e = os.path.splitext(r)
        stems[r] = f"{s}_{e[1:].lower()}" if count[s] > 1 else s
    return stems


def frame_sums(u8):
    """Exact integer sums for the data set's mean/std: (sum, sum of squares, count) of the uint8 pixels."""
    v = u8.astype(np.int64)
    return int(v.sum()), int((v * v).sum()), int(v.size)


def png_names(stem, n):
    return [f"{stem}.png"] if n == 1 else [f"{stem}_p{i:04d}.png" for i in range(n)]


def work_png(job):
    """Worker: one input file -> its PNG(s) in OUT. Skips a file whose outputs exist (reads them for stats)."""
    path, rel, stem, cfg = job
    res = {"rel": rel, "sums": [], "notes": {}, "inpainted": 0, "skipped": False, "error": None}
    try:
        n = tiff_pages(path) if path.lower().endswith((".tif", ".tiff")) else 1
        names = [os.path.join(cfg.out, s) for s in png_names(stem, n)]
        if os.path.exists(names[-1]):           # written last, each atomically: the file is done
            res["skipped"] = True
            for f in names:
                with Image.open(f) as im:
                    res["sums"].append(frame_sums(np.asarray(im.convert("L"))))
            return res
        frames = read_frames(path)
        names = [os.path.join(cfg.out, s) for s in png_names(stem, len(frames))]
        os.makedirs(os.path.dirname(names[0]), exist_ok=True)
        for i, (img, f) in enumerate(zip(frames, names)):
            u8, notes = process_frame(img, cfg)
            tmp = f"{f}.{os.getpid()}.tmp"
            Image.fromarray(u8).save(tmp, format="PNG", compress_level=cfg.compress)
            os.replace(tmp, f)
            res["sums"].append(frame_sums(u8))
            res["inpainted"] += "inpainted" in notes
            if notes.keys() - {"inpainted"}:                # only the exceptions are listed one by one
                res["notes"][f"{rel}#{i}" if len(frames) > 1 else rel] = notes
    except Exception as e:   # noqa: BLE001 -- one bad file must not stop a million-frame run; it is reported
        res["error"] = f"{type(e).__name__}: {e}"
    return res


def work_npy(job):
    """Worker: one input file -> its uint8 frames (returned; the main process writes the stack)."""
    path, rel, first, todo, cfg = job
    res = {"rel": rel, "first": first, "frames": [], "sums": [], "notes": {}, "inpainted": 0, "error": None}
    try:
        frames = read_frames(path)
        if max(todo) >= len(frames):
            raise ValueError(f"has {len(frames)} pages now, {max(todo) + 1}+ when it was counted")
        for i in todo:
            u8, notes = process_frame(frames[i], cfg)
            res["frames"].append((i, u8))
            res["sums"].append(frame_sums(u8))
            res["inpainted"] += "inpainted" in notes
            if notes.keys() - {"inpainted"}:
                res["notes"][f"{rel}#{i}" if len(frames) > 1 else rel] = notes
    except Exception as e:   # noqa: BLE001 -- reported, never fatal
        res["error"] = f"{type(e).__name__}: {e}"
    return res


def count_pages(job):
    path, rel = job
    try:
        return rel, (tiff_pages(path) if path.lower().endswith((".tif", ".tiff")) else 1), None
    except Exception as e:   # noqa: BLE001
        return rel, 0, f"{type(e).__name__}: {e}"


def run_pool(fn, jobs, workers, desc):
    """Yield fn(job) for every job, in any order, with a progress bar; workers <= 1 runs in this process."""
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc=desc, unit="file", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)                # a line every 30 s in a log file
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            yield fn(j)
            bar.update(1)
    else:
        with mp.Pool(min(workers, len(jobs))) as pool:
            for r in pool.imap_unordered(fn, jobs, chunksize=max(1, min(16, len(jobs) // (8 * workers)))):
                yield r
                bar.update(1)
    bar.close()


def atomic_json(obj, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# the listing the method scripts make of --data, so that stats.json can say which frames it describes

# Copied from mae.py: listing


FRAME_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")


def list_frames(data):
    """Every frame file under `data` (recursive, symbolic links followed, sorted) and how many
    frames each holds: a page of a tif, a row of a .npy stack (uint8 (N, H, W) or (N, H, W, C)),
    any other image one frame."""
    if not os.path.isdir(data):
        raise SystemExit(f"{data}: no such folder; pass --data the folder that holds your frames")
    paths = []
    for root, _, names in os.walk(data, followlinks=True):
        paths += [os.path.join(root, n) for n in names if n.lower().endswith(FRAME_EXTS)]
    paths.sort()
    if not paths:
        kinds = "/".join(e[1:] for e in FRAME_EXTS)
        raise SystemExit(f"{data}: no {kinds} files under it; point --data at the folder of your "
                         f"frames")
    return paths, [frames_in(p) for p in paths]


def frames_in(path):
    """How many frames one file holds; 1 for an image that cannot be opened (reported when it is
    decoded)."""
    if path.lower().endswith(".npy"):
        try:
            a = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: not a readable .npy file ({e}); remove it or rewrite it "
                             f"with np.save") from None
        channels_ok = a.ndim == 3 or (a.ndim == 4 and a.shape[3] in (1, 3, 4))
        if a.dtype != np.uint8 or not channels_ok:
            raise SystemExit(f"{path}: a frame stack must be uint8 (N, H, W) or (N, H, W, C) with "
                             f"C 1, 3 or 4, not {a.dtype} {a.shape}; convert it, e.g. "
                             f"np.save(path, a.astype(np.uint8))")
        return len(a)
    if path.lower().endswith((".tif", ".tiff")):
        with suppress(Exception), Image.open(path) as im:
            return getattr(im, "n_frames", 1)
    return 1


def fingerprint(data, paths, counts):
    """sha256 of a listing: each file's path relative to `data`, its size in bytes and its frame
    count, so it changes when a frame file is added, removed, renamed or rewritten with another
    size."""
    h = hashlib.sha256()
    for path, n in zip(paths, counts):
        h.update(f"{os.path.relpath(path, data)}\t{os.path.getsize(path)}\t{n}\n".encode())
    return h.hexdigest()

# End of shared block: listing


def write_npy(cfg, rels, report):
    """Fill OUT/frames.npy.partial in place (resumable), then compact out failed frames and rename."""
    final, part = os.path.join(cfg.out, "frames.npy"), os.path.join(cfg.out, "frames.npy.partial")
    done_f, plan_f = os.path.join(cfg.out, "frames.done.npy"), os.path.join(cfg.out, "frames.plan.json")
    sums_f = os.path.join(cfg.out, "frames.sums.npy")
    if os.path.exists(final) and not os.path.exists(part):
        print(f"{final} exists and is complete; delete it to rebuild")
        st = np.lib.format.open_memmap(final, mode="r")
        tot = np.zeros(3)
        for i in range(0, len(st), 4096):
            c = st[i:i + 4096].astype(np.float64)
            tot += (c.sum(), (c * c).sum(), c.size)
        return tot, len(st)
    counts = {}
    for rel, n, err in run_pool(count_pages, [(os.path.join(cfg.src, r), r) for r in rels], cfg.workers, "count"):
        counts[rel] = n
        if err:
            report["failed"].append({"path": rel, "error": err})
    plan = [[r, counts[r]] for r in rels if counts[r] > 0]
    first = np.cumsum([0] + [n for _, n in plan])
    N = int(first[-1])
    if N == 0:
        raise SystemExit(f"no readable frames under {cfg.src}")
    shape = (N, cfg.size, cfg.size)
    resume = (os.path.exists(part) and os.path.exists(done_f) and os.path.exists(plan_f)
              and json.load(open(plan_f)) == {"plan": plan, "size": cfg.size})
    if not resume:
        stack = np.lib.format.open_memmap(part, mode="w+", dtype=np.uint8, shape=shape)
        done, sums = np.zeros(N, bool), np.zeros((N, 3), np.int64)
        atomic_json({"plan": plan, "size": cfg.size}, plan_f)
    else:
        stack = np.lib.format.open_memmap(part, mode="r+")
        done, sums = np.load(done_f), np.load(sums_f)
        print(f"resuming: {int(done.sum())}/{N} frames already in {part}")
    jobs = []
    for (rel, n), f0 in zip(plan, first[:-1]):
        todo = [i for i in range(n) if not done[f0 + i]]
        if todo:
            jobs.append((os.path.join(cfg.src, rel), rel, int(f0), todo, cfg))
    report["skipped_frames"] = int(done.sum())

    def save_progress():
        stack.flush()                                     # pixels on disk before they are marked done
        np.save(f"{sums_f}.tmp.npy", sums)
        os.replace(f"{sums_f}.tmp.npy", sums_f)
        np.save(f"{done_f}.tmp.npy", done)
        os.replace(f"{done_f}.tmp.npy", done_f)

    last = time.time()
    try:
        for res in run_pool(work_npy, jobs, cfg.workers, "frames"):
            if res["error"]:
                report["failed"].append({"path": res["rel"], "error": res["error"]})
            for (i, u8), s in zip(res["frames"], res["sums"]):
                stack[res["first"] + i] = u8
                sums[res["first"] + i] = s
                done[res["first"] + i] = True
            report["notes"].update(res["notes"])
            report["inpainted"] += res["inpainted"]
            if time.time() - last > 5:
                save_progress()
                last = time.time()
    finally:                                              # Ctrl-C keeps what is done for the next run
        save_progress()
    index = [r if n == 1 else f"{r}#{i}" for r, n in plan for i in range(n)]
    keep = np.nonzero(done)[0]
    if len(keep) < N:                                     # failed files leave holes: copy the rest out
        tmp = f"{final}.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(keep), cfg.size, cfg.size))
        for i in range(0, len(keep), 4096):
            out[i:i + 4096] = stack[keep[i:i + 4096]]
        out.flush()
        del out, stack
        os.replace(tmp, final)
        os.remove(part)
    else:
        del stack
        os.replace(part, final)
    with open(os.path.join(cfg.out, "frames.txt.tmp"), "w") as f:
        f.writelines(index[k] + "\n" for k in keep)
    os.replace(os.path.join(cfg.out, "frames.txt.tmp"), os.path.join(cfg.out, "frames.txt"))
    tot = sums[keep].sum(0).astype(np.float64)
    for f in (done_f, plan_f, sums_f):
        os.remove(f)
    return tot, len(keep)


def main(cfg):
    if not os.path.isdir(cfg.src):
        raise SystemExit(f"{cfg.src}: not a folder of raw frames")
    if os.path.abspath(cfg.src) == os.path.abspath(cfg.out):
        raise SystemExit("--out must differ from the input folder (outputs are PNGs too)")
    if cfg.npy and cfg.size <= 0:
        raise SystemExit("--npy needs a fixed --size (a stack has one frame shape)")
    rels = list_inputs(cfg.src, cfg.out)
    if not rels:
        raise SystemExit(f"{cfg.src}: no {'/'.join(e[1:] for e in EXTS)} files found")
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.time()
    report = {"source": os.path.abspath(cfg.src), "config": asdict(cfg), "files": len(rels), "failed": [],
              "notes": {}, "inpainted": 0}
    if cfg.npy:
        tot, n_frames = write_npy(cfg, rels, report)
    else:
        stems = output_stems(rels)
        jobs = [(os.path.join(cfg.src, r), r, stems[r], cfg) for r in rels]
        tot, n_frames, skipped = np.zeros(3), 0, 0
        for res in run_pool(work_png, jobs, cfg.workers, "frames"):
            if res["error"]:
                report["failed"].append({"path": res["rel"], "error": res["error"]})
            for s in res["sums"]:
                tot += s
            n_frames += len(res["sums"])
            skipped += res["skipped"]
            report["notes"].update(res["notes"])
            report["inpainted"] += res["inpainted"]
        report["skipped_files"] = skipped
    report["failed"].sort(key=lambda r: r["path"])
    report["frames"] = n_frames
    if n_frames == 0:
        atomic_json(report, os.path.join(cfg.out, "report.json"))
        raise SystemExit(f"no frame could be read; see {os.path.join(cfg.out, 'report.json')}")
    s, ss, n = tot
    mean = s / n / 255
    std = max(ss / n / 255 ** 2 - mean ** 2, 0.0) ** 0.5
    # the frames these statistics describe, as the method scripts list OUT (they recompute on a change)
    paths, counts = list_frames(cfg.out)
    fp = fingerprint(cfg.out, paths, counts)
    stats = {"mean": [mean], "std": [std], "frames": sum(counts), "fingerprint": fp}
    atomic_json(stats, os.path.join(cfg.out, "stats.json"))
    notes = report["notes"]
    inpainted = report["inpainted"]
    too_much = sum("too_much_colour" in v for v in notes.values())
    flat = sum("not_rescaled" in v for v in notes.values())
    report.update(too_much_colour=too_much, not_rescaled=flat)
    atomic_json(report, os.path.join(cfg.out, "report.json"))
    print(f"{n_frames} frames from {len(rels)} files -> {cfg.out} in {time.time() - t0:.1f}s "
          f"(this run: {inpainted} inpainted, {too_much} with too much colour kept as luma, {flat} not rescaled)")
    print(f"stats.json: mean {mean:.4f}, std {std:.4f}")
    if report["failed"]:
        print(f"{len(report['failed'])} unreadable files (listed in {os.path.join(cfg.out, 'report.json')}):")
        for r in report["failed"][:10]:
            print(f"  {r['path']}: {r['error']}")
    return report


if __name__ == "__main__":
    main(parse_args())
