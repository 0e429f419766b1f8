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
                           warmup=1, no_augment=False)
    bench.train_main(a)
    out = capsys.readouterr().out
    assert f"## {method} training step on cpu" in out
    assert "img/s" in out and "GFLOP/img" in out
