"""probe.py: the batched 5-seed probe against a plain one-seed nn.Linear + Adam loop, early stopping on the
validation loss, sanity of the metric scale (separable ~1, random labels ~0.5), sklearn metrics recomputed from
results.json, the three task layouts, and the refusals (missing split, absent class, unreadable image,
non-pretext checkpoint)."""
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

import probe
import vit
from probe import Config, evaluate, metrics, read_tasks, train_probe


def blobs(n, d, classes, sep, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g)
    return torch.randn(n, d, generator=g) + sep * centres[y], y


def reference_probe(Xtr, ytr, Xva, yva, C, seed, cfg):
    """The textbook loop for one seed: nn.Linear, autograd cross-entropy, torch.optim.Adam, same init draws and
    shuffles as probe.py (the seed's generator: weight, bias, then one randperm per epoch)."""
    g = torch.Generator().manual_seed(seed)
    D = Xtr.shape[1]
    lin = torch.nn.Linear(D, C)
    with torch.no_grad():
        lin.weight.copy_(torch.empty(C, D).uniform_(-D ** -0.5, D ** -0.5, generator=g))
        lin.bias.copy_(torch.empty(C, 1).uniform_(-D ** -0.5, D ** -0.5, generator=g)[:, 0])
    opt = torch.optim.Adam(lin.parameters(), lr=cfg.lr)
    hist, best, best_state, bad, stopped = [], float("inf"), None, 0, cfg.epochs
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(lin(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            vl = F.cross_entropy(lin(Xva), yva).item()
        hist.append(vl)
        if vl < best:
            best, best_epoch, bad = vl, epoch, 0
            best_state = {k: v.clone() for k, v in lin.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                stopped = epoch
                break
    lin.load_state_dict(best_state)
    return lin, np.array(hist), best_epoch, stopped


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny ops: threads only add synchronisation on a busy CI box
    yield
    torch.set_num_threads(n)


def test_batched_seeds_equal_one_seed_at_a_time(one_thread):
    X, y = blobs(150, 24, 3, 0.4, seed=0)                               # noisy: val loss turns up, stops early
    Xtr, ytr, Xva, yva, Xte = X[:60], y[:60], X[60:100], y[60:100], X[100:]
    cfg = Config(epochs=60, patience=6, batch_size=16, lr=1e-2)
    seeds = [3, 4, 5]
    p = train_probe(Xtr, ytr, Xva, yva, 3, seeds, cfg)
    P = probe.predict(p, Xte)                                            # (S, N, C)
    for k, s in enumerate(seeds):
        lin, hist, best_epoch, stopped = reference_probe(Xtr, ytr, Xva, yva, 3, s, cfg)
        assert int(p["stopped_epoch"][k]) == stopped and int(p["best_epoch"][k]) == best_epoch
        np.testing.assert_allclose(p["val_loss"][:stopped, k].numpy(), hist, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(P[k], lin(Xte).softmax(-1).detach(), rtol=1e-4, atol=1e-5)
    assert (p["stopped_epoch"] < cfg.epochs).all()                       # early stopping did happen


def test_early_stopping_keeps_the_best_val_loss_epoch():
    X, y = blobs(120, 64, 2, 0.3, seed=1)                                # few samples, many dims: overfits
    cfg = Config(epochs=200, patience=10, batch_size=32, lr=1e-2)
    p = train_probe(X[:40], y[:40], X[40:80], y[40:80], 2, [0, 1, 2, 3, 4], cfg)
    for k in range(5):
        best, stop = int(p["best_epoch"][k]), int(p["stopped_epoch"][k])
        h = p["val_loss"][:stop, k]
        assert best == 1 + int(h.argmin()) and stop == best + cfg.patience
        assert float(p["best_val_loss"][k]) == float(h.min())
        # the returned weights are the ones of that epoch: their val loss is the recorded minimum
        P = probe.predict(p, X[40:80])[k]
        assert abs(F.nll_loss(P.log(), y[40:80]).item() - float(h.min())) < 1e-5


def test_separable_task_auroc_one_random_labels_half():
    cfg = Config(epochs=40, patience=10, seeds=3)
    X, y = blobs(600, 32, 3, 3.0, seed=2)
    task = {"classes": ["a", "b", "c"], "splits": {"train": ([None] * 300, y[:300].numpy()),
                                                    "val": ([None] * 100, y[300:400].numpy()),
                                                    "test": ([None] * 200, y[400:].numpy())}}
    r = evaluate({"train": X[:300], "val": X[300:400], "test": X[400:]}, task, cfg, torch.device("cpu"))
    assert r["auroc_mean"] > 0.99 and r["f1_mean"] > 0.95
    X, _ = blobs(1600, 32, 2, 0.0, seed=3)
    y = torch.randint(0, 2, (1600,), generator=torch.Generator().manual_seed(9))   # labels unrelated to X
    task = {"classes": ["a", "b"], "splits": {"train": ([None] * 800, y[:800].numpy()),
                                              "val": ([None] * 200, y[800:1000].numpy()),
                                              "test": ([None] * 600, y[1000:].numpy())}}
    r = evaluate({"train": X[:800], "val": X[800:1000], "test": X[1000:]}, task, cfg, torch.device("cpu"))
    assert abs(r["auroc_mean"] - 0.5) < 0.06


def test_metrics_are_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 50)
    y[:4] = [0, 1, 2, 3]
    P = rng.random((50, 4)).astype(np.float32)
    P /= P.sum(1, keepdims=True)
    auroc, f1 = metrics(y, P)
    assert auroc == roc_auc_score(y, P.astype(np.float64) / P.astype(np.float64).sum(1, keepdims=True),
                                  multi_class="ovr", average="macro")
    assert f1 == f1_score(y, P.argmax(1), average="macro")
    yb = y % 2
    assert metrics(yb, P[:, :2])[0] == roc_auc_score(yb, P[:, 1] / P[:, :2].sum(1))

# -----------------------------------------------------------------------------
# layouts and the end-to-end run


def save_img(path, value, rng, size=20, mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.clip(value + 40 * rng.standard_normal((size, size + 4)), 0, 255).astype(np.uint8)
    Image.fromarray(a if mode == "L" else np.stack([a] * 3, -1)).save(path)


LEVELS = {"dark": 40, "mid": 120, "bright": 200}


def folder_task(root, counts=(8, 4, 6), classes=("dark", "mid", "bright"), rng=None,
                split_names=("train", "val", "test")):
    rng = rng or np.random.default_rng(0)
    for s, n in zip(split_names, counts):
        for c in classes:
            for i in range(n):
                save_img(os.path.join(root, s, c, f"{c}{i}.png"), LEVELS[c], rng, mode="RGB" if i % 2 else "L")
    return root


def test_layouts_parse(tmp_path):
    rng = np.random.default_rng(1)
    folder_task(tmp_path / "fold", split_names=("train", "validation", "test"), rng=rng)
    (t,) = read_tasks(str(tmp_path / "fold"))
    assert t["name"] == "fold" and t["classes"] == ["bright", "dark", "mid"]
    assert [len(t["splits"][s][0]) for s in ("train", "val", "test")] == [24, 12, 18]
    paths, labels = t["splits"]["val"]
    assert all(t["classes"][lab] in p for p, lab in zip(paths, labels))
    # UltraBench v1.0.1: {train,validation,test}.json with image paths relative to the dataset folder
    ub = tmp_path / "aul_mass_v1.0.1"
    names = {0: "Normal", 1: "Benign", 2: "Malignant"}
    for fname, n in (("train.json", 6), ("validation.json", 3), ("test.json", 3)):
        items = []
        for i in range(n):
            lab = i % 3
            rel = f"images/{fname[:-5]}_{i}.jpg"
            save_img(str(ub / rel), 100, rng)
            items.append({"image": rel, "scan_mask": f"masks/scan/{i}.png", "label": lab, "pathology": names[lab]})
        json.dump(items, open(ub / fname, "w"))
    (t,) = read_tasks(str(ub))
    assert t["classes"] == ["0:Normal", "1:Benign", "2:Malignant"]         # ordered by UltraBench's label ids
    assert t["splits"]["test"][1].tolist() == [0, 1, 2] and t["splits"]["train"][0][0] == str(ub / "images/train_0.jpg")
    # CSV: path,label,split; and several label columns (prep/synthetic.py's labels.csv) -> one task per column
    rows = [(f"img/{i}.png", i % 2, ("train", "val", "test")[i % 3]) for i in range(18)]
    for p, _, _ in rows:
        save_img(str(tmp_path / "c" / p), 90, rng)
    with open(tmp_path / "c" / "task.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    (t,) = read_tasks(str(tmp_path / "c" / "task.csv"))
    assert t["name"] == "task" and t["classes"] == ["0", "1"] and len(t["splits"]["train"][0]) == 6
    assert read_tasks(str(tmp_path / "c"))[0]["splits"]["val"][1].tolist() == t["splits"]["val"][1].tolist()
    with open(tmp_path / "c" / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "fatty", "lesion", "split"])
        w.writerows([(p, lab, 1 - lab, s) for p, lab, s in rows])
    a, b = read_tasks(str(tmp_path / "c" / "labels.csv"))
    assert (a["name"], b["name"]) == ("fatty", "lesion")
    assert (a["splits"]["test"][1] == 1 - b["splits"]["test"][1]).all()


def test_refusals(tmp_path):
    rng = np.random.default_rng(2)
    folder_task(tmp_path / "nosplit", counts=(3, 2), split_names=("train", "val"), rng=rng)
    with pytest.raises(ValueError, match="no 'test' split"):
        read_tasks(str(tmp_path / "nosplit"))
    folder_task(tmp_path / "absent", counts=(3, 2, 2), rng=rng)
    for f in os.listdir(tmp_path / "absent" / "val" / "mid"):
        os.remove(tmp_path / "absent" / "val" / "mid" / f)
    with pytest.raises(ValueError, match="class 'mid' has no images in the 'val' split"):
        read_tasks(str(tmp_path / "absent"))
    (tmp_path / "new_ub").mkdir()
    json.dump([], open(tmp_path / "new_ub" / "train_val.json", "w"))
    with pytest.raises(ValueError, match="ultrabench==1.0.1"):
        read_tasks(str(tmp_path / "new_ub"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no task found"):
        read_tasks(str(tmp_path / "empty"))
    junk = tmp_path / "model.pth"
    junk.write_bytes(b"\x80\x04 pickled torch weights")
    with pytest.raises(ValueError, match="not a safetensors file.*vit.py convert"):
        probe.main(Config(ckpts=[str(junk)], data=[str(tmp_path / "absent")], out=str(tmp_path / "o")))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An MAE run folder with its step-0 encoder beside the checkpoint (init.safetensors), and a bare I-JEPA file."""
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(1)
    cfg = vit.ViTConfig(img_size=32, patch_size=8, in_chans=1, embed_dim=64, depth=2, num_heads=4)
    init = vit.ViT(cfg)
    vit.save_checkpoint(d / "mae" / "init.safetensors", init, method="mae", pool="cls", mean=[0.45], std=[0.25])
    with torch.no_grad():
        for p in init.parameters():
            p.add_(0.05 * torch.randn_like(p))                            # "trained": moved away from its init
    vit.save_checkpoint(d / "mae" / "ckpt.safetensors", init, method="mae", pool="cls", mean=[0.45], std=[0.25],
                        step=10)
    b = vit.ViT(vit.ViTConfig(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
                              cls_token=False))
    vit.save_checkpoint(d / "ijepa.safetensors", b, method="ijepa", pool="mean", mean=[0.4] * 3, std=[0.3] * 3)
    return str(d / "mae" / "ckpt.safetensors"), str(d / "ijepa.safetensors")


def by_label(doc):
    return {e["label"]: k for k, e in doc["encoders"].items()}


def check_saved_metrics(saved):
    """Every stored per-seed metric recomputed by sklearn from the stored probabilities."""
    for name, t in saved["tasks"].items():
        y = np.array(t["test_labels"])
        for key, r in t["results"].items():
            assert len(r["seeds"]) == saved["protocol"]["seeds"]
            for s in r["seeds"]:
                P = np.array(s["test_probs"])
                assert P.shape == (len(y), len(t["classes"]))
                auroc = roc_auc_score(y, P[:, 1]) if P.shape[1] == 2 else roc_auc_score(
                    y, P / P.sum(1, keepdims=True), multi_class="ovr", average="macro")
                assert s["auroc"] == pytest.approx(auroc, abs=1e-12)
                assert s["f1"] == pytest.approx(f1_score(y, P.argmax(1), average="macro"), abs=1e-12)
            a = np.array([s["auroc"] for s in r["seeds"]])
            assert r["auroc_mean"] == pytest.approx(a.mean()) and r["auroc_std"] == pytest.approx(a.std(ddof=1))
            # the table's statistic: the seed-mean AUROC on all test items, inside its bootstrap CI
            st = t["statistics"][key]
            assert st["auroc"] == pytest.approx(a.mean(), abs=1e-12)
            assert st["ci"][0] - 1e-12 <= st["auroc"] <= st["ci"][1] + 1e-12


def test_end_to_end_results_json_table_and_cache(tmp_path, checkpoints, capsys):
    rng = np.random.default_rng(3)
    folder_task(tmp_path / "three", rng=rng)
    folder_task(tmp_path / "two", classes=("dark", "bright"), rng=rng)
    cfg = Config(ckpts=list(checkpoints), data=[str(tmp_path / "three"), str(tmp_path / "two")],
                 out=str(tmp_path / "out"), epochs=25, patience=5, seeds=3, num_workers=0, img_batch=16,
                 controls=False, boot=200)
    doc = probe.main(cfg)
    out = capsys.readouterr().out
    assert "encoder" in out and "AUROC (%) [95% CI]" in out and "MAE" in out and "I-JEPA" in out
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["protocol"]["f1"] == "macro" and saved["format"] == probe.RESULTS_FORMAT
    assert [e["label"] for e in saved["encoders"].values()] == ["MAE", "I-JEPA"]
    assert list(saved["encoders"]) == [probe.sha256_file(p) for p in checkpoints]       # keyed by the file hash
    assert saved["bootstrap"]["resamples"] == 200 and saved["bootstrap"]["seed"] == 0
    check_saved_metrics(saved)
    for t in saved["tasks"].values():
        for r in t["results"].values():
            assert r["auroc_mean"] > 0.75                                 # brightness classes, random ViT
    md = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert md[2] == ("| encoder | three (test n=18) AUROC (%) [95% CI] | three (test n=18) F1 (%) "
                     "| two (test n=12) AUROC (%) [95% CI] | two (test n=12) F1 (%) |")
    assert md[4].startswith("| MAE | ") and md[5].startswith("| I-JEPA | ") and md[6] == ""
    assert any(line.startswith("| MAE - I-JEPA | ") for line in md)     # the paired comparison
    # a rerun into the same OUT reuses the stored results; without them, features come from the cache
    again = probe.main(cfg)
    assert "kept from an earlier run" in capsys.readouterr().out
    assert again["tasks"] == doc["tasks"]
    feats = sorted((tmp_path / "out" / "features").rglob("*.pt"))
    assert len(feats) == 4
    mtimes = [f.stat().st_mtime_ns for f in feats]
    os.remove(tmp_path / "out" / "results.json")
    doc2 = probe.main(cfg)
    assert "features cached" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in feats] == mtimes
    k = by_label(doc)["MAE"]
    assert doc2["tasks"]["three"]["results"][k]["seeds"] == doc["tasks"]["three"]["results"][k]["seeds"]


def test_controls_twins_and_raw_pixels(tmp_path, checkpoints, capsys):
    folder_task(tmp_path / "two", counts=(8, 4, 6), classes=("dark", "bright"), rng=np.random.default_rng(4))
    cfg = Config(ckpts=list(checkpoints), data=[str(tmp_path / "two")], out=str(tmp_path / "out"), epochs=10,
                 patience=5, seeds=2, num_workers=0, img_batch=16, boot=100)
    doc = probe.main(cfg)
    out = capsys.readouterr().out
    lab = by_label(doc)
    assert set(lab) == {"MAE", "MAE own init", "MAE ViT init", "I-JEPA", "I-JEPA ViT init", "raw pixels (16x16 RGB)"}
    mae = doc["encoders"][lab["MAE"]]
    init = os.path.join(os.path.dirname(checkpoints[0]), "init.safetensors")
    assert lab["MAE own init"] == mae["twins"]["own init"] and lab["MAE own init"].startswith("twin-")
    assert doc["encoders"][lab["MAE own init"]]["sha256"] == probe.sha256_file(init)
    assert doc["encoders"][lab["MAE own init"]]["kind"] == "own init"
    ij = doc["encoders"][lab["I-JEPA"]]
    assert ij["twins"]["own init"] is None and "init.safetensors" in ij["twins"]["missing"]["own init"]
    assert "I-JEPA own init absent: no " in out                         # said in the table, not invented
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| &nbsp;&nbsp;own init | absent | - |" in md and "| MAE - own init | " in md
    assert "| I-JEPA - ViT init | " in md and "| I-JEPA - own init" not in md
    assert "| MAE - raw pixels (16x16 RGB) | " in md
    check_saved_metrics(doc)
    kinds = {(c["a"], c["kind"]) for c in doc["tasks"]["two"]["comparisons"]}
    assert kinds == {(lab["MAE"], "own init"), (lab["MAE"], "ViT init"), (lab["MAE"], "raw pixels"),
                     (lab["I-JEPA"], "ViT init"), (lab["I-JEPA"], "raw pixels"), (lab["MAE"], "trained")}
    t = read_tasks(str(tmp_path / "two"))[0]
    paths = [p for s in ("train", "val", "test") for p in t["splits"][s][0]]

    def cached(key):
        (f,) = (tmp_path / "out" / "features" / doc["encoders"][key]["sha256"][:16]).glob("*.pt")
        z = torch.load(f, weights_only=True)
        return torch.cat([z[s] for s in ("train", "val", "test")])

    # the ViT-init twin: vit.ViT of the checkpoint's config under torch seed 0, the checkpoint's pool and mean/std
    torch.manual_seed(0)
    twin = vit.ViT(vit.config_from_meta(vit.load_checkpoint(checkpoints[0])[1])).eval()
    x = torch.stack([probe.load_image(p, 1, 32, False) for p in paths]).float() / 255
    with torch.no_grad():
        ref = twin((x - 0.45) / 0.25)[:, 0]
    torch.testing.assert_close(cached(lab["MAE ViT init"]), ref, rtol=1e-4, atol=1e-5)
    # the own-init twin: the init file's encoder
    model, _ = vit.load_encoder(init)
    with torch.no_grad():
        torch.testing.assert_close(cached(lab["MAE own init"]), model((x - 0.45) / 0.25)[:, 0], rtol=1e-4, atol=1e-5)
    # raw pixels: the RGB image resized to 16 x 16 by PIL, in [0, 1] (z-scored by the probe with the train split)
    px = torch.stack([probe.load_image(p, 3, 16, False) for p in paths]).flatten(1).float() / 255
    torch.testing.assert_close(cached(lab["raw pixels (16x16 RGB)"]), px)
    # --no-controls: only the checkpoints
    doc = probe.main(replace(cfg, controls=False, out=str(tmp_path / "bare")))
    assert [e["label"] for e in doc["encoders"].values()] == ["MAE", "I-JEPA"]
    assert "own init" not in (tmp_path / "bare" / "table.md").read_text()


def test_never_overwrites_earlier_results(tmp_path, checkpoints, capsys):
    """A second evaluation into the same --out adds to results.json (keyed by checkpoint hash); one that cannot be
    added (other settings, another task of the same name, an unreadable or foreign file) is refused untouched."""
    rng = np.random.default_rng(5)
    folder_task(tmp_path / "two", counts=(6, 4, 6), classes=("dark", "bright"), rng=rng)
    folder_task(tmp_path / "three", counts=(6, 4, 6), rng=rng)
    out = tmp_path / "out"
    cfg = Config(ckpts=[checkpoints[0]], data=[str(tmp_path / "two")], out=str(out), epochs=8, patience=4, seeds=2,
                 num_workers=0, img_batch=16, controls=False, boot=50)
    first = probe.main(cfg)
    mae = by_label(first)["MAE"]
    kept = first["tasks"]["two"]["results"][mae]
    second = probe.main(replace(cfg, ckpts=[checkpoints[1]], data=[str(tmp_path / "two"), str(tmp_path / "three")]))
    saved = json.load(open(out / "results.json"))
    assert saved["tasks"]["two"]["results"][mae] == kept                 # the first evaluation is still there
    assert set(saved["tasks"]["two"]["results"]) == {mae, by_label(second)["I-JEPA"]}
    assert set(saved["tasks"]["three"]["results"]) == {by_label(second)["I-JEPA"]}
    md = (out / "table.md").read_text()
    assert "| MAE | " in md and "| I-JEPA | " in md and "| MAE - I-JEPA | " in md
    assert "| MAE | " in md.split("three (test n=18) F1 (%) |")[1].split("\n")[2]          # "-" where not run
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"other settings \(epochs 8 there, 9 now\).*another --out"):
        probe.main(replace(cfg, epochs=9))
    folder_task(tmp_path / "other" / "two", counts=(5, 4, 6), classes=("dark", "bright"), rng=rng)
    with pytest.raises(ValueError, match=r"task 'two' there was evaluated on other images or labels"):
        probe.main(replace(cfg, data=[str(tmp_path / "other" / "two")]))
    assert (out / "results.json").read_bytes() == before
    (out / "results.json").write_text('{"tasks": {}}')                    # an earlier probe.py's file
    with pytest.raises(ValueError, match="not a pretext-probe-3 file.*kept as it is"):
        probe.main(cfg)
    (out / "results.json").write_text('{"format": "pretext-probe-3", "tasks": {')
    with pytest.raises(ValueError, match="results.json: unreadable"):
        probe.main(cfg)
    assert (out / "results.json").read_text() == '{"format": "pretext-probe-3", "tasks": {'
    with pytest.raises(SystemExit):
        probe.parse_args(["x.safetensors", "--data", "t", "--boot", "0"])


def test_paper_numbers_beside_matching_tasks(tmp_path, checkpoints, capsys):
    assert probe.paper_matches(["fatty_liver_v1.0.1", "aul_mass_v1.0.1", "fatty", "lesion", "TN5000"],
                               probe.PAPER_TABLE2_ALIASES) == {"fatty_liver_v1.0.1": "Fatty Liver",
                                                               "aul_mass_v1.0.1": "AUL", "fatty": "Fatty Liver",
                                                               "TN5000": "TN5000"}
    folder_task(tmp_path / "fatty", counts=(6, 4, 6), classes=("dark", "bright"), rng=np.random.default_rng(6))
    cfg = Config(ckpts=[checkpoints[0]], data=[str(tmp_path / "fatty")], out=str(tmp_path / "out"), epochs=4,
                 patience=4, seeds=2, num_workers=0, controls=False, boot=50)
    probe.main(cfg)
    out = capsys.readouterr().out
    assert "Pretext Matters, Table 2" in out and "Fatty Liver (ours: fatty)" in out
    assert "98.70±0.26" in out and "86.66±1.5" in out and "MMOTU" not in out
    probe.main(replace(cfg, paper=True))
    out = capsys.readouterr().out
    assert all(d in out for d in probe.PAPER_TABLE2) and "99.71±0.01" in out

# -----------------------------------------------------------------------------
# statistics: the bootstrap against sklearn on every resample, DeLong against its O(n^2) definition


def resample_direct(y, P, counts):
    """The slow way: materialise each resample and ask sklearn, seed by seed."""
    out = np.empty((len(P), len(counts)))
    for b, c in enumerate(counts):
        idx = np.repeat(np.arange(len(y)), c.astype(int))
        for s, p in enumerate(P):
            out[s, b] = metrics(y[idx], p[idx])[0]
    return out


def test_resampled_auroc_is_sklearn_on_each_resample():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    p1 = np.round(rng.random((3, 40)), 1)                                 # many ties
    P = np.stack([1 - p1, p1], -1)                                        # (S, N, 2)
    counts = probe.bootstrap_counts(y, 30, seed=7)
    np.testing.assert_allclose(probe.resampled_auroc(y, P, counts), resample_direct(y, P, counts), atol=1e-12)
    y = np.r_[0, 1, 2, 3, rng.integers(0, 4, 46)]
    P = rng.dirichlet(np.ones(4), (2, 50)).astype(np.float32)             # multi-class, float32 as stored
    counts = probe.bootstrap_counts(y, 20, seed=8)
    np.testing.assert_allclose(probe.resampled_auroc(y, P, counts), resample_direct(y, P, counts), atol=1e-12)
    full = probe.resampled_auroc(y, P, np.ones((1, 50)))[:, 0]
    np.testing.assert_allclose(full, [metrics(y, p)[0] for p in P], atol=1e-12)


def test_bootstrap_is_stratified_seeded_and_its_ci_the_percentiles():
    y = np.array([0] * 7 + [1] * 5 + [2] * 3)
    counts = probe.bootstrap_counts(y, 500, seed=3)
    assert counts.shape == (500, 15) and (counts >= 0).all()
    for c, n in ((0, 7), (1, 5), (2, 3)):
        assert (counts[:, y == c].sum(1) == n).all()                      # every resample keeps the class sizes
    np.testing.assert_array_equal(counts, probe.bootstrap_counts(y, 500, seed=3))
    assert not np.array_equal(counts, probe.bootstrap_counts(y, 500, seed=4))
    # the draws are what they say: default_rng(seed).integers per class, in class order
    rng = np.random.default_rng(3)
    ref = np.zeros((500, 15))
    for c in (0, 1, 2):
        idx = np.flatnonzero(y == c)
        for b, row in enumerate(idx[rng.integers(0, len(idx), size=(500, len(idx)))]):
            np.add.at(ref[b], row, 1)
    np.testing.assert_array_equal(counts, ref)
    # item_statistics' CI and paired CI = numpy percentiles of the direct per-resample seed means
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(12, int), np.ones(9, int)]
    PA = rng.dirichlet(np.ones(2), (3, 21))
    PB = rng.dirichlet(np.ones(2), (3, 21))
    stats, comps = probe.item_statistics(y, {"a": PA, "b": PB}, ["a", "b"], {}, None, 100, seed=5)
    counts = probe.bootstrap_counts(y, 100, seed=5)
    da = resample_direct(y, PA, counts).mean(0)
    db = resample_direct(y, PB, counts).mean(0)
    np.testing.assert_allclose(stats["a"]["ci"], np.percentile(da, [2.5, 97.5]), atol=1e-12)
    assert stats["a"]["auroc"] == pytest.approx(np.mean([metrics(y, p)[0] for p in PA]), abs=1e-12)
    (c,) = comps
    assert (c["a"], c["b"], c["kind"]) == ("a", "b", "trained")
    np.testing.assert_allclose(c["ci"], np.percentile(da - db, [2.5, 97.5]), atol=1e-12)
    assert c["delta"] == pytest.approx(stats["a"]["auroc"] - stats["b"]["auroc"], abs=1e-12)


def brute_components(pos, score):
    """DeLong's V10, V01 straight from the definition: psi(x, z) = 1 if x > z, 1/2 if equal, over all pairs."""
    x = score[pos][:, None]
    z = score[~pos][None, :]
    psi = (x > z) + 0.5 * (x == z)                                        # (m, n)
    return psi.mean(1), psi.mean(0)


def test_delong_fast_components_equal_the_definition_and_sklearn():
    from scipy.stats import norm, rankdata
    rng = np.random.default_rng(2)
    for n in (2, 7, 50, 197):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.random(n) + 0.3 * y, 1)                          # ties between and within classes
        np.testing.assert_allclose(probe.midranks(s), rankdata(s))
        v10, v01 = probe.delong_components(y == 1, s)
        r10, r01 = brute_components(y == 1, s)
        np.testing.assert_allclose(v10, r10, atol=1e-12)
        np.testing.assert_allclose(v01, r01, atol=1e-12)
        assert v10.mean() == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert v01.mean() == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # the paired test against the textbook formula: var = L (S10 / m + S01 / n) L^T, L = (1, -1)
    y = rng.integers(0, 2, 80)
    a = rng.random(80) + 0.8 * y
    b = np.round(rng.random(80) + 0.4 * y, 1)
    PA = np.stack([1 - a / 2, a / 2], -1)[None]                           # (1, N, 2): one seed
    PB = np.stack([1 - b / 2, b / 2], -1)[None]
    ca = brute_components(y == 1, a / 2)
    cb = brute_components(y == 1, b / 2)
    m, k = (y == 1).sum(), (y == 0).sum()
    S10 = np.cov(np.stack([ca[0], cb[0]]))
    S01 = np.cov(np.stack([ca[1], cb[1]]))
    L = np.array([1.0, -1.0])
    var = L @ (S10 / m + S01 / k) @ L
    delta = roc_auc_score(y, a) - roc_auc_score(y, b)
    d, z, p = probe.delong_test(y, PA, PB)
    assert d == pytest.approx(delta, abs=1e-12) and z == pytest.approx(delta / np.sqrt(var), rel=1e-9)
    assert p == pytest.approx(2 * norm.sf(abs(delta) / np.sqrt(var)), rel=1e-9)
    # several seeds: the seed-mean AUROC's components are the seed means of each seed's
    PA3 = np.concatenate([PA, PA[:, ::-1] * 0 + PA, PB])                  # (3, N, 2)
    PB3 = np.concatenate([PB, PA, PB])
    comps = [(brute_components(y == 1, pa[:, 1]), brute_components(y == 1, pb[:, 1])) for pa, pb in zip(PA3, PB3)]
    d10 = np.mean([ca[0] - cb[0] for ca, cb in comps], axis=0)
    d01 = np.mean([ca[1] - cb[1] for ca, cb in comps], axis=0)
    d, z, p = probe.delong_test(y, PA3, PB3)
    assert z == pytest.approx(d / np.sqrt(d10.var(ddof=1) / m + d01.var(ddof=1) / k), rel=1e-9)
    # identical predictions: no difference, p = 1
    assert probe.delong_test(y, PA, PA)[2] == 1.0
    # one positive (or a zero variance beside a difference): not estimable, p = None, "-" in the table
    y1 = np.array([0, 0, 1])
    d, z, p = probe.delong_test(y1, np.array([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]]),
                                np.array([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]]))
    assert d == pytest.approx(-0.5) and z is None and p is None and probe.fmt_p(p) == "-"


def test_delong_multiclass_variance_agrees_with_the_bootstrap():
    """The macro one-vs-rest extension: its variance against the stratified bootstrap's on a large test set."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 900)
    PA = rng.dirichlet(np.ones(3), (1, 900)) + 0.6 * np.eye(3)[y][None]
    PB = rng.dirichlet(np.ones(3), (1, 900)) + 0.4 * np.eye(3)[y][None]
    PB[:, :300] = PA[:, :300]                                             # correlated, as two encoders on one set
    theta, phi = probe.auroc_influence(y, PA[0])
    assert theta == pytest.approx(metrics(y, PA[0])[0], abs=1e-12)
    counts = probe.bootstrap_counts(y, 3000, seed=0)
    boot = probe.resampled_auroc(y, PA, counts)[0] - probe.resampled_auroc(y, PB, counts)[0]
    d, z, p = probe.delong_test(y, PA, PB)
    assert (d / z) ** 2 == pytest.approx(boot.var(), rel=0.12)
    assert probe.influence_var(y, phi) == pytest.approx(probe.resampled_auroc(y, PA, counts)[0].var(), rel=0.12)


def test_unreadable_image_is_named(tmp_path, checkpoints):
    folder_task(tmp_path / "t", counts=(2, 2, 2), classes=("dark", "bright"))
    (tmp_path / "t" / "test" / "dark" / "dark1.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    cfg = Config(ckpts=[checkpoints[0]], data=[str(tmp_path / "t")], out=str(tmp_path / "o"), num_workers=0)
    with pytest.raises(ValueError, match=r"unreadable image.*test/dark/dark1\.png"):
        probe.main(cfg)


def test_sixteen_bit_and_grey_rgb_inputs(tmp_path):
    a = (np.arange(24 * 20).reshape(20, 24) % 256).astype(np.uint16)
    Image.fromarray(a * 257).save(tmp_path / "w16.png")
    Image.fromarray(a.astype(np.uint8)).save(tmp_path / "w8.png")
    x16, x8 = probe.load_image(str(tmp_path / "w16.png"), 1, 16, False), probe.load_image(str(tmp_path / "w8.png"), 1,
                                                                                           16, False)
    assert x16.shape == (1, 16, 16) and torch.equal(x16, x8)
    rgb = probe.load_image(str(tmp_path / "w8.png"), 3, 16, True)         # grey repeated to 3 channels, padded
    assert rgb.shape == (3, 16, 16) and torch.equal(rgb[0], rgb[2]) and rgb[:, :1].max() == 0


def test_bench_times_all_epochs():
    r = probe.benchmark(n=400, dim=16, epochs=4, seeds=2)
    assert r["epochs"] == 4 and r["seconds"] > 0 and r["n_train"] == 280


def test_tasks_sharing_image_files_embed_them_once(tmp_path, checkpoints, monkeypatch):
    """Two tasks whose images are hard links to the same files (the demo's fatty / lesion folders): each encoder
    decodes and embeds every file once, and both tasks get the rows of their own images."""
    folder_task(tmp_path / "a", counts=(6, 4, 6), classes=("dark", "bright"), rng=np.random.default_rng(7))
    for root, _, files in os.walk(tmp_path / "a"):
        for f in files:
            src = os.path.join(root, f)
            rel = os.path.relpath(src, tmp_path / "a").split(os.sep)
            dst = tmp_path / "b" / rel[0] / ("bright" if rel[1] == "dark" else "dark") / rel[2]   # other labels
            os.makedirs(dst.parent, exist_ok=True)
            os.link(src, dst)
    calls = []
    real = probe.extract
    monkeypatch.setattr(probe, "extract", lambda model, meta, images, cfg, device: calls.append(len(images)) or real(
        model, meta, images, cfg, device))
    cfg = Config(ckpts=[checkpoints[0]], data=[str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "o"),
                 epochs=3, patience=3, seeds=2, num_workers=0, controls=False, boot=20)
    probe.main(cfg)
    assert calls == [32]                                                    # one pass over the 32 distinct files
    ta, tb = (read_tasks(str(tmp_path / n))[0] for n in ("a", "b"))
    key = probe.sha256_file(checkpoints[0])[:16]
    fa, fb = (torch.load(probe.feature_path({"sha256": key, "meta": vit.load_checkpoint(checkpoints[0])[1]}, t, cfg),
                         weights_only=True) for t in (ta, tb))
    for s in ("train", "val", "test"):
        pos = {os.path.basename(os.path.dirname(p)) + "/" + os.path.basename(p): i
               for i, p in enumerate(tb["splits"][s][0])}
        for i, p in enumerate(ta["splits"][s][0]):
            other = ("bright" if "/dark/" in p else "dark") + "/" + os.path.basename(p)
            torch.testing.assert_close(fa[s][i], fb[s][pos[other]])


def test_row_names_say_what_was_trained():
    """The table names a run by what it is: a frozen teacher makes US-JEPA, SIGReg is named, never hidden."""
    def meta(method, **args):
        return {"method": method, "args": args}
    assert probe.method_name(meta("mae")) == "MAE"
    assert probe.method_name(meta("dino")) == "DINOv3"
    assert probe.method_name(meta("ijepa", teacher="", sigreg=0.0)) == "I-JEPA"
    assert probe.method_name(meta("ijepa", teacher="runs/mae/ckpt.safetensors", sigreg=0.0)) == "US-JEPA"
    assert probe.method_name(meta("ijepa", teacher="", sigreg=0.05)) == "I-JEPA + SIGReg"
    assert probe.method_name(meta("ijepa", teacher="t.safetensors", sigreg=0.05)) == "US-JEPA + SIGReg"


def test_twins_that_are_the_same_network_are_evaluated_once(tmp_path, capsys):
    """An I-JEPA run starts from vit.py's default init: its own-init twin IS its ViT-init twin, and a second run
    from the same seed has that twin too. One key (weights + preprocessing), one evaluation, every row filled."""
    cfg = vit.ViTConfig(img_size=32, patch_size=8, in_chans=1, embed_dim=64, depth=2, num_heads=4, cls_token=False)
    paths = []
    for run in ("a", "b"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)                                            # as ijepa.py and --twin-seed 0
            init = vit.ViT(cfg)
        vit.save_checkpoint(tmp_path / run / "init.safetensors", init, method="ijepa", pool="mean", mean=[0.45],
                            std=[0.25], args={"run": run})                # different files, the same network
        with torch.no_grad():
            for p in init.parameters():
                p.add_((0.05 if run == "a" else 0.07) * torch.randn_like(p))
        vit.save_checkpoint(tmp_path / run / "ckpt.safetensors", init, method="ijepa", pool="mean", mean=[0.45],
                            std=[0.25], step=10)
        paths.append(str(tmp_path / run / "ckpt.safetensors"))
    folder_task(tmp_path / "two", counts=(8, 4, 6), classes=("dark", "bright"), rng=np.random.default_rng(4))
    ck = probe.read_checkpoint(paths[0])
    own, _ = probe.own_init_twin(ck)
    assert own["key"] == probe.vit_init_twin(ck, 0)["key"]
    assert own["key"] != probe.vit_init_twin(ck, 1)["key"]                 # another seed: another network
    doc = probe.main(Config(ckpts=paths, data=[str(tmp_path / "two")], out=str(tmp_path / "out"), epochs=5,
                            patience=5, seeds=2, num_workers=0, img_batch=16, boot=50))
    assert "with 2 control encoder(s)" in capsys.readouterr().out           # the shared twin + raw pixels
    twins = {doc["encoders"][k]["twins"][kind] for k in doc["encoders"] if doc["encoders"][k]["kind"] == "trained"
             for kind in ("own init", "ViT init")}
    assert twins == {own["key"]} and own["key"] in doc["tasks"]["two"]["results"]
