"""The benchmark harness (fastae/bench.py) at tiny shapes: its statistics, its memory count, the
files it writes and its argument errors. The speed numbers themselves are not asserted here
(they depend on the machine); README's "Benchmarks" section records a measured run."""

from __future__ import annotations

import json

import pytest
import torch

from fastae import bench


def test_summary_of_known_times():
    summary = bench.summarize([0.005, 0.001, 0.004, 0.002, 0.003])
    assert summary["median_ms"] == pytest.approx(3.0)
    assert summary["min_ms"] == pytest.approx(1.0)
    assert summary["max_ms"] == pytest.approx(5.0)
    # statistics.quantiles' default (exclusive) method on 1..5: 1.5 and 4.5.
    assert summary["q1_ms"] == pytest.approx(1.5)
    assert summary["q3_ms"] == pytest.approx(4.5)
    assert summary["runs"] == 5


def test_saved_bytes_of_eager_and_fastae():
    # Per (B, H) tensor: fastae saves h only (plus n and a few (H,) vectors of the KL term);
    # eager autograd saves h, 1 - h, f' and f'^2, i.e. four.
    batch, hidden = 256, 16
    case = bench.make_case((batch, 8, hidden), bench.DTYPES["fp32"], "cpu")
    h_bytes = batch * hidden * 4
    fastae_forward, _ = bench.build("fastae-torch", case, "cpu")
    eager_forward, _ = bench.build("eager", case, "cpu")
    fastae_saved = bench.saved_bytes(fastae_forward, case)
    eager_saved = bench.saved_bytes(eager_forward, case)
    assert h_bytes + hidden * 4 <= fastae_saved <= 1.1 * h_bytes
    assert 4 * h_bytes <= eager_saved <= 4.2 * h_bytes


def test_main_writes_table_json_and_plot(tmp_path, capsys):
    status = bench.main(
        [
            "--device", "cpu", "--shapes", "32x12x8,20x6x4", "--dtype", "fp32",
            "--candidates", "jacobian,eager,fastae-torch,floor",
            "--repeats", "3", "--warmup", "1", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    assert "fastae-torch" in out and "32 x 12 x 8" in out

    (json_path,) = tmp_path.glob("*.json")
    (png_path,) = tmp_path.glob("*.png")
    assert png_path.stat().st_size > 0
    document = json.loads(json_path.read_text())
    assert document["machine"]["torch"]
    assert document["machine"]["triton"]
    assert document["shapes"] == [[32, 12, 8], [20, 6, 4]]
    first = document["cases"][0]
    assert first["fastae_reference"] == "fastae-torch"
    candidates = first["candidates"]
    assert set(candidates) == {"jacobian", "eager", "fastae-torch", "floor"}
    for name in ("jacobian", "eager", "fastae-torch"):
        entry = candidates[name]
        assert entry["status"] == "ok"
        assert entry["forward_backward"]["runs"] >= 3
        # Every candidate computes the same loss as eager.
        assert entry["loss_abs_error_vs_eager"] < 1e-4
        assert entry["loss_matches_eager"] is True
    assert candidates["floor"]["forward_backward"]["vs_floor"] == pytest.approx(1.0)
    assert candidates["fastae-torch"]["forward_backward"]["vs_fastae"] == pytest.approx(1.0)
    # torch.func refuses saved_tensors_hooks: the Jacobian's bytes are marked, not invented.
    assert "saved_bytes_not_measured" in candidates["jacobian"]
    # Far below fastae.functional.cpu_linear.MIN_ONEDNN_MACS: torch's matmul.
    assert [case["forward_gemm"] for case in document["cases"]] == ["torch.matmul"] * 2


def test_floor_runs_the_forward_matmul_of_the_pytorch_path(monkeypatch):
    # The floor times x W^T and delta^T x through the GEMMs fastae's PyTorch path uses, so that
    # the path is never measured against a slower floor than its own matmul.
    calls = []
    real_linear = bench.linear

    def spy(x, weight):
        calls.append((tuple(x.shape), tuple(weight.shape)))
        return real_linear(x, weight)

    monkeypatch.setattr(bench, "linear", spy)
    case = bench.make_case((6, 5, 4), bench.DTYPES["fp32"], "cpu")
    forward, forward_backward = bench.build("floor", case, "cpu")
    a = forward()
    _, grad_w = forward_backward()
    assert calls == [((6, 5), (4, 5))] * 2
    x, weight, _, _, delta = case.inputs
    torch.testing.assert_close(a, x @ weight.detach().t())
    torch.testing.assert_close(grad_w, delta.t() @ x)
    # floor-matmul: the same products through torch's matmul, never through fastae's route.
    forward, forward_backward = bench.build("floor-matmul", case, "cpu")
    assert torch.equal(forward(), x @ weight.detach().t())
    assert torch.equal(forward_backward()[1], delta.t() @ x)
    assert len(calls) == 2


def test_jacobian_left_out_of_large_shapes():
    assert "jacobian" in bench.available_candidates("cpu", (256, 784, 512))
    assert "jacobian" not in bench.available_candidates("cpu", (1024, 784, 1024))
    assert "fastae-triton" not in bench.available_candidates("cpu", (256, 784, 512))
    assert "fastae-triton" in bench.available_candidates("cuda", (256, 784, 512))
    # On CUDA the floor is torch's matmul already; floor-matmul is the CPU's comparison.
    assert "floor-matmul" in bench.available_candidates("cpu", (256, 784, 512))
    assert "floor-matmul" not in bench.available_candidates("cuda", (256, 784, 512))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "256x784"], "argument --shapes: got '256x784', expected BxDxH"),
        (
            ["--shapes", "8x8x8,16x8x8,8x8x8"],
            "argument --shapes: got '8x8x8' twice, expected each once",
        ),
        (
            ["--shapes", "8x8x8,16x8x8,8X08x8"],
            "argument --shapes: got '8X08x8', the same as '8x8x8' before it, expected each once",
        ),
        (["--dtype", "fp8"], "argument --dtype: got 'fp8', expected"),
        (["--dtype", "fp32,fp32"], "argument --dtype: got 'fp32' twice, expected each once"),
        (
            ["--candidates", "floor,eager,floor"],
            "argument --candidates: got 'floor' twice, expected each once",
        ),
        (["--candidates", "numpy"], "argument --candidates: got 'numpy', expected"),
        (["--threads", "0"], "argument --threads: got '0', expected an integer >= 1"),
        (["--threads", "-2"], "argument --threads: got '-2', expected an integer >= 1"),
        (["--repeats", "0"], "argument --repeats: got '0', expected an integer >= 1"),
        (["--repeats", "two"], "argument --repeats: got 'two', expected an integer >= 1"),
        (["--warmup", "-1"], "argument --warmup: got '-1', expected an integer >= 0"),
        (["--compile-mode", "bogus"], "argument --compile-mode: invalid choice: 'bogus'"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    # One argparse error line, exit status 2, the flag named once, before any work is done.
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    (last,) = [line for line in err.splitlines() if line.startswith("fastae bench: error:")]
    assert message in last
    flag = argv[0]
    assert last.count(flag) == 1
    assert "Traceback" not in err


def test_compile_modes_in_help_and_accepted():
    parser = bench.build_parser()
    for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        assert parser.parse_args(["--compile-mode", mode]).compile_mode == mode
    assert parser.parse_args(["--warmup", "0"]).warmup == 0
    assert parser.parse_args(["--repeats", "1", "--threads", "1"]).repeats == 1


def test_help_states_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    # argparse wraps help text; compare with whitespace collapsed.
    text = " ".join(capsys.readouterr().out.split())
    assert "at least 1 (default: by the case's size" in text
    assert "20 to 300 on cpu, 200 on cuda, 50 above 1e11 flops" in text
    assert "at least 0 (default: 5)" in text
    assert "(default: benchmarks/results, relative to the current directory)" in text


def test_candidates_that_cannot_run_here_are_refused(tmp_path, capsys):
    # fastae-triton needs CUDA: asked for alone on a CPU it is refused before any work, and no
    # file (nor the --out folder) is written.
    with pytest.raises(SystemExit) as exit_info:
        bench.main(
            ["--device", "cpu", "--candidates", "fastae-triton", "--out", str(tmp_path / "new")]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "fastae bench: error: --candidates: got fastae-triton, none of which can run on cpu; "
        "on cpu this machine can run jacobian, eager, compile, fastae-torch, floor"
    ) in err
    assert list(tmp_path.iterdir()) == []


def test_candidates_partly_runnable_run_and_log_the_rest(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="fastae.bench"):
        status = bench.main(
            [
                "--device", "cpu", "--shapes", "8x4x4", "--candidates", "fastae-triton,eager",
                "--repeats", "1", "--warmup", "0", "--no-plot", "--out", str(tmp_path),
            ]
        )  # fmt: skip
    assert status == 0
    assert "--candidates: skipped fastae-triton, not runnable on cpu" in caplog.messages
    (json_path,) = tmp_path.glob("*.json")
    candidates = json.loads(json_path.read_text())["cases"][0]["candidates"]
    assert list(candidates) == ["eager"]
    assert candidates["eager"]["status"] == "ok"
    assert candidates["eager"]["forward_backward"]["runs"] == 1


def _record(shape, dtype, medians, saved=None):
    saved = saved or {}
    candidates = {}
    for name, median in medians.items():
        candidates[name] = {"status": "ok", "forward_backward": {"median_ms": median}}
        if name in saved:
            candidates[name]["saved_vs_h"] = saved[name]
    b, d, h = shape
    return {"shape": {"B": b, "D": d, "H": h}, "dtype": dtype, "candidates": candidates}


def test_targets_on_cpu():
    record = _record(
        (256, 784, 512),
        "fp32",
        {"fastae-torch": 3.0, "eager": 4.0, "compile": 2.5, "floor": 2.0, "floor-matmul": 2.4},
        {"fastae-torch": 1.02, "eager": 4.02},
    )
    targets = {t["target"].split(": ", 1)[1]: t for t in bench.check_targets([record], "cpu")}
    (matmul,) = [
        t for name, t in targets.items() if name.startswith("fastae-torch fwd+bwd / floor-")
    ]
    assert matmul["value"] == pytest.approx(1.25) and matmul["met"] is None
    assert targets["fastae-torch fwd+bwd / eager <= 0.85"]["value"] == pytest.approx(0.75)
    assert targets["fastae-torch fwd+bwd / eager <= 0.85"]["met"] is True
    assert targets["fastae-torch fwd+bwd / compile <= 1.0"]["value"] == pytest.approx(1.2)
    assert targets["fastae-torch fwd+bwd / compile <= 1.0"]["met"] is False
    assert targets["fastae-torch fwd+bwd / floor <= 1.5"]["met"] is True
    assert targets["fastae-torch bytes saved / h <= 1.1"]["met"] is True


def test_targets_on_cuda_and_missing_candidates():
    big = _record((8192, 4096, 16384), "bf16", {"fastae-triton": 11.0, "floor": 10.0})
    small = _record((256, 784, 512), "bf16", {"compile": 0.3, "fastae-torch": 1.0})
    targets = bench.check_targets([big, small], "cuda")
    assert targets[0]["value"] == pytest.approx(1.1) and targets[0]["met"] is True
    # No Triton result at the small shape: reported as not measured, not as met.
    assert targets[1]["value"] is None and targets[1]["met"] is None


def test_round_orders_are_seeded_permutations_with_every_predecessor():
    names = ["jacobian", "eager", "compile", "fastae-torch", "floor"]
    orders = bench.round_orders(names, 200)
    assert orders == bench.round_orders(names, 200)  # the same seed gives the same rounds
    assert all(sorted(order) == sorted(names) for order in orders)
    # Within rounds every candidate follows every other one, not one fixed predecessor.
    pairs = {(a, b) for order in orders for a, b in zip(order[:-1], order[1:], strict=True)}
    assert len(pairs) == len(names) * (len(names) - 1)
    firsts = {order[0] for order in orders}
    assert firsts == set(names)


@pytest.mark.parametrize("out", ["/proc/fastae-bench", "FILE"])
def test_an_unusable_out_folder_is_refused_before_any_timing(out, tmp_path, capsys):
    if out == "FILE":
        out = tmp_path / "a-file"
        out.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--shapes", "8x4x4", "--repeats", "1", "--out", str(out)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    (line,) = [x for x in captured.err.splitlines() if x.startswith("fastae bench: error:")]
    assert line.startswith(f"fastae bench: error: --out: got {out}, expected a folder it can")
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="checks the message without a GPU; CI (no GPU) runs it, the GPU tier "
    "(benchmarks/gpu_check.sh) runs --device cuda for real",
)
def test_a_bad_onednn_switch_is_refused_before_timing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTAE_ONEDNN", "on")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--shapes", "8x8x8", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "fastae bench: error: FASTAE_ONEDNN: got 'on', expected '0' or '1'" in err
    assert not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_refused_like_other_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert (
        "fastae bench: error: --device: got cuda, expected cpu or auto: torch sees no CUDA device"
    ) in capsys.readouterr().err


def test_a_loss_that_disagrees_with_eager_is_flagged(tmp_path, monkeypatch, capsys):
    # A wrong candidate is still timed, but the run says so and the JSON flags it.
    real_loss = bench.fastae_loss

    def wrong(backend):
        loss = real_loss(backend)
        return lambda *args: loss(*args) * 1.01

    monkeypatch.setattr(bench, "fastae_loss", wrong)
    status = bench.main(
        [
            "--device", "cpu", "--shapes", "8x4x4", "--candidates", "eager,fastae-torch",
            "--repeats", "1", "--warmup", "0", "--no-plot", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert status == 0
    assert "fastae-torch: loss differs from eager's by" in capsys.readouterr().err
    (json_path,) = tmp_path.glob("*.json")
    candidates = json.loads(json_path.read_text())["cases"][0]["candidates"]
    assert candidates["fastae-torch"]["loss_matches_eager"] is False
    assert candidates["eager"]["loss_matches_eager"] is True
