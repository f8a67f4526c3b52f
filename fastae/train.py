"""The training loop, checkpoints and per-epoch metrics of fastae.

A run lives in one folder:

    RUN/checkpoint/config.json         model, training and data configuration (Autoencoder(**...))
    RUN/checkpoint/model.safetensors   the weights
    RUN/checkpoint/optimizer.pt        optimizer state, noise generator state and noise step
    RUN/checkpoint/state.json          completed epochs, per-epoch metrics, elapsed time
    RUN/metrics.csv                    one row per epoch

The checkpoint is written after every epoch, atomically: the four files go into a fresh
``checkpoint.tmp`` folder, which then takes the place of ``checkpoint`` by renames (the old one
is moved aside to ``checkpoint.old`` first and deleted last). A run killed at any moment leaves
a complete checkpoint in ``checkpoint`` or, inside the rename window, in ``checkpoint.old``;
load_checkpoint reads whichever is complete.

Resuming gives the same weights, bit for bit, as a run that was never stopped: each epoch's
shuffle comes from a generator seeded with (seed, epoch), and the corruption noise, keyed by the
model's seed and its noise step counter (or drawn from its generator), has that counter and the
generator's state in the checkpoint.

On several processes (fit(..., dist=parallel.init(...)), see fastae.parallel) every rank draws
the same order, takes its slice of each global batch and steps through DistributedDataParallel;
the batch means of the loss are global, so the run takes the steps of one process (the batch
size is that of the global batch). Every rank validates; rank 0 alone writes the checkpoint and
the metrics, logs and shows the progress bar.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import pickle
import shutil
import time
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save_file
from tqdm import tqdm

from fastae.metrics import NEAR_ZERO
from fastae.models import Autoencoder
from fastae.models import Losses
from fastae.parallel import DistContext
from fastae.parallel import check_shards
from fastae.parallel import shard
from fastae.parallel import wrap

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "check_resume_state",
    "checkpoint_dir",
    "fit",
    "inactive_codes_message",
    "load_checkpoint",
    "load_weights",
    "run_config",
    "save_checkpoint",
    "train_step",
]

CHECKPOINT = "checkpoint"
_TMP = CHECKPOINT + ".tmp"
_OLD = CHECKPOINT + ".old"
# The running loss on the progress bar is refreshed every this many steps (each costs a sync).
_POSTFIX_EVERY = 10
# The columns of metrics.csv, in this order for fresh and resumed runs alike (state.json stores
# each epoch's record with sorted keys); any other key of a record follows, sorted.
METRICS_COLUMNS = (
    "epoch",
    "train_loss",
    "train_reconstruction",
    "train_penalty",
    "val_loss",
    "val_mse",
)
# The flag of each variant's penalty weight: the one to lower when every code unit is inactive.
_PENALTY_FLAG = {"sparse-l1": "--gamma", "sparse-kl": "--beta", "contractive": "--lambda"}


class CheckpointError(ValueError):
    """A missing, incomplete or mismatched checkpoint."""


@dataclass
class TrainConfig:
    """How to train: full passes over the training split, Adam with a constant learning rate."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.01
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainResult:
    """What fit() returns: per-epoch metrics and the training time of this process."""

    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def checkpoint_dir(run_dir: str) -> str | None:
    """The complete checkpoint folder of a run, or None when it has none."""
    for name in (CHECKPOINT, _OLD):
        path = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(path, "state.json")):
            return path
    return None


def save_checkpoint(
    run_dir: str,
    model: Autoencoder,
    optimizer: torch.optim.Optimizer,
    config: dict,
    state: dict,
) -> None:
    """Write config, weights, optimizer state and training state as RUN/checkpoint, atomically."""
    tmp = os.path.join(run_dir, _TMP)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    buffer = io.BytesIO()
    payload = {"optimizer": optimizer.state_dict(), "generator": model.generator_state()}
    payload["noise_step"] = model.noise_step
    torch.save(payload, buffer)
    _write_atomic(os.path.join(tmp, "optimizer.pt"), buffer.getvalue())
    _write_atomic(os.path.join(tmp, "config.json"), _json_bytes(config))
    _write_atomic(os.path.join(tmp, "state.json"), _json_bytes(state))

    final, old = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, _OLD)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: str) -> tuple[dict, dict, dict, dict]:
    """(config, weights, optimizer payload, state) of a run folder.

    Raises CheckpointError naming the file that is missing, damaged or incomplete."""
    path = checkpoint_dir(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir}: no checkpoint found (expected {CHECKPOINT}/state.json)")
    config = _read_json(os.path.join(path, "config.json"))
    state = _read_json(os.path.join(path, "state.json"))
    file = os.path.join(path, "model.safetensors")
    try:
        weights = load_file(file)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{file}: unreadable weights ({error})") from None
    file = os.path.join(path, "optimizer.pt")
    try:
        payload = torch.load(file, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{file}: unreadable optimizer state ({reason})") from None
    if not isinstance(payload, dict) or not {"optimizer", "generator"} <= set(payload):
        raise CheckpointError(f"{file}: expected the keys 'optimizer' and 'generator'")
    return config, weights, payload, state


def check_resume_state(run_dir: str, state: dict) -> None:
    """Raise CheckpointError unless state (of load_checkpoint) has what resuming needs: the
    completed epochs and one history record per epoch."""
    file = os.path.join(checkpoint_dir(run_dir) or run_dir, "state.json")
    epoch, history = state.get("epoch"), state.get("history")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise CheckpointError(f"{file}: got epoch {epoch!r}, expected an integer >= 0")
    if not isinstance(history, list) or len(history) != epoch:
        records = f" of {len(history)} records" if isinstance(history, list) else ""
        raise CheckpointError(
            f"{file}: got history {type(history).__name__}{records}, expected a list of "
            f"{epoch} per-epoch records"
        )


def _read_json(file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file}: unreadable ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: got {type(value).__name__}, expected a JSON object")
    return value


def load_weights(model: torch.nn.Module, weights: dict) -> None:
    """Load a state dict into model, all or nothing: any missing, unexpected or mis-shaped key is
    an error that lists every one of them (no partial load)."""
    expected = model.state_dict()
    problems = []
    for name in sorted(set(expected) | set(weights)):
        if name not in weights:
            problems.append(f"{name}: missing from the checkpoint")
        elif name not in expected:
            problems.append(f"{name}: not a parameter of the model")
        elif tuple(weights[name].shape) != tuple(expected[name].shape):
            problems.append(
                f"{name}: checkpoint shape {tuple(weights[name].shape)}, model shape "
                f"{tuple(expected[name].shape)}"
            )
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    model.load_state_dict(weights, strict=True)


def _write_metrics_csv(run_dir: str, history: list[dict]) -> None:
    if not history:
        return
    out = io.StringIO()
    extra = sorted(set(history[0]) - set(METRICS_COLUMNS))
    columns = [key for key in METRICS_COLUMNS if key in history[0]] + extra
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    _write_atomic(os.path.join(run_dir, "metrics.csv"), out.getvalue().encode("utf-8"))


def _epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator)


def _local_batch(model: Autoencoder, x: torch.Tensor, index: torch.Tensor, rank: int, world: int):
    """This rank's rows of the global batch x[index], and for a model that corrupts its input in
    PyTorch their corrupted copies: that noise is drawn for the whole global batch, as one process
    draws it, so every rank keeps the noise of its own rows (None when the model has no
    corruption or draws it inside the fused encoder pass)."""
    start, stop = shard(index.shape[0], rank, world)
    if model.noise is None or model.encoder_noise_is_fused():
        # Without corruption, or with the corruption drawn inside the fused encoder pass (keyed
        # by seed, step and rank: each rank draws its own noise, of the same distribution).
        return x[index[start:stop]], None
    full = x[index]
    return full[start:stop], model.corrupt(full)[start:stop]


def train_step(
    step_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    corrupted: torch.Tensor | None = None,
) -> Losses:
    """One optimizer step on this rank's part of a batch; returns its Losses.

    Args:
        step_module: parallel.wrap(model, dist): its forward is the loss; under
            DistributedDataParallel the backward also averages the gradients over the ranks.
        optimizer: over the model's parameters.
        batch: (B_r, D) this rank's samples; corrupted: their corrupted copies, or None.
    """
    losses = step_module(batch, corrupted)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    optimizer.step()
    return losses


def _validation(model: Autoencoder, x_val: torch.Tensor) -> tuple[dict, bool]:
    """({"val_loss", "val_mse"}, whether every code unit is inactive on every sample)."""
    model.eval()
    with torch.no_grad():
        losses = model.loss(x_val)
        h = model.encode(x_val)
        mse = torch.nn.functional.mse_loss(model.decode(h), x_val).item()
        inactive = bool((h.abs() < NEAR_ZERO).all())
    model.train()
    return {"val_loss": losses.total.item(), "val_mse": mse}, inactive


def inactive_codes_message(model: Autoencoder) -> str:
    """The warning for a model whose code units are all inactive (|h| < NEAR_ZERO on every
    validation sample): it only reconstructs a constant, and says which flag to lower."""
    flag = _PENALTY_FLAG.get(model.variant)
    weight = {"--gamma": model.gamma, "--beta": model.beta, "--lambda": model.lam}.get(flag)
    fix = (
        f"lower {flag} (got {weight:g})"
        if flag is not None
        else "lower --lr or change --activation"
    )
    return (
        f"all {model.code_size} code units are inactive (|h| < {NEAR_ZERO} on every validation "
        f"sample; {model.activation} codes): the model reconstructs the same output for every "
        f"input; {fix}"
    )


def fit(
    model: Autoencoder,
    x_train: np.ndarray,
    x_val: np.ndarray,
    config: TrainConfig,
    *,
    run_dir: str | None = None,
    run_config: dict | None = None,
    resume: bool = False,
    progress: bool | None = None,
    stop_at: tuple[int, int] | None = None,
    dist: DistContext | None = None,
) -> TrainResult:
    """Train model on x_train, checkpointing into run_dir after every epoch.

    Args:
        model: the Autoencoder (its parameters are updated in place).
        x_train, x_val: float32 arrays (N, D), scaled to the data range.
        config: epochs (the total, counting epochs of a resumed run), batch size, lr, seed, device.
        run_dir: the run folder; None trains without writing anything.
        run_config: the JSON configuration stored as checkpoint/config.json.
        resume: continue from the checkpoint in run_dir.
        progress: show a tqdm bar (None: only on a terminal).
        stop_at: (epoch, batch) at which to raise KeyboardInterrupt, to test interrupted runs.
        dist: this process's place among several (fastae.parallel.init), or None for one
            process. It overrides config.device; only rank 0 writes into run_dir and logs.

    Returns:
        TrainResult with one dict of metrics per epoch (train loss, reconstruction and penalty
        means over batches; validation loss and MSE in eval mode).
    """
    device = dist.device if dist is not None else torch.device(config.device)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    main = rank == 0
    check_shards(x_train.shape[0], config.batch_size, world)
    model.to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    x_tr = torch.from_numpy(x_train).to(device)
    x_va = torch.from_numpy(x_val).to(device)
    history: list[dict] = []
    start_epoch = 0
    elapsed_before = 0.0

    if resume:
        if run_dir is None:
            raise ValueError("resume: got True without a run_dir, expected a run folder")
        _, weights, payload, state = load_checkpoint(run_dir)
        check_resume_state(run_dir, state)
        load_weights(model, weights)
        optimizer.load_state_dict(payload["optimizer"])
        model.set_generator_state(payload["generator"])
        model.noise_step = int(payload.get("noise_step", 0))
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        elapsed_before = float(state.get("train_seconds", 0.0))
        if main:
            logger.info("resuming %s from epoch %d of %d", run_dir, start_epoch, config.epochs)

    count = x_tr.shape[0]
    batches = math.ceil(count / config.batch_size)
    if model.variant == "contractive":
        plan = model.penalty_plan(min(config.batch_size, count))
        logger.info(
            "contractive penalty of the %d-layer encoder: %s (side %s, k %d)",
            len(model.hidden),
            plan["method"],
            plan["side"],
            plan["k"],
        )
    bar = tqdm(
        total=(config.epochs - start_epoch) * batches,
        desc=f"{model.variant}",
        unit="step",
        disable=(not progress if progress is not None else None) if main else True,
        leave=False,
    )
    # The parameters are broadcast from rank 0 when DistributedDataParallel wraps the model.
    model.set_process_group(dist.group if dist is not None else None)
    step_module = wrap(model, dist)
    started = time.perf_counter()
    warned = False
    try:
        for epoch in range(start_epoch, config.epochs):
            order = _epoch_order(count, config.seed, epoch).to(device)
            # Loss sums stay on the device: no host sync per step, only per epoch.
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            for step in range(batches):
                if stop_at is not None and (epoch, step) == stop_at:
                    raise KeyboardInterrupt(f"stop_at {stop_at}")
                index = order[step * config.batch_size : (step + 1) * config.batch_size]
                batch, corrupted = _local_batch(model, x_tr, index, rank, world)
                losses = train_step(step_module, optimizer, batch, corrupted)

                sums += torch.stack([part.detach() for part in losses]).double()
                bar.update(1)
                if step % _POSTFIX_EVERY == 0 or step == batches - 1:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{sums[0].item() / (step + 1):.4f}")

            validation, inactive = _validation(model, x_va)
            record = {
                "epoch": epoch + 1,
                "train_loss": sums[0].item() / batches,
                "train_reconstruction": sums[1].item() / batches,
                "train_penalty": sums[2].item() / batches,
                **validation,
            }
            history.append(record)
            if not main:
                continue
            if inactive and not warned:
                warned = True
                logger.warning("epoch %d: %s", epoch + 1, inactive_codes_message(model))
            logger.info(
                "epoch %d/%d  train loss %.5f  val loss %.5f  val mse %.5f",
                epoch + 1,
                config.epochs,
                record["train_loss"],
                record["val_loss"],
                record["val_mse"],
            )
            if run_dir is not None:
                state = {
                    "epoch": epoch + 1,
                    "history": history,
                    "train_seconds": elapsed_before + time.perf_counter() - started,
                }
                save_checkpoint(run_dir, model, optimizer, run_config or {}, state)
                _write_metrics_csv(run_dir, history)
    finally:
        bar.close()
        model.set_process_group(None)
    return TrainResult(history, elapsed_before + time.perf_counter() - started)


def run_config(model: Autoencoder, train: TrainConfig, data: dict) -> dict:
    """The JSON configuration of a run: everything needed to rebuild its model and data."""
    return {"model": model.config, "train": asdict(train), "data": data}
