"""Synthetic scenes, degradations, dataset folders and packs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hicd_core import DatasetError
from hicd_core.data import (
    SETTINGS,
    ArrayDataset,
    DegradedView,
    FolderDataset,
    H5Dataset,
    InMemory,
    build_degraded_set,
    load_splits,
    channel_stats,
    degrade,
    degrade_with_params,
    open_dataset,
    pack_dataset,
    random_colour,
    random_crop_flip,
    synthetic_pairs,
    TrainBatches,
)
from hicd_core.data import degradations as D
from tests.conftest import LEVIR_SAMPLES, SZTAKI

PIL = pytest.importorskip("PIL.Image")


# --------------------------------------------------------------------------- synthetic scenes


def test_synthetic_shapes_dtypes_and_labels():
    t1, t2, label = synthetic_pairs(6, 64, seed=3)
    assert t1.shape == t2.shape == (6, 3, 64, 64) and t1.dtype == t2.dtype == np.float32
    assert label.shape == (6, 64, 64) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1} and label.any()
    assert 0.0 <= t1.min() and t1.max() <= 1.0 and 0.0 <= t2.min() and t2.max() <= 1.0


def test_synthetic_is_deterministic_per_seed_and_prefix_stable():
    a = synthetic_pairs(3, 32, seed=7)
    b = synthetic_pairs(4, 32, seed=7)
    c = synthetic_pairs(3, 32, seed=8)
    for x, y in zip(a, b):
        assert np.array_equal(x, y[:3])
    assert not np.array_equal(a[0], c[0])


def test_unchanged_pixels_still_differ_pseudo_change():
    """Pseudo-change (illumination, season, noise) touches unlabelled pixels too."""
    t1, t2, label = synthetic_pairs(4, 64, seed=0)
    unchanged = label == 0
    diff = np.abs(t1 - t2).mean(axis=1)
    assert diff[unchanged].mean() > 0.01
    assert diff[label == 1].mean() > diff[unchanged].mean()  # real change is stronger


# --------------------------------------------------------------------------- degradations


def image(seed=0, size=64):
    return synthetic_pairs(1, size, seed)[1][0]


def high_frequency_energy(img, cutoff):
    spec = np.abs(np.fft.fft2(img.mean(axis=0))) ** 2
    f = np.fft.fftfreq(img.shape[1])
    fy, fx = np.meshgrid(f, f, indexing="ij")
    return spec[np.maximum(np.abs(fy), np.abs(fx)) > cutoff].sum()


@pytest.mark.parametrize("setting", SETTINGS)
def test_settings_keep_shape_dtype_range_and_are_pure(setting):
    img = image()
    before = img.copy()
    a = degrade(img, setting, 5)
    assert a.shape == img.shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, degrade(img, setting, 5))
    assert np.array_equal(img, before)  # the input is not modified


def test_random_settings_depend_on_seed():
    img = image()
    for setting in ("single", "multi"):
        outs = [degrade(img, setting, s) for s in range(4)]
        assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_unknown_setting():
    with pytest.raises(ValueError, match="unknown quality setting 'x3'"):
        degrade(image(), "x3", 0)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        degrade(np.zeros((64, 64)), "single", 0)


def test_blur_lowers_high_frequency_energy():
    img = image(size=64)
    assert high_frequency_energy(D.gaussian_blur(img, 2.0), 0.25) < 0.2 * high_frequency_energy(img, 0.25)
    aniso = D.gaussian_blur(img, 3.0, 0.5, angle=0.3)
    assert aniso.shape == img.shape


def test_noise_has_the_requested_std():
    flat = np.full((3, 128, 128), 0.5, np.float32)
    noisy = D.gaussian_noise(flat, 10 / 255, seed=1)
    assert np.std(noisy - flat) == pytest.approx(10 / 255, rel=0.03)


def test_resolution_x8_removes_detail_above_the_new_nyquist():
    img = image(size=64)
    low = D.resolution(img, 8)
    # the x8 grid's Nyquist frequency is 1/16 cycles per pixel
    assert high_frequency_energy(low, 1 / 16 + 0.02) < 0.05 * high_frequency_energy(img, 1 / 16 + 0.02)
    block = D.resolution(np.ones((3, 16, 16), np.float32) * 0.3, 4)
    np.testing.assert_allclose(block, 0.3, atol=1e-6)  # constant images survive exactly


def test_jpeg_quality_orders_the_error_and_values_stay_in_range():
    img = image()
    errs = [np.abs(D.jpeg(img, q) - img).mean() for q in (10, 50, 95)]
    assert errs[0] > errs[1] > errs[2]
    assert np.abs(D.jpeg(img, 50) - D.jpeg(img, 50, engine="pillow")).mean() < 0.03
    bright = np.ones((3, 16, 16), np.float32)
    assert D.jpeg(bright, 30).min() > 0.9  # clipped before quantising: no wrap-around to dark


def test_haze_and_low_light():
    img = image()
    hz = D.haze(img, 0.5, 0.9)
    np.testing.assert_allclose(hz, img * 0.5 + 0.45, atol=1e-6)
    assert hz.std() < img.std()
    dark = D.low_light(img, 2.0, 0.7)
    assert dark.mean() < img.mean()


def test_multi_keeps_the_pipeline_order():
    order = ["blur", "resize", "noise", "jpeg"]
    for seed in range(10):
        kinds = [k for k, _ in degrade_with_params(image(), "multi", seed)[1]]
        assert 2 <= len(kinds) <= 4 and kinds == sorted(kinds, key=order.index)


# --------------------------------------------------------------------------- folders


def write_folder(root, n=3, size=16, label_scale=255, seed=0):
    rng = np.random.default_rng(seed)
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"tile_{i}.png"
        PIL.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "A" / name)
        PIL.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "B" / name)
        PIL.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * label_scale).save(root / "label" / name)
    return root


@pytest.mark.parametrize("scale", [1, 255])
def test_folder_dataset_reads_samples(tmp_path, scale):
    ds = FolderDataset(write_folder(tmp_path, label_scale=scale))
    assert len(ds) == 3 and ds.names == ["tile_0", "tile_1", "tile_2"]
    t1, t2, label = ds[0]
    assert t1.shape == t2.shape == (3, 16, 16) and t1.dtype == np.float32 and t1.max() <= 1
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}


def test_folder_split_list_and_ignore_value(tmp_path):
    root = write_folder(tmp_path)
    (root / "list").mkdir()
    (root / "list" / "train.txt").write_text("tile_2.png\ntile_0\n")
    ds = FolderDataset(root, "train")
    assert ds.names == ["tile_2", "tile_0"]
    with pytest.raises(DatasetError, match="val.txt: split list not found"):
        FolderDataset(root, "val")
    lab = np.zeros((16, 16), np.uint8)
    lab[:4] = 255
    lab[4:8] = 1
    PIL.fromarray(lab).save(root / "label" / "tile_1.png")
    ds = FolderDataset(root, ignore_value=255)
    assert set(np.unique(ds[1][2])) == {0, 1, 255}
    with pytest.raises(DatasetError, match=r"tile_1.png: label values \[0, 1, 255\]"):
        FolderDataset(root)[1]


def test_folder_errors_name_the_file(tmp_path):
    root = write_folder(tmp_path)
    (root / "B" / "tile_1.png").unlink()
    with pytest.raises(DatasetError, match=r"tile_1.png: no counterpart tile_1.\* in .*B"):
        FolderDataset(root)
    root = write_folder(tmp_path / "sizes")
    PIL.fromarray(np.zeros((8, 16, 3), np.uint8)).save(root / "B" / "tile_0.png")
    with pytest.raises(DatasetError, match=r"B/tile_0.png: size \(8, 16\) differs"):
        FolderDataset(root)[0]
    root = write_folder(tmp_path / "labels")
    PIL.fromarray(np.full((16, 16), 7, np.uint8)).save(root / "label" / "tile_0.png")
    with pytest.raises(DatasetError, match=r"label/tile_0.png: label values \[7\]"):
        FolderDataset(root)[0]
    root = write_folder(tmp_path / "garbage")
    (root / "A" / "tile_0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="A/tile_0.png: cannot read image"):
        FolderDataset(root)[0]
    with pytest.raises(DatasetError, match="missing folder label/"):
        (tmp_path / "empty" / "A").mkdir(parents=True)
        (tmp_path / "empty" / "B").mkdir()
        FolderDataset(tmp_path / "empty")


def test_grayscale_is_converted_to_rgb(tmp_path):
    root = write_folder(tmp_path)
    PIL.fromarray(np.full((16, 16), 100, np.uint8), mode="L").save(root / "A" / "tile_0.png")
    t1 = FolderDataset(root)[0][0]
    assert t1.shape == (3, 16, 16) and np.allclose(t1, 100 / 255)


def test_pack_round_trip_and_damage(tmp_path):
    ds = FolderDataset(write_folder(tmp_path / "f"))
    path = pack_dataset(ds, tmp_path / "pack.h5")
    packed = open_dataset(path)
    assert isinstance(packed, H5Dataset) and len(packed) == 3 and packed.names == ds.names
    for i in range(3):
        for a, b in zip(ds[i], packed[i]):
            np.testing.assert_allclose(a, b, atol=0.5 / 255)
    packed.close()
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DatasetError, match="pack.h5"):
        H5Dataset(path)[2]


def test_degraded_set_is_deterministic(tmp_path):
    arrays = synthetic_pairs(3, 32, seed=1)
    a = build_degraded_set(ArrayDataset(*arrays), "multi", 4, tmp_path / "a.h5")
    b = build_degraded_set(ArrayDataset(*arrays), "multi", 4, tmp_path / "b.h5")
    da, db = H5Dataset(a), H5Dataset(b)
    for i in range(3):
        assert all(np.array_equal(x, y) for x, y in zip(da[i], db[i]))
        assert np.array_equal(da[i][2], arrays[2][i])
    view = DegradedView(ArrayDataset(*arrays), "resolution-x4", 0)
    assert not np.array_equal(view[0][1], arrays[1][0]) and np.array_equal(view.hq(0)[1], arrays[1][0])


@given(st.integers(0, 2**32 - 1))
def test_crop_and_flip_stay_synchronised(seed):
    rng = np.random.default_rng(seed)
    base = rng.random((16, 16)).astype(np.float32)
    t1 = np.stack([base, base * 2, base * 3])
    label = (base > 0.5).astype(np.uint8)
    a, b, lab = random_crop_flip(t1, t1 + 1, label, rng, crop=8)
    assert a.shape == (3, 8, 8) and lab.shape == (8, 8)
    np.testing.assert_array_equal(b, a + 1)
    np.testing.assert_array_equal(lab, (a[0] > 0.5).astype(np.uint8))


@pytest.mark.skipif(not LEVIR_SAMPLES.is_dir(), reason="../shared/data/levir-cd-samples not present")
def test_real_levir_samples_load():
    ds = FolderDataset(LEVIR_SAMPLES)
    assert len(ds) == 11
    t1, t2, label = ds[0]
    assert t1.shape == (3, 256, 256) and label.shape == (256, 256)
    assert set(np.unique(label)) <= {0, 1}
    assert ds.validate() == 11


def test_label_threshold_binarises_grey_masks_and_the_default_still_errors(tmp_path):
    root = write_folder(tmp_path)
    lab = np.zeros((16, 16), np.uint8)
    lab[:4], lab[4:6], lab[6:8] = 255, 213, 57  # anti-aliased edges, as in SZTAKI's szada_6 / tiszadob_4
    PIL.fromarray(lab).save(root / "label" / "tile_1.png")
    with pytest.raises(DatasetError, match=r"tile_1.png: label values \[0, 57, 213, 255\].*--label-threshold"):
        FolderDataset(root)[1]
    label = FolderDataset(root, label_threshold=128)[1][2]
    assert label.dtype == np.uint8 and label[:6].all() and not label[6:].any()
    with pytest.raises(DatasetError, match="label threshold must be in 1..255"):
        FolderDataset(root, label_threshold=0)


@pytest.mark.skipif(not SZTAKI.is_dir(), reason="../shared/data/sztaki-airchange not present")
def test_sztaki_grey_masks_need_and_take_a_threshold():
    with pytest.raises(DatasetError, match="szada_6.png: label values"):
        FolderDataset(SZTAKI)[FolderDataset(SZTAKI).names.index("szada_6")]
    ds = FolderDataset(SZTAKI, label_threshold=128)
    label = ds[ds.names.index("szada_6")][2]
    assert label.shape == (640, 952) and set(np.unique(label)) == {0, 1}
    assert 0.015 < label.mean() < 0.025  # the README's 1.96 % change


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_change_aware_crops_hold_change_at_the_stated_rate(rate):
    label = np.zeros((200, 300), np.uint8)
    label[150:160, 20:30] = 1  # 0.17 % of the scene: a uniform 32x32 crop rarely holds any
    img = np.zeros((3, 200, 300), np.float32)
    rng = np.random.default_rng(0)
    n = 2000
    hits = sum(random_crop_flip(img, img, label, rng, 32, change_rate=rate)[2].any() for _ in range(n))
    uniform = ((160 - 150 + 31) * (30 - 20 + 31)) / ((200 - 31) * (300 - 31))  # windows touching the block
    expected = rate + (1 - rate) * uniform
    assert abs(hits / n - expected) < 4 * np.sqrt(expected * (1 - expected) / n) + 1e-3, (hits / n, expected)


def test_change_rate_zero_keeps_the_random_stream_and_no_change_falls_back():
    t = np.random.default_rng(1).random((3, 40, 40)).astype(np.float32)
    label = np.zeros((40, 40), np.uint8)
    a = random_crop_flip(t, t, label, np.random.default_rng(5), 16)
    b = random_crop_flip(t, t, label, np.random.default_rng(5), 16, change_rate=0.0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    crop = random_crop_flip(t, t, label, np.random.default_rng(5), 16, change_rate=1.0)  # no change pixel
    assert crop[0].shape == (3, 16, 16)


def test_random_colour_gain_and_offset_per_channel_within_bounds():
    t = np.random.default_rng(1).random((3, 20, 20)).astype(np.float32) + 0.1
    assert random_colour(t, np.random.default_rng(0), 0.0) is t  # off: the image itself
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    random_colour(t, rng, 0.0)
    assert rng.bit_generator.state == state  # off draws nothing
    for seed in range(20):
        out = random_colour(t, np.random.default_rng(seed), 0.3)
        assert out.dtype == np.float32 and out.shape == t.shape
        for c in range(3):  # each channel is an affine map of its own with gain in 1 +- 0.3, offset in +- 0.15
            gain, offset = np.polyfit(t[c].ravel(), out[c].ravel(), 1)
            assert 0.7 - 1e-4 <= gain <= 1.3 + 1e-4 and abs(offset) <= 0.15 + 1e-4
    a, b = (random_colour(t, np.random.default_rng(3), 0.3) for _ in range(2))
    assert np.array_equal(a, b)  # seeded


def test_train_batches_colour_draws_t1_and_t2_apart_and_zero_keeps_the_stream():
    rng = np.random.default_rng(4)
    data = [(rng.random((3, 16, 16)).astype(np.float32),) * 2 + (np.zeros((16, 16), np.uint8),) for _ in range(4)]

    def first(colour):
        batches = TrainBatches(data, 2, rng=np.random.default_rng(9), crop=8, colour=colour)
        return next(iter(batches.epoch()))

    plain, again = first(0.0), first(0.0)
    default = next(iter(TrainBatches(data, 2, rng=np.random.default_rng(9), crop=8).epoch()))
    assert all(np.array_equal(x, y) for x, y in zip(plain[:2] + plain[3:], default[:2] + default[3:]))
    assert np.array_equal(plain[0], plain[1]) and np.array_equal(again[0], plain[0])  # t1 == t2 here
    x1, x2, _, label = first(0.4)
    assert not np.allclose(x1, x2) and label.shape == (2, 8, 8)  # t1 and t2 drew their own colour
    with pytest.raises(ValueError, match="colour"):
        TrainBatches(data, 2, rng=np.random.default_rng(0), colour=1.5)


def test_train_batches_pair_degradation_degrades_both_images_apart_and_zero_keeps_the_stream():
    rng = np.random.default_rng(5)
    data = [(rng.random((3, 16, 16)).astype(np.float32),) * 2 + ((rng.random((16, 16)) > 0.5).astype(np.uint8),)
            for _ in range(4)]

    def first(**kw):
        return next(iter(TrainBatches(data, 2, rng=np.random.default_rng(9), crop=8, **kw).epoch()))

    plain, off = first(), first(pair_setting="multi", pair_rate=0.0)
    assert all(np.array_equal(x, y) for x, y in zip(plain[:2] + plain[3:], off[:2] + off[3:]))
    x1, x2, _, label = first(pair_setting="multi", pair_rate=1.0)
    assert np.array_equal(label[0], plain[3][0])  # the first crop is drawn before any degradation
    assert not np.allclose(x1, plain[0]) and not np.allclose(x2, plain[1])  # both images degraded
    assert not np.allclose(x1, x2)  # each with its own seed (t1 == t2 before)
    blurred = first(pair_setting="resolution-x4", pair_rate=1.0)
    assert np.array_equal(blurred[0], blurred[1])  # a deterministic setting degrades equal images alike
    with pytest.raises(ValueError, match="pair_rate must be in"):
        TrainBatches(data, 2, rng=np.random.default_rng(0), pair_setting="multi", pair_rate=1.5)
    with pytest.raises(ValueError, match="needs a pair_setting"):
        TrainBatches(data, 2, rng=np.random.default_rng(0), pair_rate=0.5)


def test_channel_stats_and_in_memory_cache():
    rng = np.random.default_rng(2)
    t1 = (rng.random((4, 3, 8, 8)) * [[[0.5]], [[1.0]], [[0.1]]]).astype(np.float32)
    t2 = (rng.random((4, 3, 8, 8)) * [[[0.5]], [[1.0]], [[0.1]]] + 0.2).astype(np.float32)
    t2[:, 2] = 0.3  # a constant band in t2 only
    ds = InMemory(ArrayDataset(t1, t2, np.zeros((4, 8, 8), np.uint8)))
    mean, std = channel_stats(ds)
    both = np.concatenate([t1, t2]).astype(np.float64)
    assert np.allclose(mean, both.mean(axis=(0, 2, 3))) and np.allclose(std, both.std(axis=(0, 2, 3)))
    const = ArrayDataset(np.full((1, 3, 4, 4), 0.5, np.float32), np.full((1, 3, 4, 4), 0.5, np.float32),
                         np.zeros((1, 4, 4), np.uint8))
    assert channel_stats(const) == ([0.5, 0.5, 0.5], [1.0, 1.0, 1.0])
    assert len(ds) == 4 and ds[1][0] is ds[1][0]  # served from memory


def test_evaluation_batches_split_where_the_size_changes():
    from hicd_core.data import iterate_batches

    small = [(np.zeros((3, 8, 8), np.float32),) * 2 + (np.zeros((8, 8), np.uint8),)] * 3
    large = [(np.zeros((3, 16, 8), np.float32),) * 2 + (np.zeros((16, 8), np.uint8),)] * 2
    shapes = [b[0].shape for b in iterate_batches(small[:2] + large + small[2:], 4)]
    assert shapes == [(2, 3, 8, 8), (2, 3, 16, 8), (1, 3, 8, 8)]


def test_a_pack_that_does_not_fit_fails_before_hdf5_writes(tmp_path):
    """A 1 MB tmpfs (root and mount needed; skipped otherwise): the pack is refused with an OSError, the
    interpreter lives on, no temporary file remains, and a pack that fits is written."""
    import subprocess
    import sys

    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        code = ("import sys; from hicd_core.data import synthetic_pairs, pack_dataset, H5Dataset\n"
                "try:\n    pack_dataset(synthetic_pairs(200, 64, 0), sys.argv[1] + '/big.h5')\n"
                "except OSError as exc:\n    print('refused', exc.errno)\n"
                "pack_dataset(synthetic_pairs(20, 64, 0), sys.argv[1] + '/fits.h5')\n"
                "print(len(H5Dataset(sys.argv[1] + '/fits.h5')))\n")
        out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (out.returncode, out.stderr[-1500:])
        assert out.stdout.split() == ["refused", "28", "20"]
        assert sorted(p.name for p in folder.iterdir()) == ["fits.h5"]
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_damaged_pack_is_refused_before_hdf5_parses_it(tmp_path):
    path = pack_dataset(synthetic_pairs(4, 16, 0), tmp_path / "pack.h5")
    assert path.read_bytes().startswith(b"hicd-dataset v2 sha256=")
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for pos in [*range(0, 100), *rng.choice(np.arange(512, len(data)), 200, replace=False)]:
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF
        path.write_bytes(bytes(damaged))
        if 88 <= pos < 512:  # the user block's zero padding after the digest line (87 bytes and a newline)
            continue
        with pytest.raises(DatasetError, match="pack.h5: (damaged dataset pack|not a hicd dataset pack)"):
            H5Dataset(path)
    path.write_bytes(bytes(data))
    assert len(H5Dataset(path)) == 4


def test_split_is_seeded_disjoint_and_keeps_the_tiles_of_a_scene_together():
    from hicd_core.data import split_scenes

    names = [f"scene{s}_{t:04d}" for s in range(10) for t in range(4)]
    a = split_scenes(names, seed=3, scene_pattern=r"^(scene\d+)_")
    assert a == split_scenes(list(reversed(names)), seed=3, scene_pattern=r"^(scene\d+)_")  # deterministic
    assert a != split_scenes(names, seed=4, scene_pattern=r"^(scene\d+)_")
    assert sorted(sum(a.values(), [])) == sorted(names)
    scene_of = {part: {n.split("_")[0] for n in part_names} for part, part_names in a.items()}
    assert not (scene_of["train"] & scene_of["val"] or scene_of["train"] & scene_of["test"]
                or scene_of["val"] & scene_of["test"])
    assert [len(scene_of[p]) for p in ("train", "val", "test")] == [7, 1, 2]
    with pytest.raises(DatasetError, match="too few"):
        split_scenes(["a_1", "a_2", "b_1"], scene_pattern=r"^(\w)_")
    with pytest.raises(ValueError, match="summing to 1"):
        split_scenes(names, fractions=(0.5, 0.1, 0.1))


def test_hicd_split_writes_lists_that_training_then_uses(tmp_path, capsys):
    import json

    from hicd_core.cli import main as cli_main

    root = write_folder(tmp_path / "d", n=6)
    assert cli_main(["split", str(root), "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [out[p]["n"] for p in ("train", "val", "test")] == [4, 1, 1]
    train, val, test = load_splits(root)
    assert len(train) == 4 and not set(train.names) & (set(val.names) | set(test.names))
    assert cli_main(["split", str(root)]) == 2 and "exists" in capsys.readouterr().err
    assert cli_main(["split", str(root), "--force", "--seed", "2"]) == 0
