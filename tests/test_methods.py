"""What mae.py, dino.py and ijepa.py do alike, checked on all three: the same data folder gives the
same frames, statistics, channel handling and errors; the command line; runs that are never
overwritten, logs that survive a kill, clean errors for a bad --resume or a diverging loss; the
random twin, the collapse diagnostic, the data-wait fraction, the kernel report and a compiled
step that is one graph with the pretext ops."""
import importlib
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import kernels
import vit

METHODS = ["mae", "dino", "ijepa"]
COMMON = "--device cpu --num-workers 0 --diag-every 0 --log-every 2 --save-every 1000".split()
TINY = {
    "mae": ("--size vit_tiny --depth 2 --img-size 32 --patch-size 8 --decoder-dim 64 --decoder-depth 1 "
            "--decoder-heads 4 --batch-size 8 --epochs 2 --warmup-epochs 1").split(),
    "dino": ("--size vit_tiny --depth 2 --img-size 32 --n-local 2 --n-prototypes 32 --head-hidden 32 "
             "--head-bottleneck 16 --batch-size 8 --epoch-length 0 --epochs 2 --warmup-epochs 0.5").split(),
    "ijepa": ("--size vit_tiny --depth 2 --img-size 64 --patch-size 8 --pred-depth 2 --pred-dim 64 "
              "--pred-heads 2 --batch-size 8 --min-keep 4 --epochs 3").split(),
}
COMMON_FLAGS = ("data out in-chans img-size patch-size size depth batch-size epochs warmup-epochs lr min-lr "
                "weight-decay resume max-steps seed device num-workers save-every log-every compile "
                "diag-every").split()


def method(name):
    return importlib.import_module(name)


def cfg_of(name, *flags):
    return method(name).parse_args(TINY[name] + COMMON + [str(f) for f in flags])


def strict_lines(path):
    """log.jsonl as strict JSON (a bare NaN or Infinity fails), one dict per line."""
    def refuse(c):
        raise ValueError(f"{path}: bare {c} in the log")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def gray_frames(d, n=16, size=40, seed=0):
    """n smooth random grayscale PNG frames."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.uniform(0, 255, (5, 5)).astype(np.uint8)
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(d / f"g{i:02d}.png")
    return d


@pytest.fixture
def mixed(tmp_path):
    """The folder every method must read alike: gray and RGB frames, a 16-bit TIFF, a multi-page
    TIFF, a .npy stack and a corrupt file."""
    d = gray_frames(tmp_path / "mixed", n=10)
    rgb = np.zeros((30, 20, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = np.arange(20) * 10
    Image.fromarray(rgb).save(d / "rgb.png")  # tall: padded left and right
    Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)).save(d / "deep16.tif")
    pages = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (30, 220)]
    pages[0].save(d / "pages.tif", save_all=True, append_images=pages[1:])
    np.save(d / "stack.npy", np.random.default_rng(1).integers(0, 256, (3, 24, 24), dtype=np.uint8))
    (d / "corrupt.png").write_bytes(b"\x89PNG but not really")
    (d / "notes.txt").write_text("not a frame")
    return d

# -----------------------------------------------------------------------------
# one behaviour: frames, statistics, channels, errors, command line


def test_same_folder_same_frames_stats_and_errors(mixed, tmp_path):
    listings = [method(m).list_frames(str(mixed)) for m in METHODS]
    assert listings[0] == listings[1] == listings[2]
    paths, counts = listings[0]
    assert [os.path.basename(p) for p in paths][:4] == ["corrupt.png", "deep16.tif", "g00.png", "g01.png"]
    assert sum(counts) == 10 + 1 + 1 + 2 + 3 + 1 and counts[paths.index(str(mixed / "pages.tif"))] == 2
    for chans in (1, 3):
        decoded = []
        for m in METHODS:
            fr = method(m).Frames(paths, counts, chans, 20)
            decoded.append([fr[i] for i in range(len(fr))])
        for i in range(len(decoded[0])):
            ok = [d[i][1] for d in decoded]
            assert ok == [ok[0]] * 3 and ok[0] == (i != 0)  # only corrupt.png fails, in all
            assert torch.equal(decoded[0][i][0], decoded[1][i][0])
            assert torch.equal(decoded[0][i][0], decoded[2][i][0])
            assert decoded[0][i][0].shape == (chans, 20, 20)
        if chans == 3:  # gray repeated, RGB kept
            gray = decoded[0][2][0]
            assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    deep = method("mae").Frames(paths, counts, 1, 30)[1][0][0].numpy()  # 16-bit: / 257, no stretch
    square = np.zeros((30, 30), np.uint8)
    square[5:25] = (np.arange(600).reshape(20, 30) * 100 / 257 + 0.5).astype(np.uint8)
    assert np.array_equal(deep, np.asarray(Image.fromarray(square).resize((30, 30), Image.BICUBIC)))
    # statistics: computed alike from the same frames, written into --out with the listing's
    # fingerprint
    stats = []
    for m in METHODS:
        mod = method(m)
        data = {"frames": sum(counts), "fingerprint": mod.fingerprint(str(mixed), paths, counts)}
        cfg = cfg_of(m, "--data", mixed, "--out", tmp_path / f"out_{m}", "--load-size", 64)
        stats.append(mod.resolve_stats(mod.Frames(paths, counts, 1, mod.load_size(cfg)), cfg, data)[:2])
        written = json.loads((tmp_path / f"out_{m}" / "stats.json").read_text())
        assert written["fingerprint"] == data["fingerprint"] and written["frames"] == 18
    assert stats[0] == stats[1] == stats[2]
    assert not (mixed / "stats.json").exists()  # the data folder is left alone
    # the same errors, word for word
    for make_bad, call in [
            (lambda: np.save(mixed / "float.npy", np.zeros((2, 4, 4), np.float32)),
             lambda mod: mod.list_frames(str(mixed))),
            (lambda: None, lambda mod: mod.list_frames(str(tmp_path / "absent"))),
            (lambda: (mixed / "stats.json").write_text('{"mean": [0.5, 0.5, 0.5], "std": [0.2, '
                                                       '0.2, 0.2]}'),
             lambda mod: mod.read_stats(str(mixed / "stats.json"), 1))]:
        make_bad()
        messages = []
        for m in METHODS:
            with pytest.raises(SystemExit) as e:
                call(method(m))
            messages.append(str(e.value))
        assert messages[0] == messages[1] == messages[2] and str(tmp_path) in messages[0]
        for p in (mixed / "float.npy", mixed / "stats.json"):
            p.unlink(missing_ok=True)


def test_same_stats_json_rules_in_every_method(tmp_path, capsys):
    """One folder's normalisation, alike in all three for --in-chans 1 and 3: gray frames and a 16-bit
    TIFF without a stats.json, with prep/ultrasound.py's (fingerprinted), after the folder changed and
    with one written by hand; RGB frames; and the same refusals of a stats.json for another channel
    count."""
    gray = gray_frames(tmp_path / "gray", n=6)
    Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)).save(gray / "deep16.tif")
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(4):
        a = np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)
        a[..., 0] //= 2  # a darker red channel
        Image.fromarray(a).save(rgb / f"c{i}.png")

    def outcome(folder, chans, run):
        """(mean, std, where from, what was printed), or the refusal, with each method's --out as OUT:
        the same in all three."""
        seen = []
        for m in METHODS:
            mod = method(m)
            out = tmp_path / f"{run}_{m}"
            cfg = cfg_of(m, "--data", folder, "--out", out, "--in-chans", chans, "--load-size", 40)
            paths, counts = mod.list_frames(str(folder))
            data = {"frames": sum(counts), "fingerprint": mod.fingerprint(str(folder), paths, counts)}
            try:
                mean, std, source = mod.resolve_stats(mod.Frames(paths, counts, chans, 40), cfg, data)
            except SystemExit as e:
                mean, std, source = "refused", None, str(e)
            printed = capsys.readouterr().out
            seen.append([mean, std, source.replace(str(out), "OUT"), printed.replace(str(out), "OUT")])
        assert seen[0] == seen[1] == seen[2]
        return seen[0]

    mean1, std1, source, printed = outcome(gray, 1, "computed")
    assert source == "7 frames (written to OUT/stats.json)" and printed == ""
    mean3, std3, _, _ = outcome(gray, 3, "computed3")
    assert mean3 == pytest.approx(mean1 * 3) and std3 == pytest.approx(std1 * 3)  # gray repeated
    red, green, _ = outcome(rgb, 3, "rgb3")[0]
    assert red < green and len(outcome(rgb, 1, "rgb1")[0]) == 1
    mod = method("mae")
    paths, counts = mod.list_frames(str(gray))
    prep = {"mean": [0.3], "std": [0.1], "frames": 7, "fingerprint": mod.fingerprint(str(gray), paths, counts)}
    (gray / "stats.json").write_text(json.dumps(prep))
    for chans in (1, 3):  # prep's file serves gray frames for either channel count
        assert outcome(gray, chans, f"prep{chans}") == [[0.3] * chans, [0.1] * chans, str(gray / "stats.json"), ""]
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(gray / "new.png")   # the folder changed
    _, _, source, printed = outcome(gray, 1, "changed")
    assert source.startswith("8 frames") and "computed from 7 frames" in printed and "recomputing" in printed
    (gray / "stats.json").write_text(json.dumps({"mean": [0.25], "std": [0.2]}))   # written by hand
    for chans in (1, 3):
        mean, std, source, _ = outcome(gray, chans, f"hand{chans}")
        assert (mean, std) == ([0.25] * chans, [0.2] * chans) and "taken as given" in source
    for values, chans in ((3, 1), (2, 3), (2, 1)):
        (gray / "stats.json").write_text(json.dumps({"mean": [0.5] * values, "std": [0.2] * values}))
        refused, _, message, _ = outcome(gray, chans, f"bad{values}{chans}")
        assert refused == "refused" and f"--in-chans {chans} needs {chans} each" in message
    (gray / "stats.json").write_text(json.dumps({"mean": [0.5, 0.4, 0.3], "std": [0.2] * 3}))
    assert outcome(gray, 3, "three")[:2] == [[0.5, 0.4, 0.3], [0.2] * 3]


@pytest.mark.parametrize("name", METHODS)
def test_a_run_on_the_mixed_folder_skips_the_corrupt_file(name, mixed, tmp_path, capsys):
    out = tmp_path / "run"
    # the whole epoch 0
    method(name).train(cfg_of(name, "--data", mixed, "--out", out, "--max-steps", 2))
    used = np.random.default_rng([0, 0]).permutation(18)[:16]  # 2 batches of 8, drop_last
    assert (f"skipping unreadable {mixed / 'corrupt.png'}" in capsys.readouterr().out) == (0 in used)
    _, meta = vit.load_checkpoint(out / "ckpt.safetensors")
    assert len(meta["mean"]) == 1 and meta["in_chans"] == 1
    assert meta["state"]["data"]["frames"] == 18


@pytest.mark.parametrize("name", METHODS)
def test_help_gives_every_common_flag_its_meaning_and_default(name, capsys):
    with pytest.raises(SystemExit):
        method(name).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())                       # unwrapped
    for flag in COMMON_FLAGS:
        assert f"--{flag} " in text or f"--{flag}," in text, flag
    helps, _ = method(name).config_help()
    for f in method(name).Config.__dataclass_fields__:
        assert helps.get(f), f"{name}.Config.{f} has no comment, so --help would not explain it"
        assert f"--{f.replace('_', '-')}" in text
    assert text.count("(default:") >= len(helps) and "--in-chans N 1 = grayscale" in text
    assert method(name).Config().in_chans == 1 and method(name).parse_args([]) == method(name).Config()
    if name != "mae":
        assert "--weight-decay-end" in text


def test_common_flags_mean_the_same_in_every_method():
    helps = [method(m).config_help()[0] for m in METHODS]
    common = ("data in_chans load_size num_workers size depth patch_size batch_size resume max_steps "
              "save_every log_every diag_every device synthetic_frames").split()
    for flag in common:
        assert helps[0][flag] == helps[1][flag] == helps[2][flag], flag

# -----------------------------------------------------------------------------
# nothing lost, nothing silent (issue 16)


@pytest.mark.parametrize("name", METHODS)
def test_a_run_is_never_overwritten(name, tmp_path):
    data = gray_frames(tmp_path / "data")
    out = tmp_path / "run"
    method(name).train(cfg_of(name, "--data", data, "--out", out, "--max-steps", 4))
    before = {p: (out / p).read_bytes() for p in ("ckpt.safetensors", "init.safetensors", "log.jsonl")}
    with pytest.raises(SystemExit, match=f"{out} holds a run .*: pass --resume {out / 'ckpt.safetensors'}"):
        method(name).train(cfg_of(name, "--data", data, "--out", out, "--max-steps", 2))
    other = tmp_path / "other"
    method(name).train(cfg_of(name, "--data", data, "--out", other, "--max-steps", 1))
    with pytest.raises(SystemExit, match="holds another run"):  # --resume into someone else's run
        method(name).train(cfg_of(name, "--data", data, "--out", other, "--resume", out / "ckpt.safetensors"))
    assert {p: (out / p).read_bytes() for p in before} == before
    started = tmp_path / "started"  # a run stopped before its first checkpoint: nothing to resume
    started.mkdir()
    shutil.copy(out / "log.jsonl", started / "log.jsonl")
    with pytest.raises(SystemExit, match="holds the start of a run that saved no checkpoint .*log.jsonl"):
        method(name).train(cfg_of(name, "--data", data, "--out", started, "--max-steps", 1))
    assert (started / "log.jsonl").read_bytes() == before["log.jsonl"]


@pytest.mark.parametrize("name", METHODS)
def test_the_log_survives_a_kill_and_resume(name, tmp_path):
    data = gray_frames(tmp_path / "data")
    out = tmp_path / "run"
    method(name).train(cfg_of(name, "--data", data, "--out", out, "--max-steps", 2, "--diag-every", 1))
    with open(out / "log.jsonl", "a") as f:  # lines after the checkpoint, and
        # one cut off by the kill
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')
    (out / "ckpt.safetensors.tmp").write_bytes(b"half a checkpoint")        # a kill mid-save
    init = (out / "init.safetensors").read_bytes()
    method(name).train(cfg_of(name, "--data", data, "--out", out, "--max-steps", 4, "--diag-every", 1,
                              "--resume", out / "ckpt.safetensors"))
    lines = strict_lines(out / "log.jsonl")
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4] and lines[3]["loss"] != 9.0
    assert not (out / "ckpt.safetensors.tmp").exists()
    assert (out / "init.safetensors").read_bytes() == init  # the random twin: never rewritten
    for r in lines[1:]:
        assert {"step", "epoch", "loss", "lr", "wd", "img_per_s", "data_wait"} <= set(r)
        assert 0 <= r["data_wait"] <= 1
        assert {"emb_std", "rankme", "patch_std"} <= set(r)  # diagnostic merged into its step
    assert set(lines[0]) >= {"step", "epoch", "lr", "emb_std", "rankme", "patch_std"}
    assert "loss" not in lines[0]
    assert "kernels" in lines[1] and "kernels" in lines[3]  # once per launch: step 1 and 3


@pytest.mark.parametrize("name", METHODS)
def test_a_diverging_loss_stops_cleanly_and_keeps_the_checkpoint(name, tmp_path):
    data = gray_frames(tmp_path / "data")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        method(name).train(cfg_of(name, "--data", data, "--out", out, "--lr", "1e30", "--warmup-epochs", "0",
                                  "--save-every", "1", "--log-every", "1"))
    msg = str(e.value)
    lines = strict_lines(out / "log.jsonl")  # nan is written as null
    bad = next(r for r in lines if r["loss"] is None)
    _, meta = vit.load_checkpoint(out / "ckpt.safetensors")
    assert meta["step"] == bad["step"] - 1
    assert msg.startswith(f"step {bad['step']}: loss is ") and f"(step {meta['step']}) is kept" in msg


@pytest.mark.parametrize("name", METHODS)
def test_two_ranks_stop_alike_and_tear_their_group_down(name, tmp_path, torchrun):
    """A loss diverging under torchrun: both ranks stop at the same step with the same message (a
    SystemExit, no traceback), each destroys its process group on the way out, and the launch ends
    cleanly. A rank that leaves its gloo group behind can abort at exit ("terminate called without
    an active exception"), now and then: the group's state is checked, not the luck of one run."""
    data = gray_frames(tmp_path / "data")
    flags = TINY[name] + COMMON + ["--data", str(data), "--out", str(tmp_path / "run"), "--lr", "1e30",
                                   "--warmup-epochs", "0", "--save-every", "1", "--log-every", "1"]
    p = torchrun(["tests/ddp_run.py", name, str(tmp_path), *flags])
    assert p.returncode == 0, p.stderr[-3000:]
    messages = [(tmp_path / f"rank{r}.exit").read_text() for r in (0, 1)]
    assert messages[0] == messages[1] and messages[0].startswith("step ") and ": loss is " in messages[0]
    assert [(tmp_path / f"rank{r}.group").read_text() for r in (0, 1)] == ["destroyed"] * 2
    assert "Traceback" not in p.stderr and "terminate called" not in p.stderr


@pytest.mark.parametrize("name", METHODS)
def test_bad_resume_files_are_refused_with_a_message(name, tmp_path):
    data = gray_frames(tmp_path / "data")
    good = tmp_path / "good"
    method(name).train(cfg_of(name, "--data", data, "--out", good, "--max-steps", 1))
    ckpt = good / "ckpt.safetensors"
    cut = tmp_path / "cut" / "ckpt.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    twin = tmp_path / "twin" / "twin.safetensors"  # an encoder without training state
    twin.parent.mkdir()
    shutil.copy(good / "init.safetensors", twin)
    foreign_name = "dino" if name != "dino" else "mae"
    foreign = tmp_path / "foreign"
    method(foreign_name).train(cfg_of(foreign_name, "--data", data, "--out", foreign, "--max-steps", 1))
    cases = [(tmp_path / "none" / "ckpt.safetensors", "no such checkpoint"),
             (cut, "not a safetensors file.*cut short"),
             (foreign / "ckpt.safetensors", f"a {foreign_name} checkpoint without {name}.py's "
                                            f"training state"),
             (twin, f"without {name}.py's training state")]
    for path, message in cases:
        with pytest.raises(SystemExit, match=message):
            method(name).train(cfg_of(name, "--data", data, "--out", path.parent, "--resume", path))
    with pytest.raises(SystemExit, match=r"trained with --img-size"):      # other flags
        method(name).train(cfg_of(name, "--data", data, "--out", good, "--resume", ckpt, "--img-size", 96))
    gray_frames(data, n=20, seed=5)                                         # other data
    with pytest.raises(SystemExit, match="trained on 16 frames .* now has 20"):
        method(name).train(cfg_of(name, "--data", data, "--out", good, "--resume", ckpt))


@pytest.mark.parametrize("name", METHODS)
def test_stats_json_knows_its_frames(name, tmp_path, capsys):
    mod = method(name)
    data = gray_frames(tmp_path / "data")
    paths, counts = mod.list_frames(str(data))
    fp = mod.fingerprint(str(data), paths, counts)
    prep = {"mean": [0.3], "std": [0.1], "frames": 16, "fingerprint": fp}  # as prep/ultrasound.py
    (data / "stats.json").write_text(json.dumps(prep))
    mod.train(cfg_of(name, "--data", data, "--out", tmp_path / "a", "--max-steps", 1))
    # prep's, matching
    assert vit.load_checkpoint(tmp_path / "a" / "ckpt.safetensors")[1]["mean"] == [0.3]
    gray_frames(data, n=17, seed=3)  # the folder changed: recomputed
    mod.train(cfg_of(name, "--data", data, "--out", tmp_path / "b", "--max-steps", 1))
    assert "stats.json: computed from 16 frames" in capsys.readouterr().out
    recomputed = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert recomputed["frames"] == 17 and recomputed["mean"][0] != 0.3
    # the user's file is untouched
    assert json.loads((data / "stats.json").read_text())["mean"] == [0.3]
    (data / "stats.json").write_text(json.dumps({"mean": [0.25], "std": [0.2]}))   # written by hand
    mod.train(cfg_of(name, "--data", data, "--out", tmp_path / "c", "--max-steps", 1))
    assert "without a fingerprint of its frames: taken as given" in capsys.readouterr().out
    assert vit.load_checkpoint(tmp_path / "c" / "ckpt.safetensors")[1]["mean"] == [0.25]

# -----------------------------------------------------------------------------
# the random twin, the collapse diagnostic, the data wait, the kernel report, a compiled step


@pytest.mark.parametrize("name", METHODS)
def test_init_is_the_encoder_before_any_update(name, tmp_path):
    data = gray_frames(tmp_path / "data")
    out = tmp_path / "run"
    method(name).train(cfg_of(name, "--data", data, "--out", out, "--max-steps", 2))
    init_t, init_meta = vit.load_checkpoint(out / "init.safetensors")
    ckpt_t, meta = vit.load_checkpoint(out / "ckpt.safetensors")
    assert init_meta["step"] == 0 and init_meta["state"] == {} and set(init_meta) == set(meta)
    for k in ("method", "pool", "mean", "std", "vit", "args"):
        assert init_meta[k] == meta[k], k
    assert set(init_t) == {k for k in ckpt_t if k.startswith("encoder.")}
    assert any(not torch.equal(init_t[k], ckpt_t[k]) for k in init_t)  # training moved the encoder
    torch.manual_seed(0)
    mod = method(name)
    cfg = cfg_of(name, "--data", data)
    if name == "mae":
        fresh = mod.MAE(cfg).encoder
    elif name == "dino":
        fresh = mod.build(cfg, torch.device("cpu"))[1].backbone
    else:
        fresh = mod.build(cfg, "cpu")[1]
    for k, v in fresh.state_dict().items():
        assert torch.equal(init_t[f"encoder.{k}"], v), k


def test_collapse_diagnostic_formulas():
    class Tokens(torch.nn.Module):  # a stand-in encoder: fixed tokens
        num_prefix = 1

        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, x):
            return self.t[x[:, 0, 0, 0].long()]

    g = torch.Generator().manual_seed(0)
    n, N, D = 40, 9, 16
    t = torch.randn(n, 1 + N, D, generator=g, dtype=torch.float64).float()
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2)
    mod = method("mae")
    for pool in ("cls", "mean"):
        got = mod.collapse_diagnostic(Tokens(t), x, pool)
        tn = t.double().numpy()
        z = tn[:, 0] if pool == "cls" else tn[:, 1:].mean(1)
        zn = z / np.linalg.norm(z, axis=1, keepdims=True)
        s = np.linalg.svd(z, compute_uv=False)
        p = s / s.sum() + 1e-7
        pt = tn[:, 1:]
        ln = (pt - pt.mean(-1, keepdims=True)) / np.sqrt(pt.var(-1, keepdims=True) + 1e-5)
        assert got["emb_std"] == pytest.approx(zn.std(0, ddof=1).mean() * np.sqrt(D), rel=1e-4)
        assert got["rankme"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-4)
        assert got["patch_std"] == pytest.approx(ln.std(0, ddof=1).mean(), rel=1e-4)
    # every image alike
    same = mod.collapse_diagnostic(Tokens(t[:1].expand(n, -1, -1) + 0), x, "mean")
    assert same["emb_std"] < 1e-3 and same["rankme"] < 1.01 and same["patch_std"] < 1e-3


@pytest.mark.parametrize("name", METHODS)
def test_diagnostic_runs_at_step_zero_and_every_diag_every(name, tmp_path):
    data = gray_frames(tmp_path / "data")
    out = tmp_path / "run"
    method(name).train(cfg_of(name, "--data", data, "--out", out, "--max-steps", 3, "--diag-every", 2))
    lines = strict_lines(out / "log.jsonl")
    with_diag = [r["step"] for r in lines if "rankme" in r]
    assert with_diag == [0, 2, 3]  # step 0, every 2, the last step
    enc, meta = vit.load_encoder(out / "init.safetensors")  # step 0 is the init's diagnostic
    mod = method(name)
    frames = mod.Frames(*mod.list_frames(str(data)), 1, mod.load_size(cfg_of(name)))

    class Stand:
        master = True
        device = torch.device("cpu")
        mean = meta["mean"]
        std = meta["std"]
    probe = mod.diagnostic_frames(frames, cfg_of(name, "--diag-every", 1), Stand())
    assert probe.shape == (16, 1, enc.cfg.img_size, enc.cfg.img_size)
    expected = mod.collapse_diagnostic(enc, probe, meta["pool"])
    for k, v in expected.items():
        assert lines[0][k] == pytest.approx(v, rel=1e-5), k


def test_data_wait_is_logged_and_warned_about(tmp_path, monkeypatch, capsys):
    mae = method("mae")
    data = gray_frames(tmp_path / "data", n=32)
    decode = mae.Frames.decode

    def slow(self, i):  # a loader far slower than the step
        import time
        time.sleep(0.02)
        return decode(self, i)
    monkeypatch.setattr(mae.Frames, "decode", slow)
    mae.train(cfg_of("mae", "--data", data, "--out", tmp_path / "run", "--max-steps", 4, "--log-every", 1))
    lines = strict_lines(tmp_path / "run" / "log.jsonl")
    assert all(r["data_wait"] > 0.5 for r in lines)
    assert capsys.readouterr().out.count("of the time went to waiting for data (> 10%)") == 1


@pytest.mark.parametrize("name", METHODS)
def test_kernel_report_is_printed_and_logged_once(name, tmp_path, capsys):
    data = gray_frames(tmp_path / "data")
    out = tmp_path / "run"
    method(name).train(cfg_of(name, "--data", data, "--out", out, "--max-steps", 3))
    lines = strict_lines(out / "log.jsonl")
    assert [("kernels" in r) for r in lines] == [True, False, False]
    report = lines[0]["kernels"]
    assert report
    assert all(set(v) >= {"path", "why"} and v["path"] in ("triton", "torch") for v in report.values())
    assert "attention" in " ".join(report)
    assert capsys.readouterr().out.count("kernels: ") == 1 and isinstance(kernels.report_line(), str)


@pytest.mark.parametrize("name", METHODS)
def test_compiled_step_is_one_graph_with_the_pretext_ops(name):
    """The graph a GPU run compiles, traced on CPU: forward and loss with fullgraph=True (no graph
    break), the kernel ops in it as torch.ops.pretext.* custom ops."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):                                     # what inductor is handed,
        graphs.append(gm)                                                # then functionalised and run
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    mod = method(name)
    cfg = cfg_of(name)
    torch.manual_seed(0)
    if name == "mae":
        model = mod.MAE(cfg)
        ids_shuffle, len_keep = mod.random_masking(4, 16, 0.75, torch.Generator().manual_seed(0), "cpu")
        step = torch.compile(model, fullgraph=True, backend=backend)
        loss = step(torch.randn(4, 1, 32, 32), ids_shuffle, len_keep)[0]
        expected = ("attention", "gather")
    elif name == "dino":
        raw, teacher, _ = mod.build(cfg, torch.device("cpu"))
        frames = torch.randint(0, 256, (4, 1, 36, 36), dtype=torch.uint8)
        x_g, x_l = mod.make_views(frames, cfg, torch.Generator().manual_seed(0), torch.tensor([0.5]),
                                  torch.tensor([0.2]))
        extras = mod.batch_extras(cfg, 4, 0, 0)
        step = torch.compile(mod.forward_loss, fullgraph=True, backend=backend)
        loss = step(raw, teacher, x_g, x_l, extras["mask"], extras["mask_idx"], extras["weight"],
                    torch.tensor(0.04), cfg)[0]
        expected = ("attention", "cosine")
    else:
        model, teacher, _, _ = mod.build(cfg, "cpu")
        extras = mod.batch_extras(cfg, 4, 0, 0)
        x = torch.randn(4, 1, 64, 64)
        step = torch.compile(mod.forward_loss, fullgraph=True, backend=backend)
        loss = step(cfg, model, teacher, x, x, extras["masks_enc"], extras["masks_pred"], None)[0]
        expected = ("attention", "gather")
    loss.backward()
    assert math.isfinite(loss.item()) and len(graphs) == 1
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    pretext = sorted(o for o in ops if o.startswith("pretext."))
    for op in expected:
        assert any(op in o for o in pretext), f"no pretext {op} op in the graph: {pretext}"

