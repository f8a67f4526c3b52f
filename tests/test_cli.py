"""The fastae command end to end: runs, outputs, resume, and one-line errors for bad input."""

import hashlib
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
    np.save(tmp_path / "big.npy", np.array([[0.0, 1e39], [1.0, 2.0]]))
    np.save(tmp_path / "garbage.npy", np.array([{}, None], dtype=object), allow_pickle=True)
    (tmp_path / "afile").write_text("not a folder\n")


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
            "fastae train: error: --activation: got 'relu' for variant 'sparse-kl', expected "
            "'sigmoid'",
        ),
        (
            ["train", "--variant", "denoising", "--noise", "gaussian"],
            "fastae train: error: argument --noise: got 'gaussian', expected KIND:LEVEL with KIND "
            "one of gaussian, masking, salt-and-pepper (see fastae train --help)",
        ),
        (["train", "--bogus"], "fastae train: error: unrecognized arguments: --bogus"),
        (
            ["train", "--out", "afile"],
            "fastae train: error: --out: afile is a file, expected a folder (a new or empty one)",
        ),
        (
            ["train", "--data", "big.npy"],
            "--data: big.npy: got 1 value(s) beyond float32's range",
        ),
        (
            ["train", "--data", "garbage.npy"],
            "--data: garbage.npy: not a numeric array (it holds pickled Python objects)",
        ),
        (
            ["compare", "--lambda", "0"],
            "fastae compare: error: --lambda: got 0 for the contractive row, expected > 0",
        ),
        (
            ["compare", "--hidden", "32,8", "--penalty-method", "exact", "--penalty-probes", "4"],
            "fastae compare: error: --penalty-probes: got 4 with penalty_method 'exact'",
        ),
        (
            ["eval", "empty"],
            "fastae eval: error: RUN_DIR: empty: no checkpoint found (expected "
            "checkpoint/state.json)",
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


def _main(args):
    """The exit status of cli.main in this process (its output: capsys of the caller)."""
    with pytest.raises(SystemExit) as exited:
        raise SystemExit(cli.main(args))
    return exited.value.code


def test_dead_relu_codes_are_reported_with_the_flag_to_lower(tmp_path, monkeypatch, capsys):
    # gamma 0.01 suits sigmoid codes; with relu codes it silences every unit in the first epoch.
    monkeypatch.chdir(tmp_path)
    args = ["train", "--variant", "sparse-l1", "--tied", "--activation", "relu", "--epochs", "2"]
    assert _main([*args, "--out", "dead"]) == 0
    out, err = capsys.readouterr()
    message = (
        "all 8 code units are inactive (|h| < 0.05 on every validation sample; relu codes): the "
        "model reconstructs the same output for every input; lower --gamma (got 0.01)"
    )
    assert f"epoch 1: {message}" in err
    assert f"  warning: {message}\n" in out
    assert json.loads((tmp_path / "dead" / "summary.json").read_text())["warning"] == message

    # The README's relu example: a smaller gamma keeps units alive, and nothing is reported.
    assert _main([*args, "--gamma", "0.001", "--out", "alive"]) == 0
    out, err = capsys.readouterr()
    assert "inactive" not in out + err
    summary = json.loads((tmp_path / "alive" / "summary.json").read_text())
    assert summary["near_zero"] < 1.0 and "warning" not in summary


def test_a_run_folder_is_claimed_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # Another run takes the folder between this run's checks and its first write.
    checked = cli._new_out

    def raced(out, stem, resumable=True):
        out = checked(out, stem, resumable)
        os.makedirs(out)
        (tmp_path / out / cli.CLAIM).write_text(f"{os.getpid()}\n")  # a live process
        return out

    monkeypatch.setattr(cli, "_new_out", raced)
    assert _main(["train", "--epochs", "1", "--out", "shared"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "fastae train: error: --out: shared was taken by another run started at the same time, "
        "expected a new folder\n"
    )
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [cli.CLAIM]
    monkeypatch.setattr(cli, "_new_out", checked)

    # Started later, while the other run has written nothing but its claim.
    assert _main(["train", "--epochs", "1", "--out", "shared"]) == 2
    assert capsys.readouterr().err == (
        f"fastae train: error: --out: shared is taken by another run (process {os.getpid()}, "
        "still running, has not written yet), expected a new folder\n"
    )
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [cli.CLAIM]

    # An empty folder given with --out, and a generated name, are claimed by the run itself.
    (tmp_path / "empty").mkdir()
    assert cli._claim_out("empty", chosen=True) == "empty"
    assert (tmp_path / "empty" / cli.CLAIM).is_file()
    (tmp_path / "runs" / "x").mkdir(parents=True)
    assert cli._claim_out(os.path.join("runs", "x"), chosen=False) == os.path.join("runs", "x-2")


def test_two_runs_with_the_same_out_one_is_refused(tmp_path):
    args = ["train", "--epochs", "2", "--out", "same"]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "fastae", *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for _ in range(2)
    ]
    results = [(run.wait(timeout=120), run.stderr.read()) for run in runs]
    for run in runs:
        run.stdout.close()
        run.stderr.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert refused.count("\n") == 1 and "--out: same" in refused and "Traceback" not in refused
    rows = (tmp_path / "same" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "1", "2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run on a .npy file: (folder, data file)."""
    from fastae.data import load_dataset

    base = tmp_path_factory.mktemp("finished")
    np.save(base / "x.npy", load_dataset("digits").x[:200])
    done = _run(["train", "--data", "x.npy", "--epochs", "2", "--out", "run"], base)
    assert done.returncode == 0, done.stderr
    return base / "run", base / "x.npy"


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _damaged(finished_run, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    damage(run / "checkpoint")
    return run


def _truncate(name):
    def damage(checkpoint):
        data = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data[: len(data) // 2])

    return damage


def _drop_history(checkpoint):
    state = json.loads((checkpoint / "state.json").read_text())
    del state["history"]
    (checkpoint / "state.json").write_text(json.dumps(state))


def _other_hidden(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model"]["hidden"] = [4]
    (checkpoint / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, commands, message",
    [
        (
            _truncate("model.safetensors"),
            ("eval", "resume"),
            "run/checkpoint/model.safetensors: unreadable weights (",
        ),
        (
            _truncate("optimizer.pt"),
            ("eval", "resume"),
            "run/checkpoint/optimizer.pt: unreadable optimizer state (",
        ),
        (
            _drop_history,
            ("resume",),  # eval needs no history
            "run/checkpoint/state.json: got history NoneType, expected a list of 2 per-epoch "
            "records",
        ),
        (
            _other_hidden,
            ("resume",),
            "run/checkpoint/model.safetensors does not match config.json: checkpoint does not "
            "match the model: decoder.0.weight: checkpoint shape (64, 8), model shape (64, 4)",
        ),
    ],
    ids=["weights", "optimizer", "history", "hidden"],
)
def test_damaged_checkpoints_are_one_line_errors(
    finished_run, tmp_path, monkeypatch, capsys, damage, commands, message
):
    monkeypatch.chdir(tmp_path)
    run = _damaged(finished_run, tmp_path, damage)
    before = _files(run)
    for command in commands:
        args = ["eval", "run"] if command == "eval" else ["train", "--resume", "--out", "run"]
        assert _main([*args, "--epochs", "3"] if command == "resume" else args) == 2
        err = capsys.readouterr().err
        prefix = "RUN_DIR" if command == "eval" else "--out"
        assert err.startswith(f"fastae {args[0]}: error: {prefix}: "), err
        assert message in err and err.count("\n") == 1, err
        assert _files(run) == before


def test_resume_refuses_data_that_changed_since_the_run_started(
    finished_run, tmp_path, monkeypatch, capsys
):
    import shutil

    monkeypatch.chdir(tmp_path)
    run = _damaged(finished_run, tmp_path, lambda checkpoint: None)
    data = finished_run[1]
    original = data.read_bytes()
    x = np.load(data)
    recorded = json.loads((run / "checkpoint" / "config.json").read_text())["data"]["fingerprint"]
    assert recorded["shape"] == [200, 64]
    before = _files(run)
    try:
        for changed in (x + np.eye(200, 64, dtype=x.dtype), x[:, :60]):
            np.save(data, changed)
            assert _main(["train", "--resume", "--out", "run", "--epochs", "3"]) == 2
            err = capsys.readouterr().err
            digest = hashlib.sha256(changed.astype(np.float32).tobytes()).hexdigest()
            assert err == (
                f"fastae train: error: --data: {data} has changed since the run started: got "
                f"shape {changed.shape} (sha256 {digest[:12]}), "
                f"expected shape (200, 64) (sha256 {recorded['sha256'][:12]}) as recorded in "
                f"run/checkpoint/config.json\n"
            )
            assert _files(run) == before

        # eval still reports on the file as it is now, and says that it changed.
        np.save(data, x + np.eye(200, 64, dtype=x.dtype))
        assert _main(["eval", "run"]) == 0
        assert f"{data} has changed since the run was trained" in capsys.readouterr().err

        # A run from before fingerprints were recorded: only the width is checked.
        np.save(data, x[:, :60])
        config = json.loads((run / "checkpoint" / "config.json").read_text())
        del config["data"]["fingerprint"]
        (run / "checkpoint" / "config.json").write_text(json.dumps(config))
        assert _main(["train", "--resume", "--out", "run", "--epochs", "3"]) == 2
        assert capsys.readouterr().err == (
            f"fastae train: error: --data: {data} has changed since the run started: got 60 "
            "features, expected 64 (the run's model)\n"
        )
    finally:
        data.write_bytes(original)
    shutil.rmtree(run)


def test_compare_with_relu_skips_sparse_kl_and_says_why(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--activation", "relu", "--gamma", "0.001", "--epochs", "1"]
    done = _run([*args, "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    note = "sparse-kl skipped (its KL penalty needs sigmoid codes, got --activation relu)"
    assert note in done.stderr
    table = (out / "compare.md").read_text()
    assert "| sparse-kl |" not in table and table.rstrip().endswith(note)
    assert len((out / "compare.csv").read_text().splitlines()) == 7


def test_a_folder_claimed_by_a_dead_run_can_be_used_again(tmp_path, monkeypatch, capsys):
    # A run killed before its first checkpoint leaves only its claim, naming a process that has
    # ended: --resume says what happened, and a new run with the same --out takes the folder.
    monkeypatch.chdir(tmp_path)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / "dead").mkdir()
    (tmp_path / "dead" / cli.CLAIM).write_text(ended.stdout)

    assert _main(["train", "--resume", "--out", "dead"]) == 2
    assert capsys.readouterr().err == (
        "fastae train: error: --out: dead holds no checkpoint: its run stopped before the end of "
        "its first epoch; start it again with the same --out and without --resume\n"
    )
    assert _main(["train", "--epochs", "1", "--out", "dead"]) == 0
    assert (tmp_path / "dead" / "checkpoint" / "state.json").exists()
    assert (tmp_path / "dead" / cli.CLAIM).read_text() == f"{os.getpid()}\n"


def test_a_bad_backend_override_is_one_line_before_anything_is_written(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTAE_BACKEND", "bogus")
    assert _main(["train", "--epochs", "1", "--out", "run"]) == 2
    assert capsys.readouterr().err == (
        "fastae train: error: FASTAE_BACKEND: got 'bogus', expected 'torch' or 'triton' (or "
        "unset)\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_bad_onednn_switch_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    # The digits model is far below the size that takes oneDNN: the value is checked anyway.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTAE_ONEDNN", "yes")
    assert _main(["train", "--epochs", "1", "--out", "run"]) == 2
    assert capsys.readouterr().err == (
        "fastae train: error: FASTAE_ONEDNN: got 'yes', expected '0' or '1' (or unset)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rank, echoed", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_reports_a_malformed_command_line(
    monkeypatch, capsys, rank, echoed
):
    # torchrun starts every process with the same arguments: one message, not one per process.
    monkeypatch.setenv("RANK", rank)
    assert _main(["train", "--epochs", "zero"]) == 2
    err = capsys.readouterr().err
    assert ("fastae train: error: argument --epochs" in err) == echoed
    assert err == "" or echoed


def test_errors_that_can_differ_between_processes_are_reported_by_every_rank(
    tmp_path, monkeypatch, capsys
):
    # A data file can be missing on one node only: that rank must say so.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "3")
    assert _main(["train", "--data", "missing.csv"]) == 2
    assert "--data" in capsys.readouterr().err
