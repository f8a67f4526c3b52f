"""The benchmark harness (fastae/bench.py) at tiny shapes: its statistics, its memory count, the
files it writes and its argument errors. The speed numbers themselves are not asserted here
(they depend on the machine); README's "Benchmarks" section records a measured run."""

from __future__ import annotations

import json

import pytest

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
    assert candidates["floor"]["forward_backward"]["vs_floor"] == pytest.approx(1.0)
    assert candidates["fastae-torch"]["forward_backward"]["vs_fastae"] == pytest.approx(1.0)
    # torch.func refuses saved_tensors_hooks: the Jacobian's bytes are marked, not invented.
    assert "saved_bytes_not_measured" in candidates["jacobian"]


def test_jacobian_left_out_of_large_shapes():
    assert "jacobian" in bench.available_candidates("cpu", (256, 784, 512))
    assert "jacobian" not in bench.available_candidates("cpu", (1024, 784, 1024))
    assert "fastae-triton" not in bench.available_candidates("cpu", (256, 784, 512))
    assert "fastae-triton" in bench.available_candidates("cuda", (256, 784, 512))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "256x784"], "--shapes: got '256x784', expected BxDxH"),
        (["--dtype", "fp8"], "--dtype: got 'fp8'"),
        (["--candidates", "numpy"], "--candidates: got 'numpy'"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


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
        {"fastae-torch": 3.0, "eager": 4.0, "compile": 2.5, "floor": 2.0},
        {"fastae-torch": 1.02, "eager": 4.02},
    )
    targets = {t["target"].split(": ", 1)[1]: t for t in bench.check_targets([record], "cpu")}
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
