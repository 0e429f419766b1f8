"""Gated-attention MIL on frozen pretext features: the paper's histopathology evaluation (Table 3, section 4.2,
appendix 0.C and 0.D.2).

    python prep/wsi.py tile slides/slides.csv --out data/patches          # 224 px, 20x, Reinhard (prep/wsi.py)
    python prep/wsi.py split slides/slides.csv --out data/splits.csv      # 70/10/20 by patient
    python abmil.py runs/mae/ckpt.safetensors runs/dino/ckpt.safetensors runs/ijepa/ckpt.safetensors \\
        --patches data/patches --splits data/splits.csv --out runs/abmil/cptac_lung       # 1 GPU (or CPU)
    torchrun --nproc_per_node=8 abmil.py runs/*/ckpt.safetensors --patches data/patches --splits data/splits.csv
        # 8 GPUs: the slides' embedding is sharded over ranks (rank r takes slides r::world), rank 0 trains

Features. Each slide's patches.npy (uint8, memory-mapped) is read in batches by a prefetch thread, resized on
the device from 224 to --img-size 256 ("resized to 256 for inference", 0.C; bilinear, antialiased), standardised
with the checkpoint's mean/std and pooled as the checkpoint says (vit.ViT.embed: CLS for MAE / DINOv3, mean of
the patch tokens for I-JEPA), bf16 autocast on CUDA. Cached as OUT/features/<sha256 of the checkpoint>-<px>px/
<slide>.npz = features (n, D) float32, the patch indices and their level-0 coords, so re-runs and new seeds
cost nothing. --max-patches caps the data set (0.C: "sub-sampled each downstream dataset to 2 million patches
and used the same subset for each SSL method"): every slide keeps floor(n * cap / total) patches (at least
one), drawn with rng(subset_seed, crc32(slide)); the subset depends only on the patch counts, never on the
checkpoint.

ABMIL (Ilse et al. 2018, gated attention, eq. 9) with CLAM's sizes (CLAM models/model_clam.py:41-62, 76-186,
the ABMIL that pathology foundation-model papers run), for D-dim features (384 for ViT-S):
    H = Dropout(ReLU(Linear(D, 512) x))                      (N, 512)   per-patch embedding
    a = softmax_N( w^T (tanh(V H) * sigmoid(U H)) )           (N,)       V, U: Linear(512, 256), w: Linear(256, 1)
    z = a^T H                                                 (512,)     attention pooling
    logits = Linear(512, C) z                                 (C,)       softmax + cross-entropy
Dropout 0.25 after the first layer and on both gates (CLAM; Ilse uses none). Paper 0.D.2: 20 epochs, Adam, lr
1e-3, weight decay 1e-4 (Adam's L2, as Ilse's main.py), one bag per step, the epoch with the best validation
AUROC applied to test (first epoch on ties), 5 seeds (the seed sets the init, dropout and the bag order).
A bag is a slide (--bag slide) or all slides of a patient (--bag patient, "slide-level or patient-level label").
Training runs on the features' device; bags are small, so on a CPU shared with other jobs OMP_NUM_THREADS=1 is
much faster (two spinning OpenMP threads per tiny matmul).

Metrics (sklearn): AUROC = roc_auc_score on P[:, 1] for two classes, macro one-vs-rest for more; F1 = macro F1
of the argmax. Mean and sample std (ddof=1) over seeds, printed as the paper's Table 3 (one column group per
checkpoint; one data set per run, so one row) and written to OUT/table.md. Per seed: OUT/<ckpt>/seed<k>.json
with the validation history, the best epoch and every test bag's probabilities. Top-10 attention patches of
every bag (section 4.2: "we extract the top 10 highest-scoring patches per WSI") from the first seed's model:
OUT/<ckpt>/topk/<bag>/<rank>_<slide>_x<x>_y<y>.png (the stored 224 px patch, before the resize to 256) and
OUT/<ckpt>/topk.json (slide, row of patches.npy, level-0 x, y, attention) for viz.py.

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
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import vit

SPLITS = ("train", "val", "test")
NAMES = {"mae": "MAE", "dino": "DINOv3", "ijepa": "I-JEPA"}     # column-group names as the paper's tables

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    ckpts: list = field(default_factory=list)   # pretext checkpoints (positional)
    patches: str = ""             # prep/wsi.py tile output: <slide>/{patches,coords}.npy
    splits: str = ""              # CSV slide, patient, label, split (prep/wsi.py split)
    out: str = "runs/abmil"
    name: str = ""                # table row name; default: the splits file's name (its folder's for splits.csv)
    bag: str = "slide"            # slide | patient
    img_size: int = 256           # inference size (0.C: 224 px patches resized to 256); 0 = the checkpoint's
    batch_size: int = 256         # patches per encoder forward
    max_patches: int = 2_000_000  # cap per data set (0.C), the same subset for every checkpoint; 0 = no cap
    subset_seed: int = 0
    hidden: int = 512             # CLAM: Linear(D, 512)
    attn_dim: int = 256           # CLAM: gated attention 512 -> 256 -> 1
    dropout: float = 0.25         # CLAM
    epochs: int = 20              # 0.D.2
    lr: float = 1e-3              # 0.D.2
    weight_decay: float = 1e-4    # 0.D.2
    seeds: int = 5                # 0.D.2
    seed: int = 0                 # seeds are seed, seed + 1, ...
    topk: int = 10                # attention patches exported per bag (section 4.2); 0 = none
    device: str = "auto"          # auto | cpu | cuda | cuda:1 ...


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", help="pretext checkpoints (convert official ones with `vit.py convert`)")
    for f in fields(Config):
        if f.name == "ckpts":
            continue
        name = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(name, type=type(f.default), default=f.default, required=f.name in ("patches", "splits"))
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.bag not in ("slide", "patient"):
        p.error(f"--bag must be slide or patient, got {cfg.bag!r}")
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
    slides, skipped = {}, []
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

# -----------------------------------------------------------------------------
# features


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@torch.no_grad()
def embed(model, meta, patches, idx, size, batch_size, device):
    """uint8 patches[idx] (n, 224, 224, 3) -> (n, D) float32 features, resized to size and pooled per meta."""
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
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                z = model.embed((x - mean) / std, meta["pool"])                       # (B, D)
            out.append(z.float().cpu())
    return torch.cat(out)


def slide_features(ck, slides, idx, cfg, device, rank=0, world=1):
    """{slide: (n, D) float32} for every slide; computes (this rank's share of) what the cache lacks."""
    from tqdm import tqdm
    size = cfg.img_size or ck["meta"]["img_size"]
    cache = os.path.join(cfg.out, "features", f"{ck['sha256'][:16]}-{size}px")
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
        if ck.get("model") is None:
            ck["model"], _ = vit.load_encoder(ck["path"], device)
        bar = tqdm(total=sum(len(idx[s]) for s in todo), desc=f"features {ck['label']}", unit="patch",
                   disable=rank != 0)
        for sid in todo:
            patches = np.load(os.path.join(slides[sid]["dir"], "patches.npy"), mmap_mode="r")  # (n, 224, 224, 3)
            z = embed(ck["model"], ck["meta"], patches, idx[sid], size, cfg.batch_size, device).numpy()
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


def metrics(y, P):
    """AUROC (binary: P[:, 1]; else macro one-vs-rest) and macro F1, sklearn, on probabilities P (N, C)."""
    from sklearn.metrics import f1_score, roc_auc_score
    P = np.asarray(P, dtype=np.float64)
    P = P / P.sum(1, keepdims=True)          # sklearn's ovr check wants rows summing to 1 in float64
    C = P.shape[1]
    if C == 2:
        auroc = roc_auc_score(y, P[:, 1])
    else:
        auroc = roc_auc_score(y, P, multi_class="ovr", average="macro", labels=list(range(C)))
    f1 = f1_score(y, P.argmax(1), average="macro", labels=list(range(C)), zero_division=0)
    return float(auroc), float(f1)


@torch.no_grad()
def predict(model, X, ids):
    """-> (len(ids), C) softmax probabilities and the mean cross-entropy, eval mode."""
    model.eval()
    logits = torch.stack([model(X[i])[0] for i in ids])                       # (n, C)
    return logits.softmax(-1).cpu().double().numpy(), logits


def train_abmil(X, y, split, n_classes, seed, cfg):
    """One seed: X list of (N_i, D) bags (on the training device), y (B,) int64 tensor, split {name: bag ids}.
    -> (model at the best validation-AUROC epoch, record with history, best epoch, val/test metrics)."""
    torch.manual_seed(seed)
    dev = X[0].device
    model = ABMIL(X[0].shape[1], n_classes, cfg.hidden, cfg.attn_dim, cfg.dropout).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = np.random.default_rng(seed)
    y_val = y[split["val"]].cpu().numpy()
    best, best_state, best_epoch, history = -math.inf, None, 0, []
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
            best, best_epoch, best_state = auroc, epoch, copy.deepcopy(model.state_dict())
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
# reporting


def fmt(m, s):
    return f"{100 * m:.1f}±{100 * s:.1f}"                    # Table 3: one decimal


def table(name, labels, results):
    """One row shaped like the paper's Table 3 (a column group per checkpoint), as text and Markdown."""
    cells = [(fmt(r["auroc_mean"], r["auroc_std"]), fmt(r["f1_mean"], r["f1_std"])) for r in results]
    w0, w = max(7, len(name)), max([11] + [len(c) for v in cells for c in v])
    lines = [f"{'':{w0}}   " + " | ".join(f"{l:^{2 * w + 2}.{2 * w + 2}}" for l in labels),
             f"{'Dataset':{w0}}   " + " | ".join(f"{'AUROC (%)':>{w}}  {'F1 (%)':>{w}}" for _ in labels)]
    lines += ["-" * len(lines[1]), f"{name:{w0}}   " + " | ".join(f"{a:>{w}}  {f:>{w}}" for a, f in cells)]
    md = ["| Dataset | " + " | ".join(f"{l} AUROC (%) | {l} F1 (%)" for l in labels) + " |",
          "|---|" + "---:|" * (2 * len(labels)), f"| {name} | " + " | ".join(" | ".join(c) for c in cells) + " |"]
    return "\n".join(lines), "\n".join(md) + "\n"


def checkpoint_labels(ckpts):
    """Column-group names: the method, with the run folder when two checkpoints share a method."""
    methods = [NAMES.get(c["meta"]["method"], c["meta"]["method"]) for c in ckpts]
    labels = [f"{m} ({os.path.basename(os.path.dirname(os.path.abspath(c['path'])))})" if methods.count(m) > 1
              else m for c, m in zip(ckpts, methods)]
    return [f"{m} ({os.path.basename(c['path'])})" if labels.count(l) > 1 else l
            for c, m, l in zip(ckpts, methods, labels)]


def main(cfg):
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = 0, 1
    if ddp:
        from datetime import timedelta
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # gloo for the barrier even on GPUs: ranks wait for the slowest one's share, which can take long
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=12))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if ddp and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    # every input error surfaces before any compute
    ckpts = []
    for p in cfg.ckpts:
        _, meta = vit.load_checkpoint(p)                     # clear error for files that are not pretext checkpoints
        if meta["in_chans"] != 3:
            raise ValueError(f"{p}: a {meta['in_chans']}-channel ({meta['method']}) encoder; ABMIL embeds RGB H&E "
                             f"patches, so give a checkpoint pretrained with --in-chans 3 on histopathology")
        ckpts.append({"path": p, "meta": meta, "sha256": sha256_file(p)})
    for c, label in zip(ckpts, checkpoint_labels(ckpts)):
        c["label"] = label
    slides, bags, classes = read_dataset(cfg)
    idx = subset(slides, cfg.max_patches, cfg.subset_seed)
    stem = os.path.splitext(os.path.basename(cfg.splits))[0]
    name = cfg.name or (os.path.basename(os.path.dirname(os.path.abspath(cfg.splits))) if stem == "splits" else stem)
    split = {s: [b for b, bag in enumerate(bags) if bag["split"] == s] for s in SPLITS}
    members = [[(sid, int(r)) for sid in bag["slides"] for r in idx[sid]] for bag in bags]
    n_all, n_used = sum(s["n"] for s in slides.values()), sum(len(v) for v in idx.values())
    if master:
        print(f"{name}: {len(slides)} slides, {len(bags)} {cfg.bag} bags, classes {classes}, train/val/test "
              f"{'/'.join(str(len(split[s])) for s in SPLITS)}; {n_used} of {n_all} patches"
              + (f" (--max-patches {cfg.max_patches}, seed {cfg.subset_seed})" if n_used < n_all else "")
              + f"; {len(ckpts)} checkpoint(s) on {device}" + (f" x {world} ranks" if ddp else ""))
        os.makedirs(cfg.out, exist_ok=True)
    y = torch.tensor([bag["label"] for bag in bags])
    results, doc = [], None
    for ck in ckpts:
        t0 = time.time()
        feats = slide_features(ck, slides, idx, cfg, device, rank, world)
        ck.pop("model", None)
        if not master:
            continue
        t1 = time.time()
        X = [torch.cat([feats[sid] for sid in bag["slides"]]).to(device) for bag in bags]   # (N_i, D) per bag
        yd = y.to(device)
        out_dir = os.path.join(cfg.out, f"{ck['meta']['method']}-{ck['sha256'][:8]}")
        os.makedirs(out_dir, exist_ok=True)
        runs = []
        for k in range(cfg.seeds):
            model, rec = train_abmil(X, yd, split, len(classes), cfg.seed + k, cfg)
            rec.update(checkpoint=os.path.abspath(ck["path"]), sha256=ck["sha256"], classes=classes,
                       test_bags=[bags[b]["name"] for b in split["test"]], test_labels=y[split["test"]].tolist())
            with open(os.path.join(out_dir, f"seed{cfg.seed + k}.json"), "w") as f:
                json.dump(rec, f, indent=1)
            runs.append(rec)
            if k == 0 and cfg.topk > 0:
                export_topk(model, X, bags, members, slides, cfg.topk, out_dir)
        a, f1 = np.array([r["auroc"] for r in runs]), np.array([r["f1"] for r in runs])
        sd = lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0   # noqa: E731
        results.append({"label": ck["label"], "path": os.path.abspath(ck["path"]), "sha256": ck["sha256"],
                        "dir": out_dir, "auroc_mean": float(a.mean()), "auroc_std": sd(a),
                        "f1_mean": float(f1.mean()), "f1_std": sd(f1),
                        "seeds": [{k: r[k] for k in ("seed", "best_epoch", "val_auroc", "auroc", "f1")} for r in runs]})
        r = results[-1]
        print(f"{ck['label']:>12} | {name}: AUROC {fmt(r['auroc_mean'], r['auroc_std'])}  F1 "
              f"{fmt(r['f1_mean'], r['f1_std'])}  best epochs {[s['best_epoch'] for s in r['seeds']]}  "
              f"(features {t1 - t0:.1f}s, ABMIL {time.time() - t1:.1f}s) -> {out_dir}")
        doc = {"dataset": name, "classes": classes, "bag": cfg.bag, "config": asdict(cfg),
               "n_bags": {s: len(split[s]) for s in SPLITS}, "n_patches": n_used, "n_patches_tiled": n_all,
               "protocol": {"optimizer": "Adam (L2 weight decay)", "selection": "best validation AUROC epoch",
                            "auroc": "binary on P[:,1]; macro one-vs-rest", "f1": "macro",
                            "std": "sample std over seeds (ddof=1)"},
               "results": results}
        tmp = os.path.join(cfg.out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, os.path.join(cfg.out, "results.json"))
    if ddp:
        torch.distributed.destroy_process_group()
    if not master:
        return None
    text, md = table(name, [r["label"] for r in results], results)
    print(f"\nABMIL on frozen features, test split, mean±std over {cfg.seeds} seeds (%; F1 = macro)\n{text}")
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(md)
    print(f"\n{os.path.join(cfg.out, 'results.json')}, {os.path.join(cfg.out, 'table.md')}, per-seed JSON and "
          f"top-{cfg.topk} attention patches under each checkpoint's folder")
    return doc


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError) as e:             # bad input: the message names the file and the fix
        sys.exit(f"abmil.py: {e}")
