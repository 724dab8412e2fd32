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


def edit(path, mode="a"):
    """Open a checkpoint with h5py to change it on purpose, and re-seal it afterwards (the documented
    user-block header: tests change the HDF5 content, then ask what the schema checks behind the digest say)."""
    class Editor:
        def __enter__(self):
            self.f = h5py.File(path, mode)
            return self.f

        def __exit__(self, *exc):
            self.f.close()
            data = path.read_bytes()
            path.write_bytes(io.seal_image(data))
            return False

    return Editor()


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
    with pytest.raises(CheckpointError, match="junk.h5: not a hicd checkpoint"):
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
    with edit(path) as f:
        a = f["params/head.weight"][()]
        digest = f["params/head.weight"].attrs["sha256"]
        del f["params/head.weight"]
        ds = f["params"].create_dataset("head.weight", data=a)  # contiguous, no Fletcher32
        ds.attrs["sha256"] = digest
        offset = ds.id.get_offset()
    io.load_checkpoint(path)  # still intact
    data = bytearray(path.read_bytes())
    data[offset + 1] ^= 0x10
    path.write_bytes(io.seal_image(bytes(data)))  # past the file digest: the array's own SHA-256 must catch it
    with pytest.raises(CheckpointError, match=r"'/params/head.weight' is corrupted \(SHA-256"):
        io.load_checkpoint(path)


def test_schema_errors_name_the_key(saved, tmp_path):
    path = saved[0]
    with edit(path) as f:
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
    with h5py.File(foreign, "w", userblock_size=512) as f:
        f["x"] = np.zeros(3)
    foreign.write_bytes(io.seal_image(foreign.read_bytes()))
    with pytest.raises(CheckpointError, match="foreign.h5: not a hicd checkpoint"):
        io.load_checkpoint(foreign)
    with edit(path) as f:
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


def _as_version_1(path, out, *, with_meta_digest=True):
    """Rewrite a checkpoint in the version 1 layout (HDF5 from byte 0, no user block)."""
    with h5py.File(path, "r") as src, h5py.File(out, "w") as dst:
        for key in src:
            src.copy(src[key], dst, name=key)
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        dst.attrs["format_version"] = 1
        if with_meta_digest:
            dst.attrs["meta_sha256"] = io._meta_digest(dst.attrs)
        else:
            del dst.attrs["meta_sha256"]
    return out


def test_the_older_format_is_read_or_named(saved, tmp_path):
    path, model, _ = saved
    old = _as_version_1(path, tmp_path / "v1.h5")
    ck = io.load_checkpoint(old)
    assert all(np.array_equal(ck["params"][k], v) for k, v in model.params.items())
    older = _as_version_1(path, tmp_path / "v1-no-meta.h5", with_meta_digest=False)
    with pytest.raises(CheckpointError, match=r"v1-no-meta.h5: older checkpoint format \(version 1"):
        io.load_checkpoint(older)


FLIP_SCRIPT = """
import sys
import numpy as np
from hicd_core import CheckpointError, io
path, out = sys.argv[1], sys.argv[2]
data = bytearray(open(path, "rb").read())
original = io.load_checkpoint(path)
header = len(b"hicd-checkpoint v2 sha256=") + 65  # the digest line; the rest of the user block is zero padding
offsets = sorted(set(range(header)) | set(range(io.USERBLOCK, 8192)) | set(range(len(data) - 1024, len(data)))
                 | set(range(8192, len(data), 101)) | {header + 7})
raised = same = 0
for pos in offsets:
    damaged = bytearray(data)
    damaged[pos] ^= 0xFF
    open(out, "wb").write(damaged)
    try:
        ck = io.load_checkpoint(out)
    except CheckpointError:
        raised += 1
        continue
    for group in ("params", "buffers"):
        for k, v in original[group].items():
            assert np.array_equal(ck[group][k], v), (pos, group, k)
    for key in ("step", "config", "model_config", "rng_state", "extra"):
        assert ck[key] == original[key], (pos, key)
    same += 1
print(len(data), len(offsets), raised, same)
"""


def test_every_flipped_byte_is_refused_before_parsing_or_changes_nothing(tmp_path):
    """Single-byte flips of a small checkpoint, one at a time: every byte of the digest line, of the first 7.5 KiB
    of the HDF5 image (superblock, root object header and its attributes: format, config, model_config, rng_state,
    extra) and of the last KiB (the attributes written last: optimizer, meta_sha256), every 101st byte between, and
    one byte of the user block's padding. Run in a subprocess, so that a crash inside HDF5 fails the test instead
    of killing pytest."""
    import subprocess
    import sys

    model, _ = make()
    path = tmp_path / "small.h5"
    io.save_checkpoint(path, model=model, step=2, rng_state=np.random.default_rng(0).bit_generator.state,
                       config={"lr": 1e-2}, extra={"epoch": 1})
    out = subprocess.run([sys.executable, "-c", FLIP_SCRIPT, str(path), str(tmp_path / "flipped.h5")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    size, tried, raised, same = map(int, out.stdout.split())
    print(f"{tried} single-byte flips of a {size}-byte checkpoint: {raised} refused, {same} loaded unchanged")
    assert raised + same == tried and tried > 8000
    assert same == 1  # the padding byte: outside the digest, and read by nobody


def test_a_full_disk_is_an_oserror_the_old_file_stays_and_no_temp_file_remains(saved, monkeypatch):
    import errno

    path, model, opt = saved
    before = path.read_bytes()

    class FullDisk:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "open", FullDisk, raising=False)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(path, model=model, optimizer=opt, step=3)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_real_full_disk_during_training_is_one_line(tmp_path):
    """A 1 MB tmpfs as the run folder (root and mount needed; skipped otherwise)."""
    import subprocess
    import sys

    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (folder / "filler").write_bytes(b"\0" * 900_000)
        out = subprocess.run([sys.executable, "-m", "hicd_core.cli", "train", "--size", "32", "--n-train", "8",
                              "--n-val", "8", "--epochs", "2", "--no-progress", "--out", str(folder / "run")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
        assert out.stderr.startswith("hicd: error:") and "No space left" in out.stderr, out.stderr
        assert out.stderr.strip().count("\n") == 0, out.stderr
        assert not list((folder / "run").glob(".*.tmp-*"))
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_checkpoints_and_the_package_report_one_version(tmp_path):
    from pathlib import Path

    import hicd_core
    from hicd_core import _version
    from hicd_core.model import TinySiamCD

    path = io.save_checkpoint(tmp_path / "v.h5", model=TinySiamCD(widths=(2, 2, 2, 2)))
    assert io.load_checkpoint(path)["hicd_version"] == hicd_core.__version__ == _version.__version__
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert "version=VERSION" in setup and "_version.py" in setup
    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    assert f"## {hicd_core.__version__}" in changelog
