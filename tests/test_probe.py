"""probe.py: the batched 5-seed probe against a plain one-seed nn.Linear + Adam loop, early stopping on the
validation loss, sanity of the metric scale (separable ~1, random labels ~0.5), sklearn metrics recomputed from
results.json, the three task layouts, and the refusals (missing split, absent class, unreadable image,
non-pretext checkpoint)."""
import csv
import json
import os

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
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    a = vit.ViT(vit.ViTConfig(img_size=32, patch_size=8, in_chans=1, embed_dim=64, depth=2, num_heads=4))
    vit.save_checkpoint(d / "mae.safetensors", a, method="mae", pool="cls", mean=[0.45], std=[0.25])
    b = vit.ViT(vit.ViTConfig(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
                              cls_token=False))
    vit.save_checkpoint(d / "ijepa.safetensors", b, method="ijepa", pool="mean", mean=[0.4] * 3, std=[0.3] * 3)
    return str(d / "mae.safetensors"), str(d / "ijepa.safetensors")


def test_end_to_end_results_json_table_and_cache(tmp_path, checkpoints, capsys):
    rng = np.random.default_rng(3)
    folder_task(tmp_path / "three", rng=rng)
    folder_task(tmp_path / "two", classes=("dark", "bright"), rng=rng)
    cfg = Config(ckpts=list(checkpoints), data=[str(tmp_path / "three"), str(tmp_path / "two")],
                 out=str(tmp_path / "out"), epochs=25, patience=5, seeds=3, num_workers=0, img_batch=16)
    doc = probe.main(cfg)
    out = capsys.readouterr().out
    assert "Dataset" in out and "AUROC (%)" in out and "mae" in out and "ijepa" in out
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["protocol"]["f1"] == "macro" and [c["label"] for c in saved["checkpoints"]] == ["mae", "ijepa"]
    for name, t in saved["tasks"].items():
        y = np.array(t["test_labels"])
        for label, r in t["results"].items():
            assert len(r["seeds"]) == 3
            for s in r["seeds"]:
                P = np.array(s["test_probs"])
                assert P.shape == (len(y), len(t["classes"]))
                auroc = roc_auc_score(y, P[:, 1]) if P.shape[1] == 2 else roc_auc_score(
                    y, P / P.sum(1, keepdims=True), multi_class="ovr", average="macro")
                assert s["auroc"] == pytest.approx(auroc, abs=1e-12)
                assert s["f1"] == pytest.approx(f1_score(y, P.argmax(1), average="macro"), abs=1e-12)
            a = np.array([s["auroc"] for s in r["seeds"]])
            assert r["auroc_mean"] == pytest.approx(a.mean()) and r["auroc_std"] == pytest.approx(a.std(ddof=1))
            assert r["auroc_mean"] > 0.75                                 # brightness classes, random ViT
    md = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert md[0].startswith("| Dataset | mae AUROC (%) | mae F1 (%) | ijepa AUROC") and len(md) == 4
    # second run: features from the cache, identical results (seeded)
    feats = sorted((tmp_path / "out" / "features").rglob("*.pt"))
    assert len(feats) == 4
    mtimes = [f.stat().st_mtime_ns for f in feats]
    doc2 = probe.main(cfg)
    assert "features cached" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in feats] == mtimes
    assert doc2["tasks"]["three"]["results"]["mae"]["seeds"] == doc["tasks"]["three"]["results"]["mae"]["seeds"]


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
