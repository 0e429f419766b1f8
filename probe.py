"""Linear probing of frozen encoders: the paper's ultrasound evaluation (Table 2, appendix 0.D.2).

    python probe.py runs/mae/ckpt.safetensors runs/dino/ckpt.safetensors runs/ijepa/ckpt.safetensors \\
        --data ultrabench/aul_mass_v1.0.1 ultrabench/fatty_liver_v1.0.1 data/synthetic/labels.csv --out runs/probe
    python probe.py --bench          # 5 seeds x 300 epochs on 5000 cached 384-d features, timed

Tasks (--data, any mix):
- a folder TASK/{train,val,test}/<class>/*.png|jpg|... (`validation` is accepted for `val`);
- UltraBench v1.0.1: TASK/{train,validation,test}.json, lists of {"image": path relative to TASK, "label": int,
  "class" or "pathology": name}. (UltraBench >= 1.1 writes train_val.json only; the paper's splits are 1.0.1's.)
- a CSV with columns path (relative to the CSV's folder), split (train/val/test) and label; a CSV with
  several label columns instead of `label` (prep/synthetic.py's labels.csv: fatty, lesion) is one task each.
Every split must hold every class (AUROC and macro-F1 need it). Layouts and checkpoints are checked before any
compute; a missing split, an absent class, a missing or unreadable image (when first read) or a file that is
not a pretext checkpoint stops the run with a message naming it and the fix.

Features: once per (checkpoint, image list), with the checkpoint's own preprocessing (meta img_size, in_chans:
grey -> RGB by repetition or RGB -> luma, meta mean/std: for our encoders the pretraining set's statistics, as
the paper standardises downstream images) and pooling (meta pool: CLS token, or mean of the patch tokens for
I-JEPA); batched, on the GPU when there is one, no augmentation. Cached in OUT/features/ under the checkpoint
file's sha256 and the image list (paths, sizes, mtimes), so re-running, adding tasks or checkpoints only
computes what is new.

Probe, as 0.D.2: one linear layer on the frozen features, cross-entropy, batch 32, lr 1e-3, up to 300 epochs,
early stopping with patience 30 on the validation loss, the best-validation-loss epoch evaluated on test,
5 seeds (a seed sets the init, nn.Linear's U(-1/sqrt(D), 1/sqrt(D)), and the shuffling). The paper names no
optimiser and there is no public code for it (nor for US-JEPA, whose benchmark it follows): we use Adam
(0.9, 0.999, eps 1e-8), constant lr, no weight decay. US-JEPA states AdamW wd 1e-4, a cosine schedule, <= 150
epochs, patience 15; --weight-decay moves towards it. --standardize z-scores the features with the train
split's statistics (MAE-style feature scales otherwise need other learning rates; off, as in the paper).
Speed: the 5 seeds train at once as one batched linear layer W (S, C, D + 1) (bias as the last column), two
torch.bmm per minibatch indexed straight out of the feature tensor (no DataLoader), the cross-entropy
gradient written out, torch's fused Adam. Adam is elementwise and each seed's gradient is its own, so each
seed follows exactly the trajectory it would alone (tests/test_probe.py checks it against a plain one-seed
nn.Linear loop); a stopped seed keeps being updated with the others, but its best weights are kept.
`python probe.py --bench` times 5 seeds x 300 epochs on 3500 x 384 cached features (see BENCHMARKS.md).

Metrics on test (sklearn): AUROC = roc_auc_score on P[:, 1] for two classes, macro one-vs-rest over the
softmax probabilities for more; F1 = macro F1 of the argmax (the class-balanced F1 US-JEPA reports); mean and
sample std (ddof=1) over the seeds, printed as the paper's Table 2 (rows = tasks, a column group per checkpoint)
and written to OUT/table.md. OUT/results.json holds per-seed metrics, best/stopped epochs, and the test labels
and probabilities of every seed, so every number can be recomputed with sklearn.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

import vit

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
FEATURES_VERSION = 1          # bump when the image loading below changes, to invalidate cached features


@dataclass
class Config:
    ckpts: list = field(default_factory=list)   # pretext checkpoints (positional)
    data: list = field(default_factory=list)    # task folders / CSVs
    out: str = "runs/probe"
    batch_size: int = 32        # 0.D.2
    lr: float = 1e-3            # 0.D.2
    epochs: int = 300           # 0.D.2: up to 300
    patience: int = 30          # 0.D.2: early stopping on the validation loss
    seeds: int = 5              # 0.D.2: five seeds, averaged
    seed: int = 0               # seeds are seed, seed + 1, ...
    weight_decay: float = 0.0   # Adam's L2 penalty (0 = plain Adam)
    standardize: bool = False   # z-score the features with the train split's mean/std before the probe
    pad: bool = False           # pad images to a square before resizing (prep/ultrasound.py does); else squash
    img_batch: int = 64         # images per encoder forward pass
    num_workers: int = 4        # image decoding processes
    device: str = "auto"        # auto | cpu | cuda | cuda:1 ...
    bench: bool = False         # time the probe on synthetic features and exit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="*", help="pretext checkpoints (convert official ones with `vit.py convert`)")
    p.add_argument("--data", nargs="+", default=[], help="task folders or CSV files")
    for f in fields(Config):
        if f.name in ("ckpts", "data"):
            continue
        name = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(name, type=type(f.default), default=f.default)
    cfg = Config(**vars(p.parse_args(argv)))
    if not cfg.bench and (not cfg.ckpts or not cfg.data):
        p.error("give at least one checkpoint and --data TASK (or --bench)")
    return cfg

# -----------------------------------------------------------------------------
# tasks: folders, UltraBench v1.0.1 JSON, CSV -> {name, classes, splits: {split: (paths, labels)}}


def make_task(name, where, rows, names=None):
    """rows: (split, path, class name) -> task dict; checks every split exists and holds every class.
    Classes are indexed in `names` order, by default sorted (numerically when they are integers)."""
    isint = lambda c: c.lstrip("-").isdigit()   # noqa: E731
    names = names or sorted({c for _, _, c in rows}, key=lambda c: (not isint(c), int(c) if isint(c) else 0, c))
    cls = {c: i for i, c in enumerate(names)}
    splits = {}
    for s in SPLITS:
        paths = [p for sp, p, _ in rows if sp == s]
        labels = np.array([cls[c] for sp, _, c in rows if sp == s], dtype=np.int64)
        if not paths:
            raise ValueError(f"{where}: no {s!r} split; the paper selects the epoch on the validation loss and "
                             f"reports test, so every task needs train, val (or validation) and test")
        counts = np.bincount(labels, minlength=len(names))
        if (counts == 0).any():
            absent = [names[i] for i in np.nonzero(counts == 0)[0]]
            raise ValueError(f"{where}: class {absent[0]!r} has no images in the {s!r} split "
                             f"(counts {dict(zip(names, counts.tolist()))}); AUROC and macro-F1 need every class "
                             f"in every split: fix the split or drop the class")
        splits[s] = (paths, labels)
    if len(names) < 2:
        raise ValueError(f"{where}: only one class ({names}); a probe needs at least two")
    return {"name": name, "where": where, "classes": names, "splits": splits}


def read_folder_task(d):
    rows = []
    for sub in sorted(os.listdir(d)):
        s = SPLIT_NAMES.get(sub.lower())
        if s is None or not os.path.isdir(os.path.join(d, sub)):
            continue
        for c in sorted(os.listdir(os.path.join(d, sub))):
            cd = os.path.join(d, sub, c)
            if os.path.isdir(cd):
                rows += [(s, os.path.join(cd, f), c) for f in sorted(os.listdir(cd)) if f.lower().endswith(EXTS)]
    return [make_task(os.path.basename(os.path.normpath(d)), d, rows)]


def read_ultrabench_task(d):
    if not os.path.exists(os.path.join(d, "validation.json")) and os.path.exists(os.path.join(d, "train_val.json")):
        raise ValueError(f"{d}: train_val.json is UltraBench >= 1.1 (train and validation merged); the paper uses "
                         f"v1.0.1's predefined splits: `pip install ultrabench==1.0.1` and re-run `ultrabench`")
    rows = []
    for s, fname in (("train", "train.json"), ("val", "validation.json"), ("test", "test.json")):
        f = os.path.join(d, fname)
        if not os.path.exists(f):
            raise ValueError(f"{d}: no {fname}; UltraBench v1.0.1 writes train.json, validation.json, test.json")
        with open(f) as fh:
            items = json.load(fh)
        for i, it in enumerate(items):
            if not isinstance(it, dict) or "image" not in it or "label" not in it:
                raise ValueError(f"{f}: entry {i} has no 'image' and 'label' (is this a classification task?)")
            name = it.get("class", it.get("pathology"))             # butterfly: class, the others: pathology
            rows.append((s, os.path.join(d, it["image"]), int(it["label"]), f"{it['label']}:{name}"))
    names = {lab: c for _, _, lab, c in rows}
    order = [names[lab] for lab in sorted(names)]                       # classes in UltraBench's label order
    return [make_task(os.path.basename(os.path.normpath(d)), d, [(s, p, c) for s, p, _, c in rows], order)]


def read_csv_task(f):
    with open(f, newline="") as fh:
        rd = csv.DictReader(fh)
        cols = rd.fieldnames or []
        table = list(rd)
    if "path" not in cols or "split" not in cols:
        raise ValueError(f"{f}: a task CSV needs the columns path, split and label (found {cols})")
    label_cols = ["label"] if "label" in cols else [c for c in cols if c not in ("path", "split")]
    if not label_cols:
        raise ValueError(f"{f}: no label column (expected path,label,split)")
    base = os.path.dirname(os.path.abspath(f))
    tasks = []
    for lc in label_cols:
        rows = []
        for i, r in enumerate(table):
            s = SPLIT_NAMES.get(r["split"].strip().lower())
            if s is None:
                raise ValueError(f"{f}: row {i + 2}: split {r['split']!r} is not train/val/validation/test")
            rows.append((s, os.path.join(base, r["path"]), r[lc].strip()))
        name = os.path.splitext(os.path.basename(f))[0] if lc == "label" else lc
        tasks.append(make_task(name, f"{f} [{lc}]", rows))
    return tasks


def read_tasks(path):
    if os.path.isfile(path) and path.lower().endswith(".csv"):
        return read_csv_task(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such task folder or CSV file")
    if any(os.path.exists(os.path.join(path, f)) for f in ("train.json", "validation.json", "train_val.json")):
        return read_ultrabench_task(path)
    if any(SPLIT_NAMES.get(s.lower()) for s in os.listdir(path) if os.path.isdir(os.path.join(path, s))):
        return read_folder_task(path)
    csvs = sorted(f for f in os.listdir(path) if f.lower().endswith(".csv"))
    if len(csvs) == 1:
        return read_csv_task(os.path.join(path, csvs[0]))
    raise ValueError(f"{path}: no task found; expected {{train,val,test}}/<class>/ folders, UltraBench v1.0.1's "
                     f"train.json / validation.json / test.json, or one CSV with path,label,split columns")

# -----------------------------------------------------------------------------
# features


def load_image(path, in_chans, size, pad):
    """-> uint8 (C, size, size); 16-bit images scaled to 8 bits, grey <-> RGB as the encoder expects."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I") or im.mode == "F":                  # 16/32-bit grey
            a = np.asarray(im).astype(np.float32)
            a = a / (65535 if a.max() > 255 else 255) * 255
            im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
        im = im.convert("L" if in_chans == 1 else "RGB")                # RGB -> ITU-R 601 luma; grey repeated
    if pad and im.width != im.height:
        s = max(im.size)
        sq = Image.new(im.mode, (s, s))
        sq.paste(im, ((s - im.width) // 2, (s - im.height) // 2))
        im = sq
    a = np.asarray(im.resize((size, size), Image.BILINEAR))
    return torch.from_numpy(a.copy()).reshape(size, size, in_chans).permute(2, 0, 1)   # (C, S, S)


class Images(torch.utils.data.Dataset):
    def __init__(self, paths, in_chans, size, pad):
        self.paths, self.in_chans, self.size, self.pad = paths, in_chans, size, pad

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return load_image(self.paths[i], self.in_chans, self.size, self.pad), i, ""
        except Exception as e:   # noqa: BLE001 -- reported by name after the pass
            return torch.zeros(self.in_chans, self.size, self.size, dtype=torch.uint8), i, f"{type(e).__name__}: {e}"


@torch.no_grad()
def extract(model, meta, paths, cfg, device):
    """-> (N, D) float32 features of `paths` with the checkpoint's preprocessing and pooling."""
    from tqdm import tqdm
    C, S = meta["in_chans"], meta["img_size"]
    mean = torch.tensor(meta["mean"], device=device).view(1, C, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, C, 1, 1)
    loader = torch.utils.data.DataLoader(Images(paths, C, S, cfg.pad), batch_size=cfg.img_batch,
                                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    feats, bad = [None] * len(paths), []
    for x, idx, err in tqdm(loader, desc="features", unit="batch", leave=False,
                            mininterval=0.5 if sys.stderr.isatty() else 30):
        bad += [(paths[i], e) for i, e in zip(idx.tolist(), err) if e]
        x = x.to(device, non_blocking=True).float().div(255)          # (B, C, S, S)
        z = model.embed((x - mean) / std, meta["pool"]).float().cpu()  # (B, D)
        for i, zi in zip(idx.tolist(), z):
            feats[i] = zi
    if bad:
        raise ValueError(f"{len(bad)} unreadable image(s): " + "; ".join(f"{p} ({e})" for p, e in bad[:5])
                         + ". Re-export them or remove them from the task")
    return torch.stack(feats)


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def task_features(ck, task, cfg, device):
    """{split: (N, D) features}, from OUT/features/ when this checkpoint has seen these images."""
    listing = []
    for s in SPLITS:
        for p in task["splits"][s][0]:
            try:
                st = os.stat(p)
            except OSError:
                raise ValueError(f"{task['where']}: image {p} does not exist") from None
            listing.append([s, os.path.abspath(p), st.st_size, st.st_mtime_ns])
    meta = ck["meta"]
    prep = [FEATURES_VERSION, meta["img_size"], meta["in_chans"], meta["mean"], meta["std"], meta["pool"], cfg.pad]
    key = hashlib.sha256(json.dumps([listing, prep]).encode()).hexdigest()[:16]
    path = os.path.join(cfg.out, "features", ck["sha256"][:16], f"{key}.pt")   # tasks on the same images share it
    if os.path.exists(path):
        return torch.load(path, weights_only=True), True
    if ck.get("model") is None:
        ck["model"], _ = vit.load_encoder(ck["path"], device)
    paths = [p for s in SPLITS for p in task["splits"][s][0]]
    z = extract(ck["model"], meta, paths, cfg, device)
    out, i = {}, 0
    for s in SPLITS:
        n = len(task["splits"][s][0])
        out[s] = z[i:i + n].contiguous()
        i += n
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(out, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    return out, False

# -----------------------------------------------------------------------------
# the probe: S seeds trained at once


def train_probe(Xtr, ytr, Xva, yva, n_classes, seeds, cfg):
    """S linear probes (one per seed) trained together; -> dict with the best-val-loss W (S, C, D), b (S, C),
    best_epoch (S,), stopped_epoch (S,), best_val_loss (S,), val_loss history (E, S). Epochs count from 1.

    The cross-entropy gradient is written out (d loss / d logits = softmax - onehot) instead of building an
    autograd graph per step: two bmm and one fused Adam step per minibatch for all seeds."""
    threads = torch.get_num_threads()
    if Xtr.device.type == "cpu":
        torch.set_num_threads(1)   # ops this small only lose to thread synchronisation (BENCHMARKS.md)
    try:
        return _train_probe(Xtr, ytr, Xva, yva, n_classes, seeds, cfg)
    finally:
        torch.set_num_threads(threads)


def _train_probe(Xtr, ytr, Xva, yva, n_classes, seeds, cfg):
    dev = Xtr.device
    S, (N, D), C = len(seeds), Xtr.shape, n_classes
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    bound = 1 / math.sqrt(D)   # nn.Linear's init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(D), 1/sqrt(D)), bias too
    W = torch.stack([torch.cat([torch.empty(C, D).uniform_(-bound, bound, generator=g),
                                torch.empty(C, 1).uniform_(-bound, bound, generator=g)], 1) for g in gens])
    W = W.to(dev)                                                        # (S, C, D + 1), bias as last column
    Xtr = torch.cat([Xtr, torch.ones(N, 1, device=dev)], 1)              # (N, D + 1)
    Xva = torch.cat([Xva, torch.ones(len(Xva), 1, device=dev)], 1)       # (Nv, D + 1)
    onehot = F.one_hot(ytr, C).to(Xtr.dtype)                             # (N, C)
    opt = torch.optim.Adam([W], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    best_W = W.clone()
    best = torch.full((S,), float("inf"))
    best_epoch, stopped = torch.zeros(S, dtype=torch.long), torch.zeros(S, dtype=torch.long)
    bad, active, hist = torch.zeros(S, dtype=torch.long), torch.ones(S, dtype=torch.bool), []
    yva_s = yva.repeat(S)                                                # (S * Nv,) seed-major
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.stack([torch.randperm(N, generator=g) for g in gens]).to(dev)   # (S, N): own order per seed
        for i in range(0, N, cfg.batch_size):
            idx = perm[:, i:i + cfg.batch_size]                          # (S, B)
            x = Xtr.index_select(0, idx.reshape(-1)).view(S, -1, D + 1)  # (S, B, D + 1)
            p = torch.bmm(x, W.transpose(1, 2)).softmax(-1)              # (S, B, C)
            # mean cross-entropy over the batch, per seed: d/dlogits = (p - onehot) / B, d/dW = that^T x
            g = p.sub_(onehot.index_select(0, idx.reshape(-1)).view(S, -1, C)).div_(idx.shape[1])
            W.grad = torch.bmm(g.transpose(1, 2), x)                     # (S, C, D + 1)
            opt.step()
        with torch.no_grad():
            logits = torch.bmm(Xva.expand(S, -1, -1), W.transpose(1, 2))  # (S, Nv, C)
            vl = F.cross_entropy(logits.reshape(-1, C), yva_s, reduction="none").view(S, -1).mean(1).cpu()
        hist.append(vl)
        improved = active & (vl < best)
        if improved.any():
            best = torch.where(improved, vl, best)
            best_epoch[improved] = epoch
            best_W[improved.to(dev)] = W[improved.to(dev)]
        bad = torch.where(improved, 0, bad + 1)
        newly = active & (bad >= cfg.patience)
        stopped[newly] = epoch
        active &= ~newly
        if not active.any():
            break
    stopped[active] = epoch
    return {"W": best_W[:, :, :D], "b": best_W[:, :, D], "best_epoch": best_epoch, "stopped_epoch": stopped,
            "best_val_loss": best, "val_loss": torch.stack(hist)}


def predict(probe, X):
    """-> (S, N, C) softmax probabilities of the best-val-loss weights."""
    return (torch.bmm(X.expand(len(probe["W"]), -1, -1), probe["W"].transpose(1, 2)) + probe["b"][:, None]).softmax(-1)


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


def evaluate(feats, task, cfg, device):
    """Train the S-seed probe on one task's features -> per-seed metrics and test probabilities."""
    ys = {s: torch.from_numpy(task["splits"][s][1]).to(device) for s in SPLITS}
    X = {s: feats[s].to(device) for s in SPLITS}
    if cfg.standardize:
        mu, sd = X["train"].mean(0), X["train"].std(0).clamp_min(1e-6)
        X = {s: (x - mu) / sd for s, x in X.items()}
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    probe = train_probe(X["train"], ys["train"], X["val"], ys["val"], len(task["classes"]), seeds, cfg)
    P = predict(probe, X["test"]).cpu().double().numpy()                 # (S, Nt, C)
    y = task["splits"]["test"][1]
    per_seed = []
    for k, s in enumerate(seeds):
        auroc, f1 = metrics(y, P[k])
        per_seed.append({"seed": s, "auroc": auroc, "f1": f1, "best_epoch": int(probe["best_epoch"][k]),
                         "stopped_epoch": int(probe["stopped_epoch"][k]),
                         "best_val_loss": float(probe["best_val_loss"][k]), "test_probs": P[k].tolist()})
    a, f = np.array([r["auroc"] for r in per_seed]), np.array([r["f1"] for r in per_seed])
    sd = lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0   # noqa: E731
    return {"auroc_mean": float(a.mean()), "auroc_std": sd(a), "f1_mean": float(f.mean()), "f1_std": sd(f),
            "seeds": per_seed}

# -----------------------------------------------------------------------------
# reporting


def fmt(m, s):
    return f"{100 * m:.2f}±{100 * s:.2f}"


def table(tasks, labels, results):
    """Plain-text table shaped like the paper's Table 2, and the same as Markdown."""
    w0 = max(7, *(len(t) for t in tasks))
    cells = {(t, l): (fmt(r["auroc_mean"], r["auroc_std"]), fmt(r["f1_mean"], r["f1_std"]))
             for t in tasks for l in labels if (r := results.get(t, {}).get(l))}
    w = max([12] + [len(c) for v in cells.values() for c in v])
    group = [f"{l:^{2 * w + 2}.{2 * w + 2}}" for l in labels]
    lines = [f"{'':{w0}}   " + " | ".join(group),
             f"{'Dataset':{w0}}   " + " | ".join(f"{'AUROC (%)':>{w}}  {'F1 (%)':>{w}}" for _ in labels)]
    lines.append("-" * len(lines[1]))
    for t in tasks:
        row = [cells.get((t, l), ("-", "-")) for l in labels]
        lines.append(f"{t:{w0}}   " + " | ".join(f"{a:>{w}}  {f:>{w}}" for a, f in row))
    md = ["| Dataset | " + " | ".join(f"{l} AUROC (%) | {l} F1 (%)" for l in labels) + " |",
          "|---|" + "---:|" * (2 * len(labels))]
    for t in tasks:
        md.append(f"| {t} | " + " | ".join(" | ".join(cells.get((t, l), ("-", "-"))) for l in labels) + " |")
    return "\n".join(lines), "\n".join(md) + "\n"


def checkpoint_labels(ckpts):
    """Column-group names: the method, with the run folder when two checkpoints share a method."""
    methods = [c["meta"]["method"] for c in ckpts]
    labels = []
    for c, m in zip(ckpts, methods):
        name = m
        if methods.count(m) > 1:
            name = f"{m} ({os.path.basename(os.path.dirname(os.path.abspath(c['path']))) or c['path']})"
        labels.append(name)
    for i, l in enumerate(labels):              # still equal (same folder): fall back to the file name
        if labels.count(l) > 1:
            labels[i] = f"{methods[i]} ({os.path.basename(ckpts[i]['path'])})"
    return labels


def main(cfg):
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # everything that can be wrong with the inputs is checked before any compute
    ckpts = []
    for p in cfg.ckpts:
        _, meta = vit.load_checkpoint(p)          # clear error for files that are not pretext checkpoints
        ckpts.append({"path": p, "meta": meta, "sha256": sha256_file(p)})
    tasks = [t for d in cfg.data for t in read_tasks(d)]
    seen = {}
    for t in tasks:                              # unique task names (two CSVs with a `fatty` column ...)
        seen[t["name"]] = seen.get(t["name"], 0) + 1
        if seen[t["name"]] > 1:
            t["name"] = f"{t['name']}_{seen[t['name']]}"
    labels = checkpoint_labels(ckpts)
    names = [t["name"] for t in tasks]
    print(f"{len(ckpts)} checkpoint(s) x {len(tasks)} task(s) on {device}; probe: Adam lr {cfg.lr}, batch "
          f"{cfg.batch_size}, <= {cfg.epochs} epochs, patience {cfg.patience}, {cfg.seeds} seeds")
    for t in tasks:
        n = {s: len(t["splits"][s][0]) for s in SPLITS}
        print(f"  {t['name']}: {len(t['classes'])} classes {t['classes']}, train/val/test {n['train']}/"
              f"{n['val']}/{n['test']}  ({t['where']})")
    os.makedirs(cfg.out, exist_ok=True)
    results = {t: {} for t in names}
    doc = {"protocol": {**asdict(cfg), "optimizer": "Adam", "auroc": "binary on P[:,1]; macro one-vs-rest",
                        "f1": "macro", "std": "sample std over seeds (ddof=1)"},
           "checkpoints": [{"label": l, "path": os.path.abspath(c["path"]), "sha256": c["sha256"],
                            **{k: c["meta"][k] for k in ("method", "pool", "img_size", "in_chans", "mean", "std")}}
                           for l, c in zip(labels, ckpts)],
           "tasks": {t["name"]: {"where": t["where"], "classes": t["classes"],
                                 "n": {s: len(t["splits"][s][0]) for s in SPLITS},
                                 "test_paths": t["splits"]["test"][0],
                                 "test_labels": t["splits"]["test"][1].tolist(), "results": results[t["name"]]}
                     for t in tasks}}
    for ck, label in zip(ckpts, labels):
        for t in tasks:
            t0 = time.time()
            feats, cached = task_features(ck, t, cfg, device)
            t1 = time.time()
            results[t["name"]][label] = r = evaluate(feats, t, cfg, device)
            ep = [s["best_epoch"] for s in r["seeds"]]
            took = "cached" if cached else f"{t1 - t0:.1f}s"
            print(f"{label:>12} | {t['name']}: AUROC {fmt(r['auroc_mean'], r['auroc_std'])}  F1 "
                  f"{fmt(r['f1_mean'], r['f1_std'])}  best epochs {ep}  (features {took}, "
                  f"probe {time.time() - t1:.1f}s)")
            tmp = os.path.join(cfg.out, "results.json.tmp")
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, os.path.join(cfg.out, "results.json"))
        ck.pop("model", None)
    text, md = table(names, labels, results)
    print(f"\nLinear probe on frozen features, test split, mean±std over {cfg.seeds} seeds (%; F1 = macro)\n{text}")
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(md)
    print(f"\n{os.path.join(cfg.out, 'results.json')} (per-seed metrics, test probabilities), "
          f"{os.path.join(cfg.out, 'table.md')}")
    return doc

# -----------------------------------------------------------------------------
# benchmark


def benchmark(n=5000, dim=384, classes=2, seeds=5, epochs=300, device="cpu"):
    """Time the probe alone: n synthetic features split 70/10/20, every epoch run (no early stop)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    X = torch.randn(n, dim, generator=g) + 0.3 * torch.randn(classes, dim, generator=g)[y]
    X, y = X.to(device), y.to(device)
    a, b = int(0.7 * n), int(0.8 * n)
    cfg = Config(epochs=epochs, patience=epochs + 1, seeds=seeds)
    if device != "cpu" and str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    probe = train_probe(X[:a], y[:a], X[a:b], y[a:b], classes, list(range(seeds)), cfg)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.time() - t0
    steps = epochs * math.ceil(a / cfg.batch_size)
    return {"seconds": dt, "steps_per_s": steps / dt, "epochs": int(probe["stopped_epoch"].max()), "n_train": a,
            "dim": dim, "seeds": seeds}


if __name__ == "__main__":
    cfg = parse_args()
    if cfg.bench:
        dev = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else (
            "cpu" if cfg.device == "auto" else cfg.device)
        r = benchmark(seeds=cfg.seeds, epochs=cfg.epochs, device=dev)
        print(f"probe: {r['seeds']} seeds x {r['epochs']} epochs on {r['n_train']} x {r['dim']} train features "
              f"(+ val each epoch), batch {Config.batch_size}: {r['seconds']:.1f}s on {dev}"
              f"{' (1 thread)' if dev == 'cpu' else ''}, {r['steps_per_s']:.0f} steps/s")
        sys.exit(0)
    try:
        main(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
