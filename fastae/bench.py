"""Benchmark of one encoder layer with every statistic in the loss: `fastae bench`.

The candidates each compute, for x (B, D), W (H, D), b (H,) and a fixed random G (B, H),

    h = sigmoid(x W^T + b)
    loss = sum(h * G) + contractive + KL(rho || rho_hat) + l1           (DESIGN section 2)

and are timed for the forward alone and for forward + backward (x needs no gradient, W and b do):

    jacobian      per-sample Jacobians with torch.func (vmap of jacrev), the usual way to write a
                  contractive penalty; small shapes only (it holds B x H x D numbers)
    eager         the closed form C = mean_b sum_j (h(1-h))^2 n_j through plain autograd
    compile       torch.compile of that same function (mode "max-autotune-no-cudagraphs" on a
                  GPU, the default inductor mode on a CPU); a failed compile is reported, not fatal
    fastae-torch  fastae.encode(..., backend="torch") with fastae.kl_sparsity
    fastae-triton fastae.encode(..., backend="triton"), on CUDA
    floor         the bare matmuls any encoder must run: x W^T (forward), and x W^T plus
                  delta^T x with delta given (forward + backward), through the same GEMMs as
                  fastae's PyTorch path (oneDNN for x W^T on a CPU where that path uses it, see
                  fastae.functional.cpu_linear; torch's matmul otherwise), so that no candidate
                  runs a faster GEMM than the floor
    floor-matmul  (CPU only) the same bare matmuls through torch's matmul (x @ W.t(), MKL in
                  PyTorch's CPU build), for comparison: what the floor is where the PyTorch path
                  does not take oneDNN

Timing: warm-ups first, then rounds in which every candidate runs once in turn (interleaved, so
that drift of the machine's clock or load hits all alike), in an order shuffled anew each round
from a fixed seed (so that no candidate always inherits the caches and heap another one leaves
behind); the median over rounds is reported with its quartiles, min and max. On CUDA each call
is timed with CUDA events. Also measured: the bytes each candidate saves for backward
(torch.autograd.graph.saved_tensors_hooks, leaving out x, W, b and G themselves), as a multiple
of the bytes of h, and on CUDA the peak memory of one forward + backward beyond the inputs.

    python -m fastae.bench                      # CPU shapes, fp32, results in benchmarks/results
    python -m fastae.bench --device cuda --dtype fp32,bf16 --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import torch
from torch import Tensor

import fastae
from fastae.functional import triton_usable
from fastae.functional.cpu_linear import enabled_by_environment
from fastae.functional.cpu_linear import linear
from fastae.functional.cpu_linear import onednn_used
from fastae.reference import jacobian_penalty

CPU_SHAPES = ((256, 784, 512), (1024, 784, 1024), (4096, 64, 256))
GPU_SHAPES = CPU_SHAPES + ((4096, 1024, 4096), (8192, 4096, 16384))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CANDIDATES = (
    "jacobian", "eager", "compile", "fastae-torch", "fastae-triton", "floor", "floor-matmul"
)  # fmt: skip
# The modes torch.compile accepts.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

logger = logging.getLogger(__name__)

# The KL target of the benchmark loss; any value in (0, 1) costs the same.
RHO = 0.05
KL_EPS = 1e-6

# Per-sample Jacobians hold B x H x D numbers (plus as many for their backward): above this many
# the candidate is skipped (256 x 784 x 512 is about 1.0e8).
JACOBIAN_MAX_ELEMENTS = 1.1e8

# The per-sample Jacobian takes hundreds of times longer than the rest; it is timed in this many
# rounds, spread evenly over the run, so that it does not dominate the wall time.
JACOBIAN_RUNS = 5


@dataclass
class Case:
    """The tensors of one benchmark case; x, G and delta need no gradient, W and b do."""

    x: Tensor
    weight: Tensor
    bias: Tensor
    g: Tensor
    delta: Tensor

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return (self.x, self.weight, self.bias, self.g, self.delta)


@dataclass
class Result:
    """Timings (seconds) and memory of one candidate on one case."""

    name: str
    status: str = "ok"
    error: str = ""
    forward: list[float] = field(default_factory=list)
    forward_backward: list[float] = field(default_factory=list)
    saved_bytes: int | None = None
    saved_note: str = ""
    peak_bytes: int | None = None
    max_abs_error: float | None = None
    loss_matches: bool | None = None


def make_case(shape: tuple[int, int, int], dtype: torch.dtype, device: str, seed: int = 0) -> Case:
    """Inputs like a first layer on pixel data: x in [0, 1), W ~ N(0, 1/D), b = 0."""
    batch, features, hidden = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size, scale=1.0, normal=True):
        t = torch.randn(*size, generator=gen) if normal else torch.rand(*size, generator=gen)
        return (t * scale).to(device=device, dtype=dtype)

    x = rand(batch, features, normal=False)
    weight = rand(hidden, features, scale=features**-0.5).requires_grad_()
    bias = torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True)
    g = rand(batch, hidden, scale=(batch * hidden) ** -0.5)
    delta = rand(batch, hidden, scale=batch**-1.0)
    return Case(x, weight, bias, g, delta)


def _kl(rho_hat: Tensor) -> Tensor:
    """The formula of fastae.kl_sparsity without its range check (a device sync that would
    also break torch.compile's graph)."""
    r = rho_hat.clamp(KL_EPS, 1.0 - KL_EPS)
    return (RHO * torch.log(RHO / r) + (1.0 - RHO) * torch.log((1.0 - RHO) / (1.0 - r))).sum()


def eager_loss(x: Tensor, weight: Tensor, bias: Tensor, g: Tensor) -> Tensor:
    """The benchmark loss in closed form, statistics in fp32, as plain autograd code."""
    h = torch.sigmoid(torch.addmm(bias, x, weight.t()))
    h32 = h.float()
    fp = h32 * (1 - h32)
    n = weight.float().square().sum(1)
    contractive = (fp.square() @ n).mean()
    rho_hat = h32.mean(0)
    l1 = h32.abs().sum(1).mean()
    return (h * g).sum().float() + contractive + _kl(rho_hat) + l1


def jacobian_loss(x: Tensor, weight: Tensor, bias: Tensor, g: Tensor) -> Tensor:
    """The benchmark loss with the contractive term from explicit per-sample Jacobians."""

    def layer(inputs: Tensor) -> Tensor:
        return torch.sigmoid(torch.addmm(bias, inputs, weight.t()))

    h = layer(x)
    h32 = h.float()
    contractive = jacobian_penalty(layer, x).float()
    return (h * g).sum().float() + contractive + _kl(h32.mean(0)) + h32.abs().sum(1).mean()


def fastae_loss(backend: str) -> Callable[..., Tensor]:
    def loss(x: Tensor, weight: Tensor, bias: Tensor, g: Tensor) -> Tensor:
        h, stats = fastae.encode(x, weight, bias, "sigmoid", backend=backend)
        kl = fastae.kl_sparsity(stats.rho_hat, RHO, KL_EPS)
        return (h * g).sum().float() + stats.contractive + kl + stats.l1

    return loss


def compile_mode(device: str) -> str:
    return "max-autotune-no-cudagraphs" if device == "cuda" else "default"


def device_candidates(device: str) -> list[str]:
    """The candidates that can run on this device at some shape, in the order of CANDIDATES."""
    # Triton on a CPU only runs in its interpreter, which times numpy, not a kernel. On CUDA the
    # floor is torch's matmul already.
    left_out = "floor-matmul" if device == "cuda" else "fastae-triton"
    return [n for n in CANDIDATES if n != left_out]


def available_candidates(device: str, shape: tuple[int, int, int]) -> list[str]:
    """The candidates that can run on this device and shape, in the order of CANDIDATES."""
    too_big = math.prod(shape) > JACOBIAN_MAX_ELEMENTS
    return [n for n in device_candidates(device) if n != "jacobian" or not too_big]


def build(name: str, case: Case, device: str, compile_mode_: str | None = None):
    """(forward, forward_backward) callables of one candidate; forward returns the loss."""
    x, weight, bias, g, delta = case.inputs
    if name in ("floor", "floor-matmul"):
        x_, w_ = x.detach(), weight.detach()
        forward_matmul = linear if name == "floor" else lambda x, w: x @ w.t()

        def floor_forward():
            with torch.no_grad():
                return forward_matmul(x_, w_)

        def floor_forward_backward():
            with torch.no_grad():
                return forward_matmul(x_, w_), delta.t() @ x_

        return floor_forward, floor_forward_backward

    if name == "eager":
        loss_fn = eager_loss
    elif name == "jacobian":
        loss_fn = jacobian_loss
    elif name == "compile":
        mode = compile_mode_ or compile_mode(device)
        loss_fn = torch.compile(eager_loss, mode=mode, dynamic=False)
    elif name.startswith("fastae-"):
        loss_fn = fastae_loss(name.removeprefix("fastae-"))
    else:
        raise ValueError(f"candidate: got {name!r}, expected one of {', '.join(CANDIDATES)}")

    def forward():
        return loss_fn(x, weight, bias, g)

    def forward_backward():
        weight.grad = None
        bias.grad = None
        loss = loss_fn(x, weight, bias, g)
        loss.backward()
        return loss

    return forward, forward_backward


def saved_bytes(forward: Callable[[], Tensor], case: Case) -> int:
    """Bytes of the tensors autograd saves for backward during one forward, each storage counted
    once, leaving out storages of the inputs x, W, b, G (the caller holds those anyway)."""
    inputs = {t.untyped_storage().data_ptr() for t in case.inputs}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            # A wrapper without storage (functorch); count its own bytes.
            storages[id(tensor)] = tensor.numel() * tensor.element_size()
            return tensor
        ptr = storage.data_ptr()
        if ptr not in inputs:
            storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    del loss
    return sum(storages.values())


def peak_bytes(forward_backward: Callable[[], Tensor]) -> int:
    """CUDA only: peak memory allocated during one forward + backward, beyond what was
    allocated before it (the inputs)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _timer(device: str):
    """A function that runs fn once and returns its duration in seconds."""
    if device == "cuda":

        def run_cuda(fn):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return run_cuda

    def run_cpu(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run_cpu


def loss_tolerance(dtype: torch.dtype, reference: Tensor) -> float:
    """How far a candidate's loss may be from eager's: rounding of sums over B x H terms,
    relative to the loss (at least 1): 1e-4 in fp32 and fp64, 5e-2 in bf16 and fp16."""
    relative = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    return relative * max(1.0, abs(reference.float().item()))


def _check(forward: Callable[[], Tensor], reference: Tensor) -> float:
    with torch.no_grad():
        return abs(forward().float().item() - reference.float().item())


def bench_case(
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: str,
    candidates: list[str],
    repeats: int,
    warmup: int,
    compile_mode_: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Result]:
    """Time every candidate on one (shape, dtype), interleaved round by round."""
    case = make_case(shape, dtype, device)
    results: dict[str, Result] = {}
    fns = {}
    reference = eager_loss(*case.inputs[:4]).detach()
    for name in candidates:
        result = Result(name)
        results[name] = result
        try:
            forward, forward_backward = build(name, case, device, compile_mode_)
            # Warm-up: compiles, autotunes, fills allocator caches; a failure is recorded.
            for _ in range(warmup if name != "jacobian" else 1):
                forward()
                forward_backward()
            if not name.startswith("floor"):
                result.max_abs_error = _check(forward, reference)
                tolerance = loss_tolerance(dtype, reference)
                result.loss_matches = result.max_abs_error <= tolerance
                if not result.loss_matches and progress:
                    progress(
                        f"{name}: loss differs from eager's by {result.max_abs_error:.3g} "
                        f"(tolerance {tolerance:.3g}); timed anyway, flagged in the JSON"
                    )
                try:
                    result.saved_bytes = saved_bytes(forward, case)
                except RuntimeError as err:
                    # torch.func refuses to run under saved_tensors_hooks.
                    result.saved_note = str(err).splitlines()[0][:200]
            if device == "cuda":
                result.peak_bytes = peak_bytes(forward_backward)
            fns[name] = (forward, forward_backward)
        except Exception as err:  # noqa: BLE001 - any failure of a candidate is reported
            result.status = "failed"
            result.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            if progress:
                progress(f"{name} failed: {result.error}")

    timer = _timer(device)
    for round_, order in enumerate(round_orders(list(fns), repeats)):
        for name in order:
            forward, forward_backward = fns[name]
            if name == "jacobian" and round_ % max(1, repeats // JACOBIAN_RUNS):
                continue
            results[name].forward.append(timer(forward))
            results[name].forward_backward.append(timer(forward_backward))
        if device == "cuda":
            torch.cuda.synchronize()
    weight, bias = case.weight, case.bias
    weight.grad = bias.grad = None
    return results


def round_orders(names: list[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """The order of the candidates in each round: a permutation drawn anew each round from a
    fixed seed. A fixed or rotating order would have each candidate run after the same
    predecessor nearly every round, and inherit the caches, heap and page state that one leaves
    behind."""
    rng = random.Random(seed)
    return [rng.sample(names, len(names)) for _ in range(rounds)]


def summarize(times: list[float]) -> dict[str, float] | None:
    """Median, quartiles, min and max in milliseconds."""
    if not times:
        return None
    ms = sorted(t * 1e3 for t in times)
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return {
        "median_ms": statistics.median(ms),
        "q1_ms": q1,
        "q3_ms": q3,
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "runs": len(ms),
    }


def machine_info(device: str) -> dict[str, object]:
    """What the numbers were measured on."""

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    info: dict[str, object] = {
        "device": device,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "fastae": fastae.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = os.getloadavg()[0]
    info["cpu_pressure_start"] = cpu_pressure()
    return info


def cpu_pressure() -> float | None:
    """Linux only: the share of the last 10 s in which some runnable task waited for a CPU, in
    percent (/proc/pressure/cpu). Anything well above 0 means other work shared the machine and
    the times below are inflated, the more so for candidates made of many small ops."""
    try:
        with open("/proc/pressure/cpu", encoding="utf-8") as f:
            found = re.search(r"avg10=([0-9.]+)", f.readline())
        return float(found.group(1)) if found else None
    except OSError:
        return None


def machine_slug(info: dict[str, object]) -> str:
    if info["device"] == "cuda":
        name = str(info["gpu"])
    else:
        name = f"{info['cpu']}-{info['cpu_count']}cpu-{info['torch_threads']}threads"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _reference_name(results: dict[str, Result]) -> str | None:
    """The fastae backend the ratios refer to: Triton where it ran, else the PyTorch path."""
    for name in ("fastae-triton", "fastae-torch"):
        if name in results and results[name].status == "ok":
            return name
    return None


def case_record(shape, dtype_name, results: dict[str, Result]) -> dict[str, object]:
    """The JSON record of one case: per candidate its times, ratios and memory."""
    batch, _, hidden = shape
    h_bytes = batch * hidden * DTYPES[dtype_name].itemsize
    reference = _reference_name(results)
    record: dict[str, object] = {
        "shape": {"B": shape[0], "D": shape[1], "H": shape[2]},
        "dtype": dtype_name,
        "h_bytes": h_bytes,
        "fastae_reference": reference,
        "candidates": {},
    }
    for name, result in results.items():
        entry: dict[str, object] = {"status": result.status}
        if result.status != "ok":
            entry["error"] = result.error
        else:
            for mode in ("forward", "forward_backward"):
                summary = summarize(getattr(result, mode))
                entry[mode] = summary
                for base, key in (("floor", "vs_floor"), (reference, "vs_fastae")):
                    other = results.get(base) if base else None
                    if summary and other and other.status == "ok" and getattr(other, mode):
                        base_median = summarize(getattr(other, mode))["median_ms"]
                        entry[mode][key] = summary["median_ms"] / base_median
            if result.saved_bytes is not None:
                entry["saved_bytes"] = result.saved_bytes
                entry["saved_vs_h"] = result.saved_bytes / h_bytes
            elif result.saved_note:
                entry["saved_bytes_not_measured"] = result.saved_note
            if result.peak_bytes is not None:
                entry["peak_bytes"] = result.peak_bytes
            if result.max_abs_error is not None:
                entry["loss_abs_error_vs_eager"] = result.max_abs_error
                entry["loss_matches_eager"] = result.loss_matches
        record["candidates"][name] = entry
    return record


def _median(record: dict[str, object], name: str, mode: str = "forward_backward"):
    entry = record["candidates"].get(name)
    if not entry or entry["status"] != "ok" or not entry.get(mode):
        return None
    return entry[mode]["median_ms"]


def check_targets(records: list[dict[str, object]], device: str) -> list[dict[str, object]]:
    """The speed and memory targets of the suite, each with its measured value and verdict.

    On a CPU, at (256, 784, 512) fp32, fastae's PyTorch path forward + backward: at most 0.85 x
    eager, 1.0 x torch.compile and 1.5 x the floor; bytes saved at most 1.1 x h (eager saves
    about 4 x). On CUDA, fastae's Triton kernels forward + backward: at most 1.15 x the cuBLAS
    floor at (8192, 4096, 16384) bf16, and torch.compile at least 1.5 x slower at
    (256, 784, 512).
    """
    targets = []

    def add(what, value, limit, at_most=True):
        if value is None:
            targets.append({"target": what, "value": None, "limit": limit, "met": None})
            return
        met = value <= limit if at_most else value >= limit
        targets.append({"target": what, "value": value, "limit": limit, "met": met})

    for record in records:
        shape = tuple(record["shape"].values())
        dtype = record["dtype"]
        where = f"{'x'.join(map(str, shape))} {dtype}"
        if device == "cpu" and shape == (256, 784, 512) and dtype == "fp32":
            fast = _median(record, "fastae-torch")
            for base, limit in (("eager", 0.85), ("compile", 1.0), ("floor", 1.5)):
                other = _median(record, base)
                ratio = fast / other if fast and other else None
                add(f"{where}: fastae-torch fwd+bwd / {base} <= {limit}", ratio, limit)
            matmul = _median(record, "floor-matmul")
            targets.append(
                {"target": f"{where}: fastae-torch fwd+bwd / floor-matmul (no limit: the floor "
                 "through torch's matmul, for comparison)",
                 "value": fast / matmul if fast and matmul else None, "limit": None, "met": None}
            )  # fmt: skip
            for name, limit in (("fastae-torch", 1.1), ("eager", None)):
                entry = record["candidates"].get(name, {})
                value = entry.get("saved_vs_h")
                if limit is None:
                    targets.append(
                        {"target": f"{where}: {name} bytes saved / h (about 4)", "value": value,
                         "limit": None, "met": None}
                    )  # fmt: skip
                else:
                    add(f"{where}: {name} bytes saved / h <= {limit}", value, limit)
        if device == "cuda":
            fast = _median(record, "fastae-triton")
            if shape == (8192, 4096, 16384) and dtype == "bf16":
                floor = _median(record, "floor")
                ratio = fast / floor if fast and floor else None
                add(f"{where}: fastae-triton fwd+bwd / floor <= 1.15", ratio, 1.15)
            if shape == (256, 784, 512):
                compiled = _median(record, "compile")
                ratio = compiled / fast if fast and compiled else None
                add(f"{where}: compile fwd+bwd / fastae-triton >= 1.5", ratio, 1.5, False)
    return targets


def format_targets(targets: list[dict[str, object]]) -> str:
    lines = []
    for t in targets:
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        verdict = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        lines.append(f"target {t['target']}: {value} ({verdict})")
    return "\n".join(lines)


def format_table(records: list[dict[str, object]]) -> str:
    """One line per candidate and case: medians, spreads, ratios and saved bytes."""
    header = (
        f"{'B x D x H':>18} {'dtype':>5} {'candidate':>14} {'fwd ms':>9} {'fwd+bwd ms':>11} "
        f"{'[q1, q3]':>17} {'/floor':>8} {'/fastae':>8} {'saved/h':>8} {'peak MiB':>9}"
    )
    lines = [header, "-" * len(header)]
    for record in records:
        shape = record["shape"]
        label = f"{shape['B']} x {shape['D']} x {shape['H']}"
        for name, entry in record["candidates"].items():
            if entry["status"] != "ok":
                lines.append(f"{label:>18} {record['dtype']:>5} {name:>14}  {entry['error']}")
                continue
            fwd, both = entry["forward"], entry["forward_backward"]
            spread = f"[{both['q1_ms']:.3f}, {both['q3_ms']:.3f}]"
            saved = f"{entry['saved_vs_h']:.2f}" if "saved_vs_h" in entry else "-"
            peak = f"{entry['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in entry else "-"
            vs_floor = f"{both['vs_floor']:.2f}" if "vs_floor" in both else "-"
            vs_fastae = f"{both['vs_fastae']:.2f}" if "vs_fastae" in both else "-"
            lines.append(
                f"{label:>18} {record['dtype']:>5} {name:>14} {fwd['median_ms']:9.3f} "
                f"{both['median_ms']:11.3f} {spread:>17} {vs_floor:>8} {vs_fastae:>8} "
                f"{saved:>8} {peak:>9}"
            )
    lines.append("ratios: median forward+backward time over that of the floor and of fastae")
    return "\n".join(lines)


def plot(records: list[dict[str, object]], info: dict[str, object], path: Path) -> None:
    """Grouped bars: per case, each candidate's median time over the floor's, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CANDIDATES if any(n in r["candidates"] for r in records)]
    labels = [
        f"{r['shape']['B']}x{r['shape']['D']}x{r['shape']['H']}\n{r['dtype']}" for r in records
    ]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.6 * len(records) + 2) * 1.6, 5))
    width = 0.8 / max(1, len(names))
    for ax, mode, title in zip(
        axes, ("forward", "forward_backward"), ("forward", "forward + backward"), strict=True
    ):
        for i, name in enumerate(names):
            xs, ys = [], []
            for k, record in enumerate(records):
                entry = record["candidates"].get(name)
                if entry and entry["status"] == "ok" and "vs_floor" in entry[mode]:
                    xs.append(k + (i - (len(names) - 1) / 2) * width)
                    ys.append(entry[mode]["vs_floor"])
            ax.bar(xs, ys, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(records)), labels, fontsize=8)
        ax.set_ylabel("median time / bare-matmul floor")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    where = info.get("gpu") or f"{info['cpu']}, {info['torch_threads']} threads"
    fig.suptitle(
        f"fastae bench: {where}; torch {info['torch']}, triton {info['triton']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _each_once(items: list, spelled: list[str]) -> list:
    """items, refusing one listed twice (it would be timed twice and named twice in the file)."""
    for i, item in enumerate(items):
        if item in items[:i]:
            first = spelled[items.index(item)]
            if first == spelled[i]:
                raise argparse.ArgumentTypeError(f"got {first!r} twice, expected each once")
            raise argparse.ArgumentTypeError(
                f"got {spelled[i]!r}, the same as {first!r} before it, expected each once"
            )
    return items


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.lower().replace(" ", "").split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(
                f"got {item!r}, expected BxDxH with positive integers, e.g. 256x784x512"
            )
        shapes.append(tuple(int(p) for p in parts))
    return _each_once(shapes, text.split(","))


def _names_from(allowed) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names, each one of allowed."""

    def parse(text: str) -> list[str]:
        names = [item.strip() for item in text.split(",")]
        for name in names:
            if name not in allowed:
                raise argparse.ArgumentTypeError(
                    f"got {name!r}, expected a comma-separated list of {', '.join(allowed)}"
                )
        return _each_once(names, names)

    return parse


parse_dtypes = _names_from(DTYPES)
parse_candidates = _names_from(CANDIDATES)


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low (argparse puts the flag's name before the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"got {text!r}, expected an integer >= {low}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastae bench",
        description="Time one encoder layer with contractive, KL and L1 terms in the loss: "
        "per-sample Jacobians, eager autograd, torch.compile, fastae and the bare matmuls.",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="where to run (default: cuda if available, else cpu)",
    )  # fmt: skip
    parser.add_argument(
        "--shapes", type=parse_shapes, default=None,
        help="comma-separated BxDxH (default: the CPU shapes, plus two large ones on cuda)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", type=parse_dtypes, default=None,
        help="comma-separated fp32, bf16, fp16 (default: fp32 on cpu, fp32,bf16 on cuda)",
    )  # fmt: skip
    parser.add_argument(
        "--candidates", type=parse_candidates, default=None,
        help=f"comma-separated subset of {', '.join(CANDIDATES)} (default: all that can run)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=_int_at_least(1), default=None,
        help="timed rounds per case, at least 1 (default: by the case's size, about the same "
        "wall time each: 20 to 300 on cpu, 200 on cuda, 50 above 1e11 flops)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=_int_at_least(0), default=5,
        help="untimed runs per candidate, at least 0 (default: 5)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=_int_at_least(1), default=None,
        help="torch.set_num_threads, at least 1 (default: torch's)",
    )  # fmt: skip
    parser.add_argument(
        "--compile-mode", choices=COMPILE_MODES, default=None,
        help="torch.compile mode (default: max-autotune-no-cudagraphs on cuda, default on cpu)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"),
        help="folder for the JSON and PNG, made if missing (default: benchmarks/results, "
        "relative to the current directory)",
    )  # fmt: skip
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    return parser


def default_repeats(shape: tuple[int, int, int], device: str) -> int:
    """More rounds for small cases, fewer for large ones: about the same wall time each."""
    flops = 2.0 * math.prod(shape)
    if device == "cuda":
        return 50 if flops > 1e11 else 200
    return max(20, min(300, int(3e10 / max(flops, 1.0))))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write JSON and PNG; return an exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: got cuda, expected cpu or auto: torch sees no CUDA device")
    try:
        enabled_by_environment()
    except ValueError as error:
        parser.error(str(error))
    if args.candidates is not None:
        runnable = device_candidates(device)
        skipped = [n for n in args.candidates if n not in runnable]
        if len(skipped) == len(args.candidates):
            parser.error(
                f"--candidates: got {','.join(args.candidates)}, none of which can run on "
                f"{device}; on {device} this machine can run {', '.join(runnable)}"
            )
        if skipped:
            logger.warning(
                "--candidates: skipped %s, not runnable on %s", ", ".join(skipped), device
            )
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        if not os.access(args.out, os.W_OK):
            raise PermissionError("not writable")
    except OSError as err:
        # Made and checked after the other arguments and before any timing: a bad --out
        # costs nothing, and a refused run leaves no folder behind.
        reason = err.strerror or str(err)
        parser.error(f"--out: got {args.out}, expected a folder it can write to ({reason})")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or list(GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    dtypes = args.dtype or (["fp32", "bf16"] if device == "cuda" else ["fp32"])
    info = machine_info(device)
    info["compile_mode"] = args.compile_mode or compile_mode(device)
    info["fastae_triton_usable"] = triton_usable(torch.device(device))

    from tqdm import tqdm

    records = []
    cases = [(shape, dtype) for dtype in dtypes for shape in shapes]
    bar = tqdm(cases, desc="fastae bench", file=sys.stderr)
    for shape, dtype_name in bar:
        bar.set_postfix_str(f"{'x'.join(map(str, shape))} {dtype_name}")
        names = available_candidates(device, shape)
        if args.candidates is not None:
            too_big = [
                n for n in args.candidates if n not in names and n in device_candidates(device)
            ]
            if too_big:
                logger.warning(
                    "%s: skipped %s, B*D*H above %.1e (per-sample Jacobians)",
                    "x".join(map(str, shape)), ", ".join(too_big), JACOBIAN_MAX_ELEMENTS,
                )  # fmt: skip
            names = [n for n in names if n in args.candidates]
        repeats = args.repeats or default_repeats(shape, device)
        torch._dynamo.reset()
        results = bench_case(
            shape, DTYPES[dtype_name], device, names, repeats, args.warmup, args.compile_mode,
            progress=lambda message: bar.write(message, file=sys.stderr),
        )  # fmt: skip
        record = case_record(shape, dtype_name, results)
        # The route of the PyTorch path's (and the floor's) forward matmul for this case.
        batch, features, hidden = shape
        scalar = torch.empty((), dtype=DTYPES[dtype_name], device=device)
        onednn = onednn_used(scalar.expand(batch, features), scalar.expand(hidden, features))
        record["forward_gemm"] = "onednn" if onednn else "torch.matmul"
        records.append(record)
        if device == "cuda":
            torch.cuda.empty_cache()
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = os.getloadavg()[0]
    info["cpu_pressure_end"] = cpu_pressure()

    targets = check_targets(records, device)
    table = format_table(records)
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} CPUs)"
    sys.stdout.write(
        f"{where}; torch {info['torch']}, triton {info['triton']}, "
        f"{info['torch_threads']} threads, compile mode {info['compile_mode']}; "
        f"CPU pressure {info['cpu_pressure_start']} -> {info['cpu_pressure_end']} %\n"
    )
    sys.stdout.write(table + "\n")
    if targets:
        sys.stdout.write(format_targets(targets) + "\n")

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    info["date_utc"] = stamp.isoformat(timespec="seconds")
    stem = f"{machine_slug(info)}_{'-'.join(dtypes)}_{stamp.strftime('%Y%m%d-%H%M%S')}"
    document = {
        "machine": info,
        "dtypes": dtypes,
        "shapes": shapes,
        "cases": records,
        "targets": targets,
    }
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    written = [str(json_path)]
    if not args.no_plot:
        png_path = args.out / f"{stem}.png"
        plot(records, info, png_path)
        written.append(str(png_path))
    sys.stdout.write("wrote " + ", ".join(written) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
