"""Training on several processes: joining the process group, splitting each batch across the
ranks, DistributedDataParallel, and the launcher of ``fastae train --nproc N``.

Two ways to start R processes, which end in the same code:

    fastae train --nproc R ...                        launch() starts R processes on this machine
    torchrun --nproc-per-node R -m fastae train ...   torchrun starts them

Either way every process finds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its
environment, and init() joins the default process group: gloo for the CPU, nccl for CUDA, where
the process of local rank r uses cuda:r. The group has a timeout: a collective that waits longer
(a peer that hangs) raises instead of blocking forever, and a peer that dies breaks the
connections at once. launch() watches its processes and stops the others when one fails.

What is exact. Step k of every rank works on global batch k of the one-process run: every rank
draws the same seeded order of the epoch and takes a contiguous slice of the global batch
(shard(); sizes differ by at most one, so the last batch of an epoch may split unevenly). The
model reduces every batch mean of its loss over the group (Autoencoder.set_process_group), with
gradients scaled so that each rank holds R times the gradient of the global loss with respect to
its own samples; DDP's average over the R ranks then leaves exactly the gradient of one process
on the whole batch, and every rank takes the same optimizer step as that process would (up to
the rounding of sums taken in another order).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import multiprocessing.connection
import os
import re
import signal
import socket
import sys
import threading
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistContext",
    "LaunchError",
    "LossModule",
    "check_shards",
    "collective_failure",
    "init",
    "launch",
    "launched",
    "shard",
    "shutdown",
    "world_size_from_env",
    "wrap",
]

# Seconds a collective may wait for the other ranks before it raises. Rank 0 alone writes the
# checkpoint after each epoch while the others wait at the first collective of the next one, so
# this must exceed the time of that write (well under a second for the models of the README).
DEFAULT_TIMEOUT = 60.0

# Seconds launch() gives a process to end after SIGTERM before it sends SIGKILL.
_GRACE = 3.0

# prctl(2) option: the signal a process gets when its parent ends.
_PR_SET_PDEATHSIG = 1

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """A process of launch() failed; the message says which and how, in one line."""


@dataclass(frozen=True)
class DistContext:
    """The place of this process in the run."""

    rank: int
    """This process's rank, 0 .. world_size - 1."""

    world_size: int
    """R, the number of processes."""

    local_rank: int
    """The rank on this machine (picks the GPU)."""

    device: torch.device
    """Where this process trains: cpu, or cuda:local_rank."""

    group: object
    """The torch.distributed process group of the run (the default group)."""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and plots, and shows the progress bar."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process is one of several started by torchrun or launch()."""
    return all(name in os.environ for name in _ENV)


def world_size_from_env() -> int:
    return int(os.environ["WORLD_SIZE"])


def init(device: str, timeout: float = DEFAULT_TIMEOUT) -> DistContext:
    """Join the default process group from the environment that torchrun or launch() set.

    Args:
        device: "cpu" (gloo) or "cuda" (nccl; this process uses cuda:LOCAL_RANK).
        timeout: seconds a collective may wait for the other ranks before it raises.
    """
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    kind = torch.device(device)
    if kind.type == "cuda":
        if kind.index is not None and world > 1:
            raise ValueError(
                f"got {device!r} for {world} processes, expected 'cuda' (the process of local "
                "rank r uses cuda:r)"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"got 'cuda' for the process of local rank {local_rank}, expected at most "
                f"{count} processes per machine (one per CUDA device)"
            )
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
        backend = "nccl"
    elif kind.type == "cpu":
        where, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"got {device!r}, expected cpu or cuda for several processes")
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    return DistContext(rank, world, local_rank, where, dist.group.WORLD)


def shutdown(context: DistContext | None) -> None:
    """Leave the process group joined by init()."""
    if context is not None and dist.is_initialized():
        dist.destroy_process_group()


def shard(count: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous slice of a global batch of ``count`` samples.

    The first count % world ranks take one sample more than the others.
    """
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def check_shards(count: int, batch_size: int, world: int, name: str = "batch_size") -> None:
    """Every rank needs at least one sample of every global batch (the encoder statistics are
    undefined on an empty batch): refuse a batch size whose batches, the last one of the epoch
    included, would leave a rank without one."""
    if world <= 1:
        return
    sizes = {min(batch_size, count), count % batch_size or batch_size}
    smallest = min(sizes)
    if smallest < world:
        raise ValueError(
            f"{name}: got {batch_size} for {count} training samples, which makes a batch of "
            f"{smallest}, expected every batch to hold at least one sample for each of the "
            f"{world} processes; choose another batch size"
        )


def collective_failure(error: BaseException) -> str | None:
    """When error is a failed collective (a peer that died or timed out), one line saying what
    happened; None for any other error.

    gloo reports both as a RuntimeError whose message starts with the gloo source location, nccl
    as a torch.distributed.DistError.
    """
    text = str(error).strip()
    if not isinstance(error, dist.DistError) and not (
        isinstance(error, RuntimeError) and ("gloo" in text or "NCCL" in text)
    ):
        return None
    line = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "")
    line = line.split(". ")[0].rstrip(".")
    return line or type(error).__name__


class LossModule(torch.nn.Module):
    """``model.loss`` as a forward. DistributedDataParallel averages the gradients of what its
    own forward computed, so the loss is computed through it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, corrupted=None):
        return self.model.loss(x, corrupted=corrupted)


def wrap(model: torch.nn.Module, context: DistContext | None) -> torch.nn.Module:
    """The module whose forward(x, corrupted) is the loss of a step: LossModule(model), under
    DistributedDataParallel when there are several processes."""
    module = LossModule(model)
    if context is None:
        return module
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, process_group=context.group)


# -- the launcher of `fastae train --nproc N` ----------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _end_with_parent() -> None:
    """On Linux, have the kernel send this process SIGTERM when the launcher dies (SIGKILL, or a
    SIGINT it does not get), so that no orphan goes on training and writing the run folder."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _process_main(index: int, world: int, port: int, target, args) -> None:
    """The body of each started process: the environment torchrun would set, then target."""
    _end_with_parent()
    # tqdm's default lock is a multiprocessing semaphore, registered with the launcher's resource
    # tracker; a process killed by a signal cannot unregister it, and the tracker would print a
    # "leaked semaphore" warning after the launcher's error message. These processes share no
    # progress bar, so a thread lock does.
    tqdm.set_lock(threading.RLock())
    os.environ.update(
        RANK=str(index),
        LOCAL_RANK=str(index),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        code = target(args)
    except Exception:
        # The launcher reports which process failed; the traceback says why.
        traceback.print_exc()
        code = 1
    raise SystemExit(code)


def _first_failure(processes) -> tuple[int, int] | None:
    """Wait until every process has ended or one has failed: (rank, exit code) of the first
    failure seen, or None when all ended with status 0.

    When several failures are seen at once, one killed by a signal is the likelier cause (the
    others then lose their peer and exit with status 1), so it is the one named.
    """
    pending = dict(enumerate(processes))
    while pending:
        ready = multiprocessing.connection.wait([p.sentinel for p in pending.values()])
        failures = []
        for rank, process in sorted(pending.items()):
            if process.sentinel not in ready:
                continue
            process.join()
            del pending[rank]
            if process.exitcode != 0:
                failures.append((process.exitcode > 0, rank, process.exitcode))
        if failures:
            _, rank, code = min(failures)
            return rank, code
    return None


def _stop(processes, wait_first: bool = False) -> None:
    """SIGTERM every living process, then SIGKILL those still there after a grace period.

    wait_first: give them a grace period to end on their own first (after a Ctrl-C, which they
    got too, and after which rank 0 says how to resume).
    """
    if wait_first:
        for process in processes:
            process.join(_GRACE)
    for process in processes:
        if process.is_alive():
            process.terminate()
            # A stopped process (SIGSTOP, a debugger) acts on SIGTERM once it is continued.
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
    for process in processes:
        process.join(_GRACE)
        if process.is_alive():
            process.kill()
            process.join()


def _describe(rank: int, world: int, code: int) -> str:
    if code < 0:
        try:
            how = f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with status {code}"
    return f"process {rank} of {world} {how}; stopped the other processes"


def launch(nproc: int, target, args) -> None:
    """Run target(args) in ``nproc`` new processes on this machine, as ranks 0 .. nproc - 1.

    Each process starts fresh (the "spawn" method) with the environment of torchrun, rendezvous
    on 127.0.0.1 at a free port. When one process fails (non-zero status, or a signal) the others
    are stopped and LaunchError says which failed and how.

    Args:
        nproc: the number of processes R.
        target: a module-level function (it is pickled by name) returning an exit status.
        args: its argument (picklable).
    """

    def _terminated(signum, frame):
        raise LaunchError(f"got {signal.Signals(signum).name}; stopped the processes")

    # SIGTERM to the launcher ends its processes too (only the main thread may set handlers).
    handles_term = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if handles_term else None
    try:
        context = mp.start_processes(
            _process_main,
            args=(nproc, _free_port(), target, args),
            nprocs=nproc,
            join=False,
            start_method="spawn",
        )
        processes = context.processes
        try:
            failure = _first_failure(processes)
        except KeyboardInterrupt:
            _stop(processes, wait_first=True)
            raise
        except BaseException:
            _stop(processes)
            raise
    finally:
        if handles_term:
            signal.signal(signal.SIGTERM, previous)
    if failure is not None:
        _stop(processes)
        rank, code = failure
        raise LaunchError(_describe(rank, nproc, code))
