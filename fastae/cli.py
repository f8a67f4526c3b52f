"""The `fastae` command (also `python -m fastae`).

    fastae train [flags]           train one autoencoder; with no flags, a contractive AE on the
                                   bundled digits; --nproc N trains on N processes
                                   (torch.distributed), as does torchrun ... -m fastae train
    fastae compare [flags]         train every variant and PCA at the same bottleneck, one table
    fastae eval RUN_DIR [--data]   reload a run and report the metrics of `compare`
    fastae bench [...]             the speed benchmarks (fastae.bench)

Every bad input (flags, data files) is found before anything is written and ends the command
with exit status 2 and one line `fastae ...: error: ...`, as argparse does for its own errors.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import sys
import time

logger = logging.getLogger(__name__)

# Defaults of `fastae train` and `fastae compare`.
# NOTE: tuned on digits (1437 training samples, seed 0, 2-core CPU, torch 2.13 CPU): 100 epochs of
# batch 32 at lr 0.01 take about 15 s per model, and at 8 code units the undercomplete AE then
# reaches a lower validation MSE than PCA (0.0223 against 0.0238; at 40 epochs it did not).
DEFAULT_HIDDEN = (8,)
DEFAULT_EPOCHS = 100
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 0.01
DEFAULT_SEED = 0
DEFAULT_VAL_FRACTION = 0.2

# The penalty weight each variant gets when its flag is not given, chosen on the same digits runs
# so that each penalty visibly does its job without ruining the reconstruction (the README table).
VARIANT_DEFAULTS = {
    "undercomplete": {},
    "sparse-l1": {"gamma": 0.01},
    "sparse-kl": {"beta": 0.1, "rho": 0.05},
    "denoising": {"noise": "masking:0.3"},
    "contractive": {"lam": 0.03, "penalty_method": "auto", "penalty_probes": None},
}
# The flag of each model argument, for error messages and for checking which flags a variant takes.
_FLAGS = {
    "lam": "--lambda",
    "beta": "--beta",
    "rho": "--rho",
    "gamma": "--gamma",
    "noise": "--noise",
    "penalty_method": "--penalty-method",
    "penalty_probes": "--penalty-probes",
}
# The flag of each other Autoencoder argument that fastae train and compare set, for the model's
# own error messages ("activation: got ..." becomes "--activation: got ...").
_MODEL_FLAGS = {
    **_FLAGS,
    "hidden": "--hidden",
    "activation": "--activation",
    "reconstruction": "--reconstruction",
}
# Marks a run folder as taken: created with O_CREAT | O_EXCL, so of two runs started with the
# same --out only one gets it.
CLAIM = ".fastae-run"
# Models with at most this many weights in their largest layer train on one CPU thread.
_SMALL_MODEL = 256 * 256
# The corruption of the corrupted-input MSE when the model has none of its own.
DEFAULT_EVAL_NOISE = "masking:0.3"
# Epochs of each layer's shallow autoencoder in `fastae train --stacked`.
# NOTE: measured on digits (64-32-8 contractive, batch 32, seed 0, 2-core CPU): the 32 -> 8 stage
# is flat after 10 epochs (val loss 0.0033); the 64 -> 32 stage still improves at 50 (val loss
# 0.047 at 20, 0.037 at 50). After the 100 fine-tuning epochs the val MSE is 0.0265 with 20,
# 0.0230 with 50 and 0.0224 with no pretraining: on data this small pretraining is a
# demonstration, not a gain, so the default keeps its cost low (about 1.5 s for 20 epochs).
DEFAULT_PRETRAIN_EPOCHS = 20
# The encoder of compare's "deep contractive" row: DEEP_EXPANSION * code units, then the code.
DEEP_EXPANSION = 4

_COMPARE_COLUMNS = [
    ("model", "model"),
    ("mse", "val MSE"),
    ("corrupted_mse", "corrupted-input MSE"),
    ("jacobian", "mean ||J||_F^2"),
    ("mean_activation", "mean activation"),
    ("near_zero", "near-zero fraction"),
    ("train_seconds", "train time (s)"),
]


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class RunError(Exception):
    """A run that failed after it started (a process of a parallel run died): one line, exit
    status 1."""


# -- argument types ------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a positive integer")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected an integer >= 0")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a finite number")
    return value


def _nonnegative(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a number >= 0")
    return value


def _positive(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a number > 0")
    return value


def _open_unit(text: str) -> float:
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a number strictly in (0, 1)")
    return value


def _widths(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")]
    try:
        widths = tuple(int(part) for part in parts)
    except ValueError:
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(
            f"got {text!r}, expected comma-separated positive widths such as 32,8"
        )
    return widths


def _noise(text: str) -> str:
    from fastae.corruption import parse_corruption

    try:
        return parse_corruption(text).spec()
    except ValueError as error:
        # argparse names the flag already: "argument --noise: got ...".
        raise argparse.ArgumentTypeError(str(error).removeprefix("noise: ")) from None


# -- parser --------------------------------------------------------------------------------------


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default=None,
        help="'digits' (the default) or a .npy, .npz, .csv or MNIST IDX (-idx3-ubyte[.gz]) file",
    )
    parser.add_argument(
        "--label-column",
        default=None,
        help="CSV only: the column holding labels (header name or 0-based index)",
    )


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    from fastae.activations import ACTIVATIONS

    _add_data_flags(parser)
    parser.add_argument(
        "--hidden", type=_widths, default=None, help="encoder widths, e.g. 8 or 32,8 (default 8)"
    )
    parser.add_argument("--epochs", type=_positive_int, default=None, help="default 100")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help="default 32")
    parser.add_argument("--lr", type=_positive, default=None, help="Adam learning rate (0.01)")
    parser.add_argument("--lambda", dest="lam", metavar="LAMBDA", type=_nonnegative, default=None,
                        help="contractive weight (0.03)")  # fmt: skip
    parser.add_argument("--beta", type=_nonnegative, default=None, help="KL weight (0.1)")
    parser.add_argument("--rho", type=_open_unit, default=None, help="KL target (0.05)")
    parser.add_argument("--gamma", type=_nonnegative, default=None, help="L1 weight (0.01)")
    parser.add_argument("--noise", type=_noise, default=None,
                        help="corruption KIND:LEVEL, KIND in gaussian, masking, salt-and-pepper "
                        "(masking:0.3)")  # fmt: skip
    parser.add_argument(
        "--penalty-method",
        choices=("auto", "exact", "estimate"),
        default=None,
        help="contractive penalty of a deep encoder: exact, estimate (random probes) or auto "
        "(exact when affordable; the default)",
    )
    parser.add_argument("--penalty-probes", type=_positive_int, default=None,
                        help="probes per sample of the estimate (16)")  # fmt: skip
    parser.add_argument(
        "--activation",
        choices=sorted(ACTIVATIONS),
        default=None,
        help="of the encoder layers (sigmoid; sparse-kl needs sigmoid)",
    )
    parser.add_argument(
        "--reconstruction", choices=("mse", "bce"), default=None, help="the loss (mse)"
    )
    parser.add_argument(
        "--tied",
        action="store_true",
        default=None,
        help="decoder weights = transposed encoder weights",
    )
    parser.add_argument("--val-fraction", type=_open_unit, default=None, help="default 0.2")
    parser.add_argument("--seed", type=_nonnegative_int, default=None, help="default 0")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")


def _echoes_usage_errors() -> bool:
    """Whether this process reports a malformed command line: under torchrun every process
    parses the same one, so only rank 0 says what is wrong with it and the others exit 2
    quietly. Errors that can differ between processes (a file missing on one node) are still
    reported by every process."""
    return os.environ.get("RANK", "0") == "0"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage block above it)."""

    def error(self, message: str):
        text = f"{self.prog}: error: {message} (see {self.prog} --help)\n"
        self.exit(2, text if _echoes_usage_errors() else None)


def build_parser() -> argparse.ArgumentParser:
    from fastae.models import VARIANTS

    parser = _Parser(prog="fastae", description="Train, compare and evaluate autoencoders.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train one autoencoder")
    train.add_argument("--variant", choices=VARIANTS, default=None, help="default contractive")
    _add_training_flags(train)
    train.add_argument("--out", default=None, help="the run folder (runs/VARIANT-TIME)")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    train.add_argument(
        "--stacked",
        action="store_true",
        default=None,
        help="greedy layer-wise pretraining of each encoder layer first, then fine-tuning",
    )
    train.add_argument(
        "--pretrain-epochs",
        type=_positive_int,
        default=None,
        help=f"epochs per layer with --stacked ({DEFAULT_PRETRAIN_EPOCHS})",
    )
    train.add_argument(
        "--nproc",
        type=_positive_int,
        default=None,
        help="train on N processes of this machine with DistributedDataParallel (gloo on the "
        "CPU, nccl with one GPU each on cuda); --batch-size is the global batch (default 1)",
    )
    train.add_argument(
        "--dist-timeout",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="with several processes: how long a process waits for the others before the run "
        "ends with an error (default 60)",
    )

    compare = commands.add_parser("compare", help="train every variant and PCA, one table")
    _add_training_flags(compare)
    compare.add_argument("--out", default=None, help="the output folder (runs/compare-TIME)")

    evaluate = commands.add_parser("eval", help="reload a run and report its metrics")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    _add_data_flags(evaluate)
    evaluate.add_argument("--noise", type=_noise, default=None,
                          help="corruption for the corrupted-input MSE")  # fmt: skip
    evaluate.add_argument("--device", default=None)

    commands.add_parser("bench", help="speed benchmarks (fastae.bench)", add_help=False)
    parser.commands = commands.choices
    return parser


# -- shared steps --------------------------------------------------------------------------------


def _device(name: str | None) -> str:
    import torch

    name = name or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: got {name!r}, expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: got {name!r}, but no CUDA device is available")
    # The backend the layers will pick on this device (FASTAE_BACKEND can force one) and
    # FASTAE_ONEDNN, checked before anything is written rather than at the first forward.
    from fastae.functional import resolve_backend
    from fastae.functional.cpu_linear import enabled_by_environment

    try:
        resolve_backend("auto", device)
        enabled_by_environment()
    except ValueError as error:
        raise UsageError(str(error)) from None
    return name


def _set_threads(device: str, model, processes: int = 1) -> None:
    """One intra-op thread for small models on the CPU; larger models share the cores between
    the processes of the machine.

    NOTE: on the 2-core CI machine, while other jobs ran, 450 steps of the default contractive
    model (64-8, batch 32) took 0.22 s with one thread and 6.0 s with two: for matmuls this small
    the threads spend their time waiting on each other. Larger models keep torch's default.
    """
    import torch

    if torch.device(device).type != "cpu":
        return
    widest = max((model.in_features, *model.hidden))
    if model.in_features * widest <= _SMALL_MODEL:
        torch.set_num_threads(1)
    elif processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))


def _source(data: str | None) -> str:
    """The data source as stored in a run: a name, or an absolute path (runs resume anywhere)."""
    from fastae.data import NAMED

    data = data or "digits"
    return data if data in NAMED else os.path.abspath(data)


def _load_split(source: str, label_column, val_fraction: float, seed: int):
    from fastae.data import DataError
    from fastae.data import load_dataset
    from fastae.data import prepare

    try:
        dataset = load_dataset(source, label_column)
        return dataset, prepare(dataset, val_fraction, seed)
    except DataError as error:
        raise UsageError(f"--data: {error}") from None


def _architecture(args: argparse.Namespace) -> dict:
    """The model flags that every variant takes."""
    names = ("activation", "reconstruction", "tied")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _model_kwargs(variant: str, args: argparse.Namespace) -> dict:
    """The model arguments of a variant: its defaults, overridden by its flags; a flag that
    belongs to another variant is an error."""
    kwargs = dict(VARIANT_DEFAULTS[variant])
    for name, flag in _FLAGS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in VARIANT_DEFAULTS[variant]:
            owner = next(v for v, d in VARIANT_DEFAULTS.items() if name in d)
            raise UsageError(f"{flag}: applies to --variant {owner}, got --variant {variant}")
        kwargs[name] = value
    kwargs.update(_architecture(args))
    for name in ("lam", "beta", "gamma"):
        if kwargs.get(name, None) == 0.0:
            raise UsageError(f"{_FLAGS[name]}: got 0 for --variant {variant}, expected > 0")
    return kwargs


def _build_model(in_features: int, hidden, variant: str, kwargs: dict, seed: int):
    import torch

    from fastae.models import Autoencoder

    torch.manual_seed(seed)
    try:
        return Autoencoder(in_features, hidden, variant=variant, seed=seed, **kwargs)
    except ValueError as error:
        name, sep, rest = str(error).partition(":")
        message = f"{_MODEL_FLAGS[name]}:{rest}" if sep and name in _MODEL_FLAGS else str(error)
        raise UsageError(message) from None


def _new_out(out: str | None, stem: str, resumable: bool = True) -> str:
    """The output folder of a new run; an existing non-empty folder is refused."""
    if out is None:
        base = os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        out, suffix = base, 1
        while os.path.exists(out):
            suffix += 1
            out = f"{base}-{suffix}"
        return out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out: {out} is a file, expected a folder (a new or empty one)")
    if os.path.isdir(out) and os.listdir(out) == [CLAIM]:
        owner = _claim_owner(out)
        if owner is not None:
            raise UsageError(
                f"--out: {out} is taken by another run (process {owner}, still running, has not "
                "written yet), expected a new folder"
            )
        # The run that claimed the folder died before writing anything: the folder is free.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, CLAIM))
    if os.path.isdir(out) and os.listdir(out):
        raise UsageError(
            f"--out: {out} exists and is not empty, expected a new folder"
            + (" (or --resume to continue the run in it)" if resumable else "")
        )
    return out


def _claim_owner(out: str) -> int | None:
    """The pid of the live process that claimed out, or None when that process has ended (or
    the marker names none): a run killed before its first checkpoint leaves only its marker."""
    try:
        with open(os.path.join(out, CLAIM), encoding="utf-8") as handle:
            pid = int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, another user's
    return pid


def _claim_out(out: str, chosen: bool) -> str:
    """Make out this run's folder, atomically: the O_EXCL marker CLAIM goes in first, so of two
    runs given the same --out only one gets it, and the other stops before writing anything.
    A generated name (chosen False) taken in the meantime moves on to the next free suffix."""
    base, suffix = out, 1
    while True:
        try:
            os.makedirs(out, exist_ok=chosen)
            marker = os.open(os.path.join(out, CLAIM), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                os.write(marker, f"{os.getpid()}\n".encode())
            finally:
                os.close(marker)
            return out
        except FileExistsError:
            if chosen:
                raise UsageError(
                    f"--out: {out} was taken by another run started at the same time, expected "
                    "a new folder"
                ) from None
        except OSError as error:
            raise UsageError(f"--out: cannot create {out} ({error.strerror})") from None
        suffix += 1
        out = f"{base}-{suffix}"


def _metrics_line(metrics: dict) -> str:
    return (
        f"val MSE {metrics['mse']:.5f}  corrupted-input MSE {metrics['corrupted_mse']:.5f}  "
        f"mean ||J||_F^2 {metrics['jacobian']:.4g}  mean activation "
        f"{metrics['mean_activation']:.4f}  near-zero {metrics['near_zero']:.3f}"
    )


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


# -- train ---------------------------------------------------------------------------------------


def _training_setup(args: argparse.Namespace):
    """The training configuration, the data description, the data set and its split of a new
    run (train) or of every run of compare, from the flags and their defaults."""
    from fastae.train import TrainConfig

    train = TrainConfig(
        epochs=args.epochs or DEFAULT_EPOCHS,
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        lr=args.lr or DEFAULT_LR,
        seed=DEFAULT_SEED if args.seed is None else args.seed,
        device=_device(args.device),
    )
    data = {
        "source": _source(args.data),
        "label_column": args.label_column,
        "val_fraction": args.val_fraction or DEFAULT_VAL_FRACTION,
    }
    dataset, split = _load_split(
        args.data or "digits", data["label_column"], data["val_fraction"], train.seed
    )
    return train, data, dataset, split


def _plan_resume(args: argparse.Namespace):
    """Model, training config, data and folder of the run to continue (from its checkpoint)."""
    import torch

    from fastae.data import fingerprint
    from fastae.models import Autoencoder
    from fastae.train import CheckpointError
    from fastae.train import TrainConfig
    from fastae.train import check_resume_state
    from fastae.train import checkpoint_dir
    from fastae.train import load_checkpoint
    from fastae.train import load_weights

    if args.out is None:
        raise UsageError("--resume: needs --out, the folder of the run to continue")
    if os.path.isdir(args.out) and os.listdir(args.out) == [CLAIM]:
        raise UsageError(
            f"--out: {args.out} holds no checkpoint: its run stopped before the end of its first "
            "epoch; start it again with the same --out and without --resume"
        )
    try:
        stored, weights, payload, state = load_checkpoint(args.out)
        check_resume_state(args.out, state)
    except CheckpointError as error:
        raise UsageError(f"--out: {error}") from None
    config_file = os.path.join(checkpoint_dir(args.out), "config.json")
    ignored = [
        f"--{name.replace('_', '-')}"
        for name in ("variant", "data", "hidden", "batch_size", "lr", "lam", "beta", "rho")
        + ("gamma", "noise", "seed", "val_fraction", "label_column", "activation")
        + ("reconstruction", "tied", "penalty_method", "penalty_probes", "stacked")
        + ("pretrain_epochs",)
        if getattr(args, name, None) is not None
    ]
    if ignored:
        raise UsageError(
            f"--resume: got {' '.join(ignored)}, expected only --epochs, --device, --nproc and "
            "--dist-timeout (the rest comes from the checkpoint)"
        )
    try:
        data = stored["data"]
        train = TrainConfig(**stored["train"])
        model_config = dict(stored["model"])
        variant, hidden = model_config.pop("variant"), tuple(model_config.pop("hidden"))
        in_features = model_config.pop("in_features")
        model_config.pop("seed")
        source, label_column, val_fraction = (
            data["source"], data["label_column"], data["val_fraction"]
        )  # fmt: skip
    except (KeyError, TypeError) as error:
        raise UsageError(
            f"--out: {config_file}: incomplete run configuration ({error!r})"
        ) from None
    train.epochs = args.epochs or train.epochs
    train.device = _device(args.device or train.device)
    if train.epochs < state["epoch"]:
        raise UsageError(
            f"--epochs: got {train.epochs}, expected at least the {state['epoch']} epochs "
            "the run has done"
        )
    dataset, split = _load_split(source, label_column, val_fraction, train.seed)
    got, expected = fingerprint(dataset.x), data.get("fingerprint")
    if expected is not None and got != expected:
        raise UsageError(
            f"--data: {source} has changed since the run started: got shape "
            f"{tuple(got['shape'])} (sha256 {got['sha256'][:12]}), expected shape "
            f"{tuple(expected['shape'])} (sha256 {expected['sha256'][:12]}) as recorded in "
            f"{config_file}"
        )
    if dataset.x.shape[1] != in_features:
        # A run from before fingerprints were recorded: only the width can be checked.
        raise UsageError(
            f"--data: {source} has changed since the run started: got {dataset.x.shape[1]} "
            f"features, expected {in_features} (the run's model)"
        )
    try:
        torch.manual_seed(train.seed)
        model = Autoencoder(in_features, hidden, variant=variant, seed=train.seed, **model_config)
        load_weights(model, weights)
        torch.optim.Adam(model.parameters(), lr=train.lr).load_state_dict(payload["optimizer"])
    except CheckpointError as error:
        raise UsageError(
            f"--out: {checkpoint_dir(args.out)}/model.safetensors does not match config.json: "
            f"{error}"
        ) from None
    except (ValueError, TypeError, KeyError) as error:
        raise UsageError(
            f"--out: {checkpoint_dir(args.out)}: config.json, model.safetensors and optimizer.pt "
            f"do not fit together ({error})"
        ) from None
    out = args.out
    return model, train, data, dataset, split, out


def _plan_new(args: argparse.Namespace):
    """Model, training config, data and folder of a new run (from the flags)."""
    from fastae.data import fingerprint

    variant = args.variant or "contractive"
    hidden = args.hidden or DEFAULT_HIDDEN
    kwargs = _model_kwargs(variant, args)
    train, data, dataset, split = _training_setup(args)
    data["fingerprint"] = fingerprint(dataset.x)
    model = _build_model(split.x_train.shape[1], hidden, variant, kwargs, train.seed)
    if args.pretrain_epochs is not None and not args.stacked:
        raise UsageError(f"--pretrain-epochs: got {args.pretrain_epochs} without --stacked")
    if args.stacked and len(hidden) < 2:
        raise UsageError(
            f"--stacked: got --hidden {','.join(map(str, hidden))} (one encoder layer), expected "
            "two or more widths such as 32,8"
        )
    out = _new_out(args.out, variant)
    return model, train, data, dataset, split, out


def _plan(args: argparse.Namespace):
    return _plan_resume(args) if args.resume else _plan_new(args)


def _check_processes(nproc: int, train, split) -> None:
    """What several processes need of the flags, checked before any process starts."""
    import torch

    from fastae.parallel import check_shards

    try:
        check_shards(split.x_train.shape[0], train.batch_size, nproc, "--batch-size")
    except ValueError as error:
        raise UsageError(str(error)) from None
    device = torch.device(train.device)
    if device.type == "cuda" and device.index is not None:
        raise UsageError(
            f"--device: got {train.device!r} with {nproc} processes, expected 'cuda' (the "
            "process of local rank r uses cuda:r)"
        )
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UsageError(
            f"--nproc: got {nproc} processes on --device cuda, expected at most "
            f"{torch.cuda.device_count()} (one per CUDA device)"
        )


def _train(args: argparse.Namespace) -> int:
    from fastae import parallel

    if parallel.launched():
        return _train_rank(args)
    if (args.nproc or 1) > 1:
        return _train_launch(args)
    if args.dist_timeout is not None:
        raise UsageError("--dist-timeout: applies to several processes, expected --nproc N > 1")
    return _train_run(args, _plan(args), None)


def _train_launch(args: argparse.Namespace) -> int:
    """`fastae train --nproc N`: check everything here, then start the N processes."""
    from fastae import parallel

    _, train, _, _, split, out = _plan(args)
    _check_processes(args.nproc, train, split)
    args.out = out
    backend = "nccl" if train.device.startswith("cuda") else "gloo"
    logger.info("starting %d processes (%s)", args.nproc, backend)
    try:
        parallel.launch(args.nproc, _launched_train, args)
    except parallel.LaunchError as error:
        raise RunError(str(error)) from None
    return 0


def _launched_train(args: argparse.Namespace) -> int:
    """One process of `fastae train --nproc N` (parallel.launch starts it)."""
    _configure_logging()
    return _run_command("train", _train, args)


def _train_rank(args: argparse.Namespace) -> int:
    """One of the processes started by torchrun or `--nproc`: join the group, then train."""
    from fastae import parallel

    world = parallel.world_size_from_env()
    if args.nproc is not None and args.nproc != world:
        raise UsageError(
            f"--nproc: got {args.nproc} in a run of {world} processes (torchrun), expected no "
            "--nproc"
        )
    plan = _plan(args)
    _check_processes(world, plan[1], plan[4])
    # init_process_group returns once every rank has joined, so every rank has finished the
    # checks above (of --out among them) before rank 0 creates anything.
    try:
        context = parallel.init(plan[1].device, args.dist_timeout or parallel.DEFAULT_TIMEOUT)
    except ValueError as error:
        raise UsageError(f"--device: {error}") from None
    if not context.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return _train_run(args, plan, context)
    except KeyboardInterrupt:
        if not context.is_main:
            return 130  # rank 0 (and the launcher) say it
        raise
    except Exception as error:
        what = parallel.collective_failure(error)
        if what is None:
            raise
        sys.stdout.flush()
        sys.stderr.write(
            f"fastae train: error: process {context.rank} of {context.world_size} lost the "
            f"other processes: {what}\n"
        )
        sys.stderr.flush()
        # A group with a failed operation cannot be left cleanly (destroying it, or the
        # interpreter's exit, can abort the process inside gloo): end here, status 1, without
        # the finally below.
        os._exit(1)
    finally:
        parallel.shutdown(context)


def _train_run(args: argparse.Namespace, plan, context) -> int:
    """Train the planned run, on one process (context None) or as one rank of several."""
    import torch

    from fastae import plots
    from fastae.corruption import parse_corruption
    from fastae.metrics import evaluate_model
    from fastae.train import fit
    from fastae.train import inactive_codes_message
    from fastae.train import run_config

    # 1. Every input was checked (the plan) before anything is written.
    model, train, data, dataset, split, out = plan
    main = context is None or context.is_main
    device = str(context.device) if context is not None else train.device
    data = {
        **data,
        "scaler": {"low": split.scaler.low, "high": split.scaler.high},
        "image_shape": list(split.image_shape) if split.image_shape else None,
    }
    config = run_config(model, train, data)
    pretrain_epochs = None
    if args.resume:
        from fastae.train import load_checkpoint

        # A resumed stacked run only fine-tunes further; its pretraining record is kept.
        stored = load_checkpoint(out)[0]
        if "pretrain" in stored:
            config["pretrain"] = stored["pretrain"]
    elif args.stacked:
        pretrain_epochs = args.pretrain_epochs or DEFAULT_PRETRAIN_EPOCHS
        config["pretrain"] = {"epochs_per_layer": pretrain_epochs}

    # 2. Train (after layer-wise pretraining with --stacked), checkpointing every epoch (rank 0
    # alone writes).
    _set_threads(device, model, context.world_size if context is not None else 1)
    if main:
        if not args.resume:
            out = _claim_out(out, chosen=args.out is not None)
        logger.info(
            "training %s %s on %s (%d train, %d validation samples) into %s%s",
            model.variant,
            "-".join(map(str, (model.in_features, *model.hidden))),
            dataset.name,
            split.x_train.shape[0],
            split.x_val.shape[0],
            out,
            f" on {context.world_size} processes" if context is not None else "",
        )
    pretrain_seconds = 0.0
    if pretrain_epochs is not None:
        from fastae.stacked import pretrain

        # Every rank pretrains the same way from the same seed; DistributedDataParallel then
        # starts the fine-tuning from rank 0's parameters.
        stages = pretrain(model, split.x_train, split.x_val, train, pretrain_epochs)
        pretrain_seconds = sum(stage.train_seconds for stage in stages)
        config["pretrain"]["seconds"] = pretrain_seconds
        config["pretrain"]["val_loss"] = [stage.history[-1]["val_loss"] for stage in stages]
        if main:
            logger.info(
                "pretrained %d layers in %.1f s; fine-tuning", len(stages), pretrain_seconds
            )
    try:
        result = fit(
            model, split.x_train, split.x_val, train, run_dir=out, run_config=config,
            resume=args.resume, dist=context,
        )  # fmt: skip
    except KeyboardInterrupt:
        if main:
            logger.info("interrupted; continue with: fastae train --resume --out %s", out)
        raise
    if not main:
        return 0

    # 3. Final metrics, summary and plots.
    noise = model.noise or parse_corruption(DEFAULT_EVAL_NOISE)
    x_val = torch.from_numpy(split.x_val).to(device)
    metrics = evaluate_model(model, x_val, noise, seed=train.seed)
    metrics["train_seconds"] = result.train_seconds
    if pretrain_epochs is not None:
        metrics["pretrain_seconds"] = pretrain_seconds
    if model.last_penalty is not None:
        used = model.last_penalty
        metrics["contractive_penalty"] = {"method": used.method, "side": used.side, "k": used.k}
    warning = ""
    if metrics["near_zero"] >= 1.0:
        warning = f"  warning: {inactive_codes_message(model)}\n"
        logger.warning("%s", inactive_codes_message(model))
        metrics["warning"] = inactive_codes_message(model)
    _write_text(os.path.join(out, "summary.json"), json.dumps(metrics, indent=2) + "\n")

    model.eval()
    with torch.no_grad():
        shown = x_val[:12]
        x_hat = model(shown).cpu().numpy()
        x_tilde = None
        if model.noise is not None:
            generator = torch.Generator(device=shown.device)
            generator.manual_seed(train.seed)
            x_tilde = model.noise(shown, generator)
            x_hat = model(x_tilde).cpu().numpy()
            x_tilde = x_tilde.cpu().numpy()
        codes = model.encode(x_val).cpu().numpy()
    plots.reconstructions(
        os.path.join(out, "reconstructions.png"), shown.cpu().numpy(), x_hat, split.image_shape,
        x_tilde,
    )  # fmt: skip
    plots.loss_curves(os.path.join(out, "loss_curves.png"), result.history)
    plots.codes_2d(os.path.join(out, "codes.png"), codes, split.y_val)

    final = result.history[-1]
    epochs = f"{final['epoch']} epoch" + ("s" if final["epoch"] != 1 else "")
    sys.stdout.write(
        f"run {out}: {model.variant} AE, {epochs} in {result.train_seconds:.1f} s\n"
        f"  train loss {final['train_loss']:.5f}  val loss {final['val_loss']:.5f}\n"
        f"  {_metrics_line(metrics)}\n"
        f"{warning}"
        "  wrote checkpoint/ (model.safetensors, config.json, optimizer.pt, state.json), "
        "metrics.csv, summary.json, reconstructions.png, loss_curves.png, codes.png\n"
    )
    return 0


# -- compare -------------------------------------------------------------------------------------


def _format_value(key: str, value) -> str:
    if key == "model":
        return str(value)
    if key == "train_seconds":
        return f"{value:.1f}"
    if key in ("near_zero", "mean_activation"):
        return f"{value:.3f}"
    return f"{value:.4g}" if key == "jacobian" else f"{value:.5f}"


def _markdown_table(rows: list[dict]) -> str:
    lines = [
        # A "|" inside a cell would end it: escaped.
        "| " + " | ".join(title.replace("|", "\\|") for _, title in _COMPARE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COMPARE_COLUMNS) + "|",
    ]
    for row in rows:
        cells = [_format_value(key, row[key]) for key, _ in _COMPARE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _compare(args: argparse.Namespace) -> int:
    import torch
    from sklearn.decomposition import PCA

    from fastae import plots
    from fastae.corruption import parse_corruption
    from fastae.data import fingerprint
    from fastae.metrics import evaluate_model
    from fastae.metrics import evaluate_pca
    from fastae.models import VARIANTS
    from fastae.train import fit
    from fastae.train import run_config

    # 1. Check everything and build every model before writing anything.
    hidden = args.hidden or DEFAULT_HIDDEN
    train, data, dataset, split = _training_setup(args)
    data["scaler"] = {"low": split.scaler.low, "high": split.scaler.high}
    data["image_shape"] = list(split.image_shape) if split.image_shape else None
    data["fingerprint"] = fingerprint(dataset.x)
    for name in ("lam", "beta", "gamma"):
        if getattr(args, name, None) == 0.0:
            owner = next(v for v, d in VARIANT_DEFAULTS.items() if name in d)
            raise UsageError(f"{_FLAGS[name]}: got 0 for the {owner} row, expected > 0")
    models, skipped = {}, []
    for variant in VARIANTS:
        if variant == "sparse-kl" and (args.activation or "sigmoid") != "sigmoid":
            skipped.append(
                f"sparse-kl skipped (its KL penalty needs sigmoid codes, got --activation "
                f"{args.activation})"
            )
            logger.info("%s", skipped[-1])
            continue
        kwargs = dict(VARIANT_DEFAULTS[variant])
        kwargs.update(
            {k: getattr(args, k) for k in kwargs if getattr(args, k, None) is not None}
        )  # fmt: skip
        kwargs.update(_architecture(args))
        models[variant] = _build_model(split.x_train.shape[1], hidden, variant, kwargs, train.seed)
        if variant == "contractive" and len(hidden) == 1:
            # The same code behind a wider first layer: the whole-encoder penalty.
            deep = (DEEP_EXPANSION * hidden[-1], hidden[-1])
            models["deep contractive"] = _build_model(
                split.x_train.shape[1], deep, variant, kwargs, train.seed
            )
    if hidden[-1] > min(split.x_train.shape):
        raise UsageError(
            f"--hidden: got a code of {hidden[-1]} units, expected at most "
            f"{min(split.x_train.shape)} for PCA on this data"
        )
    noise = parse_corruption(models["denoising"].noise.spec())
    out = _new_out(args.out, "compare", resumable=False)

    # 2. Train every variant (each a run folder that `fastae eval` reads) and fit PCA.
    _set_threads(train.device, models["undercomplete"])
    out = _claim_out(out, chosen=args.out is not None)
    x_val = torch.from_numpy(split.x_val).to(train.device)
    rows = []
    for variant, model in models.items():
        logger.info("training %s", variant)
        run_dir = os.path.join(out, variant.replace(" ", "-"))
        os.makedirs(run_dir)
        result = fit(
            model, split.x_train, split.x_val, train, run_dir=run_dir,
            run_config=run_config(model, train, data),
        )  # fmt: skip
        metrics = evaluate_model(model, x_val, noise, seed=train.seed)
        rows.append({"model": variant, **metrics, "train_seconds": result.train_seconds})
    started = time.perf_counter()
    pca = PCA(hidden[-1], random_state=train.seed).fit(split.x_train)
    seconds = time.perf_counter() - started
    rows.append(
        {"model": "PCA", **evaluate_pca(pca, split.x_val, noise, train.seed),
         "train_seconds": seconds}
    )  # fmt: skip

    # 3. One table: stdout, markdown, CSV and a plot.
    table = _markdown_table(rows)
    deep = ""
    if "deep contractive" in models:
        model = models["deep contractive"]
        used = model.last_penalty
        deep = f"; deep contractive {','.join(map(str, model.hidden))}, {used.method} penalty"
    conditions = (
        f"data {dataset.name} ({split.x_train.shape[0]} train / {split.x_val.shape[0]} "
        f"validation), code {hidden[-1]} units (encoder {','.join(map(str, hidden))}{deep}), "
        f"{train.epochs} epochs, batch {train.batch_size}, Adam lr {train.lr}, seed {train.seed}, "
        f"corruption {noise.spec()}, device {train.device}, torch {torch.__version__}"
        + "".join(f"; {note}" for note in skipped)
    )
    _write_text(os.path.join(out, "compare.md"), f"{table}\n{conditions}\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[key for key, _ in _COMPARE_COLUMNS])
    writer.writeheader()
    writer.writerows({key: row[key] for key, _ in _COMPARE_COLUMNS} for row in rows)
    _write_text(os.path.join(out, "compare.csv"), buffer.getvalue())
    plots.compare_bars(os.path.join(out, "compare.png"), rows, _COMPARE_COLUMNS[1:])
    sys.stdout.write(f"{table}\n{conditions}\nwrote {out}/compare.md, compare.csv, compare.png\n")
    return 0


# -- eval ----------------------------------------------------------------------------------------


def _eval(args: argparse.Namespace) -> int:
    import torch

    from fastae.corruption import parse_corruption
    from fastae.data import DataError
    from fastae.data import MinMaxScaler
    from fastae.data import fingerprint
    from fastae.data import load_dataset
    from fastae.metrics import evaluate_model
    from fastae.models import Autoencoder
    from fastae.train import CheckpointError
    from fastae.train import checkpoint_dir
    from fastae.train import load_checkpoint
    from fastae.train import load_weights

    if not os.path.isdir(args.run_dir):
        raise UsageError(f"RUN_DIR: {args.run_dir} is not a folder")
    try:
        config, weights, _, _ = load_checkpoint(args.run_dir)
    except CheckpointError as error:
        # The message starts with the folder or file it is about.
        raise UsageError(f"RUN_DIR: {error}") from None
    try:
        model = Autoencoder(**config["model"])
        load_weights(model, weights)
    except (CheckpointError, ValueError, KeyError, TypeError) as error:
        config_file = os.path.join(checkpoint_dir(args.run_dir), "config.json")
        raise UsageError(f"RUN_DIR: {config_file}: {error}") from None
    data = config["data"]
    seed = config["train"]["seed"]
    device = _device(args.device or config["train"]["device"])
    if args.data is None:
        dataset, split = _load_split(
            data["source"], data["label_column"], data["val_fraction"], seed
        )
        x, where = split.x_val, f"the validation split of {data['source']}"
        if data.get("fingerprint") not in (None, fingerprint(dataset.x)):
            logger.warning(
                "%s has changed since the run was trained: these metrics are of its current "
                "contents",
                data["source"],
            )
    else:
        try:
            dataset = load_dataset(args.data, args.label_column)
        except DataError as error:
            raise UsageError(f"--data: {error}") from None
        x = MinMaxScaler(**data["scaler"]).transform(dataset.x)
        where = f"all {x.shape[0]} samples of {args.data}"
    if x.shape[1] != model.in_features:
        raise UsageError(
            f"--data: got {x.shape[1]} features, expected {model.in_features} (the run's model)"
        )
    noise = parse_corruption(args.noise or (model.config["noise"] or DEFAULT_EVAL_NOISE))
    model.to(device)
    metrics = evaluate_model(model, torch.from_numpy(x).to(device), noise, seed=seed)
    sys.stdout.write(
        f"run {args.run_dir}: {model.variant} AE on {where} (corruption {noise.spec()})\n"
        f"  {_metrics_line(metrics)}\n"
    )
    return 0


# -- bench ---------------------------------------------------------------------------------------


def _bench(argv: list[str]) -> int:
    import importlib
    import importlib.util

    if importlib.util.find_spec("fastae.bench") is None:
        raise UsageError("bench: fastae.bench is not installed with this copy of fastae")
    bench = importlib.import_module("fastae.bench")
    return bench.main(argv) or 0


# -- entry point ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the fastae command; returns the exit status (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    if argv[:1] == ["bench"]:
        try:
            return _bench(argv[1:])
        except UsageError as error:
            sys.stderr.write(f"fastae: error: {error}\n")
            return 2

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command = args.command
    if command is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help(sys.stderr)
        return 2
    if unknown:
        # Reported by the subcommand, as argparse does for its other errors: "fastae train: ...".
        parser.commands[command].error(f"unrecognized arguments: {' '.join(unknown)}")
    handlers = {"train": _train, "compare": _compare, "eval": _eval}
    return _run_command(command, handlers[command], args)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _run_command(command: str, handler, args: argparse.Namespace) -> int:
    """Run a command's handler; bad input and failed runs end as one line on stderr."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            return handler(args)
    except UsageError as error:
        sys.stderr.write(f"fastae {command}: error: {error}\n")
        return 2
    except RunError as error:
        sys.stderr.write(f"fastae {command}: error: {error}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"fastae {command}: interrupted\n")
        return 130
