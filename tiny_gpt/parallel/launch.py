"""Starting the processes of a data-parallel run.

Two ways in, one body:
  * ``torchrun --nproc_per_node=2 script.py``: torchrun starts the processes and puts RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each one's environment; the script calls
    ``process_group_from_env()`` and runs its body once per process.
  * ``python script.py``: the script calls ``run_like_torchrun(script, 2, argv)``, which does
    what torchrun does -- picks a free port, starts the script 2 more times with those
    variables set, waits -- so the same body runs.
And from code (tests): ``spawn(fn, 2, ...)`` starts 2 processes with torch.multiprocessing
(the "spawn" start method: fresh interpreters, nothing inherited by fork), joins each to the
group, runs fn(rank, world, ...) and hands back what each returned; fn must be importable.
Every way, each process ends up in the same place: torch.distributed initialized, with its
own rank. The backend is gloo on CPU and nccl on CUDA (torch.distributed's own engines).
"""
import gc
import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..util.checks import is_whole_number

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def backend_for(device) -> str:
    """gloo for CPU tensors, nccl for CUDA ones."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(requested, local_rank: int, world: int) -> torch.device:
    """This rank's device: cuda:local_rank (for nccl) when there is a GPU for each of the
    `world` ranks and the `requested` device is not the CPU; else the CPU (for gloo)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if str(requested) != "cpu" and gpus >= world:
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    """Is this process one of torchrun's (its variables are all set)?"""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


@contextmanager
def process_group_from_env(backend="gloo"):
    """Join the group described by torchrun's environment variables; leave it on exit."""
    dist.init_process_group(backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        leave_group()


def gather_over_ranks(fn, world: int, device="cpu"):
    """In a process that torchrun (or run_like_torchrun) started: join the group (gloo, or
    nccl for a CUDA `device`, made this process's current device), run fn(rank), and return
    (rank, [what each rank's fn returned]) on every rank, after leaving the group. A group of
    another size than `world` is refused before fn runs (a wrong --nproc_per_node)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with process_group_from_env(backend_for(device)) as (rank, size):
        if size != world:
            raise SystemExit(f"this script runs on {world} processes (--nproc_per_node={world}),"
                             f" got {size}")
        results = [None] * size
        dist.all_gather_object(results, fn(rank))
    return rank, results


def free_port() -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_like_torchrun(script, world_size: int, argv=()) -> int:
    """Start `script` world_size times with torchrun's variables set (RANK, WORLD_SIZE, ...;
    rank 0's output shown, the others' too); wait for all. If one fails, the others are
    stopped rather than left waiting for it, and so they are if this process is interrupted.
    Returns the first failure's exit status (0 when all succeed)."""
    check_world_size(world_size)
    common = {"WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), *argv],
                              env={**os.environ, **common, "RANK": str(rank),
                                   "LOCAL_RANK": str(rank)})
             for rank in range(world_size)]
    try:
        return _wait_for_all(procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()


def _wait_for_all(procs) -> int:
    codes, first_failure = [None] * len(procs), 0
    while None in codes:
        for rank, proc in enumerate(procs):
            if codes[rank] is None:
                try:
                    codes[rank] = proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                if codes[rank] and not first_failure:
                    first_failure = codes[rank]
                    for other in procs:
                        if other.poll() is None:
                            other.terminate()
    return first_failure


def check_world_size(world_size):
    if not is_whole_number(world_size, 1):
        raise ValueError(f"world_size must be a whole number >= 1, got {world_size!r}")


def spawn(fn, world_size: int, *args, backend="gloo"):
    """Run fn(rank, world_size, *args) in world_size fresh processes joined in one group.
    Returns the list of what each rank returned (tensors come back as numpy arrays). fn must
    be importable by name (defined at a module's top level): spawned interpreters import it.
    The results are read while the ranks run: a rank blocks on a full pipe until they are."""
    check_world_size(world_size)
    port = free_port()
    queue = mp.get_context("spawn").SimpleQueue()
    context = mp.spawn(_run_rank, args=(fn, world_size, port, backend, args, queue),
                       nprocs=world_size, join=False)
    results = {}
    while True:
        while not queue.empty():
            rank, value = queue.get()
            results[rank] = value
        if context.join(timeout=0.1):  # every rank exited (an error in one is raised here)
            break
    while not queue.empty():
        rank, value = queue.get()
        results[rank] = value
    return [results[rank] for rank in range(world_size)]


def _run_rank(rank, fn, world_size, port, backend, args, queue):
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        queue.put((rank, _plain(fn(rank, world_size, *args))))
    finally:
        leave_group()


def leave_group():
    """Destroy the process group, after collecting the garbage so that no DDP wrapper
    outlives its group (without the collection, 1 of 4 runs of the tests aborted at exit)."""
    gc.collect()
    dist.destroy_process_group()


def _plain(value):
    """Tensors -> numpy arrays, inside dicts, lists and tuples: a tensor sent between processes
    would share memory with a process that is about to exit."""
    if isinstance(value, torch.Tensor):
        return np.array(value.detach().cpu())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value
