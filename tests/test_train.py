"""End-to-end training: the example, the teacher's quality, exact resume, the non-finite guard, the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hicd_core import NonFiniteError, io
from hicd_core.cli import main as cli_main
from hicd_core.data import ArrayDataset, synthetic_pairs
from hicd_core.infer import evaluate
from hicd_core.train import DistillConfig, TrainConfig, fit, load_model, train_step
from hicd_core.model import TinySiamCD
from hicd_core.optim import AdamW

ROOT = Path(__file__).resolve().parents[1]
PIL = pytest.importorskip("PIL.Image")


def run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def test_train_cd_quick_writes_its_files(tmp_path):
    out = run(["examples/train_cd.py", "--quick", "--out", str(tmp_path / "run"), "--no-progress"])
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["setting"] == "resolution-x4" and results["seed"] == 0 and results["seconds"] > 0
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["teacher HQ/HQ", "teacher HQ/LQ", "student baseline", "student HiCD"]
    for r in results["rows"]:
        assert set(r) == {"method", "f1", "iou", "precision", "recall", "oa", "kappa"}
    assert (tmp_path / "run" / "predictions.png").stat().st_size > 0
    assert "| teacher HQ/HQ" in out.stdout and "verdict: the HiCD student is" in out.stdout
    for sub in ("teacher", "student-baseline", "student-hicd"):
        assert (tmp_path / "run" / sub / "best.h5").is_file()
        assert len((tmp_path / "run" / sub / "log.jsonl").read_text().splitlines()) >= 2


def test_teacher_beats_the_all_no_change_predictor(tmp_path):
    train = ArrayDataset(*synthetic_pairs(64, 64, seed=0))
    test = ArrayDataset(*synthetic_pairs(24, 64, seed=2000))
    cfg = TrainConfig(role="teacher", epochs=8, batch_size=8, lr=5e-3, crop=32, seed=0)
    result = fit(cfg, train, test, tmp_path / "t", progress=False)
    metrics = evaluate(result.model, test)
    trivial = {"f1": 0.0, "kappa": 0.0}  # predicting "no change" everywhere scores 0 on both
    assert metrics["f1"] > trivial["f1"] + 40, metrics  # seen: 52.66 after 8 short epochs (2-core Intel Xeon)
    assert metrics["kappa"] > trivial["kappa"] + 40, metrics


def _arrays(path):
    ck = io.load_checkpoint(path)
    flat = {f"p/{k}": v for k, v in ck["params"].items()}
    flat.update({f"b/{k}": v for k, v in ck["buffers"].items()})
    for slot in ("m", "v"):
        flat.update({f"o/{slot}/{k}": v for k, v in ck["optim"][slot].items()})
    return flat, ck["step"], ck["rng_state"]


@pytest.mark.parametrize("network", [[], ["--model", "fc-siam-diff", "--dropout", "0.3", "--bottleneck", "t2"]],
                         ids=["tiny", "fc"])
def test_killed_run_resumes_bitwise(tmp_path, network):
    """FC-Siam-diff's dropout masks come from (seed, step): its runs resume bit for bit too."""
    common = ["-m", "hicd_core.cli", "train", "--role", "teacher", "--size", "32", "--n-train", "64",
              "--n-val", "8", "--epochs", "4", "--no-progress", *network]
    ref = run(common + ["--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *common, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "last.h5").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len((out / "log.jsonl").read_text().splitlines()) < 4
    resumed = run(common + ["--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr

    a, step_a, rng_a = _arrays(tmp_path / "ref" / "last.h5")
    b, step_b, rng_b = _arrays(out / "last.h5")
    assert step_a == step_b and rng_a == rng_b and set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]


def test_resume_refuses_a_different_configuration(tmp_path):
    data = ArrayDataset(*synthetic_pairs(16, 16, seed=0))
    fit(TrainConfig(epochs=1, batch_size=8), data, data, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        fit(TrainConfig(epochs=1, batch_size=8, lr=1.0), data, data, tmp_path, resume=True, progress=False)


def test_non_finite_loss_stops_with_step_and_term(tmp_path):
    t1, t2, label = synthetic_pairs(16, 16, seed=0)
    data = ArrayDataset(t1, t2, label)
    fit(TrainConfig(epochs=1, batch_size=8, augment=False), data, data, tmp_path, progress=False)
    before = (tmp_path / "last.h5").read_bytes()
    bad_t1 = t1.copy()
    bad_t1[3, 0, 2, 2] = np.nan
    bad = ArrayDataset(bad_t1, t2, label)
    with pytest.raises(NonFiniteError, match=r"step \d+ \(epoch 1\).*non-finite loss term\(s\): bce"):
        fit(TrainConfig(epochs=1, batch_size=8, augment=False), bad, data, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "last.h5").exists()
    assert (tmp_path / "last.h5").read_bytes() == before


def test_train_step_names_a_non_finite_distillation_term():
    rng = np.random.default_rng(0)
    student, teacher = TinySiamCD((4, 4, 8, 8), seed=0), TinySiamCD((4, 4, 8, 8), seed=1)
    teacher.params["enc2.0.conv.weight"] = teacher.params["enc2.0.conv.weight"] * np.nan
    x1, x2 = rng.random((2, 2, 3, 16, 16), dtype=np.float32)
    label = np.zeros((2, 16, 16), np.uint8)
    cfg = DistillConfig(method="hicd", windows=(None, None, None), change_window=8)
    with np.errstate(invalid="ignore"):
        with pytest.raises(NonFiniteError, match="distill/sem0"):
            train_step(student, AdamW(student.params), x1, x2, label, teacher=teacher, distill=cfg)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    data = ArrayDataset(*synthetic_pairs(16, 16, seed=0))
    fit(TrainConfig(epochs=1, batch_size=8, widths=(4, 4, 8, 8)), data, data, out, progress=False)
    return out / "best.h5"


def write_pair(tmp_path, h, w, h2=None, w2=None):
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(a)
    PIL.fromarray(rng.integers(0, 256, (h2 or h, w2 or w, 3), dtype=np.uint8)).save(b)
    return a, b


def test_predict_on_an_odd_sized_pair(tmp_path, tiny_checkpoint, capsys):
    a, b = write_pair(tmp_path, 300, 451)
    out, prob, ovl = tmp_path / "change.png", tmp_path / "prob.png", tmp_path / "overlay.png"
    code = cli_main(["predict", str(a), str(b), "-o", str(out), "--checkpoint", str(tiny_checkpoint),
                     "--prob", str(prob), "--overlay", str(ovl), "--tile", "128", "--overlap", "16"])
    assert code == 0
    for path, mode in ((out, "L"), (prob, "L"), (ovl, "RGB")):
        with PIL.open(path) as im:
            assert im.size == (451, 300) and im.mode == mode
    report = json.loads(capsys.readouterr().out)
    assert (report["height"], report["width"]) == (300, 451)


def test_cli_errors_are_one_line(tmp_path, tiny_checkpoint, capsys):
    a, b = write_pair(tmp_path, 32, 32, 32, 40)
    assert cli_main(["predict", str(a), str(b), "-o", str(tmp_path / "o.png"), "--checkpoint",
                     str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hicd: error:") and "b.png" in err and "differs" in err and "\n" not in err
    assert cli_main(["predict", str(tmp_path / "missing.png"), str(b), "-o", str(tmp_path / "o.png"),
                     "--checkpoint", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.png" in err and "\n" not in err
    assert cli_main(["eval", str(tmp_path / "nope.h5")]) == 2
    assert "nope.h5: no such checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["degrade", "--setting", "x3", "-o", str(tmp_path / "d.h5")])
    assert exc.value.code == 2
    assert "invalid choice: 'x3'" in capsys.readouterr().err


def test_cli_eval_degrade_and_pack(tmp_path, tiny_checkpoint, capsys):
    assert cli_main(["degrade", "--size", "16", "--n", "4", "--setting", "single", "-o", str(tmp_path / "lq")]) == 0
    assert cli_main(["pack", str(tmp_path / "lq"), "-o", str(tmp_path / "lq.h5")]) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(tiny_checkpoint), "--data", str(tmp_path / "lq.h5")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 4 and 0 <= report["f1"] <= 100
    assert cli_main(["eval", str(tiny_checkpoint), "--size", "16", "--n", "4", "--setting", "multi"]) == 0


def test_cli_predict_and_eval_with_test_time_averaging(tmp_path, tiny_checkpoint, capsys):
    a, b = write_pair(tmp_path, 64, 64)
    turned = []
    for name in ("a_turned.png", "b_turned.png"):  # the pair a quarter turn around
        with PIL.open(tmp_path / name.replace("_turned", "")) as im:
            PIL.fromarray(np.rot90(np.asarray(im))).save(tmp_path / name)
        turned.append(tmp_path / name)
    probs = {}
    for key, pair, extra in (("plain", (a, b), []), ("tta", (a, b), ["--tta"]), ("turned", turned, ["--tta"])):
        out, prob = tmp_path / f"{key}.png", tmp_path / f"{key}_prob.png"
        assert cli_main(["predict", *map(str, pair), "-o", str(out), "--checkpoint", str(tiny_checkpoint),
                         "--prob", str(prob), "--tile", "64", "--no-progress", *extra]) == 0
        with PIL.open(prob) as im:
            probs[key] = np.asarray(im).astype(int)
    capsys.readouterr()
    assert np.abs(probs["tta"] - probs["plain"]).max() > 1
    # the averaged map turns with the pair (one grey level of rounding)
    assert np.abs(np.rot90(probs["tta"]) - probs["turned"]).max() <= 1
    assert cli_main(["eval", str(tiny_checkpoint), "--size", "16", "--n", "4", "--tta"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tta"] is True and 0 <= report["f1"] <= 100


def test_console_script_help():
    out = run(["-m", "hicd_core.cli", "train", "--help"])
    assert out.returncode == 0 and "--resume" in out.stdout and "--setting" in out.stdout


def test_an_existing_run_is_never_overwritten_silently(tmp_path):
    data = ArrayDataset(*synthetic_pairs(16, 16, seed=0))
    fit(TrainConfig(epochs=1, batch_size=8), data, data, tmp_path, progress=False)
    before = (tmp_path / "last.h5").read_bytes()
    with pytest.raises(ValueError, match="already holds a training run"):
        fit(TrainConfig(epochs=1, batch_size=8), data, data, tmp_path, progress=False)
    assert (tmp_path / "last.h5").read_bytes() == before


def test_normalisation_statistics_are_stored_and_restored_with_the_checkpoint(tmp_path):
    t1, t2, label = synthetic_pairs(16, 32, seed=0)
    t2 = t2 * 0.5 + 0.25  # t2 darker and flatter: the statistics pool both dates
    train, val = ArrayDataset(t1, t2, label), ArrayDataset(*synthetic_pairs(8, 32, seed=1000))
    cfg = TrainConfig(role="teacher", epochs=1, batch_size=8, normalize=True, seed=0)
    result = fit(cfg, train, val, tmp_path / "t", progress=False)
    both = np.concatenate([t1, t2]).astype(np.float64)
    assert np.allclose(result.model.input_mean, both.mean(axis=(0, 2, 3)))
    assert np.allclose(result.model.input_std, both.std(axis=(0, 2, 3)))
    model, ck = load_model(tmp_path / "t" / "best.h5")
    assert ck["model_config"]["input_mean"] == result.model.input_mean
    assert model.input_std == result.model.input_std
    x1, x2 = t1[:2], t2[:2]
    assert np.array_equal(model.predict_logits(x1, x2), result.model.predict_logits(x1, x2))
    plain = TinySiamCD(seed=3)
    shifted = TinySiamCD(seed=3, input_mean=[0.5] * 3, input_std=[2.0] * 3)
    assert np.allclose(shifted.predict_logits(x1, x2), plain.predict_logits((x1 - 0.5) / 2, (x2 - 0.5) / 2), atol=1e-5)
    # a student that starts from this teacher takes its statistics, whatever its training set
    student_cfg = TrainConfig(role="student", setting="single", epochs=1, batch_size=8, seed=0)
    student = fit(student_cfg, ArrayDataset(*synthetic_pairs(8, 32, seed=5)), val, tmp_path / "s",
                  teacher=result.model, progress=False).model
    assert student.input_mean == result.model.input_mean
    with pytest.raises(ValueError, match="3 values each"):
        TinySiamCD(input_mean=[0.5, 0.5], input_std=[1.0, 1.0])
    with pytest.raises(ValueError, match="input_std positive"):
        TinySiamCD(input_mean=[0.5] * 3, input_std=[1.0, 0.0, 1.0])


def test_early_stopping_stops_at_the_stated_patience_and_resume_keeps_it_stopped(tmp_path, monkeypatch):
    from hicd_core import train as train_module

    scores = iter([10.0, 30.0, 20.0, 30.0, 25.0, 99.0, 99.0, 99.0])  # best at epoch 2; 3 epochs without gain
    monkeypatch.setattr(train_module, "evaluate",
                        lambda *a, **k: {"f1": next(scores), "precision": 0.0, "recall": 0.0, "iou": 0.0,
                                         "oa": 0.0, "kappa": 0.0})
    data = ArrayDataset(*synthetic_pairs(8, 16, seed=0))
    cfg = TrainConfig(role="teacher", epochs=8, batch_size=8, patience=3, seed=0)
    result = fit(cfg, data, data, tmp_path / "t", progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5]
    assert result.best["epoch"] == 2 and result.history[-1].get("stopped") is True
    assert io.load_checkpoint(tmp_path / "t" / "last.h5")["extra"]["stopped"] is True
    again = fit(cfg, data, data, tmp_path / "t", resume=True, progress=False)  # nothing left to train
    assert len(again.history) == 5 and again.best["epoch"] == 2
    with pytest.raises(ValueError, match="patience must be >= 1"):
        TrainConfig(patience=0)


def test_min_epochs_holds_early_stopping_off_until_the_network_takes_off(tmp_path, monkeypatch):
    """The collapse min_epochs guards against: a lucky first epoch, then nothing for longer than the
    patience, then the network learns. Without it the run ends at epoch 1 + patience."""
    from hicd_core import train as train_module

    curve = [12.0, 0.0, 0.0, 0.0, 5.0, 40.0, 45.0, 44.0, 43.0, 42.0, 41.0, 99.0]
    data = ArrayDataset(*synthetic_pairs(8, 16, seed=0))
    runs = {}
    for min_epochs in (0, 6):
        scores = iter(curve)
        monkeypatch.setattr(train_module, "evaluate",
                            lambda *a, **k: {"f1": next(scores), "precision": 0.0, "recall": 0.0, "iou": 0.0,
                                             "oa": 0.0, "kappa": 0.0})
        cfg = TrainConfig(role="teacher", epochs=12, batch_size=8, patience=3, min_epochs=min_epochs, seed=0)
        runs[min_epochs] = fit(cfg, data, data, tmp_path / f"m{min_epochs}", progress=False)
    assert len(runs[0].history) == 4 and runs[0].best["epoch"] == 1
    # held off through epoch 5 (it would stop there with min_epochs 5), then counted from the best (epoch 7)
    assert len(runs[6].history) == 10 and runs[6].best["epoch"] == 7 and runs[6].best["f1"] == 45.0
    assert runs[6].history[-1].get("stopped") is True
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="min_epochs must be a non-negative integer"):
            TrainConfig(min_epochs=bad)


def test_smoothed_selection_skips_a_one_epoch_spike_and_counts_patience_on_the_mean(tmp_path, monkeypatch):
    from hicd_core import train as train_module

    # trailing means of 3: 10, 30, 23.33, 33.33, 28.33, 37, 30.33, 25.33, 20 -> best at epoch 6 (the raw
    # scores' best is the spike at epoch 2), stopped after epoch 9
    scores = iter([10.0, 50.0, 10.0, 40.0, 35.0, 36.0, 20.0, 20.0, 20.0, 99.0])
    monkeypatch.setattr(train_module, "evaluate",
                        lambda *a, **k: {"f1": next(scores), "precision": 0.0, "recall": 0.0, "iou": 0.0,
                                         "oa": 0.0, "kappa": 0.0})
    data = ArrayDataset(*synthetic_pairs(8, 16, seed=0))
    cfg = TrainConfig(role="teacher", epochs=10, batch_size=8, patience=3, smoothing=3, seed=0)
    result = fit(cfg, data, data, tmp_path / "t", progress=False)
    assert len(result.history) == 9 and result.history[-1].get("stopped") is True
    assert result.best["epoch"] == 6 and result.best["f1"] == 36.0 and result.best["smoothed_f1"] == 37.0
    assert io.load_checkpoint(tmp_path / "t" / "best.h5")["extra"]["epoch"] == 6
    with pytest.raises(ValueError, match="smoothing must be an integer >= 1"):
        TrainConfig(smoothing=0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, True])
def test_colour_jitter_must_be_a_strength(bad):
    with pytest.raises(ValueError, match="colour_jitter must be a strength in"):
        TrainConfig(colour_jitter=bad)


@pytest.mark.parametrize("changes, message", [
    ({"pair_degrade_rate": 1.5, "pair_degrade": "multi"}, "pair_degrade_rate must be a share"),
    ({"pair_degrade_rate": 0.5}, "pair_degrade must be a quality setting"),
    ({"pair_degrade_rate": 0.5, "pair_degrade": "blurry"}, "pair_degrade must be a quality setting"),
    ({"pair_degrade_rate": 0.5, "pair_degrade": "multi", "role": "student", "setting": "multi"},
     "a student's t2 is degraded by its setting"),
])
def test_pair_degradation_is_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_a_teacher_with_pair_degradation_trains_other_batches_than_without(tmp_path):
    data = ArrayDataset(*synthetic_pairs(8, 16, seed=0))
    cfg = TrainConfig(role="teacher", epochs=1, batch_size=4, seed=0)
    plain = fit(cfg, data, data, tmp_path / "plain", progress=False).history[0]["train"]
    off = fit(replace(cfg, pair_degrade="multi"), data, data, tmp_path / "off", progress=False).history[0]["train"]
    on = fit(replace(cfg, pair_degrade="multi", pair_degrade_rate=1.0), data, data, tmp_path / "on",
             progress=False).history[0]["train"]
    assert off == plain and on != plain


@pytest.mark.parametrize("changes, message", [
    ({"init_seed": -1}, "init_seed must be a non-negative integer"),
    ({"init_seed": 1.5}, "init_seed must be a non-negative integer"),
    ({"init_seed": True}, "init_seed must be a non-negative integer"),
    ({"role": "student", "setting": "multi", "init_seed": 1}, "starts from the teacher's"),
])
def test_init_seed_is_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_init_seed_sets_the_initial_weights_and_seed_the_data(tmp_path):
    """A run of ``seed`` 0 and ``init_seed`` 1 starts from the weights of seed 1 and draws the batches of seed 0;
    ``init_seed`` equal to ``seed`` is the run without it, bit for bit."""
    from hicd_core.train import _setup
    data = ArrayDataset(*synthetic_pairs(8, 16, seed=0))
    cfg = TrainConfig(role="teacher", epochs=1, batch_size=4, seed=0)
    runs = {name: _setup(c, data, data, tmp_path / name, np, None)
            for name, c in [("s0", cfg), ("s1", replace(cfg, seed=1)), ("mixed", replace(cfg, init_seed=1))]}
    for name, p in runs["mixed"].model.params.items():
        np.testing.assert_array_equal(p, runs["s1"].model.params[name], err_msg=name)
    assert any(not np.array_equal(p, runs["s0"].model.params[k]) for k, p in runs["mixed"].model.params.items())
    first = {name: next(iter(r.batches.epoch())) for name, r in runs.items()}
    for a, b in zip(first["mixed"], first["s0"]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first["mixed"][0], first["s1"][0])
    same = fit(replace(cfg, init_seed=0), data, data, tmp_path / "same", progress=False)
    plain = fit(cfg, data, data, tmp_path / "plain", progress=False)
    for name, p in plain.model.params.items():
        np.testing.assert_array_equal(np.asarray(same.model.params[name]), np.asarray(p), err_msg=name)
    student = TrainConfig(role="student", setting="multi", student_init="fresh", init_seed=3)  # allowed: own weights
    assert student.init_seed == 3


def test_host_threads_train_the_same_network_and_a_run_resumes_with_another_count(tmp_path):
    """``threads`` runs the convolutions' image blocks on host threads: the same run up to the
    weight gradients' rounding; the count is not part of a run's identity (resume with any)."""
    pytest.importorskip("threadpoolctl")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive int"):
            TrainConfig(threads=bad)
    data = ArrayDataset(*synthetic_pairs(8, 16, seed=0))
    cfg = TrainConfig(role="teacher", epochs=2, batch_size=4, seed=0)
    one = fit(cfg, data, data, tmp_path / "one", progress=False)
    two = fit(replace(cfg, threads=2), data, data, tmp_path / "two", progress=False)
    a, b = one.model.params, two.model.params
    for name in a:
        np.testing.assert_allclose(np.asarray(b[name]), np.asarray(a[name]), rtol=1e-4, atol=1e-5, err_msg=name)
    again = fit(cfg, data, data, tmp_path / "two", resume=True, progress=False)  # one thread: the same run, finished
    assert len(again.history) == 2
    with pytest.raises(ValueError, match="configuration"):
        fit(replace(cfg, lr=1e-3), data, data, tmp_path / "two", resume=True, progress=False)  # still checked


def test_a_second_run_into_a_locked_folder_fails_and_a_dead_owners_lock_is_taken_over(tmp_path, capsys):
    from hicd_core import RunLockError

    data = ArrayDataset(*synthetic_pairs(8, 16, seed=0))
    cfg = TrainConfig(role="teacher", epochs=1, batch_size=8, seed=0)
    out = tmp_path / "run"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / ".lock").write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "started": "x"}))
        with pytest.raises(RunLockError, match=rf"in use by process {owner.pid}"):
            fit(cfg, data, data, out, progress=False)
        assert not (out / "last.h5").exists()
    finally:
        owner.kill()
        owner.wait()
    (out / f".last.h5.tmp-{owner.pid}").write_bytes(b"half a checkpoint")  # a writer killed mid-write
    fit(cfg, data, data, out, progress=False)  # the owner is gone: its lock and temp file go too
    assert "taking over the lock" in capsys.readouterr().err
    assert (out / "last.h5").is_file() and not (out / ".lock").exists()
    assert not list(out.glob(".*.tmp-*"))


def test_a_damaged_log_on_resume_names_the_file_and_line(tmp_path):
    data = ArrayDataset(*synthetic_pairs(8, 16, seed=0))
    cfg = TrainConfig(role="teacher", epochs=2, batch_size=8, seed=0)
    fit(replace_epochs(cfg, 1), data, data, tmp_path / "r", progress=False)
    (tmp_path / "r" / "log.jsonl").write_text('{"epoch": 1}\n{"epo')
    with pytest.raises(io.CheckpointError, match=r"log.jsonl: line 2 is not valid JSON"):
        fit(replace_epochs(cfg, 1), data, data, tmp_path / "r", resume=True, progress=False)


def replace_epochs(cfg, epochs):
    from dataclasses import replace

    return replace(cfg, epochs=epochs)


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "X", "--distill-weight", "-5"], "argument --distill-weight: -5 is not a finite number >= 0"),
    (["train", "--out", "X", "--n-val", "0"], "argument --n-val: 0 is not a positive integer"),
    (["train", "--out", "X", "--crop", "0"], "argument --crop: 0 is not a positive multiple of 8"),
    (["train", "--out", "X", "--ignore-index", "1"], "argument --ignore-index: 1 is not usable"),
    (["predict", "a.png", "b.png", "-o", "x.jpg", "--checkpoint", "c.h5"],
     "change maps are written as GeoTIFF (.tif) or PNG (.png)"),
    (["predict", "a.png", "b.png", "-o", "x.png", "--checkpoint", "c.h5", "--threshold", "nan"],
     "argument --threshold: nan is not a probability"),
    (["predict", "a.png", "b.png", "-o", "x.png", "--checkpoint", "c.h5", "--threshold", "2"],
     "argument --threshold: 2 is not a probability"),
])
def test_cli_arguments_are_checked_up_front_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1, err


def test_ignore_value_255_on_a_0_255_mask_is_refused_naming_the_file(tmp_path):
    from hicd_core import DatasetError
    from hicd_core.data import FolderDataset

    a, b = write_pair(tmp_path, 16, 16)
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    (tmp_path / "label").mkdir()
    a.rename(tmp_path / "A" / "s.png")
    b.rename(tmp_path / "B" / "s.png")
    label = np.zeros((16, 16), np.uint8)
    label[:4] = 255
    PIL.fromarray(label).save(tmp_path / "label" / "s.png")
    with pytest.raises(DatasetError, match=r"s.png: label values \[0, 255\] with ignore value 255"):
        FolderDataset(tmp_path, ignore_value=255)[0]
    assert FolderDataset(tmp_path)[0][2].sum() == 64  # without it, 255 is change


def test_train_cd_user_errors_are_one_line(tmp_path):
    (tmp_path / "afile.txt").write_text("")
    for args, message in ((["--data", str(tmp_path / "nope")], "no such folder or file"),
                          (["--out", str(tmp_path / "afile.txt")], "exists and is not a folder")):
        out = run(["examples/train_cd.py", *args])
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def _folder(root, sizes, bad_label=None):
    rng = np.random.default_rng(0)
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        for sub in ("A", "B"):
            PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / sub / f"s{i}.png")
        label = (rng.random((h, w)) > 0.8).astype(np.uint8) * 255
        if i == bad_label:
            label[0, 0] = 7
        PIL.fromarray(label).save(root / "label" / f"s{i}.png")
    return root


def test_a_bad_sample_fails_before_the_first_step_naming_the_file(tmp_path, monkeypatch):
    from hicd_core import DatasetError
    from hicd_core import train as train_module
    from hicd_core.data import FolderDataset, Repeat

    root = _folder(tmp_path / "d", [(16, 16)] * 8, bad_label=6)
    steps = []
    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    cfg = TrainConfig(role="teacher", epochs=2, batch_size=4, seed=0)
    data = FolderDataset(root)
    with pytest.raises(DatasetError, match=r"label/s6.png: label values \[0, 7, 255\]"):
        fit(cfg, Repeat(data, 2), data, tmp_path / "run", progress=False)
    assert steps == []


def test_scenes_of_different_sizes_train_validate_and_evaluate(tmp_path, capsys):
    from hicd_core.data import FolderDataset

    root = _folder(tmp_path / "d", [(16, 24)] * 4 + [(24, 16)] * 4 + [(20, 20)])  # (20, 20): not a multiple of 8
    data = FolderDataset(root)
    cfg = TrainConfig(role="teacher", epochs=1, batch_size=4, crop=16, seed=0, eval_tile=16)
    result = fit(cfg, data, data, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "best.h5").is_file() and 0 <= result.best["f1"] <= 100
    assert cli_main(["eval", str(tmp_path / "run" / "best.h5"), "--data", str(root), "--batch-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 9


def test_a_distillation_method_is_added_in_one_place(monkeypatch):
    from hicd_core import train as train_module

    calls = []

    def zero_method(cfg, taps, teacher_taps):
        calls.append(sorted(taps))
        return taps["d1"][0, 0, 0, 0] * 0.0, {"zero": 0.0}, {}

    monkeypatch.setitem(train_module.DISTILL_METHODS, "zero", zero_method)
    model, teacher = TinySiamCD(widths=(4, 4, 8, 8), seed=0), TinySiamCD(widths=(4, 4, 8, 8), seed=1)
    t1, t2, label = synthetic_pairs(2, 16, seed=0)
    terms = train_step(model, AdamW(model.params), t1, t2, label, teacher=teacher, distill=DistillConfig(method="zero"))
    assert calls and "distill/zero" in terms
    with pytest.raises(ValueError, match="unknown student method 'nope'"):
        DistillConfig(method="nope")


def test_a_run_of_an_older_release_resumes_when_new_fields_keep_their_defaults(tmp_path):
    from hicd_core.train import _same_config

    cfg = TrainConfig(role="teacher", epochs=1, batch_size=8)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("pos_weight", "normalize", "patience")}
    assert _same_config(old, cfg.to_dict())
    assert not _same_config(old, TrainConfig(role="teacher", epochs=1, batch_size=8, patience=3).to_dict())
    assert not _same_config({**old, "lr": 1.0}, cfg.to_dict())
    student = TrainConfig(role="student", setting="resolution-x4", epochs=1, batch_size=8, distill=DistillConfig())
    old_distill = {k: v for k, v in student.to_dict()["distill"].items() if k != "weight_schedule"}
    assert _same_config({**student.to_dict(), "distill": old_distill}, student.to_dict())
    cosine = TrainConfig(role="student", setting="resolution-x4", epochs=1, batch_size=8,
                         distill=DistillConfig(weight_schedule="cosine"))
    assert not _same_config({**student.to_dict(), "distill": old_distill}, cosine.to_dict())


def test_a_cosine_distillation_weight_decays_over_the_budget(tmp_path):
    cfg = DistillConfig(weight=2.0, weight_schedule="cosine")
    assert DistillConfig().at_step(7, 10) == DistillConfig()
    assert [round(cfg.at_step(s, 8).weight, 12) for s in (0, 2, 4, 8, 9)] == [2.0, round(1 + 2 ** -0.5, 12), 1.0,
                                                                              0.0, 0.0]
    assert cfg.at_step(4, 8).weight_schedule == "constant"
    with pytest.raises(ValueError, match="weight_schedule must be one of"):
        DistillConfig(weight_schedule="linear-ish")
    # in a run: the logged distillation term follows the weight (the last epoch's steps weigh least)
    train_set, val_set = ArrayDataset(*synthetic_pairs(16, 16, seed=0)), ArrayDataset(*synthetic_pairs(8, 16, seed=1))
    teacher_out = tmp_path / "teacher"
    fit(TrainConfig(epochs=1, batch_size=8, widths=(4, 4, 8, 8)), train_set, val_set, teacher_out, progress=False)
    teacher, _ = load_model(teacher_out / "best.h5")
    logged = {}
    for schedule in ("constant", "cosine"):
        distill = DistillConfig(windows=(None, None, None), change_window=8, weight_schedule=schedule)
        cfg = TrainConfig(role="student", setting="resolution-x4", epochs=2, batch_size=8, widths=(4, 4, 8, 8),
                          distill=distill)
        result = fit(cfg, train_set, val_set, tmp_path / schedule, teacher=teacher, progress=False)
        logged[schedule] = [r["train"]["distill"] for r in result.history]
        assert load_model(tmp_path / schedule / "last.h5")[1]["config"]["distill"]["weight_schedule"] == schedule
    assert logged["cosine"][0] < logged["constant"][0] and logged["cosine"][1] < 0.5 * logged["constant"][1]


# --------------------------------------------------------------------------- the second network, FC-Siam-diff


FC = dict(model="fc-siam-diff", widths=(4, 4, 8, 8))


def test_fc_siam_diff_trains_and_reloads(tmp_path):
    data = ArrayDataset(*synthetic_pairs(16, 32, seed=0))
    whole = fit(TrainConfig(epochs=2, batch_size=8, dropout=0.3, bottleneck="t2", **FC), data, data, tmp_path / "run",
                progress=False)
    model, ck = load_model(tmp_path / "run" / "last.h5")
    assert type(model).__name__ == "FCSiamDiff" and ck["model_config"]["dropout"] == 0.3
    assert model.bottleneck == "t2" and ck["config"]["bottleneck"] == "t2"
    assert ck["config"]["model"] == "fc-siam-diff"
    for k in model.params:
        assert np.array_equal(model.params[k], whole.model.params[k]), k
    assert evaluate(model, data)["f1"] == evaluate(whole.model, data)["f1"]


def test_bottleneck_settings_and_older_checkpoints():
    """A checkpoint written before the bottleneck choice existed builds the network it was: "diff"."""
    from hicd_core.networks import build_model, model_from_config

    with pytest.raises(ValueError, match=r"bottleneck must be one of \('diff', 't2', 'mean'\) \(or None"):
        TrainConfig(bottleneck="t1", **FC)
    with pytest.raises(ValueError, match="model 'tiny-siam-cd' has no bottleneck choice; got bottleneck='t2'"):
        build_model("tiny-siam-cd", (4, 4, 8, 8), bottleneck="t2")
    old = {"arch": "FCSiamDiff", "widths": [4, 4, 8, 8], "in_channels": 3, "dropout": 0.0}
    assert model_from_config(old).bottleneck == "diff"
    assert model_from_config(dict(old, bottleneck="mean")).bottleneck == "mean"


def test_networks_mix_only_where_they_can(tmp_path):
    """An FC-Siam-diff teacher distils into a fresh TinySiamCD student (same taps and resolutions); a student
    that starts from the teacher's weights needs the teacher's network; crops follow the network's multiple."""
    data = ArrayDataset(*synthetic_pairs(8, 32, seed=0))
    teacher = fit(TrainConfig(epochs=1, batch_size=8, **FC), data, data, tmp_path / "t", progress=False).model
    student = TrainConfig(role="student", setting="resolution-x4", epochs=1, batch_size=8, widths=(4, 4, 8, 8),
                          student_init="fresh", distill=DistillConfig(windows=(8, 8, None), change_window=8))
    result = fit(student, data, data, tmp_path / "s", teacher=teacher, progress=False)
    assert type(result.model).__name__ == "TinySiamCD" and "distill" in result.history[0]["train"]
    from dataclasses import replace

    with pytest.raises(ValueError, match="needs the teacher's network"):
        fit(replace(student, student_init="teacher"), data, data, tmp_path / "s2", teacher=teacher, progress=False)
    with pytest.raises(ValueError, match="crop 24 must be a multiple of 16"):
        fit(TrainConfig(epochs=1, batch_size=8, crop=24, **FC), data, data, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="has no dropout"):
        fit(TrainConfig(epochs=1, batch_size=8, dropout=0.1), data, data, tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        TrainConfig(model="unet")


def test_fc_siam_diff_predicts_an_odd_sized_pair_through_the_cli(tmp_path, capsys):
    data = ArrayDataset(*synthetic_pairs(8, 32, seed=0))
    fit(TrainConfig(epochs=1, batch_size=8, **FC), data, data, tmp_path / "m", progress=False)
    a, b = write_pair(tmp_path, 70, 90)
    out = tmp_path / "change.png"
    assert cli_main(["predict", str(a), str(b), "-o", str(out), "--checkpoint", str(tmp_path / "m" / "best.h5"),
                     "--tile", "48", "--overlap", "8"]) == 0
    with PIL.open(out) as im:
        assert im.size == (90, 70)
    capsys.readouterr()
    assert cli_main(["predict", str(a), str(b), "-o", str(out), "--checkpoint", str(tmp_path / "m" / "best.h5"),
                     "--tile", "40"]) == 2
    assert "tile must be a positive multiple of 16 for FCSiamDiff, got 40" in capsys.readouterr().err


def test_a_checkpoint_with_conv_biases_before_batchnorm_loads_folded(tmp_path):
    """hicd 0.1 networks had a bias in every convolution before BatchNorm: it loads into the bias-free network
    with the bias folded into the running mean, the same function in evaluation, and its runs resume."""
    data = ArrayDataset(*synthetic_pairs(16, 16, seed=0))
    cfg = TrainConfig(epochs=1, batch_size=8, widths=(4, 4, 8, 8))
    fit(cfg, data, data, tmp_path / "new", progress=False)
    model, ck = load_model(tmp_path / "new" / "last.h5")
    rng = np.random.default_rng(0)
    old = {"params": dict(ck["params"]), "buffers": dict(ck["buffers"])}
    optim = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ck["optim"].items()}
    for name in model.layers:  # the old layout: a bias per convolution, here non-zero
        bias = rng.standard_normal(model.layers[name][1]).astype(np.float32)
        old["params"][f"{name}.conv.bias"] = bias
        for slot in ("m", "v"):
            optim[slot][f"{name}.conv.bias"] = np.zeros_like(bias)

    class Old:  # what save_checkpoint needs of a model
        def state_dict(self):
            return old

        def config(self):
            return model.config()

    class OldOptim:
        def state_dict(self):
            return optim

    io.save_checkpoint(tmp_path / "old" / "last.h5", model=Old(), optimizer=OldOptim(), step=ck["step"],
                       rng_state=ck["rng_state"], config=ck["config"], extra=ck["extra"])
    loaded, _ = load_model(tmp_path / "old" / "last.h5")
    assert not any(k.endswith("conv.bias") for k in loaded.params)
    x1, x2 = (rng.random((2, 3, 16, 16)).astype(np.float32) for _ in range(2))
    # the old network's evaluation, layer by layer: bias added before BatchNorm's running statistics
    from hicd_core import functional as F

    for name in model.layers:
        p, b = old["params"], old["buffers"]
        args = (p[f"{name}.conv.weight"], p[f"{name}.conv.bias"], p[f"{name}.bn.weight"], p[f"{name}.bn.bias"],
                b[f"{name}.bn.running_mean"], b[f"{name}.bn.running_var"])
        x = rng.standard_normal((1, model.layers[name][0], 8, 8)).astype(np.float32)
        want = F.cbr_forward(x, *args, training=False)[0]
        lp, lb = loaded.params, loaded.buffers
        got = F.cbr_forward(x, lp[f"{name}.conv.weight"], None, lp[f"{name}.bn.weight"], lp[f"{name}.bn.bias"],
                            lb[f"{name}.bn.running_mean"], lb[f"{name}.bn.running_var"], training=False)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    assert loaded.predict_logits(x1, x2).shape == (2, 1, 16, 16)
    more = TrainConfig(epochs=2, batch_size=8, widths=(4, 4, 8, 8))
    ck_old = io.load_checkpoint(tmp_path / "old" / "last.h5")
    ck_old["config"]["epochs"] = 2
    io.save_checkpoint(tmp_path / "old" / "last.h5", model=Old(), optimizer=OldOptim(), step=ck["step"],
                       rng_state=ck["rng_state"], config=ck_old["config"], extra=ck["extra"])
    resumed = fit(more, data, data, tmp_path / "old", resume=True, progress=False)
    assert resumed.history[-1]["epoch"] == 2  # (the copied folder has no log of epoch 1)


def test_pos_weight_auto_is_the_no_change_to_change_ratio_of_the_training_labels(tmp_path):
    from hicd_core.data import change_fraction

    data = ArrayDataset(*synthetic_pairs(16, 16, seed=0))
    labels = np.stack([data[i][2] for i in range(len(data))])
    fraction = change_fraction(data)
    assert fraction == pytest.approx(labels.mean())
    result = fit(TrainConfig(epochs=1, batch_size=8, widths=(4, 4, 8, 8), pos_weight="auto"), data, data,
                 tmp_path / "auto", progress=False)
    assert result.history[0]["pos_weight"] == round((1 - fraction) / fraction, 4)
    with pytest.raises(ValueError, match="pos_weight must be a positive finite number or 'auto'"):
        TrainConfig(pos_weight="sometimes")
    empty = ArrayDataset(data.t1[:2], data.t2[:2], np.zeros_like(labels[:2]))
    with pytest.raises(Exception, match="no training label has a change pixel"):
        change_fraction(empty)


@pytest.mark.parametrize("warmup", [False, True])
def test_averaged_weights_select_the_model_and_resume_bitwise(tmp_path, warmup):
    """With ema the validation and best.h5 use the average, last.h5 carries it, and a stopped run resumes."""
    data = ArrayDataset(*synthetic_pairs(16, 16, seed=0))
    cfg = TrainConfig(epochs=2, batch_size=8, widths=(4, 4, 8, 8), ema=0.9, ema_warmup=warmup)
    fit(cfg, data, data, tmp_path / "whole", progress=False)

    class Stop(Exception):
        pass

    def stop(record):
        if record["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, data, data, tmp_path / "split", progress=False, on_epoch=stop)
    fit(cfg, data, data, tmp_path / "split", resume=True, progress=False)
    a, _, _ = _arrays(tmp_path / "whole" / "last.h5")
    b, _, _ = _arrays(tmp_path / "split" / "last.h5")
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    last, best = io.load_checkpoint(tmp_path / "whole" / "last.h5"), io.load_checkpoint(tmp_path / "whole" / "best.h5")
    average = last["optim"]["ema"]
    resumed = io.load_checkpoint(tmp_path / "split" / "last.h5")["optim"]["ema"]
    assert set(resumed) == set(average) and all(np.array_equal(resumed[k], average[k]) for k in average)
    assert not all(np.array_equal(average[k], last["params"][k]) for k in average)  # an average, not the weights
    if best["extra"]["epoch"] == 2:
        assert all(np.array_equal(best["params"][k], average[k]) for k in average)
    model, _ = load_model(tmp_path / "whole" / "best.h5")
    assert evaluate(model, data)["f1"] == best["extra"]["best"]["f1"]  # best.h5 is the model that was validated
    with pytest.raises(ValueError, match="ema must be a decay in"):
        TrainConfig(ema=1.0)


def test_warmed_up_average_starts_from_the_first_steps(tmp_path):
    """``ema_warmup``: decay min(ema, (1 + t) / (10 + t)) at update t: 0.1 at the first, so after one step
    the average is 0.1 of the initial weights and 0.9 of the trained ones (without: 0.99 and 0.01)."""
    from hicd_core.networks import build_model

    data = ArrayDataset(*synthetic_pairs(8, 16, seed=0))  # one batch: one update per epoch
    for warmup, share in ((True, 0.1), (False, 0.99)):
        out = tmp_path / str(warmup)
        fit(TrainConfig(epochs=1, batch_size=8, widths=(4, 4, 8, 8), ema=0.99, ema_warmup=warmup), data, data, out,
            progress=False)
        last = io.load_checkpoint(out / "last.h5")
        initial = build_model("tiny-siam-cd", (4, 4, 8, 8), seed=0).params
        for k, w in last["params"].items():
            np.testing.assert_allclose(last["optim"]["ema"][k], share * initial[k] + (1 - share) * w, rtol=1e-5,
                                       atol=1e-6)
    with pytest.raises(ValueError, match="ema_warmup warms up the weight average: it needs ema"):
        TrainConfig(ema_warmup=True)


def test_cli_train_takes_threads(tmp_path):
    pytest.importorskip("threadpoolctl")
    out = tmp_path / "run"
    assert cli_main(["train", "--size", "32", "--n-train", "8", "--n-val", "8", "--epochs", "1", "--batch-size", "4",
                     "--threads", "2", "--no-progress", "--out", str(out)]) == 0
    assert io.load_checkpoint(out / "last.h5")["config"]["threads"] == 2


def test_cli_train_takes_the_averaging_options(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", "--size", "32", "--n-train", "8", "--n-val", "8", "--epochs", "1", "--batch-size", "4",
                     "--ema", "0.9", "--ema-warmup", "--precise-bn", "2", "--no-progress", "--out", str(out)]) == 0
    config = io.load_checkpoint(out / "last.h5")["config"]
    assert (config["ema"], config["ema_warmup"], config["precise_bn"]) == (0.9, True, 2)


@pytest.mark.parametrize("network", ["tiny-siam-cd", "fc-siam-diff"])
def test_precise_statistics_are_the_equal_weight_mean_of_the_batches(network):
    from hicd_core.data.loader import TrainBatches
    from hicd_core.networks import build_model
    from hicd_core.train import precise_statistics

    data = ArrayDataset(*synthetic_pairs(12, 16, seed=3))
    model = build_model(network, (4, 4, 8, 8), dtype="float64", seed=1,
                        dropout=0.0 if network == "fc-siam-diff" else None)
    before = {k: v.copy() for k, v in model.buffers.items()}

    def batches():
        return TrainBatches(data, 4, rng=np.random.default_rng(5))

    got = precise_statistics(model, batches(), 5, xp=np, seed=0)  # 3 batches an epoch: cycles once
    assert all(np.array_equal(model.buffers[k], before[k]) for k in before) and model.bn_momentum == 0.1
    each = []
    again = batches()
    for i, (x1, x2, _, _) in zip(range(5), [*again.epoch(), *again.epoch()]):
        model.bn_momentum = 1.0  # the running statistics become this batch's own
        model.forward(x1, x2, training=True)
        each.append({k: v.copy() for k, v in model.buffers.items()})
    for k in before:
        np.testing.assert_allclose(got[k], np.mean([e[k] for e in each], axis=0), rtol=1e-12, atol=1e-12)


def test_precise_bn_changes_the_validated_model_not_the_training(tmp_path):
    """Training is the same step for step (last.h5); best.h5 carries the re-estimated statistics."""
    from hicd_core.networks import load_model as load
    from hicd_core.train import _training_batches, precise_statistics

    data = ArrayDataset(*synthetic_pairs(16, 16, seed=0))
    cfg = TrainConfig(epochs=2, batch_size=8, crop=16, ema=0.9, ema_warmup=True, **FC)
    fit(cfg, data, data, tmp_path / "plain", progress=False)
    precise = replace(cfg, precise_bn=3)
    fit(precise, data, data, tmp_path / "precise", progress=False)
    a, b = (io.load_checkpoint(tmp_path / run / "last.h5") for run in ("plain", "precise"))
    for group in ("params", "buffers"):
        assert all(np.array_equal(a[group][k], b[group][k]) for k in a[group]), group
    best, ck = load(tmp_path / "precise" / "best.h5")
    expected = precise_statistics(best, _training_batches(precise, data, np.random.default_rng([0, 3])), 3, xp=np)
    for k in expected:
        np.testing.assert_allclose(ck["buffers"][k], expected[k], rtol=1e-6, atol=1e-6)
    assert not all(np.allclose(ck["buffers"][k], b["buffers"][k]) for k in expected)
    assert evaluate(best, data)["f1"] == ck["extra"]["best"]["f1"]  # best.h5 is the model that was validated
    with pytest.raises(ValueError, match="precise_bn must be a number of batches >= 0"):
        TrainConfig(precise_bn=-1)
