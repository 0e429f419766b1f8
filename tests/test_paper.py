"""paper.py: the whole protocol end to end with --tiny on data that prep/synthetic.py writes (ultrasound frames,
two probe tasks in two layouts, organ masks, ten slides), a rerun that skips every step, the dry run's commands,
and the refusals of bad layouts before anything runs."""
import csv
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest

import paper
from prep import wsi
from prep.synthetic import make_slides, make_ultrasound


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("paper")
    src = d / "src"
    rows = make_ultrasound(str(src), n=48, size=64)
    us = d / "us"
    shutil.copytree(src / "raw", us / "frames")
    shutil.copytree(src / "tasks" / "fatty", us / "tasks" / "fatty")           # folder layout
    les = us / "tasks" / "lesion"                                              # CSV layout, paths beside it
    (les / "img").mkdir(parents=True)
    with open(les / "lesion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for path, _, lesion, split in rows:
            name = os.path.basename(path)
            shutil.copy(src / "clean" / name, les / "img" / name)
            w.writerow([f"img/{name}", lesion, split])
    (us / "seg" / "images").mkdir(parents=True)
    (us / "seg" / "masks").mkdir(parents=True)
    for path, *_ in rows[:6]:
        shutil.copy(src / path, us / "seg" / "images")
        shutil.copy(src / "masks" / os.path.basename(path), us / "seg" / "masks")
    # ten slides; a splits.csv that puts every class in every split among the slides that have tissue patches
    w_dir = d / "wsi_data"
    make_slides(str(w_dir), 10, seed=0, size=(2048, 1536))
    wsi.tile(replace(wsi.Config(), out=str(d / "tiles"), workers=1), [str(w_dir / "slides.csv")])
    slides = list(csv.DictReader(open(w_dir / "slides.csv")))
    tiled = {r["slide"]: len(np.load(d / "tiles" / r["slide"].split(".")[0] / "coords.npy")) for r in slides}
    by_label = {}
    for r in slides:
        if tiled[r["slide"]] and r["patient"] not in sum(by_label.values(), []):
            by_label.setdefault(r["label"], []).append(r["patient"])
    where = {p: ("train", "val", "test")[min(i, 2)] for pats in by_label.values() for i, p in enumerate(pats)}
    with open(w_dir / "splits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "patient", "label", "split"])
        w.writerows([r["slide"], r["patient"], r["label"], where.get(r["patient"], "train")] for r in slides)
    return us, w_dir


def test_tiny_protocol_end_to_end_and_rerun(inputs, tmp_path, capfd):
    us, w_dir = inputs
    out = tmp_path / "out"
    cfg = paper.parse_args(["--us", str(us), "--wsi", str(w_dir), "--out", str(out), "--tiny", "--workers", "1"])
    paper.main(cfg)
    text = capfd.readouterr().out
    state = json.load(open(out / "paper.json"))
    for m in paper.METHODS:
        for modality, chans in (("us", "1"), ("wsi", "3")):
            cmd = state["steps"][f"pretrain {modality} {m}"]["cmd"]
            assert cmd[cmd.index("--in-chans") + 1] == chans and cmd[cmd.index("--out") + 1] == str(out / f"{modality}-{m}")
            assert (out / f"{modality}-{m}" / "ckpt.safetensors").exists()
            assert (out / f"{modality}-{m}" / "init.safetensors").exists()   # the run's step-0 twin (contract 2)
    usj = state["steps"]["pretrain us usjepa"]["cmd"]
    assert usj[usj.index("--teacher") + 1] == str(out / "us-mae" / "ckpt.safetensors")
    dino = state["steps"]["pretrain wsi dino"]["cmd"]
    assert dino[dino.index("--lr") + 1] == "1e-5"                           # Table 4, histopathology
    # the probe on the prepped task images, with every control
    probe = json.load(open(out / "probe" / "results.json"))
    assert set(probe["tasks"]) == {"fatty", "lesion"}
    assert all(t["where"].startswith(str(out / "us" / "tasks")) for t in probe["tasks"].values())
    kinds = [e["kind"] for e in probe["encoders"].values()]
    assert kinds.count("trained") == 4 and "own init" in kinds and "ViT init" in kinds and "raw pixels" in kinds
    assert {e["label"] for e in probe["encoders"].values() if e["kind"] == "trained"} == {
        "MAE", "DINOv3", "I-JEPA", "US-JEPA"}
    for t in probe["tasks"].values():
        assert len(t["results"]) == len(probe["encoders"])                 # every encoder on every task
        assert {c["kind"] for c in t["comparisons"]} == {"own init", "ViT init", "raw pixels", "trained"}
    abm = json.load(open(out / "abmil" / "results.json"))
    assert abm["dataset"] == w_dir.name and len(abm["results"]) == len(abm["encoders"])
    assert [e["kind"] for e in abm["encoders"].values()].count("trained") == 4
    seg = list(csv.DictReader(open(out / "segscore.csv")))
    assert len(seg) == 6
    summary = (out / "summary.md").read_text()
    for s in ("Linear probe on frozen features", "ABMIL on frozen features", "Pretext Matters, Table 2",
              "Pretext Matters, Table 3", "5.76e-21", "| MAE - own init |"):
        assert s in summary
    assert "98.70±0.26" in text and "91.4±1" in text                        # the paper's numbers beside ours
    # the same command again: every recorded step is skipped, the evaluations reuse what they wrote
    before = (out / "probe" / "results.json").read_text()
    paper.main(cfg)
    text = capfd.readouterr().out
    assert text.count("done earlier") == len(state["steps"]) and "kept from an earlier run" in text
    assert json.loads((out / "probe" / "results.json").read_text())["tasks"]["fatty"]["results"] == json.loads(
        before)["tasks"]["fatty"]["results"]
    # another command for a step already done is refused, nothing touched
    with pytest.raises(SystemExit, match="pretrain us mae was done .* with another command"):
        paper.main(replace(cfg, train_args="--seed 1"))


def test_dry_run_prints_the_paper_settings(inputs, tmp_path, capsys):
    us, w_dir = inputs
    paper.main(paper.parse_args(["--us", str(us), "--wsi", str(w_dir), "--out", str(tmp_path / "o"), "--dry-run",
                                 "--nproc", "8"]))
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("== pretrain")]
    assert len(lines) == 8
    for line in lines:                                                       # Table 4 = the scripts' defaults
        assert "--nproc_per_node=8" in line and "--size" not in line and "--img-size" not in line
    assert "prep/ultrasound.py" in text and "--npy" in text and "--size 256" in text
    assert not (tmp_path / "o" / "us-mae").exists() and not (tmp_path / "o" / "paper.json").exists()


def test_bad_layouts_are_refused_before_anything_runs(inputs, tmp_path):
    us, w_dir = inputs
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit, match="give --us DIR, --wsi DIR or both"):
        paper.main(paper.parse_args(["--out", out]))
    empty = tmp_path / "us"
    (empty / "frames").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"frames: no pretraining frames"):
        paper.main(paper.parse_args(["--us", str(empty), "--out", out]))
    shutil.copy(us / "frames" / "frame_00000.png", empty / "frames")
    with pytest.raises(SystemExit, match=r"tasks: no task folders"):
        paper.main(paper.parse_args(["--us", str(empty), "--out", out]))
    shutil.copytree(us / "tasks" / "fatty", empty / "tasks" / "fatty")
    shutil.rmtree(empty / "tasks" / "fatty" / "val" / "fatty")
    with pytest.raises(SystemExit, match=r"class 'fatty' has no images in the 'val' split"):
        paper.main(paper.parse_args(["--us", str(empty), "--out", out]))
    (tmp_path / "w").mkdir()
    with pytest.raises(SystemExit, match=r"slides.csv: missing"):
        paper.main(paper.parse_args(["--wsi", str(tmp_path / "w"), "--out", out]))
    (tmp_path / "w" / "slides.csv").write_text("slide,patient,label\ngone.svs,P1,0\n")
    with pytest.raises(SystemExit, match=r"1 slide\(s\) not found .* gone.svs"):
        paper.main(paper.parse_args(["--wsi", str(tmp_path / "w"), "--out", out]))
    with pytest.raises(SystemExit, match="usjepa needs mae"):
        paper.main(paper.parse_args(["--us", str(us), "--methods", "dino,usjepa", "--out", out]))
    assert not os.path.exists(os.path.join(out, "paper.json"))
