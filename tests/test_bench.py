"""bench.py's training-step path runs on CPU for every method (the numbers themselves belong in BENCHMARKS.md)."""
import argparse

import pytest

import bench


@pytest.mark.parametrize("method", ["mae", "ijepa", "dino"])
def test_train_benchmark_reports_throughput_and_flops(method, capsys, monkeypatch):
    import importlib
    mod = importlib.import_module(method)
    real = mod.Config

    def tiny(**kw):            # the smallest model each method accepts, so the smoke run takes seconds
        cfg = real(**kw)
        cfg.depth, cfg.patch_size, cfg.device, cfg.num_workers = 1, 8, "cpu", 0
        for k, v in (("decoder_depth", 1), ("decoder_dim", 64), ("decoder_heads", 2), ("pred_depth", 1),
                     ("n_prototypes", 256), ("head_hidden", 64), ("head_bottleneck", 32), ("n_local", 2),
                     ("min_keep", 4)):
            if hasattr(cfg, k):
                setattr(cfg, k, v)
        return cfg
    monkeypatch.setattr(mod, "Config", tiny)
    a = argparse.Namespace(method=method, batch_size=4, size="vit_tiny", img_size=64, in_chans=3, steps=1,
                           warmup=1, no_augment=False, compile=None, json=None)
    bench.train_main(a)
    out = capsys.readouterr().out
    assert f"## {method} training step on cpu" in out
    assert "img/s" in out and "GFLOP/img" in out


# -----------------------------------------------------------------------------
# gpu-check: the plan, the refusal without a GPU, and its machinery run on CPU with stand-in commands

def test_gpu_check_dry_run_lists_every_stage_head_dim_and_training_run(capsys):
    bench.gpu_check_main(argparse.Namespace(out="runs/x", dry_run=True))
    out = capsys.readouterr().out
    for stage in ("[env]", "[kernel tests]", "[kernel timings]", "[torchrun]", "[train eager]", "[train compiled]"):
        assert stage in out, stage
    assert "N = 1, 50, 197, 333" in out and "fp32 / fp16 / bf16, forward and backward" in out
    assert "head dims 16, 32, 48, 64, 80, 96, 112, 128" in out
    import importlib
    assert tuple(importlib.import_module("kernels.attention").HEAD_DIMS) == (16, 32, 48, 64, 80, 96, 112, 128)
    assert out.count("pretext vs SDPA flash / efficient / cudnn / math") == len(bench.ATTN_SHAPES)
    assert "B256 H6 N197 D64" in out and "B256 H6 N50 D64" in out and "D16: pretext vs SDPA" in out
    for method, batch in (("ijepa", 128), ("mae", 64), ("mae", 256), ("dino", 128)):
        for mode in ("eager", "compiled"):
            assert f"{method} batch {batch} {mode}" in out, (method, batch, mode)
            assert f"--method {method} --batch-size {batch} --size vit_small --img-size 224" in out
    assert "ijepa.py" in out and "torch.distributed.run" in out and "path triton" in out
    assert "within 480 s" in out


def test_gpu_check_refuses_without_cuda(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench.gpu_check_main(argparse.Namespace(out=str(tmp_path / "gc"), dry_run=False))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU here" in err and "--dry-run" in err
    assert not (tmp_path / "gc").exists()


def test_gpu_check_command_refuses_on_cpu_with_exit_2():
    import subprocess
    import sys
    if bench.torch.cuda.is_available():
        pytest.skip("a GPU is here")
    p = subprocess.run([sys.executable, "bench.py", "gpu-check", "--out", "/nonexistent/gc"], cwd=bench.REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr


FAKE = """import json, sys, time
kind, path = sys.argv[1], sys.argv[-1]
if kind == "tests":
    open(path.split('=', 1)[1], 'w').write('<testsuites><testsuite><testcase name="a"/><testcase name="b">'
        '<failure message="boom"/></testcase><testcase name="c"><skipped/></testcase></testsuite></testsuites>')
elif kind == "timings":
    json.dump([dict(op="gather", shape="s", dims=[2, 8, 4, 16], dtype="bfloat16", pass_="fwd+bwd",
                    ms={"pretext": 1.0, "torch.gather(x + pos)": 2.0}, path="triton",
                    best_torch="torch.gather(x + pos)", speedup=2.0, target=1.5, verdict="pass")], open(path, "w"))
elif kind == "train":
    json.dump(dict(img_per_s=6000.0, flops_per_img=1e10, tflops=60.0, mfu=0.06,
                   kernels={"attention": {"path": "triton", "why": ""}}), open(path, "w"))
elif kind == "badjson":
    open(path, "w").write("{")
elif kind == "crash":
    sys.exit("CUDA error: an illegal memory access was encountered")
elif kind == "hang":
    time.sleep(60)
"""


def test_gpu_check_records_every_stage_and_survives_failures(monkeypatch, tmp_path):
    """The orchestration on CPU: stand-in commands for each stage; a crash and a hang are recorded as FAIL, the
    stages after them still run, the budget skips what does not fit, and the JSON and markdown are written."""
    import json
    import sys
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    py = [sys.executable, str(fake)]
    plan = [("env", "env", None, 30),
            ("kernel tests", "shard 1", py + ["tests", "--junitxml={scratch}/tests-0.xml"], 60),
            ("kernel timings", "timings", py + ["timings", "--json", "{scratch}/kernels.json"], 60),
            ("torchrun", "torchrun", py + ["crash", "--out", "{scratch}/run"], 60),
            ("train compiled", "ijepa", py + ["train", "--method", "ijepa", "--batch-size", "128", "--json",
                                              "{scratch}/t1.json"], 60),
            ("train compiled", "mae", py + ["hang", "--method", "mae", "--batch-size", "64", "--json",
                                            "{scratch}/t2.json"], 3),
            ("train eager", "dino", py + ["train", "--method", "dino", "--batch-size", "128", "--json",
                                          "{scratch}/t3.json"], 60),
            ("train eager", "mae", py + ["badjson", "--method", "mae", "--batch-size", "256", "--json",
                                         "{scratch}/t4.json"], 60)]
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(bench, "gpu_check_plan", lambda n: plan)
    monkeypatch.setattr(bench, "gpu_env", lambda: {"gpu": "NVIDIA H100 80GB HBM3", "gpus": 1, "peak_tflops": 989.0})
    monkeypatch.setattr(bench, "MIN_STAGE_S", 1)
    out = tmp_path / "gc"
    bench.gpu_check_main(argparse.Namespace(out=str(out), dry_run=False))
    res = json.loads((out / "gpu-check.json").read_text())
    status = [(s["stage"], s["what"], s["status"]) for s in res["stages"]]
    assert status == [("env", "env", "ok"), ("kernel tests", "tests/test_triton_kernels.py on CUDA, 1 shards", "FAIL"),
                      ("kernel timings", "timings", "pass"), ("torchrun", "torchrun", "FAIL"),
                      ("train compiled", "ijepa", "pass"), ("train compiled", "mae", "FAIL"),
                      ("train eager", "dino", "pass"), ("train eager", "mae", "FAIL")], status
    assert "could not read the result: JSONDecodeError" in res["stages"][-1]["note"]
    assert res["kernel_tests"]["passed"] == 1 and res["kernel_tests"]["failed"] == 1
    assert res["kernel_tests"]["skipped"] == 1 and res["kernel_tests"]["failures"] == ["b: boom"]
    assert "killed at 3 s" in res["stages"][5]["note"]
    assert "illegal memory access" in res["stages"][3]["note"]
    assert [(r["method"], r["batch"], r["mode"], r["verdict"]) for r in res["train"]] == [
        ("ijepa", 128, "compiled", "pass"), ("mae", 64, "compiled", "FAIL"), ("dino", 128, "eager", "pass")]
    md = (out / "gpu-check.md").read_text()
    assert "| ijepa | 128 | compiled | 6000 | 10.0 | 60 | 6.0% | 1697 | >= 5091 (3x) | pass |" in md
    assert "989.0 TFLOP/s" in md and "FAIL b: boom" in md and "| gather | s (2, 8, 4, 16) | fwd+bwd |" in md
    assert "illegal memory access" in (out / "gpu-check.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.log", "gpu-check.md"]


def test_gpu_check_skips_what_does_not_fit_the_budget(monkeypatch, tmp_path):
    import json
    import sys
    plan = [("env", "env", None, 30), ("kernel tests", "s", [sys.executable, "-c", "pass", "--junitxml=x"], 60),
            ("train compiled", "mae", [sys.executable, "-c", "pass", "--method", "mae", "--batch-size", "256",
                                       "--json", "x"], 60)]
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(bench, "gpu_check_plan", lambda n: plan)
    monkeypatch.setattr(bench, "gpu_env", lambda: {"gpu": "x", "gpus": 1, "peak_tflops": 989.0})
    monkeypatch.setattr(bench, "BUDGET_S", 10)
    monkeypatch.setattr(bench, "MIN_STAGE_S", 30)
    bench.gpu_check_main(argparse.Namespace(out=str(tmp_path), dry_run=False))
    res = json.loads((tmp_path / "gpu-check.json").read_text())
    assert res["stages"][-1]["status"] == "skipped" and "out of time" in res["stages"][-1]["note"]
    assert res["stages"][1]["status"] == "FAIL"  # no junit file: nothing passed
    assert res["train"][0]["verdict"] == "skipped"


def test_kernel_timings_code_runs_on_cpu_and_a_fallback_fails_its_target(monkeypatch):
    """time_attention / time_gather / time_cosine at tiny shapes on CPU (a wall-clock timer instead of do_bench):
    every SDPA backend is tried (those that do not run on CPU show as n/a), and since CPU tensors take the PyTorch
    reference path, no row may pass its target."""
    import math
    import time

    def wall_ms(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "bench", wall_ms)
    rows = bench.time_attention(bench.torch.float32, [("tiny", 1, 2, 9, 16)])
    rows += bench.time_gather(bench.torch.float32, [("tiny, repeats", 2, 9, 5, 16)])
    rows += bench.time_cosine(bench.torch.float32, [("tiny", 2, 5, 7, 16)])
    assert [(r["op"], r["pass_"]) for r in rows] == [(op, p) for op in ("attention", "gather", "cosine")
                                                     for p in ("fwd", "fwd+bwd")]
    attn = rows[0]
    assert set(attn["ms"]) == {"pretext", "flash", "efficient", "cudnn", "math"}
    assert not math.isnan(attn["ms"]["math"]) and attn["best_torch"] is not None
    assert all(r["path"] == "torch" for r in rows)
    assert [r["verdict"] for r in rows] == ["FAIL", "FAIL", "", "FAIL", "", "FAIL"]
    assert rows[-1]["max_err"] < 1e-5
    table = bench.kernel_tables(rows)
    assert "| tiny (1, 2, 9, 16) | fwd+bwd |" in table and "FAIL (ran torch)" in table and ">= 1.5x" in table


def test_train_verdicts():
    ok = dict(img_per_s=5100.0, flops_per_img=1.0, tflops=1.0, mfu=0.1, kernels={"attention": {"path": "triton"}})
    assert bench.train_result("ijepa", 128, "compiled", ok, "")["verdict"] == "pass"
    assert bench.train_result("ijepa", 128, "compiled", dict(ok, img_per_s=5000.0), "")["verdict"] == "FAIL"
    fell_back = dict(ok, kernels={"attention": {"path": "torch"}})
    assert bench.train_result("ijepa", 128, "compiled", fell_back, "")["verdict"] == "FAIL"
    assert bench.train_result("dino", 128, "eager", None, "exit 1")["verdict"] == "FAIL"
    assert bench.train_result("mae", 256, "eager", ok, "")["target"] == 1.5 * 3272


def test_torchrun_log_checks(tmp_path):
    import json
    triton = {"attention": {"path": "triton", "why": "x"}, "gather_tokens": {"path": "triton", "why": "y"}}
    lines = [{"step": 0, "epoch": 0, "lr": 0.0}, {"step": 1, "loss": 1.0, "kernels": triton, "data_wait": 0.3},
             {"step": 2, "loss": 0.9, "data_wait": 0.1}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    info = bench.torchrun_log(str(tmp_path))
    assert "problem" not in info and info["steps_logged"] == 2
    lines[1]["kernels"] = dict(triton, attention={"path": "torch", "why": "head dim 40"})
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert "head dim 40" in bench.torchrun_log(str(tmp_path))["problem"]
    assert bench.torchrun_log(str(tmp_path / "none"))["problem"] == "no log.jsonl written"


# -----------------------------------------------------------------------------
# bench.py data: every input kind decodes through mae.py's Frames

def test_data_bench_decodes_every_kind(capsys, tmp_path):
    out = tmp_path / "data.json"
    bench.data_main(argparse.Namespace(kinds=None, frames=3, seconds=0.05, load_size=64, json=str(out)))
    import json
    res = json.loads(out.read_text())
    assert [r["kind"] for r in res] == list(bench.DATA_KINDS)
    assert all(r["frames_per_s"] > 0 and r["workers_for_node"] >= 1 for r in res)
    table = capsys.readouterr().out
    assert "frames/s, one DataLoader worker" in table and "40,728" in table
    assert all(r["decode_per_cpu_s"] > 0 for r in res)
