"""abmil.py: gated attention against its formula, a learnable MIL task, and the whole pipeline on synthetic slides
(prep/synthetic.py -> prep/wsi.py -> abmil.py) with metrics recomputed by sklearn from the saved probabilities."""
import csv
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

import abmil
import probe
import vit
from prep import wsi
from prep.synthetic import make_slides


@pytest.fixture(autouse=True)
def one_thread():
    # one-bag steps are tiny: on a busy 2-core box two OpenMP threads spin against each other (20x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_attention_sums_to_one_and_matches_the_formula():
    torch.manual_seed(0)
    m = abmil.ABMIL(12, 3, hidden=16, attn_dim=8, dropout=0.25).eval()
    for n in (1, 2, 7, 300):
        x = torch.randn(n, 12)
        logits, a = m(x)
        assert logits.shape == (3,) and a.shape == (n,) and (a >= 0).all()
        torch.testing.assert_close(a.sum(), torch.tensor(1.0))
        h = torch.relu(x @ m.fc[0].weight.T + m.fc[0].bias)                  # Ilse et al. eq. 9, by hand
        V, U, w = m.attention_V[0], m.attention_U[0], m.attention_w
        s = (torch.tanh(h @ V.weight.T + V.bias) * torch.sigmoid(h @ U.weight.T + U.bias)) @ w.weight.T + w.bias
        ref_a = torch.softmax(s[:, 0], 0)
        torch.testing.assert_close(a, ref_a)
        torch.testing.assert_close(logits, m.classifier(ref_a @ h))
        perm = torch.randperm(n)                                             # a bag is a set
        l2, a2 = m(x[perm])
        torch.testing.assert_close(l2, logits)
        torch.testing.assert_close(a2, a[perm])


def mil_bags(rng, n_bags, dim=16):
    """Positive bags hide 1-3 key instances (shifted in 4 dims) among 8-32 noise instances: the mean of a bag
    barely moves, so the attention has to find them."""
    X, y, keys = [], [], []
    for b in range(n_bags):
        n = int(rng.integers(8, 33))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        k = np.zeros(n, bool)
        if b % 2:
            k[rng.choice(n, int(rng.integers(1, 4)), replace=False)] = True
            x[k, :4] += 3.0
        X.append(torch.from_numpy(x))
        y.append(b % 2)
        keys.append(k)
    return X, torch.tensor(y), keys


def test_learns_a_synthetic_mil_task_and_attends_to_the_key_instances():
    X, y, keys = mil_bags(np.random.default_rng(0), 140)
    split = {"train": list(range(80)), "val": list(range(80, 100)), "test": list(range(100, 140))}
    cfg = abmil.Config(hidden=64, attn_dim=32)                               # paper: 20 epochs, lr 1e-3, wd 1e-4
    model, rec = abmil.train_abmil(X, y, split, 2, seed=0, cfg=cfg)
    assert rec["auroc"] > 0.95 and rec["f1"] > 0.85
    assert len(rec["history"]) == 20
    assert rec["val_auroc"] == max(h["val_auroc"] for h in rec["history"])
    assert rec["best_epoch"] == 1 + [h["val_auroc"] for h in rec["history"]].index(rec["val_auroc"])
    model.eval()
    hits = [keys[b][int(model(X[b])[1].argmax())] for b in split["test"] if y[b] == 1]
    assert np.mean(hits) > 0.9                                              # top attention = a key instance
    _, rec2 = abmil.train_abmil(X, y, split, 2, seed=0, cfg=cfg)
    assert rec2["test_probs"] == rec["test_probs"]                           # seeded


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)
    P = rng.dirichlet(np.ones(3), 50).astype(np.float32)
    auroc, f1 = abmil.metrics(y, P)
    assert auroc == pytest.approx(roc_auc_score(y, P / P.sum(1, keepdims=True), multi_class="ovr"))
    assert f1 == pytest.approx(f1_score(y, P.argmax(1), average="macro"))
    y2 = rng.integers(0, 2, 30)
    P2 = rng.dirichlet(np.ones(2), 30)
    assert abmil.metrics(y2, P2)[0] == pytest.approx(roc_auc_score(y2, P2[:, 1]))

# -----------------------------------------------------------------------------
# the pipeline on synthetic slides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("abmil")
    make_slides(str(d / "slides"), 10, seed=0, size=(2048, 1536))
    wsi.tile(replace(wsi.Config(), out=str(d / "patches"), workers=1), [str(d / "slides" / "slides.csv")])
    rows = list(csv.DictReader(open(d / "slides" / "slides.csv")))
    n = {r["slide"]: len(np.load(d / "patches" / r["slide"].split(".")[0] / "coords.npy")) for r in rows}
    # every class in every split, whatever tissue the generator drew: split the tiled slides by hand, by patient
    by_label = {}
    seen = set()
    for r in rows:
        if n[r["slide"]] and r["patient"] not in seen:
            seen.add(r["patient"])
            by_label.setdefault(r["label"], []).append(r["patient"])
    assert all(len(p) >= 3 for p in by_label.values()) and len(by_label) == 2
    where = {p: ("train", "val", "test")[min(i, 2)] if i < 3 else "train"
             for pats in by_label.values() for i, p in enumerate(pats)}
    with open(d / "splits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "patient", "label", "split"])
        w.writerows([r["slide"], r["patient"], r["label"], where.get(r["patient"], "train")] for r in rows)
    torch.manual_seed(0)
    ck = {}
    for method, pool, cls in (("mae", "cls", True), ("ijepa", "mean", False)):
        ck[method] = str(d / method / "ckpt.safetensors")
        vit.save_checkpoint(ck[method], vit.vit_tiny(img_size=32, depth=2, cls_token=cls), method=method, pool=pool,
                            mean=[0.7, 0.5, 0.6], std=[0.2, 0.25, 0.2])
    # MAE's run folder also holds its step-0 encoder (init.safetensors), I-JEPA's does not
    vit.save_checkpoint(str(d / "mae" / "init.safetensors"), vit.vit_tiny(img_size=32, depth=2), method="mae",
                        pool="cls", mean=[0.7, 0.5, 0.6], std=[0.2, 0.25, 0.2])
    return d, ck


def run(d, ck, out, *extra, names=("mae", "ijepa")):
    argv = [*(ck[n] for n in names), "--patches", str(d / "patches"), "--splits", str(d / "splits.csv"),
            "--out", str(d / out), "--img-size", "32", "--seeds", "2", "--epochs", "3", "--topk", "3",
            "--hidden", "32", "--attn-dim", "16", "--boot", "200", *extra]
    return abmil.main(abmil.parse_args(argv))


def by_label(doc):
    return {e["label"]: k for k, e in doc["encoders"].items()}


def test_pipeline_metrics_cache_and_topk(data):
    d, ck = data
    doc = run(d, ck, "run", "--no-controls")
    lab = by_label(doc)
    assert list(lab) == ["MAE", "I-JEPA"] and list(doc["results"]) == [lab["MAE"], lab["I-JEPA"]]
    assert lab["MAE"] == probe.sha256_file(ck["mae"])                       # keyed by the checkpoint's hash
    for key, res in doc["results"].items():
        runs = []
        for s in (0, 1):
            rec = json.load(open(os.path.join(res["dir"], f"seed{s}.json")))
            y, P = np.array(rec["test_labels"]), np.array(rec["test_probs"])
            assert len(y) == doc["n_bags"]["test"] and P.shape == (len(y), 2)
            assert rec["auroc"] == pytest.approx(roc_auc_score(y, P[:, 1]))  # recomputed from the saved file
            assert rec["f1"] == pytest.approx(f1_score(y, P.argmax(1), average="macro"))
            assert rec["test_probs"] == res["seeds"][s]["test_probs"]       # results.json holds them too
            runs.append(rec)
        a = np.array([r["auroc"] for r in runs])
        assert res["auroc_mean"] == pytest.approx(a.mean()) and res["auroc_std"] == pytest.approx(a.std(ddof=1))
        st = doc["statistics"][key]                                         # the bootstrap over the test bags
        assert st["auroc"] == pytest.approx(a.mean()) and st["ci"][0] <= st["auroc"] <= st["ci"][1]
    (c,) = doc["comparisons"]
    assert (c["a"], c["b"], c["kind"]) == (lab["MAE"], lab["I-JEPA"], "trained")
    table = open(d / "run" / "table.md").read()
    assert f"| encoder | {d.name} (test n={doc['n_bags']['test']} slides) AUROC (%) [95% CI] |" in table
    assert "| MAE | " in table and "| I-JEPA | " in table and "| MAE - I-JEPA | " in table

    # cached features = the encoder on the stored patches, resized to 32 and standardised with the meta
    res = doc["results"][lab["MAE"]]
    sid = sorted(s for s in os.listdir(d / "patches") if s != "summary.json")[0]
    z = np.load(d / "run" / "features" / f"{lab['MAE'][:16]}-32px" / f"{sid}.npz")
    patches = np.load(d / "patches" / sid / "patches.npy")
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    model, meta = vit.load_encoder(ck["mae"])
    with torch.no_grad():
        ref = model(((x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)))
    np.testing.assert_allclose(z["features"], ref[:, 0].numpy(), rtol=1e-4, atol=1e-5)   # CLS token
    np.testing.assert_array_equal(z["coords"], np.load(d / "patches" / sid / "coords.npy"))

    # top-k: sorted attention, PNG = the stored patch, coords = coords.npy
    topk = json.load(open(os.path.join(res["dir"], "topk.json")))
    assert len(topk) == sum(doc["n_bags"].values())
    for bag, t in topk.items():
        att = [r["attention"] for r in t["top"]]
        assert att == sorted(att, reverse=True) and len(att) == min(3, t["n_patches"])
        for r in t["top"]:
            img = np.asarray(Image.open(os.path.join(res["dir"], r["png"])))
            np.testing.assert_array_equal(img, np.load(d / "patches" / r["slide"] / "patches.npy")[r["row"]])
            assert [r["x"], r["y"]] == np.load(d / "patches" / r["slide"] / "coords.npy")[r["row"]].tolist()

    # a rerun keeps the stored results; without results.json it reads the feature cache (files untouched) and
    # reproduces every number
    again = run(d, ck, "run", "--no-controls")
    assert again["results"] == doc["results"]
    f = d / "run" / "features" / f"{lab['MAE'][:16]}-32px" / f"{sid}.npz"
    stamp = os.stat(f).st_mtime_ns
    os.remove(d / "run" / "results.json")
    doc2 = run(d, ck, "run", "--no-controls")
    assert os.stat(f).st_mtime_ns == stamp
    assert [r["seeds"] for r in doc2["results"].values()] == [r["seeds"] for r in doc["results"].values()]


def test_controls_twins_and_raw_pixels(data, capsys):
    d, ck = data
    doc = run(d, ck, "controls", "--topk", "0")
    out = capsys.readouterr().out
    lab = by_label(doc)
    assert set(lab) == {"MAE", "MAE own init", "MAE ViT init", "I-JEPA", "I-JEPA ViT init", "raw pixels (16x16 RGB)"}
    assert doc["encoders"][lab["MAE own init"]]["sha256"] == probe.sha256_file(str(d / "mae" / "init.safetensors"))
    assert "I-JEPA own init absent: no " in out and "init.safetensors" in out
    kinds = {(c["a"], c["b"], c["kind"]) for c in doc["comparisons"]}
    assert kinds == {(lab["MAE"], lab["MAE own init"], "own init"), (lab["MAE"], lab["MAE ViT init"], "ViT init"),
                     (lab["MAE"], lab["raw pixels (16x16 RGB)"], "raw pixels"),
                     (lab["I-JEPA"], lab["I-JEPA ViT init"], "ViT init"),
                     (lab["I-JEPA"], lab["raw pixels (16x16 RGB)"], "raw pixels"),
                     (lab["MAE"], lab["I-JEPA"], "trained")}
    table = open(d / "controls" / "table.md").read()
    assert "| &nbsp;&nbsp;own init | absent | - |" in table and "| MAE - own init | " in table
    sid = sorted(s for s in os.listdir(d / "patches") if s != "summary.json")[0]
    x = torch.from_numpy(np.load(d / "patches" / sid / "patches.npy")).permute(0, 3, 1, 2).float() / 255

    def cached(key, px):
        return np.load(d / "controls" / "features" / f"{doc['encoders'][key]['sha256'][:16]}-{px}px" / f"{sid}.npz")

    # ViT init: vit.ViT of the checkpoint's config under torch seed 0, the checkpoint's pooling (mean) and mean/std
    torch.manual_seed(0)
    twin = vit.ViT(vit.config_from_meta(vit.load_checkpoint(ck["ijepa"])[1])).eval()
    x32 = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        ref = twin((x32 - torch.tensor([0.7, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.2]).view(
            1, 3, 1, 1))[:, twin.num_prefix:].mean(1)
    np.testing.assert_allclose(cached(lab["I-JEPA ViT init"], 32)["features"], ref.numpy(), rtol=1e-4, atol=1e-5)
    # raw pixels: the patch at 16 x 16, flattened, in [0, 1] (z-scored with the train bags before ABMIL)
    x16 = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False).flatten(1)
    np.testing.assert_allclose(cached(lab["raw pixels (16x16 RGB)"], 16)["features"], x16.numpy(), atol=1e-6)


def test_never_overwrites_earlier_results(data, capsys):
    """A second evaluation into the same --out adds to results.json (keyed by checkpoint hash); one that cannot be
    added (other ABMIL settings, another data set, a foreign file) is refused, the file untouched."""
    d, ck = data
    first = run(d, ck, "keep", "--no-controls", "--topk", "0", names=("mae",))
    mae = by_label(first)["MAE"]
    second = run(d, ck, "keep", "--no-controls", "--topk", "0", names=("ijepa",))
    saved = json.load(open(d / "keep" / "results.json"))
    assert saved["results"][mae] == first["results"][mae]
    assert set(saved["results"]) == {mae, by_label(second)["I-JEPA"]}
    table = open(d / "keep" / "table.md").read()
    assert "| MAE | " in table and "| I-JEPA | " in table and "| MAE - I-JEPA | " in table
    before = (d / "keep" / "results.json").read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(epochs 3 there, 4 now\).*another --out"):
        run(d, ck, "keep", "--no-controls", "--epochs", "4", names=("mae",))
    with pytest.raises(ValueError, match="another data set"):
        run(d, ck, "keep", "--no-controls", "--bag", "patient", names=("mae",))
    assert (d / "keep" / "results.json").read_bytes() == before
    (d / "keep" / "results.json").write_text("[]")
    with pytest.raises(ValueError, match="not a pretext-abmil-3 file"):
        run(d, ck, "keep", "--no-controls", names=("mae",))
    assert (d / "keep" / "results.json").read_text() == "[]"
    with pytest.raises(SystemExit):
        abmil.parse_args([ck["mae"], "--patches", "p", "--splits", "s.csv", "--seeds", "0"])


def test_paper_numbers_beside_a_matching_data_set(data, capsys):
    d, ck = data
    run(d, ck, "paper", "--no-controls", "--topk", "0", "--name", "CPTAC-Lung", "--seeds", "1", names=("mae",))
    out = capsys.readouterr().out
    assert "Pretext Matters, Table 3" in out and "CPTAC-Lung (ours: CPTAC-Lung)" in out and "91.4±1" in out
    assert "PANDA" not in out
    run(d, ck, "paper2", "--no-controls", "--topk", "0", "--paper", "--seeds", "1", names=("mae",))
    out = capsys.readouterr().out
    assert all(n in out for n in abmil.PAPER_TABLE3) and "64.0±0.6" in out


def test_max_patches_same_subset_for_every_checkpoint(data):
    d, ck = data
    doc = run(d, ck, "capped", "--max-patches", "12", "--seeds", "1", "--topk", "0", "--bag", "patient",
              "--no-controls")
    assert doc["n_patches"] < doc["n_patches_tiled"]
    rows = list(csv.DictReader(open(d / "splits.csv")))
    tiled = [r for r in rows if len(np.load(d / "patches" / r["slide"].split(".")[0] / "coords.npy"))]
    assert sum(doc["n_bags"].values()) == len({r["patient"] for r in tiled}) < len(tiled)   # one bag per patient
    subsets = []
    for key in doc["results"]:
        fd = d / "capped" / "features" / f"{key[:16]}-32px"
        subsets.append({f: np.load(fd / f)["idx"].tolist() for f in sorted(os.listdir(fd))})
    assert subsets[0] == subsets[1]                                         # same patches for MAE and I-JEPA
    assert sum(map(len, subsets[0].values())) == doc["n_patches"] <= 12 + len(subsets[0])
    assert all(len(v) >= 1 for v in subsets[0].values())
    slides = {s: {"n": 100 + 10 * i} for i, s in enumerate("abcde")}
    one, two = abmil.subset(slides, 50, 0), abmil.subset(dict(reversed(list(slides.items()))), 50, 0)
    assert all(np.array_equal(one[s], two[s]) for s in slides)             # independent of order


def test_bad_inputs_are_refused_with_the_file_and_the_fix(data, tmp_path):
    d, ck = data
    grey = str(tmp_path / "us.safetensors")
    vit.save_checkpoint(grey, vit.vit_tiny(img_size=32, depth=2, in_chans=1), method="ijepa", pool="mean",
                        mean=[0.5], std=[0.2])
    base = ["--patches", str(d / "patches"), "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=r"us.safetensors.*in-chans 3"):
        abmil.main(abmil.parse_args([grey, "--splits", str(d / "splits.csv"), *base]))
    rows = list(csv.DictReader(open(d / "splits.csv")))

    def write(name, rows, cols=("slide", "patient", "label", "split")):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        return str(tmp_path / name)

    bad = write("nosplit.csv", rows, cols=("slide", "patient", "label"))
    with pytest.raises(ValueError, match=r"nosplit.csv.*split"):
        abmil.main(abmil.parse_args([ck["mae"], "--splits", bad, *base]))
    test_rows = [r for r in rows if r["split"] == "test"]
    leak = [dict(r) for r in rows] + [{**test_rows[0], "slide": "extra.svs", "split": "train"}]
    os.makedirs(d / "patches" / "extra", exist_ok=True)
    for f in ("meta.json", "coords.npy", "patches.npy"):                   # a copy of a tiled slide
        src = d / "patches" / test_rows[0]["slide"].split(".")[0] / f
        (d / "patches" / "extra" / f).write_bytes(src.read_bytes())
    try:
        with pytest.raises(ValueError, match="patient .* is in splits"):
            abmil.main(abmil.parse_args([ck["mae"], "--splits", write("leak.csv", leak), "--bag", "patient", *base]))
    finally:
        for f in os.listdir(d / "patches" / "extra"):
            os.remove(d / "patches" / "extra" / f)
        os.rmdir(d / "patches" / "extra")
    gone = [r for r in rows if not (r["split"] == "val" and r["label"] == "1")]
    with pytest.raises(ValueError, match=r"class '1' has no tiled slide in the 'val' split"):
        abmil.main(abmil.parse_args([ck["mae"], "--splits", write("gone.csv", gone), *base]))


def test_two_ranks_shard_the_embedding_and_match_one_process(data, torchrun):
    d, ck = data
    argv = [ck["mae"], "--patches", str(d / "patches"), "--splits", str(d / "splits.csv"), "--img-size", "32",
            "--seeds", "1", "--epochs", "2", "--topk", "0", "--hidden", "32", "--attn-dim", "16", "--device", "cpu",
            "--boot", "100"]
    # torchrun --standalone picks its own free port (no race with anything else on the machine), in a
    # process group of its own that a timeout kills whole (tests/conftest.py)
    p = torchrun(["abmil.py", *argv, "--out", str(d / "ddp")])
    assert p.returncode == 0, p.stderr[-3000:]
    one = abmil.main(abmil.parse_args(argv + ["--out", str(d / "single")]))
    two = json.load(open(d / "ddp" / "results.json"))
    assert list(two["results"]) == list(one["results"])                     # the same encoders, the same keys
    for key in one["results"]:
        fd = f"{one['encoders'][key]['sha256'][:16]}-{16 if key.startswith('raw-pixels') else 32}px"
        files = sorted(os.listdir(d / "single" / "features" / fd))
        assert files == sorted(os.listdir(d / "ddp" / "features" / fd)) and len(files) >= 8
        for f in files:
            np.testing.assert_allclose(np.load(d / "ddp" / "features" / fd / f)["features"],
                                       np.load(d / "single" / "features" / fd / f)["features"], atol=1e-5)
        for a, b in zip(two["results"][key]["seeds"], one["results"][key]["seeds"]):
            np.testing.assert_allclose(a.pop("test_probs"), b.pop("test_probs"), atol=1e-5)
            assert a == pytest.approx(b, abs=1e-5)
