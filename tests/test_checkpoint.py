"""The checkpoint contract: round trip, extra state, and refusals that name the file."""
import json

import pytest
import torch
from safetensors.torch import save_file

import vit
from vit import load_checkpoint, load_encoder, pack_state, save_checkpoint, unpack_state, vit_tiny


def small(**kw):
    return vit_tiny(img_size=32, depth=2, **kw)


def test_round_trip_same_outputs(tmp_path):
    m = small(in_chans=1, num_reg=2, pos_embed="rope", layerscale=1e-5).eval()
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, m, method="dino", pool="cls", mean=[0.2], std=[0.3], args={"lr": 1e-3}, step=7,
                    tensors={"head.w": torch.ones(3)})
    m2, meta = load_encoder(p)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(m2(x), m(x))
    assert not m2.training
    assert meta["method"] == "dino" and meta["pool"] == "cls" and meta["step"] == 7
    assert meta["mean"] == [0.2] and meta["std"] == [0.3] and meta["in_chans"] == 1 and meta["img_size"] == 32
    assert meta["args"] == {"lr": 1e-3} and meta["vit"]["num_reg"] == 2
    tensors, _ = load_checkpoint(p)
    assert torch.equal(tensors["head.w"], torch.ones(3))
    assert not (tmp_path / "ck.safetensors.tmp").exists()


def test_optimizer_state_round_trip_resumes_identically(tmp_path):
    torch.manual_seed(0)
    m = small()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        opt.zero_grad(); m(x).pow(2).mean().backward(); opt.step()
    tensors, skel = pack_state(opt.state_dict(), "optim")
    save_checkpoint(tmp_path / "r.safetensors", m, method="mae", pool="cls", mean=[0] * 3, std=[1] * 3,
                    tensors=tensors, state={"optim": skel, "rng": torch.get_rng_state().tolist()[:4]})
    t, meta = load_checkpoint(tmp_path / "r.safetensors")
    m2, _ = load_encoder(tmp_path / "r.safetensors")
    m2.train()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    opt2.load_state_dict(unpack_state(json.loads(json.dumps(meta["state"]["optim"])), t))
    for mm, oo in ((m, opt), (m2, opt2)):
        oo.zero_grad(); mm(x).pow(2).mean().backward(); oo.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_refuses_files_that_are_not_checkpoints(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.pth.*not a safetensors"):
        load_encoder(junk)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, bare)
    with pytest.raises(ValueError, match="bare.safetensors.*without pretext metadata"):
        load_encoder(bare)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_encoder(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, other, metadata={"pretext": json.dumps({"format": "v0"})})
    with pytest.raises(ValueError, match="other.safetensors.*unknown checkpoint format"):
        load_encoder(other)


def test_refuses_tensors_that_do_not_fit_config(tmp_path):
    m = small()
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, m, method="mae", pool="cls", mean=[0] * 3, std=[1] * 3)
    tensors, meta = load_checkpoint(p)
    meta["vit"]["embed_dim"] = 96                                            # config says 96, weights are 192
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"pretext": json.dumps(meta)})
    with pytest.raises(ValueError, match="bad.safetensors: encoder tensors do not fit"):
        load_encoder(tmp_path / "bad.safetensors")
    del tensors["encoder.norm.weight"]
    meta["vit"]["embed_dim"] = 192
    save_file(tensors, tmp_path / "miss.safetensors", metadata={"pretext": json.dumps(meta)})
    with pytest.raises(ValueError, match="missing.*norm.weight"):
        load_encoder(tmp_path / "miss.safetensors")


def test_bad_arguments_and_interrupted_save_keep_old_file(tmp_path, monkeypatch):
    m = small()
    p = tmp_path / "ck.safetensors"
    with pytest.raises(ValueError, match="pool"):
        save_checkpoint(p, m, method="mae", pool="max", mean=[0] * 3, std=[1] * 3)
    with pytest.raises(ValueError, match="in_chans"):
        save_checkpoint(p, m, method="mae", pool="cls", mean=[0], std=[1])
    save_checkpoint(p, m, method="mae", pool="cls", mean=[0] * 3, std=[1] * 3, step=1)
    before = p.read_bytes()

    def boom(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(p, m, method="mae", pool="cls", mean=[0] * 3, std=[1] * 3, step=2)
    assert p.read_bytes() == before
    assert load_encoder(p)[1]["step"] == 1
