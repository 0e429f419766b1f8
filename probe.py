"""Linear probing of frozen encoders: the paper's ultrasound evaluation (Table 2, appendix 0.D.2), read against
"no pretraining" (random twins, raw pixels) with bootstrap confidence intervals and paired tests.

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

Features: once per (encoder, image list), with the checkpoint's own preprocessing (meta img_size, in_chans:
grey -> RGB by repetition or RGB -> luma, meta mean/std: for our encoders the pretraining set's statistics, as
the paper standardises downstream images) and pooling (meta pool: CLS token, or mean of the patch tokens for
I-JEPA); batched, on the GPU when there is one, no augmentation. Cached in OUT/features/ under the encoder's
sha256 and the image list (paths, sizes, mtimes), so re-running, adding tasks or checkpoints only computes what
is new. An image file held by several tasks (hard links count) is decoded and embedded once per encoder, and
decoded images are kept for the next encoder with the same input size and channels.

Controls (on by default; --no-controls skips them), every one through the same probe, seeds and metrics:
- "own init": OUT_RUN/init.safetensors beside each checkpoint, the same encoder role at step 0 that every
  method run writes (its own pooling and mean/std). When it is absent the table says so; nothing replaces it.
- "ViT init": vit.ViT built from the checkpoint's ViT config with vit.py's default init under torch seed
  --twin-seed, read with the checkpoint's pooling and mean/std (the plain-architecture baseline).
- "raw pixels", one per task: the image (luma when every checkpoint is grey, else RGB, padded as --pad says)
  resized to --pixel-grid x --pixel-grid by PIL's antialiased bilinear filter, in [0, 1], flattened and z-scored
  with the train split's per-pixel mean and std (so Adam's lr 1e-3 suits it): what a probe gets from no encoder.

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

Metrics on test: AUROC = sklearn's roc_auc_score on P[:, 1] for two classes, macro one-vs-rest over the softmax
probabilities for more; F1 = macro F1 of the argmax (the class-balanced F1 US-JEPA reports), mean and sample
std (ddof=1) over the seeds. Statistics over the TEST ITEMS (the frames), the statistic being the mean over the
seeds of each seed's AUROC:
- 95% CI: percentile interval of --boot stratified bootstrap resamples (each class keeps its count, its frames
  drawn with replacement; pROC's default for AUROC, Carpenter & Bithell 2000), numpy seed --boot-seed, the same
  resamples for every encoder of a task. AUROC on all resamples at once from one sort per seed (Mann-Whitney
  with tie groups), no sklearn loop.
- paired comparisons on the same frames, each trained checkpoint against each of its twins and the raw
  pixels, and every pair of trained checkpoints: the AUROC difference, its paired bootstrap 95% CI (the
  difference on each of the same resamples) and DeLong's test (DeLong, DeLong & Clarke-Pearson 1988; structural
  components by the midrank algorithm of Sun & Xu 2014; the seed-mean AUROC's components are the seed means of
  each seed's components; for C > 2 classes the macro one-vs-rest mean, see auroc_influence), two-sided p.
Printed as the paper's tables (rows = encoders, a column group per task; a second table of the paired
comparisons), with the paper's reported Table 2 beside them for tasks whose names match one of its datasets
(or all of it with --paper), and written to OUT/table.md.

Never overwritten: OUT/results.json gathers every evaluation made into OUT, keyed by the encoder (a checkpoint by
its file's sha256, an untrained twin by its weights and preprocessing, so twins that are the same network, as
I-JEPA's own init and vit.py's, are evaluated once) and the task. A later run adds its encoders and tasks and
keeps everything already there (a result already present for the same encoder and task is reused, not
recomputed); the tables show all of it. A run whose
probe settings differ from those already in OUT, a task name already there with other images or labels, or a
results.json that is unreadable or of an older format is refused before any compute, the file untouched: use
another --out. results.json holds, per task, the test paths and labels and, per encoder, every seed's metrics,
best/stopped epochs and test probabilities, and the bootstrap seed and count, so every number can be recomputed.
`python probe.py --bench` times 5 seeds x 300 epochs on 3500 x 384 cached features (see BENCHMARKS.md).
"""
import argparse
import csv
import hashlib
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

import vit

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
FEATURES_VERSION = 1          # bump when the image loading below changes, to invalidate cached features
RESULTS_FORMAT = "pretext-probe-3"   # 3: untrained twins keyed by weights + preprocessing (twin_key)
DECODE_CACHE_BYTES = 1 << 30  # decoded images kept for the next encoder of the same input size, up to this much
NAMES = {"mae": "MAE", "dino": "DINOv3", "ijepa": "I-JEPA"}     # row names as the paper's tables
# the settings that change a probe's numbers: results.json only gathers runs that agree on all of them
PROTOCOL = ("batch_size", "lr", "epochs", "patience", "seeds", "seed", "weight_decay", "standardize", "pad")


@dataclass
class Config:
    ckpts: list = field(default_factory=list)   # pretext checkpoints (positional)
    data: list = field(default_factory=list)    # task folders / CSVs
    out: str = "runs/probe"     # results.json, table.md and the feature cache (earlier results there are kept)
    batch_size: int = 32        # probe minibatch (0.D.2: 32)
    lr: float = 1e-3            # Adam learning rate, constant (0.D.2: 0.001)
    epochs: int = 300           # most epochs per probe (0.D.2: 300)
    patience: int = 30          # epochs without a lower validation loss before a seed stops (0.D.2: 30)
    seeds: int = 5              # probes per encoder and task, averaged (0.D.2: 5)
    seed: int = 0               # first seed; the seeds are seed, seed + 1, ...
    weight_decay: float = 0.0   # Adam's L2 penalty (0 = plain Adam)
    standardize: bool = False   # z-score the features with the train split's mean/std before the probe
    pad: bool = False           # pad images to a square before resizing (prep/ultrasound.py does); else squash
    controls: bool = True       # evaluate each checkpoint's own-init and ViT-init twins and a raw-pixel baseline
    twin_seed: int = 0          # torch seed of the ViT-init twin's default initialisation
    pixel_grid: int = 16        # raw-pixel baseline: images resized to this many pixels a side
    boot: int = 2000            # bootstrap resamples of the test items for the CIs and paired differences
    boot_seed: int = 0          # numpy seed of the bootstrap resamples
    paper: bool = False         # print the paper's whole Table 2, not only the datasets matching a task name
    img_batch: int = 64         # images per encoder forward pass
    num_workers: int = 4        # image decoding processes
    device: str = "auto"        # auto | cpu | cuda | cuda:1 ...
    bench: bool = False         # time the probe on synthetic features and exit


def config_help(cls):
    """{field: its comment in the class body}: the Config comments are the --help texts."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def add_config_flags(p, cls, skip=(), required=()):
    """One --flag per Config field (bools as --flag/--no-flag), help = the field's comment and its default."""
    helps = config_help(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        name = f"--{f.name.replace('_', '-')}"
        text = helps.get(f.name, "")
        if f.name in required:
            p.add_argument(name, type=type(f.default), required=True, help=text)
        elif isinstance(f.default, bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=f"{text} (default: {'on' if f.default else 'off'})")
        else:
            p.add_argument(name, type=type(f.default), default=f.default, help=f"{text} (default: {f.default!r})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="*", help="pretext checkpoints (convert official ones with `vit.py convert`)")
    p.add_argument("--data", nargs="+", default=[], help="task folders or CSV files")
    add_config_flags(p, Config, skip=("ckpts", "data"))
    cfg = Config(**vars(p.parse_args(argv)))
    if not cfg.bench and (not cfg.ckpts or not cfg.data):
        p.error("give at least one checkpoint and --data TASK (or --bench)")
    for name in ("seeds", "epochs", "batch_size", "boot", "pixel_grid", "img_batch"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
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


def task_listing(task):
    """[split, absolute path, size, mtime] of every image, in split order: what the features depend on."""
    listing = []
    for s in SPLITS:
        for p in task["splits"][s][0]:
            try:
                st = os.stat(p)
            except OSError:
                raise ValueError(f"{task['where']}: image {p} does not exist") from None
            listing.append([s, os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return listing


def task_fingerprint(task):
    """sha256 of the images (paths, sizes, mtimes), their splits and labels: results of one task name in OUT must
    all come from the same one."""
    labels = [task["splits"][s][1].tolist() for s in SPLITS]
    return hashlib.sha256(json.dumps([task_listing(task), labels, task["classes"]]).encode()).hexdigest()

# -----------------------------------------------------------------------------
# encoders: the checkpoints and their controls


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_weights(model):
    """sha256 of a module's state dict (names, shapes, bytes), to key an encoder that has no file."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def method_name(meta):
    """MAE / DINOv3 / I-JEPA as the paper's tables; an I-JEPA run with a frozen teacher is US-JEPA, and a run
    with LeJEPA's SIGReg says so ("I-JEPA + SIGReg", the paper's 0.D.4 variant)."""
    args = meta.get("args") or {}
    name = NAMES.get(meta["method"], meta["method"])
    if meta["method"] == "ijepa" and args.get("teacher"):
        name = "US-JEPA"
    if meta["method"] == "ijepa" and args.get("sigreg"):
        name = f"{name} + SIGReg"
    return name


def checkpoint_labels(ckpts, taken=()):
    """Row names: the method, with the run folder when two checkpoints share a method (or a name in `taken`),
    then the file name, then the sha256 prefix."""
    methods = [method_name(c["meta"]) for c in ckpts]
    labels = []
    for c, m in zip(ckpts, methods):
        name = m
        if methods.count(m) > 1 or m in taken:
            name = f"{m} ({os.path.basename(os.path.dirname(os.path.abspath(c['path']))) or c['path']})"
        labels.append(name)
    for i, lab in enumerate(labels):              # still equal (same folder): the file name
        if labels.count(lab) > 1 or lab in taken:
            labels[i] = f"{methods[i]} ({os.path.basename(ckpts[i]['path'])})"
    for i, lab in enumerate(labels):              # still equal: the file's hash
        if labels.count(lab) > 1 or lab in taken:
            labels[i] = f"{lab} [{ckpts[i]['sha256'][:8]}]"
    return labels


def read_checkpoint(path):
    """-> encoder dict of a trained checkpoint (clear error for files that are not pretext checkpoints)."""
    _, meta = vit.load_checkpoint(path)
    return {"kind": "trained", "path": path, "meta": meta, "sha256": sha256_file(path), "key": None}


def own_init_twin(ck):
    """The run's step-0 encoder (OUT_RUN/init.safetensors beside the checkpoint) -> (encoder dict, None) or
    (None, why it is missing)."""
    path = os.path.join(os.path.dirname(os.path.abspath(ck["path"])), "init.safetensors")
    if not os.path.isfile(path):
        return None, f"no {path}"
    if os.path.samefile(path, ck["path"]):
        return None, f"{path} is the evaluated checkpoint itself"
    model, meta = vit.load_encoder(path)
    if meta["vit"] != ck["meta"]["vit"] or meta["pool"] != ck["meta"]["pool"]:
        return None, f"{path} has another ViT config or pooling than {ck['path']}: not its twin"
    enc = {"kind": "own init", "path": path, "meta": meta, "sha256": sha256_file(path),
           "key": twin_key(sha256_weights(model), meta), "model": model}   # loaded once: kept for the features
    return enc, None


def twin_key(weights_sha, meta):
    """Key of an untrained encoder: its weights and the preprocessing it is read with. Twins that are the same
    network (I-JEPA's own init is vit.py's default init; two runs from one seed) are evaluated once."""
    prep = [weights_sha, meta["pool"], meta["mean"], meta["std"], meta["img_size"], meta["in_chans"]]
    return "twin-" + hashlib.sha256(json.dumps(prep).encode()).hexdigest()


def vit_init_twin(ck, seed):
    """vit.ViT of the checkpoint's config, vit.py's default init under torch seed `seed`, read with the checkpoint's
    pooling and mean/std. Keyed by the weights' hash and that preprocessing (twin_key)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = vit.ViT(vit.config_from_meta(ck["meta"])).eval()
    meta = {k: ck["meta"][k] for k in ("method", "vit", "img_size", "in_chans", "mean", "std", "pool")}
    meta["method"] = "vit-init"
    key = twin_key(sha256_weights(model), meta)
    return {"kind": "ViT init", "path": None, "meta": meta, "sha256": key[len("twin-"):], "key": key,
            "model": model, "seed": seed}


def pixel_encoder(chans, grid):
    """The raw-pixel baseline of a task: no encoder, the image at grid x grid."""
    key = f"raw-pixels-{grid}x{grid}x{chans}"
    meta = {"method": "pixels", "img_size": grid, "in_chans": chans, "pool": "none", "mean": None, "std": None}
    label = f"raw pixels ({grid}x{grid} {'grey' if chans == 1 else 'RGB'})"
    return {"kind": "raw pixels", "path": None, "meta": meta, "sha256": hashlib.sha256(key.encode()).hexdigest(),
            "key": key, "label": label}


def encoder_record(enc):
    """What results.json keeps of an encoder."""
    m = enc["meta"]
    rec = {"label": enc["label"], "kind": enc["kind"], "path": os.path.abspath(enc["path"]) if enc["path"] else None,
           "sha256": enc["sha256"], "method": m["method"], "pool": m["pool"], "img_size": m["img_size"],
           "in_chans": m["in_chans"], "mean": m["mean"], "std": m["std"]}
    if enc["kind"] == "ViT init":
        rec["vit"] = m["vit"]
        rec["twin_seed"] = enc["seed"]
    if enc["kind"] == "trained":
        rec["step"] = m.get("step")
        rec["twins"] = enc.get("twins", {})
    return rec

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
    a = np.asarray(im.resize((size, size), Image.BILINEAR))             # antialiased: PIL widens the filter
    return torch.from_numpy(a.copy()).reshape(size, size, in_chans).permute(2, 0, 1)   # (C, S, S)


class Images(torch.utils.data.Dataset):
    def __init__(self, paths, in_chans, size, pad):
        self.paths = paths
        self.in_chans = in_chans
        self.size = size
        self.pad = pad

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return load_image(self.paths[i], self.in_chans, self.size, self.pad), i, ""
        except Exception as e:   # noqa: BLE001 -- reported by name after the pass
            return torch.zeros(self.in_chans, self.size, self.size, dtype=torch.uint8), i, f"{type(e).__name__}: {e}"


def decode(paths, in_chans, size, cfg, desc="decode"):
    """-> uint8 (N, C, S, S) of every image, decoded by cfg.num_workers processes; unreadable images named."""
    from tqdm import tqdm
    loader = torch.utils.data.DataLoader(Images(paths, in_chans, size, cfg.pad), batch_size=cfg.img_batch,
                                         num_workers=cfg.num_workers)
    out = torch.empty(len(paths), in_chans, size, size, dtype=torch.uint8)
    bad = []
    for x, idx, err in tqdm(loader, desc=desc, unit="batch", leave=False,
                            mininterval=0.5 if sys.stderr.isatty() else 30):
        bad += [(paths[i], e) for i, e in zip(idx.tolist(), err) if e]
        out[idx] = x
    if bad:
        raise ValueError(f"{len(bad)} unreadable image(s): " + "; ".join(f"{p} ({e})" for p, e in bad[:5])
                         + ". Re-export them or remove them from the task")
    return out


@torch.no_grad()
def extract(model, meta, images, cfg, device):
    """uint8 images (N, C, S, S) -> (N, D) float32 features with the checkpoint's normalisation and pooling."""
    C = meta["in_chans"]
    mean = torch.tensor(meta["mean"], device=device).view(1, C, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, C, 1, 1)
    feats = []
    for i in range(0, len(images), cfg.img_batch):
        x = images[i:i + cfg.img_batch].to(device, non_blocking=True).float().div(255)   # (B, C, S, S)
        feats.append(model.embed((x - mean) / std, meta["pool"]).float().cpu())          # (B, D)
    return torch.cat(feats)


def file_id(path):
    """The identity of an image file: hard links to one file (the demo's task folders) share it."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


class Decoded:
    """Images decoded in this run, by file identity, kept for the next encoder with the same input size and
    channels (up to DECODE_CACHE_BYTES)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.store = {}
        self.bytes = 0

    def get(self, paths, in_chans, size):
        """-> uint8 (N, C, S, S) of paths, decoding only the files not seen at this size yet."""
        keys = [(file_id(p), in_chans, size) for p in paths]
        todo = {}
        for p, k in zip(paths, keys):
            if k not in self.store and k not in todo:
                todo[k] = p
        if todo:
            images = decode(list(todo.values()), in_chans, size, self.cfg, desc=f"decode {size}px")   # (M, C, S, S)
            if self.bytes + images.numel() > DECODE_CACHE_BYTES:
                self.store.clear()
                self.bytes = 0
            fresh = dict(zip(todo, images))
            if images.numel() <= DECODE_CACHE_BYTES:
                self.store.update(fresh)
                self.bytes += images.numel()
            return torch.stack([self.store[k] if k in self.store else fresh[k] for k in keys])
        return torch.stack([self.store[k] for k in keys])


def feature_path(enc, task, cfg):
    """OUT/features/<encoder>/<key of the image listing and the preprocessing>.pt"""
    meta = enc["meta"]
    prep = [FEATURES_VERSION, meta["img_size"], meta["in_chans"], meta["mean"], meta["std"], meta["pool"], cfg.pad]
    key = hashlib.sha256(json.dumps([task_listing(task), prep]).encode()).hexdigest()[:16]
    return os.path.join(cfg.out, "features", enc["sha256"][:16], f"{key}.pt")   # tasks on the same images share it


def encoder_features(enc, tasks, cfg, device, decoded):
    """{task name: ({split: (N, D) features}, cached)} of one encoder. Cached tasks are read from OUT/features/;
    the others are embedded together, every image file once even when several tasks hold it (hard links too)."""
    out = {}
    todo = []
    for t in tasks:
        path = feature_path(enc, t, cfg)
        if os.path.exists(path):
            out[t["name"]] = (torch.load(path, weights_only=True), True)
        else:
            todo.append((t, path))
    if not todo:
        return out
    index = {}
    paths = []
    rows = []
    for t, _ in todo:
        r = []
        for p in (p for s in SPLITS for p in t["splits"][s][0]):
            k = file_id(p)
            if k not in index:
                index[k] = len(paths)
                paths.append(p)
            r.append(index[k])
        rows.append(torch.tensor(r))
    meta = enc["meta"]
    images = decoded.get(paths, meta["in_chans"], meta["img_size"])        # (U, C, S, S) uint8, U unique files
    if enc["kind"] == "raw pixels":
        z = images.flatten(1).float().div(255)                               # (U, C * S * S)
    else:
        if enc.get("model") is None:
            enc["model"], _ = vit.load_encoder(enc["path"], device)
        enc["model"].to(device).eval()
        z = extract(enc["model"], meta, images, cfg, device)                 # (U, D)
    for (t, path), r in zip(todo, rows):
        zt = z[r]                                                            # (N, D) in the task's split order
        feats = {}
        i = 0
        for s in SPLITS:
            n = len(t["splits"][s][0])
            feats[s] = zt[i:i + n].contiguous()
            i += n
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(feats, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
        out[t["name"]] = (feats, False)
    return out

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
    S = len(seeds)
    N, D = Xtr.shape
    C = n_classes
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
    best_epoch = torch.zeros(S, dtype=torch.long)
    stopped = torch.zeros(S, dtype=torch.long)
    bad = torch.zeros(S, dtype=torch.long)
    active = torch.ones(S, dtype=torch.bool)
    hist = []
    yva_s = yva.repeat(S)                                                # (S * Nv,) seed-major
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.stack([torch.randperm(N, generator=g) for g in gens]).to(dev)   # (S, N): own order per seed
        for i in range(0, N, cfg.batch_size):
            idx = perm[:, i:i + cfg.batch_size]                          # (S, B)
            x = Xtr.index_select(0, idx.reshape(-1)).view(S, -1, D + 1)  # (S, B, D + 1)
            p = torch.bmm(x, W.transpose(1, 2)).softmax(-1)              # (S, B, C)
            # mean cross-entropy over the batch, per seed: d/dlogits = (p - onehot) / B, d/dW = that^T x
            g = p.sub_(onehot.index_select(0, idx.reshape(-1)).view(S, -1, C)).div_(idx.shape[1])   # (S, B, C)
            W.grad = torch.bmm(g.transpose(1, 2), x)                     # (S, C, D + 1)
            opt.step()
        with torch.no_grad():
            logits = torch.bmm(Xva.expand(S, -1, -1), W.transpose(1, 2))  # (S, Nv, C)
            vl = F.cross_entropy(logits.reshape(-1, C), yva_s, reduction="none").view(S, -1).mean(1).cpu()  # (S,)
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


def summarise_seeds(per_seed):
    """Mean and sample std (ddof=1) of the seeds' AUROC and F1."""
    a = np.array([r["auroc"] for r in per_seed])
    f = np.array([r["f1"] for r in per_seed])
    sd = lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0   # noqa: E731
    return {"auroc_mean": float(a.mean()), "auroc_std": sd(a), "f1_mean": float(f.mean()), "f1_std": sd(f)}


def evaluate(feats, task, cfg, device, standardize=None):
    """Train the S-seed probe on one task's features -> per-seed metrics and test probabilities."""
    standardize = cfg.standardize if standardize is None else standardize
    ys = {s: torch.from_numpy(task["splits"][s][1]).to(device) for s in SPLITS}
    X = {s: feats[s].to(device) for s in SPLITS}
    if standardize:
        mu = X["train"].mean(0)
        sd = X["train"].std(0).clamp_min(1e-6)
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
    return {**summarise_seeds(per_seed), "seeds": per_seed}

# -----------------------------------------------------------------------------
# statistics over the test items: stratified bootstrap and DeLong's test


def one_vs_rest(y, P):
    """-> [(positives (N,) bool, scores (..., N))] of the AUROC metrics() computes: class 1 on P[..., 1] for two
    classes, every class on its own column for more (sklearn's macro one-vs-rest). Rows renormalised as there."""
    P = np.asarray(P, dtype=np.float64)
    P = P / P.sum(-1, keepdims=True)
    C = P.shape[-1]
    return [(np.asarray(y) == c, P[..., c]) for c in ([1] if C == 2 else range(C))]


def bootstrap_counts(y, n_boot, seed):
    """(n_boot, N) multiplicities of the test items in stratified bootstrap resamples: each class keeps its
    count, its items drawn with replacement (pROC's default for AUROC CIs), from numpy's default_rng(seed)."""
    y = np.asarray(y)
    N = len(y)
    rng = np.random.default_rng(seed)
    counts = np.zeros(n_boot * N)
    offset = N * np.arange(n_boot)[:, None]                               # (B, 1): row b's slots in the flat array
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        draw = idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))]    # (B, n_c) item indices
        counts += np.bincount((draw + offset).ravel(), minlength=n_boot * N)
    return counts.reshape(n_boot, N)                                      # (B, N)


def weighted_auroc(pos, score, w):
    """AUROC of scores (S, N) for the items pos (N,) against the rest, item i counted w[b, i] times in resample b
    -> (S, B). Mann-Whitney with ties counting one half, from one sort per row of scores: per group of tied
    scores, the positive weight times the negative weight strictly below it plus half the tied negative weight."""
    S = score.shape[0]
    out = np.empty((S, len(w)))
    for s in range(S):
        order = np.argsort(score[s], kind="stable")
        v = score[s, order]
        starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])            # first sorted item of each tie group
        wo = w[:, order]                                                  # (B, N) in score order
        wp = np.add.reduceat(wo * pos[order], starts, axis=1)             # (B, G) positive weight per group
        wn = np.add.reduceat(wo * ~pos[order], starts, axis=1)            # (B, G) negative weight per group
        below = np.cumsum(wn, axis=1) - wn                                # (B, G) negatives strictly below
        out[s] = (wp * (below + 0.5 * wn)).sum(1) / (wp.sum(1) * wn.sum(1))
    return out


def resampled_auroc(y, P, counts):
    """P (S, N, C) per-seed test probabilities, counts (B, N) -> (S, B) each seed's AUROC on each resample."""
    return np.mean([weighted_auroc(pos, sc, counts) for pos, sc in one_vs_rest(y, P)], axis=0)


def midranks(x):
    """1-based ranks of x (N,), tied values sharing their mean rank (scipy.stats.rankdata's 'average')."""
    order = np.argsort(x, kind="mergesort")
    v = x[order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    ends = np.r_[starts[1:], len(x)]                                      # group g: sorted positions [start, end)
    r = np.empty(len(x))
    r[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)          # mean of the 1-based positions
    return r


def delong_components(pos, score):
    """DeLong's structural components (DeLong et al. 1988) by Sun & Xu's midrank algorithm (IEEE SPL 21, 2014):
    V10 (m,) per positive = the fraction of negatives it outranks (ties 1/2), V01 (n,) per negative = the fraction
    of positives that outrank it; AUROC = mean(V10) = mean(V01)."""
    x = score[pos]
    z = score[~pos]
    m = len(x)
    n = len(z)
    tz = midranks(np.concatenate([x, z]))                                 # (m + n,) ranks among all items
    v10 = (tz[:m] - midranks(x)) / n
    v01 = 1 - (tz[m:] - midranks(z)) / m
    return v10, v01


def auroc_influence(y, P):
    """P (N, C) -> (AUROC as metrics(), phi (N,)): each test item's first-order (Hajek) term of the AUROC, from
    DeLong's structural components. For two classes phi = V10 / m on the positives and V01 / n on the negatives,
    so influence_var gives DeLong's S10 / m + S01 / n. For C > 2 the macro one-vs-rest mean: class c's AUROC is a
    two-sample U-statistic of class c against the rest, so an item of class g enters through V10 of problem g
    (/ n_g) and V01 of every other problem c (/ (N - n_c)), averaged over the C problems."""
    problems = one_vs_rest(y, P)
    theta = 0.0
    phi = np.zeros(len(y))
    for pos, sc in problems:
        v10, v01 = delong_components(pos, sc)
        theta += v10.mean()
        phi[pos] += v10 / pos.sum()
        phi[~pos] += v01 / (~pos).sum()
    return theta / len(problems), phi / len(problems)


def influence_var(y, phi):
    """Variance of a statistic with item terms phi, the classes being independent samples (DeLong): sum over
    classes g of n_g times the sample variance (ddof=1) of phi over class g."""
    y = np.asarray(y)
    return float(sum((y == g).sum() * phi[y == g].var(ddof=1) for g in np.unique(y) if (y == g).sum() > 1))


def seed_influence(y, P):
    """P (S, N, C) -> (mean over seeds of the AUROC, phi (N,)): the seed-mean AUROC is a U-statistic in the same
    items with the seed-averaged kernel, so its structural components are the seed means of each seed's."""
    res = [auroc_influence(y, p) for p in P]
    return float(np.mean([t for t, _ in res])), np.mean([f for _, f in res], axis=0)


def delong_test(y, PA, PB):
    """DeLong's test of two seed-mean AUROCs on the same test items -> (difference A - B, z, two-sided p).
    No difference at all gives z = None, p = 1. The variance needs two items of every class (a sample variance
    per class): with fewer, or a zero variance beside a nonzero difference, the test is not estimable and
    z = p = None (the table prints "-"; the bootstrap CI is still there)."""
    ta, fa = seed_influence(y, PA)
    tb, fb = seed_influence(y, PB)
    delta = ta - tb
    if np.abs(fa - fb).max() < 1e-12 and abs(delta) < 1e-12:
        return delta, None, 1.0
    if np.bincount(np.asarray(y)).min() < 2:
        return delta, None, None
    var = influence_var(y, fa - fb)
    if var <= 1e-300:
        return delta, None, None
    z = delta / math.sqrt(var)
    return delta, z, math.erfc(abs(z) / math.sqrt(2))


def percentile_ci(v, level=0.95):
    """Percentile interval of bootstrap values v (B,)."""
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def item_statistics(y, probs, trained, twins, pixels, n_boot, seed):
    """Bootstrap CIs and paired comparisons of one test set.

    y (N,) test labels; probs {key: (S, N, C) per-seed test probabilities}; trained [keys] in table order;
    twins {trained key: {"own init": key | None, "ViT init": key | None}}; pixels: the raw-pixel key or None.
    -> ({key: {"auroc": seed-mean AUROC, "ci": [lo, hi]}}, [comparison dicts]). Every encoder is read on the
    same resamples, so differences are paired."""
    counts = bootstrap_counts(y, n_boot, seed)                            # (B, N)
    full = np.ones((1, len(y)))
    boot = {}
    stats = {}
    for key, P in probs.items():
        boot[key] = resampled_auroc(y, P, counts).mean(0)                 # (B,) the seed mean on each resample
        stats[key] = {"auroc": float(resampled_auroc(y, P, full).mean()), "ci": percentile_ci(boot[key])}
    pairs = []
    for a in trained:
        for kind in ("own init", "ViT init"):
            b = twins.get(a, {}).get(kind)
            if b is not None:
                pairs.append((a, b, kind))
        if pixels is not None:
            pairs.append((a, pixels, "raw pixels"))
    for i, a in enumerate(trained):
        pairs += [(a, b, "trained") for b in trained[i + 1:]]
    comparisons = []
    for a, b, kind in pairs:
        if a not in probs or b not in probs:
            continue
        delta, z, p = delong_test(y, probs[a], probs[b])
        comparisons.append({"a": a, "b": b, "kind": kind, "delta": delta, "ci": percentile_ci(boot[a] - boot[b]),
                            "delong_z": z, "delong_p": p})
    return stats, comparisons

# -----------------------------------------------------------------------------
# the paper's reported numbers (Pretext Matters, Table 2: linear probes, mean +- std over 5 seeds, %)

PAPER_TABLE2 = {   # dataset: {method: (AUROC mean, std, F1 mean, std)}
    "MMOTU": {"MAE": (78.43, 0.12, 38.04, 1.4), "DINOv3": (84.57, 0.07, 50.31, 0.65),
              "I-JEPA": (82.59, 0.06, 42.03, 0.58)},
    "AUL": {"MAE": (81.86, 0.21, 62.52, 2.1), "DINOv3": (86.77, 0.23, 66.33, 0.52),
            "I-JEPA": (86.47, 0.21, 64.71, 0.81)},
    "TN5000": {"MAE": (69.88, 0.2, 58.25, 2.2), "DINOv3": (72.36, 0.42, 63.34, 1.5),
               "I-JEPA": (75.60, 0.12, 65.83, 1.6)},
    "Fatty Liver": {"MAE": (65.89, 0.6, 50.76, 5.7), "DINOv3": (86.66, 1.5, 64.06, 1.7),
                    "I-JEPA": (98.70, 0.26, 92.80, 1.2)},
    "POCUS": {"MAE": (96.12, 0.19, 91.01, 0.11), "DINOv3": (99.49, 0.07, 94.00, 0.19),
              "I-JEPA": (97.18, 0.06, 90.48, 0.52)},
    "BUTTERFLY": {"MAE": (98.96, 0.11, 88.34, 0.98), "DINOv3": (99.66, 0.03, 90.94, 0.27),
                  "I-JEPA": (99.71, 0.01, 93.15, 0.35)},
    "GBCU": {"MAE": (66.23, 0.18, 48.48, 1.1), "DINOv3": (80.00, 0.55, 64.45, 1.7),
             "I-JEPA": (77.80, 0.28, 59.22, 3.7)},
    "BUSBRA": {"MAE": (76.63, 0.2, 67.30, 2.4), "DINOv3": (77.92, 0.36, 71.51, 1.0),
               "I-JEPA": (76.78, 0.07, 67.35, 0.24)},
}
# normalised task-name prefixes -> the paper's dataset (UltraBench folder names, the synthetic `fatty` task)
PAPER_TABLE2_ALIASES = {"mmotu": "MMOTU", "aul": "AUL", "tn5000": "TN5000", "fatty": "Fatty Liver",
                        "pocus": "POCUS", "butterfly": "BUTTERFLY", "gbcu": "GBCU", "busbra": "BUSBRA"}


def paper_matches(names, aliases):
    """{task name: paper dataset} for the task names whose lowercase alphanumerics start with an alias."""
    out = {}
    for n in names:
        norm = re.sub(r"[^a-z0-9]", "", n.lower())
        for a in sorted(aliases, key=len, reverse=True):
            if norm.startswith(a):
                out[n] = aliases[a]
                break
    return out


def paper_table(table, rows, matches, title, digits):
    """The paper's reported numbers for `rows` (its dataset names), text and Markdown."""
    methods = ["MAE", "DINOv3", "I-JEPA"]
    mine = {v: k for k, v in matches.items()}
    cells = []
    for r in rows:
        cell = []
        for m in methods:
            a, sa, f, sf = table[r][m]
            cell.append([f"{a:.{digits}f}±{sa:g}", f"{f:.{digits}f}±{sf:g}"])
        name = f"{r} (ours: {mine[r]})" if r in mine else r
        cells.append((name, cell))
    return grid_table(title, "Dataset", methods, ["AUROC (%)", "F1 (%)"], cells)

# -----------------------------------------------------------------------------
# reporting


def grid_table(title, corner, groups, subcols, rows, notes=()):
    """A table whose columns come in groups (one per task, or per method) of sub-columns, as text and Markdown.
    rows: [(row label, [[cell per sub-column] per group])]; a label starting with spaces is a sub-row."""
    w = [len(s) for s in subcols]
    for _, cells in rows:
        for cg in cells:
            for j, c in enumerate(cg):
                w[j] = max(w[j], len(c))
    inner = sum(w) + 2 * (len(subcols) - 1)
    gw = max([inner] + [len(g) for g in groups])
    w[0] += gw - inner                                  # a long group name widens its first sub-column
    w0 = max([len(corner)] + [len(label) for label, _ in rows])

    def line(label, cells):
        return f"{label:<{w0}} | " + " | ".join("  ".join(f"{c:>{w[j]}}" for j, c in enumerate(cg)) for cg in cells)

    sub = line(corner, [subcols] * len(groups))
    lines = [title, f"{'':{w0}} | " + " | ".join(f"{g:^{gw}}" for g in groups), sub, "-" * len(sub)]
    lines += [line(label, cells) for label, cells in rows]
    lines += [f"  {n}" for n in notes]
    md = [f"**{title}**", "", f"| {corner} | " + " | ".join(f"{g} {s}" for g in groups for s in subcols) + " |",
          "|---|" + "---:|" * (len(groups) * len(subcols))]
    for label, cells in rows:
        name = label if label == label.lstrip() else "&nbsp;&nbsp;" + label.strip()
        md.append(f"| {name} | " + " | ".join(c for cg in cells for c in cg) + " |")
    md += [""] + [f"- {n}" for n in notes] if notes else []
    return "\n".join(lines), "\n".join(md) + "\n"


def fmt_ci(m, ci, digits):
    return f"{100 * m:.{digits}f} [{100 * ci[0]:.{digits}f}, {100 * ci[1]:.{digits}f}]"


def fmt_sd(m, s, digits):
    return f"{100 * m:.{digits}f}±{100 * s:.{digits}f}"


def fmt_p(p):
    if p is None or not np.isfinite(p):
        return "-"
    return f"{p:.2g}" if p >= 1e-300 else "<1e-300"


def encoder_rows(encoders, n_groups, cell, n_sub):
    """Table rows in reading order: each trained encoder, its twins indented under it, then the raw pixels.
    cell(key, group index) -> [cells] or None (not evaluated there) -> (rows, notes on absent twins)."""
    def cells(key):
        return [cell(key, g) or ["-"] * n_sub for g in range(n_groups)]

    rows = []
    notes = []
    for k, e in encoders.items():
        if e["kind"] != "trained":
            continue
        rows.append((e["label"], cells(k)))
        twins = e.get("twins", {})
        for kind in ("own init", "ViT init"):
            if twins.get(kind) is not None:
                rows.append((f"  {kind}", cells(twins[kind])))
            elif kind in twins.get("missing", {}):
                rows.append((f"  {kind}", [["absent"] + ["-"] * (n_sub - 1)] * n_groups))
                notes.append(f"{e['label']} {kind} absent: {twins['missing'][kind]}")
    rows += [(e["label"], cells(k)) for k, e in encoders.items() if e["kind"] == "raw pixels"]
    return rows, notes


def comparison_table(encoders, groups, comparisons, items, digits):
    """The paired comparisons: comparisons[g] = item_statistics' list of the test set of group g; rows = (A, B)."""
    order = []
    cells = {}
    for g, comps in zip(groups, comparisons):
        for c in comps:
            key = (c["a"], c["b"])
            if key not in cells:
                order.append(key)
                cells[key] = {}
            lo, hi = (100 * v for v in c["ci"])
            cells[key][g] = [f"{100 * c['delta']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]",
                             fmt_p(c["delong_p"])]
    rows = []
    for a, b in order:
        kind = encoders[b]["kind"]
        other = kind if kind in ("own init", "ViT init") else encoders[b]["label"]
        rows.append((f"{encoders[a]['label']} - {other}", [cells[(a, b)].get(g, ["-", "-"]) for g in groups]))
    title = (f"Paired comparisons on the same test {items}: AUROC difference A - B (points) [paired 95% bootstrap "
             f"CI, the same resamples for A and B], DeLong two-sided p")
    return grid_table(title, "A - B", groups, ["ΔAUROC [95% CI]", "DeLong p"], rows)


def probe_tables(doc):
    """Every CI and comparison recomputed from the probabilities in results.json (stored back into it) -> the
    encoder table and the comparison table, as text and Markdown."""
    enc = doc["encoders"]
    tasks = list(doc["tasks"])
    boot = doc["bootstrap"]
    for name in tasks:
        t = doc["tasks"][name]
        probs = {k: np.array([s["test_probs"] for s in r["seeds"]]) for k, r in t["results"].items()}   # (S, N, C)
        trained = [k for k in enc if enc[k]["kind"] == "trained" and k in probs]
        twins = {k: enc[k].get("twins", {}) for k in trained}
        pixels = next((k for k in probs if enc[k]["kind"] == "raw pixels"), None)
        t["statistics"], t["comparisons"] = item_statistics(np.array(t["test_labels"]), probs, trained, twins, pixels,
                                                            boot["resamples"], boot["seed"])
    groups = [f"{n} (test n={len(doc['tasks'][n]['test_labels'])})" for n in tasks]

    def cell(k, g):
        t = doc["tasks"][tasks[g]]
        if k not in t["results"]:
            return None
        r = t["results"][k]
        return [fmt_ci(t["statistics"][k]["auroc"], t["statistics"][k]["ci"], 2), fmt_sd(r["f1_mean"], r["f1_std"], 2)]

    rows, notes = encoder_rows(enc, len(tasks), cell, 2)
    title = (f"Linear probe on frozen features (Table 2 protocol), test split, {doc['protocol']['seeds']} seeds. "
             f"AUROC (%): mean over seeds [95% CI: stratified bootstrap over the test frames, {boot['resamples']} "
             f"resamples]; F1 (%): macro, mean±std over seeds")
    t1, m1 = grid_table(title, "encoder", groups, ["AUROC (%) [95% CI]", "F1 (%)"], rows, notes)
    t2, m2 = comparison_table(enc, groups, [doc["tasks"][n]["comparisons"] for n in tasks], "frames", 2)
    return f"{t1}\n\n{t2}", f"{m1}\n{m2}"


def load_results(path, fmt, protocol, what):
    """The results.json already in OUT, checked against this run before any compute; None if there is none.
    Anything that cannot be added to is refused, and the file is left as it is."""
    if not os.path.exists(path):
        return None
    keep = "it is kept as it is: choose another --out (or move the file away)"
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e}); {keep}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} file (written by an earlier version?); {keep}")
    old = doc.get("protocol", {})
    diff = [f"{k} {old.get(k)!r} there, {protocol[k]!r} now" for k in protocol if old.get(k) != protocol[k]]
    if diff:
        raise ValueError(f"{path}: holds {what} made with other settings ({'; '.join(diff)}); results are only "
                         f"added to under the same settings: {keep}")
    return doc


def write_atomic(path, text):
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def add_encoder(doc, enc):
    """Register an encoder in results.json under its key, its label unique among the encoders already there."""
    old = doc["encoders"].get(enc["key"])
    if old is not None:
        enc["label"] = old["label"]
        if "twins" in enc:                           # the twins found now replace those recorded before
            old["twins"] = enc["twins"]
        return
    doc["encoders"][enc["key"]] = encoder_record(enc)


def main(cfg):
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # everything that can be wrong with the inputs is checked before any compute
    ckpts = [read_checkpoint(p) for p in cfg.ckpts]
    for c in ckpts:
        c["key"] = c["sha256"]
    tasks = [t for d in cfg.data for t in read_tasks(d)]
    seen = {}
    for t in tasks:                              # unique task names (two CSVs with a `fatty` column ...)
        seen[t["name"]] = seen.get(t["name"], 0) + 1
        if seen[t["name"]] > 1:
            t["name"] = f"{t['name']}_{seen[t['name']]}"
    for t in tasks:
        t["fingerprint"] = task_fingerprint(t)
    protocol = {**{k: getattr(cfg, k) for k in PROTOCOL}, "features_version": FEATURES_VERSION}
    res_path = os.path.join(cfg.out, "results.json")
    doc = load_results(res_path, RESULTS_FORMAT, protocol, "probe results")
    if doc is not None:
        for t in tasks:
            old = doc["tasks"].get(t["name"])
            if old is not None and old["fingerprint"] != t["fingerprint"]:
                raise ValueError(f"{res_path}: task {t['name']!r} there was evaluated on other images or labels "
                                 f"({old['where']}); it is kept as it is: choose another --out or rename the task")
    else:
        doc = {"format": RESULTS_FORMAT, "protocol": protocol, "encoders": {}, "tasks": {}}
    doc["protocol"].update(optimizer="Adam", auroc="binary on P[:,1]; macro one-vs-rest", f1="macro",
                           std="sample std over seeds (ddof=1)")
    doc["bootstrap"] = {"resamples": cfg.boot, "seed": cfg.boot_seed, "method": "stratified by class, percentile "
                        "95% interval of the seed-mean AUROC; counts = bootstrap_counts(test_labels, resamples, seed)"}
    taken = {e["label"] for k, e in doc["encoders"].items() if e["kind"] == "trained"}
    new = [c for c in ckpts if c["key"] not in doc["encoders"]]
    for c, lab in zip(new, checkpoint_labels(new, taken)):
        c["label"] = lab
    for c in ckpts:
        if c["key"] in doc["encoders"]:
            c["label"] = doc["encoders"][c["key"]]["label"]
    # the controls: each checkpoint's twins, one raw-pixel baseline per task
    encoders = []
    notes = []
    for c in ckpts:
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
    pixels = None
    if cfg.controls:
        pixels = pixel_encoder(1 if all(c["meta"]["in_chans"] == 1 for c in ckpts) else 3, cfg.pixel_grid)
        encoders.append(pixels)
    unique = {}
    for e in encoders:                           # twins shared by several checkpoints are evaluated once
        unique.setdefault(e["key"], e)
    for e in unique.values():
        add_encoder(doc, e)
    print(f"{len(ckpts)} checkpoint(s) x {len(tasks)} task(s) on {device}"
          + (f", with {len(unique) - len(ckpts)} control encoder(s)" if cfg.controls else ", no controls")
          + f"; probe: Adam lr {cfg.lr}, batch {cfg.batch_size}, <= {cfg.epochs} epochs, patience {cfg.patience}, "
          f"{cfg.seeds} seeds")
    for n in notes:
        print(f"  note: {n}")
    for t in tasks:
        n = {s: len(t["splits"][s][0]) for s in SPLITS}
        print(f"  {t['name']}: {len(t['classes'])} classes {t['classes']}, train/val/test {n['train']}/"
              f"{n['val']}/{n['test']}  ({t['where']})")
        if t["name"] not in doc["tasks"]:
            doc["tasks"][t["name"]] = {"where": t["where"], "classes": t["classes"], "fingerprint": t["fingerprint"],
                                       "n": n, "test_paths": t["splits"]["test"][0],
                                       "test_labels": t["splits"]["test"][1].tolist(), "results": {}}
    os.makedirs(cfg.out, exist_ok=True)
    decoded = Decoded(cfg)
    for e in unique.values():
        label = doc["encoders"][e["key"]]["label"]
        todo = []
        for t in tasks:
            r = doc["tasks"][t["name"]]["results"].get(e["key"])
            if r is None:
                todo.append(t)
                continue
            print(f"{label:>24} | {t['name']}: AUROC {fmt_sd(r['auroc_mean'], r['auroc_std'], 2)}  "
                  f"(kept from an earlier run in {cfg.out})")
        t0 = time.time()
        feats = encoder_features(e, todo, cfg, device, decoded)
        took = f"{time.time() - t0:.1f}s for {len(todo)} task(s)"
        for t in todo:
            results = doc["tasks"][t["name"]]["results"]
            t1 = time.time()
            r = evaluate(feats[t["name"]][0], t, cfg, device, standardize=True if e["kind"] == "raw pixels" else None)
            results[e["key"]] = r
            ep = [s["best_epoch"] for s in r["seeds"]]
            print(f"{label:>24} | {t['name']}: AUROC {fmt_sd(r['auroc_mean'], r['auroc_std'], 2)}  F1 "
                  f"{fmt_sd(r['f1_mean'], r['f1_std'], 2)}  best epochs {ep}  (features "
                  f"{'cached' if feats[t['name']][1] else took}, probe {time.time() - t1:.1f}s)")
            write_atomic(res_path, json.dumps(doc, allow_nan=False))
        e.pop("model", None)
    t0 = time.time()
    text, md = probe_tables(doc)
    took = time.time() - t0
    matches = paper_matches(list(doc["tasks"]), PAPER_TABLE2_ALIASES)
    rows = list(PAPER_TABLE2) if cfg.paper else [d for d in PAPER_TABLE2 if d in matches.values()]
    if rows:
        pt, pm = paper_table(PAPER_TABLE2, rows, matches, "Reported in Pretext Matters, Table 2 (linear probes, "
                             "ViT-S/16 on the real data sets, mean±std over 5 seeds, %)", 2)
        text = f"{text}\n\n{pt}"
        md = f"{md}\n{pm}"
    write_atomic(res_path, json.dumps(doc, allow_nan=False))
    write_atomic(os.path.join(cfg.out, "table.md"), md)
    print(f"\n{text}")
    print(f"\n{res_path} (every encoder and task evaluated into {cfg.out}: per-seed metrics and test "
          f"probabilities), {os.path.join(cfg.out, 'table.md')}; statistics {took:.1f}s")
    return doc

# -----------------------------------------------------------------------------
# benchmark


def benchmark(n=5000, dim=384, classes=2, seeds=5, epochs=300, device="cpu"):
    """Time the probe alone: n synthetic features split 70/10/20, every epoch run (no early stop)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    X = torch.randn(n, dim, generator=g) + 0.3 * torch.randn(classes, dim, generator=g)[y]
    X = X.to(device)
    y = y.to(device)
    a = int(0.7 * n)
    b = int(0.8 * n)
    cfg = Config(epochs=epochs, patience=epochs + 1, seeds=seeds)
    if str(device).startswith("cuda"):
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
        raise SystemExit(f"probe.py: error: {e}")
