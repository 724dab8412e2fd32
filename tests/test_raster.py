"""raster.py and streamed prediction: GeoTIFF in and out, bounded memory, multispectral training and prediction."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hicd_core.cli import main as cli_main
from hicd_core.infer import predict_probability, stream_probability
from hicd_core.io import save_checkpoint
from hicd_core.model import TinySiamCD
from hicd_core.data.raster import ArraySource

from .conftest import SZTAKI

ROOT = Path(__file__).resolve().parents[1]
CRS = "EPSG:32634"


def _gathered(model, t1, t2, **kw):
    """The streamed rows put back together, with a check that each row comes exactly once, in order."""
    H, W = t1.height, t1.width
    out = np.full((H, W), np.nan, np.float32)
    next_row = 0
    for row0, rows in stream_probability(model, t1, t2, **kw):
        assert row0 == next_row and rows.shape[1] == W and rows.dtype == np.float32
        out[row0 : row0 + len(rows)] = rows
        next_row = row0 + len(rows)
    assert next_row == H
    return out


@pytest.mark.parametrize("H, W, tile, overlap", [(150, 203, 64, 16), (100, 90, 128, 32), (257, 131, 64, 0),
                                                 (64, 64, 64, 8), (40, 200, 32, 8), (97, 64, 48, 24)])
def test_streamed_prediction_equals_the_in_memory_one(H, W, tile, overlap):
    model = TinySiamCD((4, 8, 8, 8), seed=3)
    rng = np.random.default_rng(H * W)
    a, b = rng.random((2, 3, H, W), dtype=np.float32)
    expected = np.asarray(predict_probability(model, a, b, tile=tile, overlap=overlap))
    got = _gathered(model, ArraySource(a), ArraySource(b), tile=tile, overlap=overlap)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_stream_refuses_a_band_count_the_model_does_not_take():
    model = TinySiamCD((4, 8, 8, 8), in_channels=4)
    a = np.zeros((3, 16, 16), np.float32)
    with pytest.raises(ValueError, match="3 band.*takes 4"):
        next(stream_probability(model, a, a, tile=16, overlap=0))


def test_the_core_imports_without_loading_rasterio_or_mpi4py():
    code = ("import sys, hicd_core, hicd_core.train, hicd_core.infer, hicd_core.cli, hicd_core.data.raster, "
            "hicd_core.parallel; print('rasterio' in sys.modules or 'mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- GeoTIFF


try:
    import rasterio
    from affine import Affine  # rasterio's dependency
except ImportError:
    rasterio = None
else:
    from hicd_core.data.raster import RasterSource, read_raster, write_raster

    TRANSFORM = Affine(1.5, 0.0, 500000.0, 0.0, -1.5, 5250000.0)
needs_rasterio = pytest.mark.skipif(rasterio is None, reason="needs rasterio (pip install 'hicd[geo]')")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "m.h5"
    save_checkpoint(path, model=TinySiamCD((4, 8, 8, 8), seed=1))
    return path


def _scene(H, W, seed, count=3):
    rng = np.random.default_rng(seed)
    return (rng.random((count, H, W)) * 255).astype(np.uint8)


@needs_rasterio
def test_geotiff_round_trip_keeps_the_grid_and_the_nodata(tmp_path, checkpoint, capsys):
    a, b = _scene(70, 90, 0), _scene(70, 90, 1)
    a[:, :10, :20] = 0  # nodata in t1 (every band)
    b[:, 60:, 80:] = 0  # nodata in t2
    b[0, 30:40, 30:40] = 0  # one band at the nodata value: still data (GDAL's dataset-mask rule)
    for name, img in (("a", a), ("b", b)):
        write_raster(tmp_path / f"{name}.tif", img, crs=CRS, transform=TRANSFORM, nodata=0)
    out, prob = tmp_path / "change.tif", tmp_path / "prob.tif"
    assert cli_main(["predict", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "-o", str(out), "--prob", str(prob),
                     "--checkpoint", str(checkpoint), "--tile", "32", "--overlap", "8", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["nodata_pixels"] == 10 * 20 + 10 * 10
    with rasterio.open(out) as m, rasterio.open(prob) as p:
        for ds in (m, p):
            assert (ds.height, ds.width, ds.count) == (70, 90, 1)
            assert ds.crs == rasterio.crs.CRS.from_string(CRS) and ds.transform == TRANSFORM
            assert ds.profile["tiled"] is False or ds.block_shapes  # written with blocks
        assert m.dtypes[0] == "uint8" and m.nodata == 255 and p.dtypes[0] == "float32" and np.isnan(p.nodata)
        mask, probability = m.read(1), p.read(1)
    nodata = np.zeros((70, 90), bool)
    nodata[:10, :20] = nodata[60:, 80:] = True
    assert np.all(mask[nodata] == 255) and np.all(np.isnan(probability[nodata]))
    assert set(np.unique(mask[~nodata]).tolist()) <= {0, 1} and np.all(np.isfinite(probability[~nodata]))
    # the valid pixels are those of the in-memory prediction on the same numbers
    model = TinySiamCD((4, 8, 8, 8), seed=1)
    expected = np.asarray(predict_probability(model, a / np.float32(255), b / np.float32(255), tile=32, overlap=8))
    np.testing.assert_allclose(probability[~nodata], expected[~nodata], atol=1e-6)
    np.testing.assert_array_equal(mask[~nodata], (expected >= 0.5)[~nodata])


@needs_rasterio
def test_mismatched_grids_give_one_line_and_align_fixes_a_half_pixel_shift(tmp_path, checkpoint, capsys):
    H, W = 40, 64
    ramp = np.linspace(10, 200, W).astype(np.float32)
    step = ramp[1] - ramp[0]
    a = np.broadcast_to(ramp, (3, H, W))
    b = a + step / 2  # the same linear scene sampled half a pixel further east ...
    write_raster(tmp_path / "a.tif", a.astype(np.float32), crs=CRS, transform=TRANSFORM)
    shifted = TRANSFORM @ Affine.translation(0.5, 0)  # ... on a grid half a pixel further east
    write_raster(tmp_path / "b.tif", b.astype(np.float32), crs=CRS, transform=shifted)
    args = ["predict", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "-o", str(tmp_path / "c.tif"),
            "--checkpoint", str(checkpoint), "--tile", "32", "--overlap", "8", "--no-progress"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "geotransform" in err and "--align" in err
    assert not (tmp_path / "c.tif").exists()
    with RasterSource(tmp_path / "a.tif") as t1, RasterSource(tmp_path / "b.tif", align_to=t1) as t2:
        assert (t2.height, t2.width, t2.transform) == (t1.height, t1.width, t1.transform)
        aligned, reference = t2.read(0, H, 0, W), t1.read(0, H, 0, W)
        # bilinear resampling is exact on a linear scene, away from the column outside t2's footprint
        np.testing.assert_allclose(aligned[:, :, 1:-1], reference[:, :, 1:-1], atol=1e-3)
        assert np.abs(t2.read(0, H, 0, W) - reference)[:, :, 1:-1].max() < np.abs(b - a).max()
    assert cli_main(args + ["--align"]) == 0
    with rasterio.open(tmp_path / "c.tif") as out:
        assert out.transform == TRANSFORM and (out.height, out.width) == (H, W)
    capsys.readouterr()
    write_raster(tmp_path / "small.tif", a[:, :32].astype(np.float32), crs=CRS, transform=TRANSFORM)
    assert cli_main(args[:2] + [str(tmp_path / "small.tif")] + args[3:]) == 2
    assert "size 32x64 differs" in capsys.readouterr().err


@needs_rasterio
def test_streamed_geotiff_equals_the_in_memory_prediction(tmp_path, checkpoint):
    a, b = _scene(203, 150, 5), _scene(203, 150, 6)
    write_raster(tmp_path / "a.tif", a, crs=CRS, transform=TRANSFORM)
    write_raster(tmp_path / "b.tif", b, crs=CRS, transform=TRANSFORM)
    model = TinySiamCD((4, 8, 8, 8), seed=1)
    expected = np.asarray(predict_probability(model, a / np.float32(255), b / np.float32(255), tile=64, overlap=24))
    with RasterSource(tmp_path / "a.tif") as t1, RasterSource(tmp_path / "b.tif") as t2:
        got = _gathered(model, t1, t2, tile=64, overlap=24)
    np.testing.assert_allclose(got, expected, atol=1e-6)


@needs_rasterio
def test_integer_rasters_are_scaled_by_their_type(tmp_path):
    write_raster(tmp_path / "u16.tif", np.full((2, 8, 8), 65535, np.uint16))
    write_raster(tmp_path / "u8.tif", np.full((1, 8, 8), 51, np.uint8))
    write_raster(tmp_path / "f.tif", np.full((1, 8, 8), 7.5, np.float32))
    assert np.all(read_raster(tmp_path / "u16.tif") == 1.0)
    np.testing.assert_allclose(read_raster(tmp_path / "u8.tif"), 0.2, atol=1e-7)
    assert np.all(read_raster(tmp_path / "f.tif") == 7.5)
    assert read_raster(tmp_path / "u16.tif", bands=[2]).shape == (1, 8, 8)


# VmHWM is this process's own peak since exec; ru_maxrss would also count the parent's resident
# memory at the fork (Linux keeps the high-water mark across execve), here the whole test session's.
MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from hicd_core.cli import main
    code = main(sys.argv[1:])
    peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
    print(json.dumps({"code": code, "peak_mb": peak_kb / 1024}))
""")


def _write_big(path, side, seed):
    """A ``side``-square 3-band uint8 GeoTIFF written by block rows (textured, so it is not all one value)."""
    rng = np.random.default_rng(seed)
    pattern = (rng.random((3, 256, side)) * 255).astype(np.uint8)
    profile = {"driver": "GTiff", "height": side, "width": side, "count": 3, "dtype": "uint8", "crs": CRS,
               "transform": TRANSFORM, "tiled": True, "blockxsize": 256, "blockysize": 256}
    with rasterio.open(path, "w", **profile) as ds:
        for y in range(0, side, 256):
            h = min(256, side - y)
            ds.write(pattern[:, :h], window=rasterio.windows.Window(0, y, side, h))


def _predict_peak_mb(tmp_path, checkpoint, side):
    """Peak resident memory (VmHWM) of ``hicd predict`` on a ``side``-square pair, in its own process."""
    folder = tmp_path / str(side)
    folder.mkdir()
    for name, seed in (("a", 0), ("b", 1)):
        _write_big(folder / f"{name}.tif", side, seed)
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, "predict", str(folder / "a.tif"),
                          str(folder / "b.tif"), "-o", str(folder / "c.tif"), "--checkpoint", str(checkpoint),
                          "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    assert stats["code"] == 0
    with rasterio.open(folder / "c.tif") as out:
        assert (out.height, out.width) == (side, side)
    return stats["peak_mb"]


@needs_rasterio
def test_peak_memory_of_a_large_scene_is_set_by_the_tile(tmp_path, checkpoint):
    # the same command on a 256-pixel scene measures what the interpreter and the libraries hold
    small, large = _predict_peak_mb(tmp_path, checkpoint, 256), _predict_peak_mb(tmp_path, checkpoint, 2048)
    # the 2048-pixel pair alone, as float32 in memory, would take 2 * 3 * 2048^2 * 4 bytes = 101 MB more
    assert large - small < 50, (small, large)


# --------------------------------------------------------------------------- multispectral


def _band_folder(root, count, n=6, size=32):
    rng = np.random.default_rng(count)
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        a = (rng.random((count, size, size)) * 4000).astype(np.uint16)
        b = a.copy()
        label = np.zeros((size, size), np.uint8)
        label[8:20, 10:22] = 255
        b[:, 8:20, 10:22] = 3000 - b[:, 8:20, 10:22] // 2
        write_raster(root / "A" / f"s{i}.tif", a)
        write_raster(root / "B" / f"s{i}.tif", b)
        write_raster(root / "label" / f"s{i}.tif", label)
    return root


@needs_rasterio
@pytest.mark.parametrize("count", [4, 13])
def test_multispectral_train_checkpoint_predict(tmp_path, count, capsys):
    data = _band_folder(tmp_path / "data", count)
    common = ["--data", str(data), "--epochs", "1", "--batch-size", "2", "--no-progress", "--normalize"]
    assert cli_main(["train", *common, "--out", str(tmp_path / "t")]) == 0
    from hicd_core.networks import load_model

    teacher, ck = load_model(tmp_path / "t" / "best.h5")
    assert teacher.in_channels == count and len(ck["model_config"]["input_mean"]) == count
    if count == 4:  # a student: degradations per band, HiCD on 4-band features
        assert cli_main(["train", *common, "--role", "student", "--setting", "multi", "--teacher",
                         str(tmp_path / "t" / "best.h5"), "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    a, b = data / "A" / "s0.tif", data / "B" / "s0.tif"
    assert cli_main(["predict", str(a), str(b), "-o", str(tmp_path / "c.tif"), "--checkpoint",
                     str(tmp_path / "t" / "best.h5"), "--tile", "32", "--no-progress"]) == 0
    with rasterio.open(tmp_path / "c.tif") as out:
        assert (out.count, out.height, out.width) == (1, 32, 32)
    capsys.readouterr()
    assert cli_main(["predict", str(a), str(b), "-o", str(tmp_path / "d.tif"), "--checkpoint",
                     str(tmp_path / "t" / "best.h5"), "--bands", "1", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"2 band(s) but {tmp_path / 't' / 'best.h5'} takes {count}" in err
    assert not (tmp_path / "d.tif").exists()


@needs_rasterio
def test_band_selection_trains_and_is_the_default_at_prediction(tmp_path, capsys):
    data = _band_folder(tmp_path / "data", 13)
    assert cli_main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "2", "--no-progress",
                     "--bands", "4", "3", "2", "8", "--out", str(tmp_path / "t")]) == 0
    from hicd_core.networks import load_model

    model, ck = load_model(tmp_path / "t" / "best.h5")
    assert model.in_channels == 4 and ck["config"]["bands"] == [4, 3, 2, 8]
    capsys.readouterr()
    a, b = data / "A" / "s1.tif", data / "B" / "s1.tif"
    assert cli_main(["predict", str(a), str(b), "-o", str(tmp_path / "c.tif"), "--checkpoint",
                     str(tmp_path / "t" / "best.h5"), "--tile", "32", "--no-progress"]) == 0
    assert cli_main(["eval", str(tmp_path / "t" / "best.h5"), "--data", str(data)]) == 0


@needs_rasterio
def test_a_folder_whose_samples_disagree_on_bands_is_refused(tmp_path):
    from hicd_core.data import FolderDataset
    from hicd_core.errors import DatasetError

    data = _band_folder(tmp_path / "data", 4)
    write_raster(data / "A" / "s2.tif", np.zeros((5, 32, 32), np.uint16))
    write_raster(data / "B" / "s2.tif", np.zeros((5, 32, 32), np.uint16))
    with pytest.raises(DatasetError, match="5 band.*has 4"):
        FolderDataset(data).validate()
    write_raster(data / "B" / "s1.tif", np.zeros((3, 32, 32), np.uint16))
    with pytest.raises(DatasetError, match="s1.tif: 3 band.*has 4"):
        FolderDataset(data)[1]
    with pytest.raises(DatasetError, match="band 9 requested"):
        FolderDataset(data, bands=[1, 9]).validate()


@needs_rasterio
@pytest.mark.skipif(not SZTAKI.is_dir(), reason="needs ../shared/data/sztaki-airchange")
def test_the_readme_geotiff_pair_predicts(tmp_path, checkpoint, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from geotiff_pair import write_pair
    finally:
        sys.path.remove(str(ROOT / "examples"))
    paths = write_pair(SZTAKI, "szada_1", tmp_path / "geo")
    with rasterio.open(paths["t1"]) as t1:
        assert (t1.count, t1.height, t1.width) == (3, 640, 952) and t1.crs == rasterio.crs.CRS.from_string(CRS)
    assert cli_main(["predict", str(paths["t1"]), str(paths["t2"]), "-o", str(tmp_path / "geo" / "change.tif"),
                     "--checkpoint", str(checkpoint), "--no-progress"]) == 0
    with rasterio.open(tmp_path / "geo" / "change.tif") as out, rasterio.open(paths["t1"]) as t1:
        assert out.transform == t1.transform and out.crs == t1.crs


@needs_rasterio
def test_a_degraded_multispectral_set_is_written_as_geotiffs_and_read_back_exactly(tmp_path, capsys):
    from hicd_core.data import FolderDataset

    data = _band_folder(tmp_path / "data", 4, n=2)
    assert cli_main(["degrade", "--data", str(data), "--setting", "multi", "-o", str(tmp_path / "lq")]) == 0
    source, degraded = FolderDataset(data), FolderDataset(tmp_path / "lq")
    t1, t2, label = degraded[1]
    np.testing.assert_array_equal(t1, source[1][0])  # t1 is untouched, and float32 GeoTIFFs keep it exactly
    assert t2.shape == (4, 32, 32) and not np.array_equal(t2, source[1][1])
    np.testing.assert_array_equal(label, source[1][2])


@needs_rasterio
def test_a_failed_write_leaves_no_file_and_keeps_the_previous_one(tmp_path):
    from hicd_core.data.raster import RasterSink

    like = ArraySource(np.zeros((1, 40, 30), np.float32))
    target = tmp_path / "change.tif"
    with RasterSink(target, like, "mask") as sink:  # a complete write
        sink.write(0, np.ones((40, 30), np.uint8))
        sink.commit()
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="half way"), RasterSink(target, like, "mask") as sink:
        sink.write(0, np.zeros((20, 30), np.uint8))
        raise RuntimeError("half way")
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["change.tif"]
