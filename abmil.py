"""Gated-attention MIL on frozen pretext features: the paper's histopathology evaluation (Table 3, section 4.2,
appendix 0.C and 0.D.2), read against "no pretraining" (random twins, raw pixels) with bootstrap CIs and paired
tests over the test bags.

    python prep/wsi.py tile slides/slides.csv --out data/patches          # 224 px, 20x, Reinhard (prep/wsi.py)
    python prep/wsi.py split slides/slides.csv --out data/splits.csv      # 70/10/20 by patient
    python abmil.py runs/mae/ckpt.safetensors runs/dino/ckpt.safetensors runs/ijepa/ckpt.safetensors \\
        --patches data/patches --splits data/splits.csv --out runs/abmil/cptac_lung       # 1 GPU (or CPU)
    torchrun --nproc_per_node=8 abmil.py runs/*/ckpt.safetensors --patches data/patches --splits data/splits.csv
        # 8 GPUs: the slides' embedding is sharded over ranks (rank r takes slides r::world), rank 0 trains

Features. Each slide's patches.npy (uint8, memory-mapped) is read in batches by a prefetch thread, resized on
the device from 224 to --img-size 256 ("resized to 256 for inference", 0.C; bilinear, antialiased), standardised
with the checkpoint's mean/std and pooled as the checkpoint says (vit.ViT.embed: CLS for MAE / DINOv3, mean of
the patch tokens for I-JEPA), bf16 autocast on CUDA. Cached as OUT/features/<sha256 of the encoder>-<px>px/
<slide>.npz = features (n, D) float32, the patch indices and their level-0 coords, so re-runs and new seeds
cost nothing. --max-patches caps the data set (0.C: "sub-sampled each downstream dataset to 2 million patches
and used the same subset for each SSL method"): every slide keeps floor(n * cap / total) patches (at least
one), drawn with rng(subset_seed, crc32(slide)); the subset depends only on the patch counts, never on the
checkpoint.

Controls (on by default; --no-controls skips them), through the same ABMIL, seeds and metrics:
- "own init": OUT_RUN/init.safetensors beside each checkpoint (the method run's encoder at step 0, its own
  pooling and mean/std); when absent the table says so and nothing replaces it;
- "ViT init": vit.ViT of the checkpoint's config, vit.py's default init under torch seed --twin-seed, with the
  checkpoint's pooling and mean/std;
- "raw pixels": each 224 px patch resized to --pixel-grid x --pixel-grid RGB (bilinear, antialiased), in [0, 1],
  flattened and z-scored per dimension with the train bags' patches: a per-patch feature that no encoder made.

ABMIL (Ilse et al. 2018, gated attention, eq. 9) with CLAM's sizes (CLAM models/model_clam.py:41-62, 76-186,
the ABMIL that pathology foundation-model papers run), for D-dim features (384 for ViT-S):
    H = Dropout(ReLU(Linear(D, 512) x))                      (N, 512)   per-patch embedding
    a = softmax_N( w^T (tanh(V H) * sigmoid(U H)) )           (N,)       V, U: Linear(512, 256), w: Linear(256, 1)
    z = a^T H                                                 (512,)     attention pooling
    logits = Linear(512, C) z                                 (C,)       softmax + cross-entropy
Dropout 0.25 after the first layer and on both gates (CLAM; Ilse uses none). Paper 0.D.2: 20 epochs, Adam, lr
1e-3, weight decay 1e-4 (Adam's L2, as Ilse's main.py), one bag per step, the epoch with the best validation
AUROC applied to test (first epoch on ties), 5 seeds (the seed sets the init, dropout and the bag order). A bag
is a slide (--bag slide) or all slides of a patient (--bag patient, "slide-level or patient-level label").
Training runs on the features' device, seed after seed; on CPU with one thread (one-bag steps are small, and
on a shared CPU two spinning OpenMP threads per matmul lose). A step costs about 3 x N x (D + 2 x 256) x 512
multiply-adds with backward (N patches; most of it in the two 512 -> 256 gates): --hidden / --attn-dim scale it.

Metrics (sklearn): AUROC = roc_auc_score on P[:, 1] for two classes, macro one-vs-rest for more; F1 = macro F1
of the argmax; mean and sample std (ddof=1) over seeds. Over the TEST BAGS, for the seed-mean AUROC (probe.py's
statistics): 95% CIs from --boot stratified bootstrap resamples (numpy seed --boot-seed) and paired comparisons
(each trained checkpoint against its twins and the raw pixels, and every pair of trained checkpoints): the
AUROC difference, its paired bootstrap 95% CI and DeLong's two-sided p. Printed as the paper's Table 3 (rows =
encoders, one data set per run; then the paired comparisons), with the paper's reported Table 3 beside them
when the data set's name matches one of its data sets (or all of it with --paper), and written to OUT/table.md.
Per seed: OUT/<encoder>/seed<k>.json with the validation history, the best epoch and every test bag's
probabilities. Top-10 attention patches of every bag (section 4.2: "we extract the top 10 highest-scoring
patches per WSI") from the first seed's model of each trained checkpoint: OUT/<ckpt>/topk/<bag>/
<rank>_<slide>_x<x>_y<y>.png (the stored 224 px patch, before the resize to 256) and OUT/<ckpt>/topk.json
(slide, row of patches.npy, level-0 x, y, attention) for viz.py.

Never overwritten: OUT/results.json gathers every encoder evaluated into OUT on its data set, keyed as in probe.py
(a checkpoint by its sha256, a twin by its weights and preprocessing); a later run adds its encoders, keeps (and
reuses) those already there, and the tables show all of them. Another data set (bags, labels, splits or patch
subset), other ABMIL settings, or a results.json that is unreadable or of an older format is refused before any
compute, the file untouched: use another --out.

Not in the paper: its code is not public, so CLAM's dimensions and dropout are our choice; class-balanced
sampling (CLAM's option) is not used; every split must hold every class (checked before any compute).
"""
import argparse
import copy
import csv
import hashlib
import json
import math
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import vit
from probe import (add_config_flags, add_encoder, checkpoint_labels, comparison_table, encoder_rows, fmt_ci,
                   fmt_sd, grid_table, item_statistics, load_results, metrics, own_init_twin, paper_matches,
                   paper_table, read_checkpoint, summarise_seeds, vit_init_twin, write_atomic)

SPLITS = ("train", "val", "test")
RESULTS_FORMAT = "pretext-abmil-3"   # 3: twins keyed as probe.twin_key
# the settings that change ABMIL's numbers: results.json only gathers runs that agree on all of them
PROTOCOL = ("img_size", "hidden", "attn_dim", "dropout", "epochs", "lr", "weight_decay", "seeds", "seed")

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    ckpts: list = field(default_factory=list)   # pretext checkpoints (positional)
    patches: str = ""             # folder written by prep/wsi.py tile: <slide>/{patches,coords}.npy, meta.json
    splits: str = ""              # CSV slide, patient, label, split (prep/wsi.py split)
    out: str = "runs/abmil"       # results.json, table.md, per-encoder folders, the feature cache (kept)
    name: str = ""                # data set name in the tables; default: the splits file's (splits.csv: its folder's)
    bag: str = "slide"            # what a bag is: slide | patient (all slides of a patient)
    img_size: int = 256           # inference size (0.C: 224 px patches resized to 256); 0 = the checkpoint's
    batch_size: int = 256         # patches per encoder forward pass
    max_patches: int = 2_000_000  # cap per data set (0.C), the same subset for every checkpoint; 0 = no cap
    subset_seed: int = 0          # seed of that subset
    hidden: int = 512             # per-patch embedding width (CLAM: Linear(D, 512))
    attn_dim: int = 256           # gated-attention width (CLAM: 512 -> 256 -> 1)
    dropout: float = 0.25         # dropout after the embedding and on both gates (CLAM: 0.25)
    epochs: int = 20              # training epochs, one bag per step (0.D.2: 20)
    lr: float = 1e-3              # Adam learning rate (0.D.2: 1e-3)
    weight_decay: float = 1e-4    # Adam's L2 weight decay (0.D.2: 1e-4)
    seeds: int = 5                # ABMIL runs per encoder, averaged (0.D.2: 5)
    seed: int = 0                 # first seed; the seeds are seed, seed + 1, ...
    topk: int = 10                # attention patches exported per bag (section 4.2); 0 = none
    controls: bool = True         # evaluate each checkpoint's own-init and ViT-init twins and a raw-pixel baseline
    twin_seed: int = 0            # torch seed of the ViT-init twin's default initialisation
    pixel_grid: int = 16          # raw-pixel baseline: each patch resized to this many pixels a side (RGB)
    boot: int = 2000              # bootstrap resamples of the test bags for the CIs and paired differences
    boot_seed: int = 0            # numpy seed of the bootstrap resamples
    paper: bool = False           # print the paper's whole Table 3, not only a data set matching the name
    device: str = "auto"          # auto | cpu | cuda | cuda:1 ...


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", help="pretext checkpoints (convert official ones with `vit.py convert`)")
    add_config_flags(p, Config, skip=("ckpts",), required=("patches", "splits"))
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.bag not in ("slide", "patient"):
        p.error(f"--bag must be slide or patient, got {cfg.bag!r}")
    for name in ("seeds", "epochs", "boot", "pixel_grid", "batch_size"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    return cfg

# -----------------------------------------------------------------------------
# data set: splits.csv + prep/wsi.py folders -> bags


def read_dataset(cfg):
    """-> (slides {id: dict(dir, n, label, patient, split)}, bags [dict(name, slides, label, split)], classes)."""
    if not os.path.isfile(cfg.splits):
        raise ValueError(f"{cfg.splits}: no such splits CSV (write one with `python prep/wsi.py split`)")
    with open(cfg.splits, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"slide", "patient", "label", "split"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{cfg.splits}: needs columns slide, patient, label, split (missing {sorted(missing)}); "
                         f"`python prep/wsi.py split slides.csv --out splits.csv` writes them")
    slides = {}
    skipped = []
    for i, r in enumerate(rows):
        if r["split"] not in SPLITS:
            raise ValueError(f"{cfg.splits}: row {i + 2}: split {r['split']!r} is not train, val or test")
        sid = os.path.splitext(os.path.basename(r["slide"]))[0]     # prep/wsi.py names folders this way
        d = os.path.join(cfg.patches, sid)
        if not os.path.exists(os.path.join(d, "meta.json")):
            skipped.append(f"{sid} (not tiled: see {os.path.join(cfg.patches, 'summary.json')})")
            continue
        n = len(np.load(os.path.join(d, "coords.npy"), mmap_mode="r"))
        if n == 0:
            skipped.append(f"{sid} (no tissue patches)")
            continue
        slides[sid] = {"dir": d, "n": n, "label": r["label"].strip(), "patient": r["patient"], "split": r["split"]}
    if not slides:
        raise ValueError(f"no slide of {cfg.splits} is tiled under {cfg.patches} (expected <slide>/meta.json, "
                         f"coords.npy, patches.npy); run `python prep/wsi.py tile ... --out {cfg.patches}`")
    if skipped:
        print(f"warning: {len(skipped)} slide(s) of {cfg.splits} left out: " + ", ".join(skipped[:10])
              + (" ..." if len(skipped) > 10 else ""))
    names = sorted({s["label"] for s in slides.values()},
                   key=lambda c: (not c.lstrip("-").isdigit(), int(c) if c.lstrip("-").isdigit() else 0, c))
    groups = {}
    for sid, s in slides.items():
        key = sid if cfg.bag == "slide" else s["patient"]
        groups.setdefault(key, []).append(sid)
    bags = []
    for key, members in groups.items():
        labs = {slides[m]["label"] for m in members}
        spl = {slides[m]["split"] for m in members}
        if len(spl) > 1:
            raise ValueError(f"{cfg.splits}: patient {key} is in splits {sorted(spl)}; a patient must be in one "
                             f"split (prep/wsi.py split guarantees it)")
        if len(labs) > 1:
            raise ValueError(f"{cfg.splits}: patient {key} has slides with labels {sorted(labs)}; use --bag slide")
        bags.append({"name": key, "slides": members, "label": names.index(labs.pop()), "split": spl.pop()})
    if len(names) < 2:
        raise ValueError(f"{cfg.splits}: only the class(es) {names} among the tiled slides; ABMIL needs two or more")
    for s in SPLITS:
        counts = np.bincount([b["label"] for b in bags if b["split"] == s], minlength=len(names))
        if (counts == 0).any():
            raise ValueError(f"{cfg.splits}: class {names[int(np.argmin(counts))]!r} has no tiled {cfg.bag} in the "
                             f"{s!r} split (counts {dict(zip(names, counts.tolist()))}); AUROC and macro-F1 need "
                             f"every class in every split: re-split (prep/wsi.py split stratifies by label)")
    return slides, bags, names


def subset(slides, cap, seed):
    """{slide: sorted patch indices}: all patches, or a seeded proportional subset of `cap` in total."""
    total = sum(s["n"] for s in slides.values())
    out = {}
    for sid, s in slides.items():
        if cap <= 0 or total <= cap:
            out[sid] = np.arange(s["n"])
            continue
        k = max(1, s["n"] * cap // total)
        rng = np.random.default_rng([seed, zlib.crc32(sid.encode())])   # per slide: independent of the others
        out[sid] = np.sort(rng.choice(s["n"], size=k, replace=False))
    return out


def dataset_fingerprint(bags, classes, idx, cfg):
    """sha256 of what the numbers depend on besides the encoder: the bags (slides, labels, splits), the classes
    and each slide's patch subset."""
    sub = {sid: hashlib.sha256(v.tobytes()).hexdigest() for sid, v in sorted(idx.items())}
    key = [[(b["name"], b["slides"], b["label"], b["split"]) for b in bags], classes, cfg.bag, sub]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()

# -----------------------------------------------------------------------------
# features


def pixel_encoder(grid):
    """The raw-pixel baseline: each patch at grid x grid RGB."""
    key = f"raw-pixels-{grid}x{grid}x3"
    meta = {"method": "pixels", "img_size": grid, "in_chans": 3, "pool": "none", "mean": None, "std": None}
    return {"kind": "raw pixels", "path": None, "meta": meta, "sha256": hashlib.sha256(key.encode()).hexdigest(),
            "key": key, "label": f"raw pixels ({grid}x{grid} RGB)"}


@torch.no_grad()
def embed(enc, patches, idx, size, batch_size, device):
    """uint8 patches[idx] (n, 224, 224, 3) -> (n, D) float32 features: resized to size, then the encoder (pooled
    per its meta, standardised with its mean/std), or for the raw pixels the resized patch itself in [0, 1]."""
    meta = enc["meta"]
    pixels = enc["kind"] == "raw pixels"
    if not pixels:
        mean = torch.tensor(meta["mean"], device=device).view(1, 3, 1, 1)
        std = torch.tensor(meta["std"], device=device).view(1, 3, 1, 1)

    def load(s):                                             # (B, 224, 224, 3) uint8, pinned for async copies
        x = torch.from_numpy(np.ascontiguousarray(patches[idx[s:s + batch_size]]))
        return x.pin_memory() if device.type == "cuda" else x

    out = []
    with ThreadPoolExecutor(1) as pool:                      # disk reads overlap the encoder
        nxt = pool.submit(load, 0)
        for s in range(0, len(idx), batch_size):
            x = nxt.result()
            if s + batch_size < len(idx):
                nxt = pool.submit(load, s + batch_size)
            x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)   # (B, 3, 224, 224)
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            if pixels:
                out.append(x.flatten(1).cpu())                                           # (B, 3 * size * size)
                continue
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                z = enc["model"].embed((x - mean) / std, meta["pool"])                   # (B, D)
            out.append(z.float().cpu())
    return torch.cat(out)


def slide_features(enc, slides, idx, cfg, device, rank=0, world=1):
    """{slide: (n, D) float32} for every slide; computes (this rank's share of) what the cache lacks."""
    from tqdm import tqdm
    if enc["kind"] == "raw pixels":
        size = cfg.pixel_grid
    else:
        size = cfg.img_size or enc["meta"]["img_size"]
    cache = os.path.join(cfg.out, "features", f"{enc['sha256'][:16]}-{size}px")
    os.makedirs(cache, exist_ok=True)

    def cached(sid):
        path = os.path.join(cache, f"{sid}.npz")
        if not os.path.exists(path):
            return None
        z = np.load(path)
        coords = np.load(os.path.join(slides[sid]["dir"], "coords.npy"), mmap_mode="r")[idx[sid]]
        if not (np.array_equal(z["idx"], idx[sid]) and np.array_equal(z["coords"], coords)):
            return None                                      # another subset or a re-tiled slide
        return z["features"]

    todo = [sid for i, sid in enumerate(sorted(slides)) if i % world == rank and cached(sid) is None]
    if todo:
        if enc["kind"] != "raw pixels" and enc.get("model") is None:
            enc["model"], _ = vit.load_encoder(enc["path"], device)
        if enc.get("model") is not None:
            enc["model"].to(device).eval()
        bar = tqdm(total=sum(len(idx[s]) for s in todo), desc=f"features {enc['label']}", unit="patch",
                   disable=rank != 0)
        for sid in todo:
            patches = np.load(os.path.join(slides[sid]["dir"], "patches.npy"), mmap_mode="r")  # (n, 224, 224, 3)
            z = embed(enc, patches, idx[sid], size, cfg.batch_size, device).numpy()
            coords = np.load(os.path.join(slides[sid]["dir"], "coords.npy"))[idx[sid]]
            tmp = os.path.join(cache, f"{sid}.tmp.npz")
            np.savez(tmp, features=z, idx=idx[sid], coords=coords)
            os.replace(tmp, os.path.join(cache, f"{sid}.npz"))
            bar.update(len(idx[sid]))
        bar.close()
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    feats = {}
    for sid in slides:
        z = cached(sid)
        if z is None:
            raise RuntimeError(f"features of {sid} are missing from {cache} after embedding")
        feats[sid] = torch.from_numpy(z)
    return feats

# -----------------------------------------------------------------------------
# ABMIL


class ABMIL(nn.Module):
    """Gated attention MIL (Ilse et al. 2018, eq. 9) with CLAM's sizes; one bag (N, D) at a time."""

    def __init__(self, dim, n_classes, hidden=512, attn_dim=256, dropout=0.25):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_V = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_U = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x):
        """x (N, D) -> logits (C,), attention a (N,) summing to 1."""
        h = self.fc(x)                                                        # (N, hidden)
        a = self.attention_w(self.attention_V(h) * self.attention_U(h))[:, 0]  # (N,) attention logits
        a = torch.softmax(a, dim=0)                                           # over the bag's patches
        return self.classifier(a @ h), a                                      # (C,), (N,)


@torch.no_grad()
def predict(model, X, ids):
    """-> (len(ids), C) softmax probabilities and the logits, eval mode."""
    model.eval()
    logits = torch.stack([model(X[i])[0] for i in ids])                       # (n, C)
    return logits.softmax(-1).cpu().double().numpy(), logits


def train_abmil(X, y, split, n_classes, seed, cfg):
    """One seed: X list of (N_i, D) bags (on the training device), y (B,) int64 tensor, split {name: bag ids}.
    -> (model at the best validation-AUROC epoch, record with history, best epoch, val/test metrics)."""
    threads = torch.get_num_threads()
    if X[0].device.type == "cpu":
        torch.set_num_threads(1)       # one-bag steps: a second thread on a shared CPU only adds spinning
    try:
        return _train_abmil(X, y, split, n_classes, seed, cfg)
    finally:
        torch.set_num_threads(threads)


def _train_abmil(X, y, split, n_classes, seed, cfg):
    torch.manual_seed(seed)
    dev = X[0].device
    model = ABMIL(X[0].shape[1], n_classes, cfg.hidden, cfg.attn_dim, cfg.dropout).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = np.random.default_rng(seed)
    y_val = y[split["val"]].cpu().numpy()
    best = -math.inf
    best_state = None
    best_epoch = 0
    history = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total = torch.zeros((), device=dev)
        for i in order.permutation(split["train"]):
            logits, _ = model(X[i])
            loss = F.cross_entropy(logits[None], y[i:i + 1])                # batch of one bag (0.D.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        P, logits = predict(model, X, split["val"])
        val_loss = F.cross_entropy(logits, y[split["val"]]).item()
        auroc, f1 = metrics(y_val, P)
        history.append({"epoch": epoch, "train_loss": total.item() / len(split["train"]), "val_loss": val_loss,
                        "val_auroc": auroc, "val_f1": f1})
        if auroc > best:                                                      # first best epoch on ties
            best = auroc
            best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    P, _ = predict(model, X, split["test"])
    auroc, f1 = metrics(y[split["test"]].cpu().numpy(), P)
    return model, {"seed": seed, "best_epoch": best_epoch, "val_auroc": best, "auroc": auroc, "f1": f1,
                   "history": history, "test_probs": P.tolist()}

# -----------------------------------------------------------------------------
# top-k attention patches (section 4.2)


@torch.no_grad()
def export_topk(model, X, bags, members, slides, k, out_dir):
    """PNG + JSON of each bag's k highest-attention patches; members[b] = [(slide, patches.npy row), ...]."""
    model.eval()
    index = {}
    for b, bag in enumerate(bags):
        logits, a = model(X[b])
        a = a.cpu().numpy()
        top = np.argsort(-a, kind="stable")[:k]
        d = os.path.join(out_dir, "topk", bag["name"])
        os.makedirs(d, exist_ok=True)
        rows = []
        for r, j in enumerate(top):
            sid, row = members[b][j]
            x, y = (int(v) for v in np.load(os.path.join(slides[sid]["dir"], "coords.npy"), mmap_mode="r")[row])
            png = os.path.join(d, f"{r:02d}_{sid}_x{x}_y{y}.png")
            Image.fromarray(np.load(os.path.join(slides[sid]["dir"], "patches.npy"), mmap_mode="r")[row]).save(png)
            rows.append({"rank": r, "slide": sid, "row": int(row), "x": x, "y": y, "attention": float(a[j]),
                         "png": os.path.relpath(png, out_dir)})
        index[bag["name"]] = {"label": bag["label"], "split": bag["split"], "n_patches": len(a),
                              "pred": int(logits.argmax()), "top": rows}
    with open(os.path.join(out_dir, "topk.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index

# -----------------------------------------------------------------------------
# the paper's reported numbers (Pretext Matters, Table 3: ABMIL, mean +- std over 5 seeds, %)

PAPER_TABLE3 = {   # dataset: {method: (AUROC mean, std, F1 mean, std)}
    "CPTAC-Lung": {"MAE": (77.1, 4.2, 27.2, 33.3), "DINOv3": (91.4, 1.0, 83.3, 1.4), "I-JEPA": (54.8, 1.3, 31.6, 29.4)},
    "PLCO-Lung": {"MAE": (63.8, 0.9, 30.6, 13.7), "DINOv3": (82.9, 1.3, 66.8, 5.3), "I-JEPA": (57.4, 8.4, 21.8, 26.7)},
    "PLCO-Breast": {"MAE": (49.2, 2.2, 26.5, 6.2), "DINOv3": (65.2, 1.1, 38.7, 8.5), "I-JEPA": (52.3, 6.2, 11.6, 8.6)},
    "Ovarian": {"MAE": (73.5, 0.7, 34.1, 7.3), "DINOv3": (92.0, 1.8, 73.3, 2.4), "I-JEPA": (55.2, 4.3, 4.5, 2.0)},
    "PANDA": {"MAE": (81.9, 0.2, 44.2, 0.3), "DINOv3": (87.0, 0.3, 53.9, 0.8), "I-JEPA": (64.0, 0.6, 22.7, 1.5)},
}
PAPER_TABLE3_ALIASES = {"cptac": "CPTAC-Lung", "plcolung": "PLCO-Lung", "plcobreast": "PLCO-Breast",
                        "ovarian": "Ovarian", "ubcocean": "Ovarian", "panda": "PANDA"}

# -----------------------------------------------------------------------------
# reporting


def abmil_tables(doc):
    """CIs and comparisons recomputed from the stored test probabilities (stored back) -> text, Markdown."""
    enc = doc["encoders"]
    y = np.array(doc["test_labels"])
    probs = {k: np.array([s["test_probs"] for s in r["seeds"]]) for k, r in doc["results"].items()}   # (S, n, C)
    trained = [k for k in enc if enc[k]["kind"] == "trained" and k in probs]
    twins = {k: enc[k].get("twins", {}) for k in trained}
    pixels = next((k for k in probs if enc[k]["kind"] == "raw pixels"), None)
    doc["statistics"], doc["comparisons"] = item_statistics(y, probs, trained, twins, pixels,
                                                            doc["bootstrap"]["resamples"], doc["bootstrap"]["seed"])
    group = f"{doc['dataset']} (test n={len(y)} {doc['bag']}s)"

    def cell(k, g):
        if k not in doc["results"]:
            return None
        r = doc["results"][k]
        return [fmt_ci(doc["statistics"][k]["auroc"], doc["statistics"][k]["ci"], 1),
                fmt_sd(r["f1_mean"], r["f1_std"], 1)]

    rows, notes = encoder_rows(enc, 1, cell, 2)
    title = (f"ABMIL on frozen features (Table 3 protocol), test split, {doc['protocol']['seeds']} seeds. AUROC (%): "
             f"mean over seeds [95% CI: stratified bootstrap over the test {doc['bag']}s, "
             f"{doc['bootstrap']['resamples']} resamples]; F1 (%): macro, mean±std over seeds")
    t1, m1 = grid_table(title, "encoder", [group], ["AUROC (%) [95% CI]", "F1 (%)"], rows, notes)
    t2, m2 = comparison_table(enc, [group], [doc["comparisons"]], f"{doc['bag']}s", 1)
    return f"{t1}\n\n{t2}", f"{m1}\n{m2}"


def main(cfg):
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = 0
    world = 1
    if ddp:
        from datetime import timedelta
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # gloo for the barrier even on GPUs: ranks wait for the slowest one's share, which can take long
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=12))
    try:
        return evaluate_all(cfg, ddp, rank, world)
    finally:
        if ddp:
            torch.distributed.destroy_process_group()


def evaluate_all(cfg, ddp, rank, world):
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if ddp and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    # every input error surfaces before any compute
    ckpts = []
    for p in cfg.ckpts:
        ck = read_checkpoint(p)                              # clear error for files that are not pretext checkpoints
        if ck["meta"]["in_chans"] != 3:
            raise ValueError(f"{p}: a {ck['meta']['in_chans']}-channel ({ck['meta']['method']}) encoder; ABMIL "
                             f"embeds RGB H&E patches, so give a checkpoint pretrained with --in-chans 3 on "
                             f"histopathology")
        ck["key"] = ck["sha256"]
        ckpts.append(ck)
    slides, bags, classes = read_dataset(cfg)
    idx = subset(slides, cfg.max_patches, cfg.subset_seed)
    stem = os.path.splitext(os.path.basename(cfg.splits))[0]
    name = cfg.name or (os.path.basename(os.path.dirname(os.path.abspath(cfg.splits))) if stem == "splits" else stem)
    split = {s: [b for b, bag in enumerate(bags) if bag["split"] == s] for s in SPLITS}
    members = [[(sid, int(r)) for sid in bag["slides"] for r in idx[sid]] for bag in bags]
    n_all = sum(s["n"] for s in slides.values())
    n_used = sum(len(v) for v in idx.values())
    fingerprint = dataset_fingerprint(bags, classes, idx, cfg)
    protocol = {k: getattr(cfg, k) for k in PROTOCOL}
    res_path = os.path.join(cfg.out, "results.json")
    doc = load_results(res_path, RESULTS_FORMAT, protocol, "ABMIL results")
    if doc is not None and doc["fingerprint"] != fingerprint:
        raise ValueError(f"{res_path}: holds ABMIL results of another data set ({doc['dataset']}: other bags, labels, "
                         f"splits or patch subset); it is kept as it is: choose another --out")
    if doc is None:
        doc = {"format": RESULTS_FORMAT, "dataset": name, "fingerprint": fingerprint, "classes": classes,
               "bag": cfg.bag, "n_bags": {s: len(split[s]) for s in SPLITS}, "n_patches": n_used,
               "n_patches_tiled": n_all, "test_bags": [bags[b]["name"] for b in split["test"]],
               "test_labels": [bags[b]["label"] for b in split["test"]], "protocol": protocol, "encoders": {},
               "results": {}}
    doc["protocol"].update(optimizer="Adam (L2 weight decay)", selection="best validation AUROC epoch",
                           auroc="binary on P[:,1]; macro one-vs-rest", f1="macro",
                           std="sample std over seeds (ddof=1)")
    doc["bootstrap"] = {"resamples": cfg.boot, "seed": cfg.boot_seed, "method": "stratified by class, percentile "
                        "95% interval of the seed-mean AUROC; counts = probe.bootstrap_counts(test_labels, "
                        "resamples, seed)"}
    taken = {e["label"] for e in doc["encoders"].values() if e["kind"] == "trained"}
    new = [c for c in ckpts if c["key"] not in doc["encoders"]]
    for c, lab in zip(new, checkpoint_labels(new, taken)):
        c["label"] = lab
    encoders = []
    notes = []
    for c in ckpts:
        if c["key"] in doc["encoders"]:
            c["label"] = doc["encoders"][c["key"]]["label"]
        encoders.append(c)
        if not cfg.controls:
            continue
        c["twins"] = {"own init": None, "ViT init": None, "missing": {}}
        own, why = own_init_twin(c)
        if own is None:
            c["twins"]["missing"]["own init"] = why
            notes.append(f"{c['label']}: own-init twin absent ({why})")
        else:
            own["label"] = f"{c['label']} own init"
            c["twins"]["own init"] = own["key"]
            encoders.append(own)
        twin = vit_init_twin(c, cfg.twin_seed)
        twin["label"] = f"{c['label']} ViT init"
        c["twins"]["ViT init"] = twin["key"]
        encoders.append(twin)
    if cfg.controls:
        encoders.append(pixel_encoder(cfg.pixel_grid))
    unique = {}
    for e in encoders:                                       # twins shared by several checkpoints are run once
        unique.setdefault(e["key"], e)
    for e in unique.values():
        add_encoder(doc, e)
    if master:
        print(f"{name}: {len(slides)} slides, {len(bags)} {cfg.bag} bags, classes {classes}, train/val/test "
              f"{'/'.join(str(len(split[s])) for s in SPLITS)}; {n_used} of {n_all} patches"
              + (f" (--max-patches {cfg.max_patches}, seed {cfg.subset_seed})" if n_used < n_all else "")
              + f"; {len(ckpts)} checkpoint(s)" + (f" and {len(unique) - len(ckpts)} control encoder(s)"
                                                   if cfg.controls else ", no controls")
              + f" on {device}" + (f" x {world} ranks" if ddp else ""))
        for n in notes:
            print(f"  note: {n}")
        os.makedirs(cfg.out, exist_ok=True)
    y = torch.tensor([bag["label"] for bag in bags])
    for e in unique.values():
        label = doc["encoders"][e["key"]]["label"]
        if e["key"] in doc["results"]:
            if master:
                r = doc["results"][e["key"]]
                print(f"{label:>24} | {name}: AUROC {fmt_sd(r['auroc_mean'], r['auroc_std'], 1)}  (kept from an "
                      f"earlier run in {cfg.out})")
            continue
        t0 = time.time()
        e["label"] = label
        feats = slide_features(e, slides, idx, cfg, device, rank, world)
        e.pop("model", None)
        if not master:
            continue
        t1 = time.time()
        X = [torch.cat([feats[sid] for sid in bag["slides"]]).to(device) for bag in bags]   # (N_i, D) per bag
        if e["kind"] == "raw pixels":                        # z-scored with the train bags' patches
            train = torch.cat([X[b] for b in split["train"]])
            mu = train.mean(0)
            sd = train.std(0).clamp_min(1e-6)
            X = [(x - mu) / sd for x in X]
        tag = {"trained": e["meta"]["method"], "own init": f"{e['meta']['method']}-init", "ViT init": "vit-init",
               "raw pixels": "pixels"}[e["kind"]]
        out_dir = os.path.join(cfg.out, f"{tag}-{e['sha256'][:8]}")
        os.makedirs(out_dir, exist_ok=True)
        runs = []
        for k in range(cfg.seeds):
            model, rec = train_abmil(X, y.to(device), split, len(classes), cfg.seed + k, cfg)
            rec.update(encoder=label, checkpoint=os.path.abspath(e["path"]) if e["path"] else None,
                       key=e["key"], classes=classes, test_bags=doc["test_bags"], test_labels=doc["test_labels"])
            with open(os.path.join(out_dir, f"seed{rec['seed']}.json"), "w") as f:
                json.dump(rec, f, indent=1)
            runs.append(rec)
            if k == 0 and cfg.topk > 0 and e["kind"] == "trained":
                export_topk(model, X, bags, members, slides, cfg.topk, out_dir)
        keep = ("seed", "best_epoch", "val_auroc", "auroc", "f1", "test_probs")
        r = {**summarise_seeds(runs), "dir": out_dir, "seeds": [{k: rec[k] for k in keep} for rec in runs]}
        doc["results"][e["key"]] = r
        print(f"{label:>24} | {name}: AUROC {fmt_sd(r['auroc_mean'], r['auroc_std'], 1)}  F1 "
              f"{fmt_sd(r['f1_mean'], r['f1_std'], 1)}  best epochs {[s['best_epoch'] for s in r['seeds']]}  "
              f"(features {t1 - t0:.1f}s, ABMIL {time.time() - t1:.1f}s) -> {out_dir}")
        write_atomic(res_path, json.dumps(doc, indent=1, allow_nan=False))
    if not master:
        return None
    text, md = abmil_tables(doc)
    matches = paper_matches([doc["dataset"]], PAPER_TABLE3_ALIASES)
    rows = list(PAPER_TABLE3) if cfg.paper else [d for d in PAPER_TABLE3 if d in matches.values()]
    if rows:
        pt, pm = paper_table(PAPER_TABLE3, rows, matches, "Reported in Pretext Matters, Table 3 (ABMIL, ViT-S/16 "
                             "pretrained on TCGA, the real data sets, mean±std over 5 seeds, %)", 1)
        text = f"{text}\n\n{pt}"
        md = f"{md}\n{pm}"
    write_atomic(res_path, json.dumps(doc, indent=1, allow_nan=False))
    write_atomic(os.path.join(cfg.out, "table.md"), md)
    print(f"\n{text}")
    print(f"\n{res_path} (every encoder evaluated into {cfg.out}), {os.path.join(cfg.out, 'table.md')}, per-seed "
          f"JSON and top-{cfg.topk} attention patches under each encoder's folder")
    return doc


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError) as e:             # bad input: the message names the file and the fix
        sys.exit(f"abmil.py: error: {e}")
