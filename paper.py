"""The whole protocol of "Pretext Matters" on your own data: prep, pretraining, linear probes, ABMIL, section 4.1.

    make paper US=data/us WSI=data/wsi                      # = python paper.py --us data/us --wsi data/wsi
    python paper.py --us data/us --wsi data/wsi --out runs/paper --nproc 8      # each pretraining on 8 GPUs
    python paper.py --us data/us --wsi data/wsi --tiny --out /tmp/p             # minutes on a CPU: checks the layout
    python paper.py --us data/us --dry-run                                       # print the commands only

Input layout (give --us, --wsi or both):
    US/
      frames/              pretraining frames: png/jpg/bmp/tif (8/16-bit, multi-page) in any subfolders
      tasks/<task>/        one folder per linear-probe task, in any layout probe.py reads: {train,val,test}/<class>/
                           images, UltraBench v1.0.1's {train,validation,test}.json, or one CSV path,label,split
      seg/images/          optional (section 4.1): images showing the organ ...
      seg/masks/           ... and its masks, 0 background / 255 organ, each with its image's relative path and stem
    WSI/                   one histopathology data set (its folder name names it in the tables)
      slides.csv           slide (a path relative to WSI/), patient, label
      the slides           anything openslide reads (svs, tiff, ndpi, mrxs, ...), where slides.csv says
      splits.csv           optional: slide, patient, label, split; else `prep/wsi.py split` writes one (70/10/20 by
                           patient, stratified by label)

What runs (OUT = --out), each command printed before it runs and recorded in OUT/paper.json:
 1. prep (appendix 0.C): prep/ultrasound.py US/frames -> OUT/us/frames (one .npy stack of --frame-size frames);
    every task's images through the same prep -> OUT/us/tasks/<task>/{train,val,test}/<class>/ (the paper's
    downstream images were processed alike and standardised with the pretraining statistics, which probe.py does
    with each checkpoint's mean/std; --no-prep-tasks probes US/tasks as they are); US/seg/images -> OUT/us/seg
    (sizes kept, so the masks still fit); prep/wsi.py tile -> OUT/wsi/patches, prep/wsi.py split ->
    OUT/wsi/splits.csv (unless WSI/splits.csv), the train split's patch stacks linked into OUT/wsi/frames with
    ImageNet mean/std (0.C).
 2. pretraining at Table 4's settings, ViT-S/16 at 224 (the method scripts' defaults): mae.py, dino.py, ijepa.py
    and US-JEPA (ijepa.py --teacher the MAE run) on OUT/us/frames with --in-chans 1 -> OUT/us-<method>/, and on
    the train slides' patches with --in-chans 3 (dino.py at Table 4's histopathology --lr 1e-5) -> OUT/wsi-<method>/.
    The paper pretrained on separate corpora (4.7 M ultrasound frames; TCGA for histopathology) and evaluated the
    checkpoint where the loss converged (MAE epoch 20, DINOv3 iteration 125000, I-JEPA epoch 3 / 11, 0.B.1);
    here the schedules run to their end unless --train-args says otherwise (e.g. "--epochs 20").
 3. probe.py on every task (Table 2 protocol, 5 seeds, with random twins, raw pixels, bootstrap CIs, DeLong)
    -> OUT/probe/; abmil.py on the slides (Table 3 protocol, likewise) -> OUT/abmil/; both print the paper's
    reported tables beside theirs.
 4. viz.py segscore OUT/us-ijepa OUT/us-dino on OUT/us/seg with US/seg/masks (section 4.1: anchor AUROC and
    Pearson coherence, Wilcoxon) -> OUT/segscore.csv, the paper's p-values printed beside.
OUT/summary.md gathers the tables. Restarting: a step recorded as done with the same command is skipped, an
interrupted pretraining run continues with --resume, and a step recorded with another command is refused
(nothing is overwritten: choose another --out). --tiny swaps in a tiny model and two steps per run (TINY below),
to check a data layout end to end on a CPU in a few minutes; its numbers mean nothing.
"""
import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from probe import add_config_flags, read_tasks

ROOT = os.path.dirname(os.path.abspath(__file__))
METHODS = ("mae", "dino", "ijepa", "usjepa")
NAMES = {"mae": "MAE", "dino": "DINOv3", "ijepa": "I-JEPA", "usjepa": "US-JEPA"}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}   # 0.C: histopathology pretraining
IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")
# --tiny: a 2-block vit_tiny on 32 px frames (4 px patches, an 8 x 8 grid), two steps per run, small heads
TINY = {
    "train": ["--size", "vit_tiny", "--depth", "2", "--img-size", "32", "--patch-size", "4", "--batch-size", "8",
              "--epochs", "1", "--max-steps", "2", "--num-workers", "0", "--device", "cpu"],
    "mae": ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"],
    "dino": ["--n-prototypes", "64", "--head-hidden", "32", "--head-bottleneck", "16", "--n-local", "2"],
    "ijepa": ["--pred-depth", "1", "--pred-dim", "32", "--pred-heads", "2", "--min-keep", "4"],
    "probe": ["--epochs", "5", "--patience", "5", "--seeds", "2", "--boot", "200", "--num-workers", "0",
              "--device", "cpu"],
    "abmil": ["--img-size", "32", "--epochs", "2", "--seeds", "2", "--hidden", "16", "--attn-dim", "8", "--topk", "2",
              "--boot", "200", "--device", "cpu"],
    "viz": ["--device", "cpu"],
}
# Pretext Matters, section 4.1 (liver of AUL, I-JEPA vs DINOv3, Wilcoxon signed-rank)
PAPER_SEGSCORE = ("Reported in Pretext Matters, section 4.1 (liver masks of AUL, I-JEPA vs DINOv3, Wilcoxon "
                  "signed-rank): I-JEPA's anchor AUROC higher, p = 5.76e-21; its mean pairwise Pearson coherence "
                  "higher, p = 7.45e-26")


@dataclass
class Config:
    us: str = ""                  # ultrasound folder: frames/, tasks/<task>/, optional seg/{images,masks}/
    wsi: str = ""                 # histopathology folder: slides.csv, the slides, optional splits.csv
    out: str = "runs/paper"       # every output; paper.json records the steps done (nothing there is overwritten)
    methods: str = "mae,dino,ijepa,usjepa"   # pretraining methods, comma-separated (usjepa needs mae: its teacher)
    tiny: bool = False            # tiny model, two steps per run (TINY): checks the pipeline, not the paper
    frame_size: int = 0           # side of the prepped frames; 0 = img_size * 8 / 7 (256 for 224, the methods' load)
    prep_tasks: bool = True       # run the tasks' images through prep/ultrasound.py as the frames (else as they are)
    nproc: int = 1                # processes (GPUs) per pretraining run, through torchrun --standalone
    workers: int = 4              # processes for prep/ultrasound.py and prep/wsi.py
    train_args: str = ""          # extra flags for every pretraining run, e.g. "--epochs 20 --num-workers 16"
    mae_args: str = ""            # extra flags for mae.py
    dino_args: str = ""           # extra flags for dino.py
    ijepa_args: str = ""          # extra flags for ijepa.py (I-JEPA and US-JEPA)
    probe_args: str = ""          # extra flags for probe.py
    abmil_args: str = ""          # extra flags for abmil.py
    dry_run: bool = False         # print the commands and exit


def parse_args(argv=None):
    tiny = "\n".join(f"    {k:6} {shlex.join(v)}" for k, v in TINY.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"{__doc__.split(chr(10) * 2, 1)[1]}\nTINY (appended by --tiny):\n{tiny}\n",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, Config)
    return Config(**vars(p.parse_args(argv)))

# -----------------------------------------------------------------------------
# the inputs, checked before anything runs


def images_under(d):
    return [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.lower().endswith(IMG_EXTS)]


def check_us(us):
    """-> (tasks [probe.py task dicts], has_seg); a SystemExit naming the folder and the fix otherwise."""
    if not os.path.isdir(us):
        raise SystemExit(f"paper.py: --us {us}: no such folder (expected frames/, tasks/<task>/, optional seg/)")
    frames = os.path.join(us, "frames")
    if not os.path.isdir(frames) or not images_under(frames):
        raise SystemExit(f"paper.py: {frames}: no pretraining frames (png/jpg/bmp/tif or .npy); put the unlabelled "
                         f"frames there")
    root = os.path.join(us, "tasks")
    dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    if not dirs:
        raise SystemExit(f"paper.py: {root}: no task folders; each probe task is tasks/<task>/ in a layout probe.py "
                         f"reads ({{train,val,test}}/<class>/, UltraBench v1.0.1 JSON, or a path,label,split CSV)")
    tasks = []
    for d in dirs:
        try:
            tasks += read_tasks(os.path.join(root, d))
        except ValueError as e:
            raise SystemExit(f"paper.py: {e}") from None
    names = [t["name"] for t in tasks]
    if len(set(names)) < len(names):
        raise SystemExit(f"paper.py: {root}: two tasks share a name ({names}); rename one of the folders")
    seg = [os.path.isdir(os.path.join(us, "seg", s)) for s in ("images", "masks")]
    if any(seg) and not all(seg):
        raise SystemExit(f"paper.py: {os.path.join(us, 'seg')}: needs both images/ and masks/ (or neither)")
    return tasks, all(seg)


def check_wsi(wsi):
    """-> (rows of slides.csv, the splits CSV to use or None)."""
    table = os.path.join(wsi, "slides.csv")
    if not os.path.isfile(table):
        raise SystemExit(f"paper.py: {table}: missing; list the slides there with columns slide, patient, label "
                         f"(slide = path relative to {wsi})")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"slide", "patient", "label"} - set(rows[0] if rows else {})
    if missing:
        raise SystemExit(f"paper.py: {table}: needs columns slide, patient, label (missing {sorted(missing)})")
    absent = [r["slide"] for r in rows if not os.path.isfile(os.path.join(wsi, r["slide"]))]
    if absent:
        raise SystemExit(f"paper.py: {table}: {len(absent)} slide(s) not found under {wsi}, e.g. {absent[0]}")
    splits = os.path.join(wsi, "splits.csv")
    return rows, splits if os.path.isfile(splits) else None

# -----------------------------------------------------------------------------
# steps: a command each, recorded in OUT/paper.json


class Steps:
    """Runs the commands one by one, recording each one done; a done step with the same command is skipped."""

    def __init__(self, out, dry_run):
        self.path = os.path.join(out, "paper.json")
        self.dry_run = dry_run
        self.state = {"steps": {}}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    self.state = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise SystemExit(f"paper.py: {self.path}: unreadable ({e}); it is kept: choose another --out") from None
        self.times = []

    def run(self, name, cmd, resume=None, record=True):
        """Run cmd (a list) unless done; resume: a checkpoint that, if present, continues an interrupted run;
        record=False for steps that always run (the evaluations, which add to their --out and reuse it)."""
        done = self.state["steps"].get(name)
        if done is not None:
            if done["cmd"] != cmd:
                raise SystemExit(f"paper.py: step {name} was done in {os.path.dirname(self.path)} with another "
                                 f"command:\n  {shlex.join(done['cmd'])}\nnot\n  {shlex.join(cmd)}\nits outputs are "
                                 f"kept: choose another --out")
            print(f"== {name}: done earlier ({done['seconds']:.0f}s), skipped")
            return
        full = list(cmd)
        if resume is not None and os.path.exists(resume):
            full += ["--resume", resume]
        print(f"== {name}: {shlex.join(full)}", flush=True)
        if self.dry_run:
            return
        t0 = time.time()
        rc = subprocess.run(full, cwd=ROOT).returncode
        if rc != 0:
            raise SystemExit(f"paper.py: step {name} failed (exit status {rc}); its output is above. Fix it and "
                             f"run the same command again: the steps done are skipped")
        self.times.append((name, time.time() - t0))
        if not record:
            return
        self.state["steps"][name] = {"cmd": cmd, "seconds": time.time() - t0,
                                     "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.path)


def script(name):
    return [sys.executable, os.path.join(ROOT, name)]


def launcher(cfg, name):
    if cfg.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
                os.path.join(ROOT, name)]
    return script(name)


def pretrain_cmd(cfg, method, data, out, chans, extra=()):
    """One pretraining run: the method's defaults (Table 4) + data, out, channels, then the overrides."""
    file = "ijepa.py" if method == "usjepa" else f"{method}.py"
    cmd = launcher(cfg, file) + ["--data", data, "--out", out, "--in-chans", str(chans), *extra]
    if cfg.tiny:
        cmd += TINY["train"] + TINY["ijepa" if method == "usjepa" else method]
    cmd += shlex.split(cfg.train_args)
    cmd += shlex.split(getattr(cfg, f"{'ijepa' if method == 'usjepa' else method}_args"))
    return cmd


def stage_task(task, d):
    """Links a task's images into the folder layout d/{train,val,test}/<class>/ for prep/ultrasound.py (any input
    layout; names made unique by their index)."""
    for s in ("train", "val", "test"):
        paths, labels = task["splits"][s]
        for i, (p, lab) in enumerate(zip(paths, labels)):
            cls = re.sub(r"[/\\:]", "_", task["classes"][lab])
            dst = os.path.join(d, s, cls, f"{i:06d}_{os.path.basename(p)}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.lexists(dst):
                os.symlink(os.path.abspath(p), dst)


def link_wsi_frames(patches, splits, d):
    """The train slides' patch stacks as .npy links in d (the methods read every .npy under --data), with the
    ImageNet mean/std of 0.C in d/stats.json."""
    with open(splits, newline="") as f:
        rows = list(csv.DictReader(f))
    os.makedirs(d, exist_ok=True)
    n = 0
    for r in rows:
        sid = os.path.splitext(os.path.basename(r["slide"]))[0]        # prep/wsi.py names the folders this way
        src = os.path.join(patches, sid, "patches.npy")
        if r.get("split") == "train" and os.path.exists(src):
            dst = os.path.join(d, f"{sid}.npy")
            if not os.path.lexists(dst):
                os.symlink(os.path.abspath(src), dst)
            n += 1
    if n == 0:
        raise SystemExit(f"paper.py: no train slide of {splits} has patches under {patches}; see "
                         f"{os.path.join(patches, 'summary.json')}")
    with open(os.path.join(d, "stats.json"), "w") as f:
        json.dump(IMAGENET, f)
    return n


def segscore_summary(path):
    """Medians and the Wilcoxon tests of viz.py's per-image CSV (columns auroc_a/b, pearson_a/b)."""
    import numpy as np
    from scipy.stats import wilcoxon
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for score in ("auroc", "pearson"):
        a = np.array([float(r[f"{score}_a"]) if r[f"{score}_a"] else np.nan for r in rows])
        b = np.array([float(r[f"{score}_b"]) if r[f"{score}_b"] else np.nan for r in rows])
        ok = np.isfinite(a) & np.isfinite(b)
        p = wilcoxon(a[ok], b[ok]).pvalue if ok.sum() > 0 and np.any(a[ok] != b[ok]) else float("nan")
        out.append(f"{score}: I-JEPA median {np.median(a[ok]) if ok.any() else float('nan'):.3f} vs DINOv3 "
                   f"{np.median(b[ok]) if ok.any() else float('nan'):.3f} over {int(ok.sum())} images, Wilcoxon "
                   f"p = {p:.3g}")
    return out


def main(cfg):
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"paper.py: --methods {cfg.methods!r}: choose from {','.join(METHODS)}")
    if "usjepa" in methods and "mae" not in methods:
        raise SystemExit("paper.py: usjepa needs mae in --methods (the MAE run is its frozen teacher)")
    if not cfg.us and not cfg.wsi:
        raise SystemExit("paper.py: give --us DIR, --wsi DIR or both (the layout is in --help)")
    tasks, has_seg = check_us(cfg.us) if cfg.us else ([], False)
    wsi_rows, wsi_splits = check_wsi(cfg.wsi) if cfg.wsi else ([], None)
    img = 32 if cfg.tiny else 224
    size = cfg.frame_size or img * 8 // 7
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    steps = Steps(out, cfg.dry_run)
    t_start = time.time()
    print(f"paper.py -> {out}: {', '.join(NAMES[m] for m in methods)}"
          + (f"; ultrasound {cfg.us}: {len(tasks)} task(s) {[t['name'] for t in tasks]}"
             + (", section 4.1 masks" if has_seg else "") if cfg.us else "")
          + (f"; histopathology {cfg.wsi}: {len(wsi_rows)} slides" if cfg.wsi else "")
          + (" (--tiny: the pipeline, not the paper)" if cfg.tiny else ""))
    prep_us = script("prep/ultrasound.py")
    tables = []
    seg_csv = None
    if cfg.us:
        # 1. prep: frames (one stack), the tasks' images the same way, the section 4.1 images at their size
        frames = os.path.join(out, "us", "frames")
        steps.run("prep us frames", prep_us + [os.path.join(cfg.us, "frames"), "--out", frames, "--size", str(size),
                                               "--npy", "--workers", str(cfg.workers)])
        task_dirs = []
        for t in tasks:
            if not cfg.prep_tasks:
                where = t["where"].split(" [")[0]                # a CSV with several label columns: once
                if where not in task_dirs:
                    task_dirs.append(where)
                continue
            src = os.path.join(out, "us", "tasks-src", t["name"])
            dst = os.path.join(out, "us", "tasks", t["name"])
            if not cfg.dry_run:
                stage_task(t, src)
            steps.run(f"prep task {t['name']}", prep_us + [src, "--out", dst, "--size", str(size), "--workers",
                                                            str(cfg.workers)])
            task_dirs.append(dst)
        seg = os.path.join(out, "us", "seg")
        if has_seg:
            steps.run("prep seg images", prep_us + [os.path.join(cfg.us, "seg", "images"), "--out", seg, "--size",
                                                    "0", "--workers", str(cfg.workers)])
        # 2. pretraining on the frames
        ckpts = []
        for m in methods:
            run_dir = os.path.join(out, f"us-{m}")
            extra = ["--teacher", os.path.join(out, "us-mae", "ckpt.safetensors")] if m == "usjepa" else []
            ckpt = os.path.join(run_dir, "ckpt.safetensors")
            steps.run(f"pretrain us {m}", pretrain_cmd(cfg, m, frames, run_dir, 1, extra), resume=ckpt)
            ckpts.append(ckpt)
        # 3. linear probes, controls and statistics
        probe_cmd = script("probe.py") + ckpts + ["--data", *task_dirs, "--out", os.path.join(out, "probe"),
                                                  "--pad", "--paper"]
        probe_cmd += (TINY["probe"] if cfg.tiny else []) + shlex.split(cfg.probe_args)
        steps.run("probe", probe_cmd, record=False)
        tables.append(os.path.join(out, "probe", "table.md"))
        # 4. section 4.1
        if has_seg and "ijepa" in methods and "dino" in methods:
            csv_out = os.path.join(out, "segscore.csv")
            steps.run("segscore", script("viz.py") + ["segscore", os.path.join(out, "us-ijepa", "ckpt.safetensors"),
                                                      os.path.join(out, "us-dino", "ckpt.safetensors"), "--images",
                                                      seg, "--masks", os.path.join(cfg.us, "seg", "masks"),
                                                      "--out", csv_out] + (TINY["viz"] if cfg.tiny else []))
            print(PAPER_SEGSCORE)
            seg_csv = csv_out
    if cfg.wsi:
        patches = os.path.join(out, "wsi", "patches")
        steps.run("prep wsi tile", script("prep/wsi.py") + ["tile", os.path.join(cfg.wsi, "slides.csv"), "--out",
                                                            patches, "--workers", str(cfg.workers)])
        splits = wsi_splits
        if splits is None:
            splits = os.path.join(out, "wsi", "splits.csv")
            steps.run("prep wsi split", script("prep/wsi.py") + ["split", os.path.join(cfg.wsi, "slides.csv"),
                                                                 "--out", splits])
        frames = os.path.join(out, "wsi", "frames")
        if not cfg.dry_run:
            n = link_wsi_frames(patches, splits, frames)
            print(f"== {n} train slides' patches linked into {frames} (ImageNet mean/std, 0.C)")
        ckpts = []
        for m in methods:
            run_dir = os.path.join(out, f"wsi-{m}")
            extra = ["--teacher", os.path.join(out, "wsi-mae", "ckpt.safetensors")] if m == "usjepa" else []
            if m == "dino":
                extra = ["--lr", "1e-5"]                     # Table 4: DINOv3's histopathology peak lr
            ckpt = os.path.join(run_dir, "ckpt.safetensors")
            steps.run(f"pretrain wsi {m}", pretrain_cmd(cfg, m, frames, run_dir, 3, extra), resume=ckpt)
            ckpts.append(ckpt)
        name = os.path.basename(os.path.normpath(cfg.wsi))
        abmil_cmd = script("abmil.py") + ckpts + ["--patches", patches, "--splits", splits, "--out",
                                                  os.path.join(out, "abmil"), "--name", name, "--paper"]
        abmil_cmd += (TINY["abmil"] if cfg.tiny else []) + shlex.split(cfg.abmil_args)
        steps.run("abmil", abmil_cmd, record=False)
        tables.append(os.path.join(out, "abmil", "table.md"))
    if cfg.dry_run:
        return None
    # OUT/summary.md: every table, and the section 4.1 numbers beside the paper's
    parts = [f"# Pretext Matters protocol on {', '.join(p for p in (cfg.us, cfg.wsi) if p)}"
             + (" (--tiny: the pipeline, not the paper)" if cfg.tiny else ""), ""]
    for path in tables:
        with open(path) as f:
            parts += [f.read(), ""]
    if seg_csv is not None:
        lines = segscore_summary(seg_csv)
        parts += ["**Section 4.1, organ segmentation by cosine similarity (viz.py segscore, I-JEPA vs DINOv3)**", ""]
        parts += [f"- {line}" for line in lines] + [f"- {PAPER_SEGSCORE}", ""]
        print("\nsection 4.1: " + "; ".join(lines))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(parts))
    took = ", ".join(f"{n} {s:.0f}s" for n, s in steps.times)
    print(f"\npaper.py: done in {time.time() - t_start:.0f}s ({took}); tables in {os.path.join(out, 'summary.md')}")
    return steps.state


if __name__ == "__main__":
    main(parse_args())
