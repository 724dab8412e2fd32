"""Checkpoints: bitwise round trip, exact resume, and every kind of damage fails clearly."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from hicd_core import CheckpointError, NonFiniteError
from hicd_core import functional as F
from hicd_core import io
from hicd_core.model import TinySiamCD
from hicd_core.optim import AdamW

WIDTHS = (4, 4, 8, 8)


def make(seed=0):
    model = TinySiamCD(widths=WIDTHS, seed=seed)
    return model, AdamW(model.params, lr=1e-2)


def train(model, opt, rng, steps):
    """A deterministic loop whose batches come from ``rng`` (the state a checkpoint must carry)."""
    for _ in range(steps):
        x1 = rng.random((2, 3, 16, 16)).astype(np.float32)
        x2 = rng.random((2, 3, 16, 16)).astype(np.float32)
        label = (rng.random((2, 16, 16)) > 0.7).astype(np.uint8)
        logits, _, cache = model.forward(x1, x2)
        _, dlogits = F.bce_with_logits(logits, label)
        opt.step(model.params, model.backward(dlogits, cache))


def assert_same_state(m1, o1, m2, o2):
    for group in ("params", "buffers"):
        a, b = getattr(m1, group), getattr(m2, group)
        assert set(a) == set(b)
        for k in a:
            assert np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype, (group, k)
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["step"] == s2["step"]
    for slot in ("m", "v"):
        for k in s1[slot]:
            assert np.array_equal(s1[slot][k], s2[slot][k]), (slot, k)


@pytest.fixture
def saved(tmp_path):
    model, opt = make()
    rng = np.random.default_rng(0)
    train(model, opt, rng, 2)
    path = tmp_path / "ckpt.h5"
    io.save_checkpoint(path, model=model, optimizer=opt, step=2, rng_state=rng.bit_generator.state,
                       config={"lr": 1e-2})
    return path, model, opt


def test_round_trip_is_bitwise(saved):
    path, model, opt = saved
    ck = io.load_checkpoint(path)
    assert ck["step"] == 2 and ck["config"] == {"lr": 1e-2}
    assert ck["model_config"] == model.config()
    m2, o2 = make(seed=9)
    m2.load_state_dict(ck, source=str(path))
    o2.load_state_dict(ck["optim"], source=str(path))
    assert_same_state(model, opt, m2, o2)


def test_resume_is_bitwise_identical_to_uninterrupted(tmp_path):
    m_ref, o_ref = make()
    train(m_ref, o_ref, np.random.default_rng(42), 6)

    model, opt = make()
    rng = np.random.default_rng(42)
    train(model, opt, rng, 3)
    path = tmp_path / "mid.h5"
    io.save_checkpoint(path, model=model, optimizer=opt, step=3, rng_state=rng.bit_generator.state)
    del model, opt, rng

    ck = io.load_checkpoint(path)
    model, opt = make(seed=123)  # different init: everything must come from the file
    model.load_state_dict(ck)
    opt.load_state_dict(ck["optim"])
    rng = np.random.default_rng()
    rng.bit_generator.state = ck["rng_state"]
    train(model, opt, rng, 3)
    assert_same_state(m_ref, o_ref, model, opt)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(CheckpointError, match="nope.h5: no such checkpoint file"):
        io.load_checkpoint(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(CheckpointError, match="junk.h5: not a readable HDF5"):
        io.load_checkpoint(junk)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(saved, fraction):
    path = saved[0]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match=str(path.name)):
        io.load_checkpoint(path)


def test_flipped_bytes_never_load_silently(saved):
    """A flipped byte anywhere either raises CheckpointError or leaves the content identical."""
    path = saved[0]
    original = io.load_checkpoint(path)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    positions = rng.choice(len(data), size=150, replace=False)
    raised = 0
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            ck = io.load_checkpoint(path)
        except CheckpointError as exc:
            assert path.name in str(exc)
            raised += 1
            continue
        for group in ("params", "buffers"):
            for k, v in original[group].items():
                assert np.array_equal(ck[group][k], v), f"byte {pos} changed {group}/{k} silently"
        for key in ("step", "config", "rng_state", "model_config"):
            assert ck[key] == original[key], f"byte {pos} changed {key} silently"
        for slot in ("m", "v"):
            for k, v in original["optim"][slot].items():
                assert np.array_equal(ck["optim"][slot][k], v), f"byte {pos} changed optim/{slot}/{k} silently"
    assert raised > 0


def test_bit_rot_in_contiguous_dataset_is_caught_by_sha256(saved):
    """Rewrite one array as a contiguous (unfiltered) dataset, then flip a byte inside it."""
    path = saved[0]
    with h5py.File(path, "a") as f:
        a = f["params/head.weight"][()]
        digest = f["params/head.weight"].attrs["sha256"]
        del f["params/head.weight"]
        ds = f["params"].create_dataset("head.weight", data=a)  # contiguous, no Fletcher32
        ds.attrs["sha256"] = digest
        offset = ds.id.get_offset()
    io.load_checkpoint(path)  # still intact
    data = bytearray(path.read_bytes())
    data[offset + 1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"'/params/head.weight' is corrupted \(SHA-256"):
        io.load_checkpoint(path)


def test_schema_errors_name_the_key(saved, tmp_path):
    path = saved[0]
    with h5py.File(path, "a") as f:
        del f["params/dec1.conv.weight"]
    ck = io.load_checkpoint(path)  # the file itself is consistent ...
    model, _ = make()
    with pytest.raises(CheckpointError, match=r"missing \['dec1.conv.weight'\]"):
        model.load_state_dict(ck, source=str(path))  # ... but not for this model

    other = tmp_path / "shape.h5"
    big = TinySiamCD(widths=(4, 4, 8, 16))
    io.save_checkpoint(other, model=big)
    with pytest.raises(CheckpointError, match=r"shape.h5: params/enc4.0.conv.weight has shape \(16, 8, 3, 3\), expected \(8, 8, 3, 3\)"):
        model.load_state_dict(io.load_checkpoint(other), source=str(other))

    f64 = tmp_path / "f64.h5"
    io.save_checkpoint(f64, model=TinySiamCD(widths=WIDTHS, dtype="float64"))
    with pytest.raises(CheckpointError, match="dtype float64, expected float32"):
        model.load_state_dict(io.load_checkpoint(f64), source=str(f64))


def test_foreign_and_future_files(saved, tmp_path):
    path = saved[0]
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CheckpointError, match="foreign.h5: not a hicd checkpoint"):
        io.load_checkpoint(foreign)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(CheckpointError, match="unknown checkpoint format_version 99"):
        io.load_checkpoint(path)


def test_failed_write_keeps_the_old_file(saved, monkeypatch):
    path, model, opt = saved
    before = path.read_bytes()
    calls = {"n": 0}
    real = io.write_array

    def failing(group, name, a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        real(group, name, a)

    monkeypatch.setattr(io, "write_array", failing)
    with pytest.raises(OSError, match="simulated"):
        io.save_checkpoint(path, model=model, optimizer=opt, step=3)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_non_finite_weights_are_never_written(tmp_path):
    model, _ = make()
    model.params["head.bias"] = np.array([np.nan], np.float32)
    with pytest.raises(NonFiniteError, match="params/head.bias"):
        io.save_checkpoint(tmp_path / "bad.h5", model=model)
    assert not (tmp_path / "bad.h5").exists()
