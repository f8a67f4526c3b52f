"""The fastae command end to end: runs, outputs, resume, and one-line errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastae import cli

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _run(args, cwd, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "fastae", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def test_train_writes_run_and_eval_reports_the_same_metrics(tmp_path):
    out = tmp_path / "run"
    done = _run(["train", "--epochs", "3", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    for name in (
        "checkpoint/model.safetensors",
        "checkpoint/config.json",
        "checkpoint/optimizer.pt",
        "checkpoint/state.json",
        "metrics.csv",
        "summary.json",
        "reconstructions.png",
        "loss_curves.png",
        "codes.png",
    ):
        assert (out / name).is_file(), name
    assert "epoch 3/3" in done.stderr
    assert len((out / "metrics.csv").read_text().splitlines()) == 4
    summary = json.loads((out / "summary.json").read_text())

    evaluated = _run(["eval", str(out)], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"val MSE {summary['mse']:.5f}" in evaluated.stdout
    assert f"mean ||J||_F^2 {summary['jacobian']:.4g}" in evaluated.stdout

    # Another data file, scaled with the run's scaler; a file of the wrong width is refused.
    from fastae.data import load_dataset

    np.save(tmp_path / "some.npy", load_dataset("digits").x[:50])
    np.save(tmp_path / "wide.npy", np.zeros((5, 65)))
    other = _run(["eval", str(out), "--data", "some.npy"], tmp_path)
    assert other.returncode == 0, other.stderr
    assert "all 50 samples of some.npy" in other.stdout
    wide = _run(["eval", str(out), "--data", "wide.npy"], tmp_path)
    assert wide.returncode == 2
    assert wide.stderr.strip() == (
        "fastae eval: error: --data: got 65 features, expected 64 (the run's model)"
    )


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--variant", "denoising", "--epochs", "400", "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "fastae", *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint" / "state.json").is_file():
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            assert process.poll() is None, "the run ended before it was killed"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    epoch = json.loads((out / "checkpoint" / "state.json").read_text())["epoch"]
    assert 1 <= epoch < 400

    resumed = _run(["train", "--resume", "--out", str(out), "--epochs", str(epoch + 2)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from epoch {epoch} of {epoch + 2}" in resumed.stderr
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, epoch + 3))


def test_compare_writes_one_table(tmp_path):
    out = tmp_path / "cmp"
    done = _run(["compare", "--epochs", "1", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    table = (out / "compare.md").read_text()
    models = ("undercomplete", "sparse-l1", "sparse-kl", "denoising", "contractive")
    for model in (*models, "deep contractive", "PCA"):
        assert f"| {model} |" in table
        assert f"| {model} |" in done.stdout
    assert len((out / "compare.csv").read_text().splitlines()) == 8
    assert (out / "compare.png").is_file()
    assert (out / "contractive" / "checkpoint" / "model.safetensors").is_file()
    deep = json.loads((out / "deep-contractive" / "checkpoint" / "config.json").read_text())
    assert deep["model"]["hidden"] == [32, 8]
    assert "deep contractive 32,8, exact penalty" in table


def test_no_command_prints_help(tmp_path):
    done = _run([], tmp_path, timeout=60)
    assert done.returncode == 2 and "usage: fastae" in done.stderr


def _bad_files(tmp_path):
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00")
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "missing.csv"], "--data: missing.csv: no such file"),
        (["train", "--data", "ragged.csv"], "--data: ragged.csv: line 2 has 1 columns"),
        (["train", "--data", "binary.csv"], "--data: binary.csv: not a readable CSV"),
        (["train", "--data", "nan.npy"], "--data: nan.npy: got 1 NaN or Inf"),
        (["train", "--hidden", "8,0"], "argument --hidden: got '8,0'"),
        (["train", "--lambda", "-0.5"], "argument --lambda: got '-0.5', expected a number >= 0"),
        (["train", "--variant", "sparse-kl", "--rho", "1.5"], "argument --rho: got '1.5'"),
        (["train", "--variant", "denoising", "--noise", "masking:1.5"], "argument --noise"),
        (["train", "--gamma", "0.1"], "--gamma: applies to --variant sparse-l1"),
        (["train", "--variant", "sparse-l1", "--gamma", "0"], "--gamma: got 0"),
        (["train", "--epochs", "0"], "argument --epochs: got '0'"),
        (["train", "--seed", "-1"], "argument --seed: got '-1'"),
        (
            ["train", "--variant", "sparse-kl", "--activation", "relu"],
            "activation: got 'relu' for variant 'sparse-kl', expected 'sigmoid'",
        ),
        (["train", "--label-column", "3"], "--data: digits: a label column applies to CSV"),
        (["train", "--resume"], "--resume: needs --out"),
        (["train", "--resume", "--out", "empty"], "--out: empty: no checkpoint found"),
        (["compare", "--hidden", "65"], "--hidden: got a code of 65 units"),
        (["eval", "missing-run"], "RUN_DIR: missing-run is not a folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path, monkeypatch, capsys, args, message
):
    monkeypatch.chdir(tmp_path)
    _bad_files(tmp_path)
    (tmp_path / "empty").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exited:
        raise SystemExit(cli.main(args))

    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.count("\n") == 1 and err.startswith("fastae"), err
    assert message in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_earlier_run_is_never_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.csv").write_text("precious\n")
    assert cli.main(["train", "--out", "old", "--epochs", "1"]) == 2
    assert "--out: old exists and is not empty" in capsys.readouterr().err
    assert (run / "metrics.csv").read_text() == "precious\n"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv"]


def test_bench_is_dispatched_to_the_benchmark_harness(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--shapes" in capsys.readouterr().out
