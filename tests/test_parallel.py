"""Data-parallel training over MPI: each check runs ``mpiexec -n 2 python tests/mpi_driver.py ...``.

Skipped without mpi4py or an ``mpiexec`` (``pip install 'hicd[mpi]'`` brings both with the
mpich wheel).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hicd_core.io import load_checkpoint

pytest.importorskip("mpi4py")
# the mpich wheel puts mpiexec beside the interpreter, which need not be on PATH
_BESIDE = Path(sys.executable).parent / "mpiexec"
MPIEXEC = str(_BESIDE) if _BESIDE.exists() else shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH")

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "mpi_driver.py"


def mpirun(*args, ranks=2, timeout=120, env=None, check=True):
    run = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(DRIVER), *map(str, args)],
                         capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])
    return run


@pytest.mark.parametrize("method", ["baseline", "hicd"])
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-10), ("float32", 1e-5)])
def test_two_ranks_take_the_steps_of_one_process_on_the_global_batch(method, dtype, tolerance):
    out = mpirun("equivalence", dtype, method)
    assert out["rank_spread"] == 0.0  # every rank holds the same parameters
    assert out["max_abs_diff"] < tolerance, out


@pytest.mark.parametrize("method", ["baseline", "hicd"])
def test_two_ranks_of_fc_siam_diff_with_dropout_take_the_steps_of_one_process(method):
    """Every rank draws the global batch's dropout masks and keeps its shard's rows: the same steps."""
    out = mpirun("equivalence", "float64", method, "sgd", "fc-siam-diff")
    assert out["rank_spread"] == 0.0
    assert out["max_abs_diff"] < 1e-10, out


def test_precise_statistics_on_two_ranks_are_the_global_batches():
    """Each rank runs its shard with synchronised BatchNorm (and the global batch's dropout masks)."""
    assert mpirun("precise")["max_abs_diff"] < 1e-10


def test_the_gathered_global_correlation_backward_matches_central_differences():
    assert mpirun("gradcheck")["max_abs_error"] < 1e-7


def test_only_rank_0_writes_and_a_two_rank_run_resumes_on_one(tmp_path):
    from hicd_core.data import ArrayDataset, synthetic_pairs
    from hicd_core.train import TrainConfig, fit

    two = mpirun("fit", tmp_path / "two", 3, 2)  # 3 epochs, stopped after 2; rank 1's file writers raise if called
    assert two["epochs"] == 2 and two["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name != ".lock") == ["best.h5", "last.h5",
                                                                                         "log.jsonl"]
    assert load_checkpoint(tmp_path / "two" / "last.h5")["config"]["world_size"] == 2
    # the same configuration and data as the driver's, in this process
    cfg = TrainConfig(role="teacher", epochs=3, batch_size=4, widths=(4, 8, 8, 8), optimizer="sgd", lr=0.02,
                      warmup_steps=2)
    train_set, val_set = ArrayDataset(*synthetic_pairs(8, 32, 21)), ArrayDataset(*synthetic_pairs(4, 32, 22))
    resumed = fit(cfg, train_set, val_set, tmp_path / "two", progress=False, resume=True)
    straight = fit(cfg, train_set, val_set, tmp_path / "one", progress=False)
    assert len(resumed.history) == len(straight.history) == 3
    for k, v in straight.model.params.items():
        np.testing.assert_allclose(resumed.model.params[k], v, rtol=0, atol=1e-5, err_msg=k)
    x1, x2, _ = synthetic_pairs(2, 32, 23)
    np.testing.assert_allclose(resumed.model.predict_logits(x1, x2), straight.model.predict_logits(x1, x2),
                               rtol=0, atol=1e-4)
    assert load_checkpoint(tmp_path / "two" / "last.h5")["config"]["world_size"] == 1


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_rank_that_dies_or_hangs_ends_the_job_and_the_checkpoint_stays_intact(tmp_path, how):
    run = mpirun(how, tmp_path / "run", check=False, env={"HICD_MPI_TIMEOUT": "5"}, timeout=90)
    assert run.returncode != 0
    if how == "hang":  # the waiting rank says why, in one line, and aborts the job
        assert "no answer from the other ranks within 5 s" in run.stderr
    ck = load_checkpoint(tmp_path / "run" / "last.h5")  # checked against its digests while loading
    assert ck["extra"]["epoch"] >= 1 and ck["config"]["world_size"] == 2


def test_the_command_under_mpiexec_trains_one_model_and_prints_once(tmp_path):
    run = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "hicd_core.cli", "train", "--epochs", "1",
                          "--size", "32", "--n-train", "8", "--n-val", "4", "--batch-size", "4", "--no-progress",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["world_size"] == 2
    bad = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "hicd_core.cli", "train", "--epochs", "1",
                          "--size", "32", "--n-train", "8", "--n-val", "4", "--batch-size", "3", "--no-progress",
                          "--out", str(tmp_path / "odd")], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode != 0 and "does not split evenly over 2 ranks" in bad.stderr


def test_the_transport_setting_is_checked_and_numpy_arrays_take_the_host_path():
    out = mpirun("transport", ranks=1)
    assert len(out["errors"]) == 2 and all("transport must be one of" in e for e in out["errors"])
    assert out["chosen"] == {name: ["mpi-host", [0.0, 1.0, 2.0]] for name in ("auto", "nccl", "mpi-host")}


def _gpus_with_nccl():
    try:
        import cupy
    except ImportError:
        return 0
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver or no device
        return 0
    return count if getattr(cupy.cuda, "nccl_enabled", False) else 0


@pytest.mark.skipif(_gpus_with_nccl() == 0, reason="needs CuPy with NCCL and a GPU")
def test_nccl_transport_matches_the_host_path_on_cupy():
    out = mpirun("nccl", ranks=min(2, _gpus_with_nccl()), timeout=300)
    assert out["transport"] == "nccl"
    assert out["collective_max_abs_diff"] == 0.0
    assert out["step_max_abs_diff"] < 1e-5, out
