"""Training on several processes (DESIGN section 4): two gloo ranks take the steps of one process,
`fastae train --nproc 2` writes one run that reloads exactly, and a rank that dies or hangs ends
the run with a one-line error in bounded time."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fastae import parallel
from fastae.models import Autoencoder
from fastae.train import TrainConfig
from fastae.train import fit
from fastae.train import train_step

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
LOCAL_SIZES = (3, 5)
# fit() on 21 samples in batches of 8: global batches of 8, 8 and 5, split 4/4, 4/4 and 3/2.
FIT_SAMPLES = 21
FIT_CONFIG = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=3)
FIT_VARIANTS = {
    "sparse-kl": {"beta": 0.5, "rho": 0.1},
    "denoising": {"noise": "masking:0.3", "tied": True},
    "contractive": {"lam": 0.2, "reconstruction": "bce"},
    # The whole-encoder penalty of a 6-4-3 encoder, a batch mean like the others.
    "deep-contractive": {"variant": "contractive", "hidden": (4, 3), "lam": 0.2},
}


def _model(variant="sparse-kl", **kwargs):
    torch.manual_seed(0)
    kwargs = dict(kwargs or FIT_VARIANTS[variant])
    hidden = kwargs.pop("hidden", (4,))
    variant = kwargs.pop("variant", variant)
    return Autoencoder(6, hidden, variant=variant, seed=1, **kwargs).double()


def _data(count, seed):
    return np.random.default_rng(seed).random((count, 6))  # float64 in [0, 1)


def _optimizer(name, model):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.5)
    return torch.optim.Adam(model.parameters(), lr=0.05)


def _steps(model, optimizer, batches, context):
    """One train_step per batch (of this rank); the total loss of each step."""
    model.set_process_group(context.group if context is not None else None)
    step_module = parallel.wrap(model, context)
    totals = [train_step(step_module, optimizer, batch).total.item() for batch in batches]
    model.set_process_group(None)
    return totals


def _rank_main(rank, world, port, out_dir):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    context = parallel.init("cpu", timeout=30)
    try:
        results = {}
        # Two steps on local batches of 3 and 5 samples (two batches: Adam's second step uses
        # the state of its first).
        x = torch.from_numpy(_data(2 * sum(LOCAL_SIZES), seed=4))
        start = sum(LOCAL_SIZES[:rank])
        batches = [part[start : start + LOCAL_SIZES[rank]] for part in x.split(sum(LOCAL_SIZES))]
        for name in ("sgd", "adam"):
            model = _model()
            optimizer = _optimizer(name, model)
            totals = _steps(model, optimizer, batches, context)
            results[name] = {"state": model.state_dict(), "totals": totals}
            if name == "adam":
                results[name]["optimizer"] = optimizer.state_dict()

        # In eval mode the group is not used: the loss of this rank's batch alone.
        model = _model()
        model.set_process_group(context.group)
        with torch.no_grad():
            results["eval"] = model.eval().loss(batches[0]).total

        x_train, x_val = _data(FIT_SAMPLES, seed=5), _data(7, seed=6)
        for variant in FIT_VARIANTS:
            model = _model(variant)
            result = fit(model, x_train, x_val, FIT_CONFIG, progress=False, dist=context)
            results[variant] = {"state": model.state_dict(), "history": result.history}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        parallel.shutdown(context)


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of two gloo ranks computed (one start of two processes for every test here)."""
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_main, args=(2, _free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_states_close(state, expected):
    assert list(state) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_steps_on_3_and_5_samples_equal_one_process_on_8(ranks, name):
    x = torch.from_numpy(_data(2 * sum(LOCAL_SIZES), seed=4))
    model = _model()
    optimizer = _optimizer(name, model)
    totals = _steps(model, optimizer, list(x.split(sum(LOCAL_SIZES))), None)

    for rank in ranks:
        # The loss of each rank is the loss of the global batch...
        np.testing.assert_allclose(rank[name]["totals"], totals, rtol=0, atol=1e-12)
        # ...and the parameters after the steps are those of one process.
        _assert_states_close(rank[name]["state"], model.state_dict())
    if name == "adam":
        # Adam's moments hold the gradients themselves (its steps barely depend on their scale).
        expected = optimizer.state_dict()["state"]
        for rank in ranks:
            for index, moments in rank[name]["optimizer"]["state"].items():
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(
                        moments[key], expected[index][key], rtol=0, atol=1e-10
                    )


def test_sgd_steps_move_the_parameters(ranks):
    # The comparison above is not between two models that did not move.
    before = _model().state_dict()
    after = ranks[0]["sgd"]["state"]
    assert min((after[k] - before[k]).abs().max().item() for k in before) > 1e-4


def test_eval_mode_keeps_to_the_local_batch(ranks):
    x = torch.from_numpy(_data(2 * sum(LOCAL_SIZES), seed=4))
    model = _model().eval()
    with torch.no_grad():
        for rank, size, start in zip(ranks, LOCAL_SIZES, (0, LOCAL_SIZES[0]), strict=True):
            expected = model.loss(x[start : start + size]).total
            torch.testing.assert_close(rank["eval"], expected, rtol=0, atol=1e-15)
    assert not torch.allclose(ranks[0]["eval"], ranks[1]["eval"])


# The denoising model draws its corruption inside each rank's fused encoder pass, keyed by
# (seed, step, rank): the ranks draw independent noise of the same distribution, so its run is
# not the one-process run (see test_denoising_on_two_ranks_keeps_the_replicas_equal).
EXACT_VARIANTS = [variant for variant in FIT_VARIANTS if variant != "denoising"]


@pytest.mark.parametrize("variant", EXACT_VARIANTS)
def test_fit_on_two_ranks_equals_one_process(ranks, variant):
    # Uneven last batch (5 samples: 3 and 2), a global BCE reconstruction for contractive, two
    # epochs of Adam.
    model = _model(variant)
    result = fit(model, _data(FIT_SAMPLES, seed=5), _data(7, seed=6), FIT_CONFIG, progress=False)

    for rank in ranks:
        _assert_states_close(rank[variant]["state"], model.state_dict())
        for got, expected in zip(rank[variant]["history"], result.history, strict=True):
            assert got.keys() == expected.keys()
            np.testing.assert_allclose(list(got.values()), list(expected.values()), atol=1e-12)


def test_denoising_on_two_ranks_keeps_the_replicas_equal(ranks):
    first, second = (rank["denoising"] for rank in ranks)
    for name, value in first["state"].items():
        assert torch.equal(value, second["state"][name]), name
    assert first["history"] == second["history"]
    # It trained: the parameters moved from their initial values.
    before = _model("denoising").state_dict()
    assert max((first["state"][k] - before[k]).abs().max().item() for k in before) > 1e-3


@pytest.mark.parametrize(
    "count, batch_size, world, smallest",
    [(21, 8, 2, None), (9, 4, 2, 1), (10, 1, 2, 1), (3, 8, 4, 3), (8, 8, 8, None)],
)
def test_every_rank_gets_a_sample_of_every_batch(count, batch_size, world, smallest):
    if smallest is None:
        parallel.check_shards(count, batch_size, world)
        for size in {batch_size, count % batch_size or batch_size}:
            bounds = [parallel.shard(size, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == size
            assert all(b[1] == a[0] for b, a in zip(bounds[:-1], bounds[1:], strict=True))
            assert {stop - start for start, stop in bounds} <= {size // world, size // world + 1}
        return
    with pytest.raises(ValueError, match=f"batch_size: got {batch_size} .* a batch of {smallest},"):
        parallel.check_shards(count, batch_size, world)


@pytest.mark.parametrize(
    "args, message",
    [
        # digits: 1438 training samples, so batches of 1437 leave one sample for the last batch.
        (
            ["--nproc", "2", "--batch-size", "1437"],
            "--batch-size: got 1437 for 1438 training samples, which makes a batch of 1, "
            "expected every batch to hold at least one sample for each of the 2 processes; "
            "choose another batch size",
        ),
        (["--nproc", "0"], "argument --nproc: got '0', expected a positive integer"),
        (["--dist-timeout", "5"], "--dist-timeout: applies to several processes"),
        (["--nproc", "2", "--dist-timeout", "0"], "argument --dist-timeout: got '0'"),
    ],
)
def test_bad_input_for_several_processes_is_one_line_before_any_starts(
    tmp_path, monkeypatch, capsys, args, message
):
    from fastae import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        raise SystemExit(cli.main(["train", *args, "--out", "run"]))
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.count("\n") == 1 and err.startswith("fastae"), err
    assert message in err
    assert list(tmp_path.iterdir()) == []


# -- the command --------------------------------------------------------------------------------


def _fastae(args, cwd, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "fastae", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        **kwargs,
    )


def test_train_on_two_processes_writes_one_run_that_reloads_exactly(tmp_path):
    from fastae import cli
    from fastae.corruption import parse_corruption
    from fastae.metrics import evaluate_model
    from fastae.train import load_checkpoint
    from fastae.train import load_weights

    process = _fastae(["train", "--nproc", "2", "--epochs", "2", "--out", "run"], tmp_path)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, err
    run = tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in run.iterdir()) == [
        ".fastae-run",  # rank 0's claim of the folder
        "checkpoint",
        "codes.png",
        "loss_curves.png",
        "metrics.csv",
        "reconstructions.png",
        "summary.json",
    ]
    # Rank 0 alone logs: each epoch once.
    assert err.count("epoch 2/2") == 1 and "on 2 processes" in err
    assert out.startswith("run run: contractive AE, 2 epochs")

    # The checkpoint, loaded in this one process, gives exactly the metrics that rank 0 computed
    # with the model it trained (summary.json).
    config, weights, _, state = load_checkpoint(str(run))
    assert state["epoch"] == 2
    model = Autoencoder(**config["model"])
    load_weights(model, weights)
    data, seed = config["data"], config["train"]["seed"]
    _, split = cli._load_split(data["source"], data["label_column"], data["val_fraction"], seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the run (a small model trains on one thread)
    try:
        metrics = evaluate_model(
            model, torch.from_numpy(split.x_val), parse_corruption("masking:0.3"), seed=seed
        )
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((run / "summary.json").read_text())
    assert {k: summary[k] for k in metrics} == metrics


def _ranks_of(process):
    """The pids of the processes that `fastae train --nproc` started, rank 0 first."""
    with open(f"/proc/{process.pid}/task/{process.pid}/children") as handle:
        children = [int(pid) for pid in handle.read().split()]
    ranks = []
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"spawn_main" in handle.read():
                ranks.append(pid)
    return sorted(ranks)


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/task"),
    reason="finds the ranks in /proc (Linux); CI runs on Linux, where this test runs",
)
@pytest.mark.parametrize(
    "how, last_line",
    [
        # A rank that dies: the launcher sees it and stops the other one.
        ("SIGKILL", "process 1 of 2 was killed by signal SIGKILL; stopped the other processes"),
        # A rank that hangs: the other one times out after --dist-timeout and says so.
        ("SIGSTOP", "process 0 of 2 exited with status 1; stopped the other processes"),
    ],
)
def test_a_rank_that_dies_or_hangs_ends_the_run_with_one_line(tmp_path, how, last_line):
    np.save(tmp_path / "small.npy", _data(200, seed=7).astype(np.float32))
    args = ["train", "--nproc", "2", "--epochs", "100000", "--data", "small.npy"]
    process = _fastae([*args, "--dist-timeout", "3", "--out", "run"], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "checkpoint" / "state.json").is_file():
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            assert process.poll() is None, process.communicate()[1]
            time.sleep(0.1)
        ranks = _ranks_of(process)
        assert len(ranks) == 2, ranks

        os.kill(ranks[1], getattr(signal, how))
        started = time.monotonic()
        _, err = process.communicate(timeout=90)
        seconds = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 1
    lines = err.strip().splitlines()
    assert lines[-1] == f"fastae train: error: {last_line}", err
    assert "Traceback" not in err
    if how == "SIGSTOP":
        assert lines[-2].startswith(
            "fastae train: error: process 0 of 2 lost the other processes: Timed out waiting 3000ms"
        ), err
        assert seconds > 2
    assert seconds < 60
    for pid in ranks:  # none is left behind
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid):
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().split(") ")[1].startswith("Z")
