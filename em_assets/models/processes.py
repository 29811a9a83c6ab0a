"""Child processes for CPU work: how many the machine takes, and spawning, tying and reaping them.

Shared by the sampling workers (`em_assets.sampling.pool`) and the training helpers
(`em_assets.training.data_parallel`).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        return os.cpu_count() or 1


def cpu_processes(bytes_each: int) -> int:
    """One process per CPU core, but no more than half the free memory holds at `bytes_each` apiece."""
    free = available_memory()
    by_memory = max(1, free // (2 * max(bytes_each, 1))) if free else 1
    return max(1, min(usable_cpus(), by_memory))


def threads_each(processes: int) -> int:
    """Intra-op threads for each of `processes` that share this machine's cores."""
    return max(1, usable_cpus() // processes)


def available_memory() -> int | None:
    """Bytes of memory the kernel counts available (MemAvailable); None where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class Child:
    """A spawned process, not yet started, and the parent's end of its two-way pipe."""

    proc: BaseProcess
    pipe: Connection
    child_end: Connection
    data: tuple


def start_children(children: Sequence[Child]) -> None:
    """Start the processes, then send each its data (the later ones start up while the first read theirs). A
    child that dies first (a script that trains or samples without an `if __name__ == "__main__":` guard runs
    itself again in the child, which then fails to spawn) shows as Died in child_messages."""
    for c in children:
        c.proc.start()
        c.child_end.close()
    # Python's spawn writes the process object to the child through a pipe whose read end it holds until the
    # write ends: large arguments there block for ever on a child that died before reading them. A socket
    # whose other end only the child holds fails at once instead.
    for c in children:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            c.pipe.send(c.data)


def _receive_then_run(parent: int, target: Callable, args: tuple, pipe: Connection) -> None:
    target(parent, *args, *pipe.recv(), pipe)


def child(target: Callable, args: tuple, name: str, data: tuple = ()) -> Child:
    """A daemon process that will run target(parent pid, *args, *data, its end of the pipe): `args` go with the
    spawn (objects shared by inheritance, e.g. a Barrier), `data` down the pipe once it starts (any size)."""
    ctx = mp.get_context("spawn")  # fork would copy OpenMP state that hangs in the child
    parent_end, child_end = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=_receive_then_run, args=(os.getpid(), target, args, child_end), name=name, daemon=True
    )
    return Child(proc, parent_end, child_end, data)


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this child when its parent dies (a killed run must not leave children computing)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    # A parent that died before this call (the child spends seconds importing torch first) is caught here.
    if os.getppid() != parent:
        os._exit(1)


def load_in_worker(loader: Callable[[], Any], threads: int) -> Any:
    """A worker process's model, loaded with its share of threads and without a load bar (several workers' bars
    would interleave in the run's log, and tqdm's lock would outlive them)."""
    # torch is imported here, in the worker: this module is loaded by torch-free parents too.
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    return loader()


@dataclass(frozen=True)
class Died:
    """What a child "sent" when it ended without sending anything more."""

    exitcode: int | None


def child_messages(
    procs: Sequence[BaseProcess], pipes: Sequence[Connection], listening: set[int]
) -> Iterator[tuple[int, Any]]:
    """(child index, message) as the children in `listening` send them, and Died once for one that ends.

    The caller discards an index from `listening` when it expects nothing more from that child.
    """
    while listening:
        ready = wait([pipes[i] for i in listening] + [procs[i].sentinel for i in listening])
        for i in sorted(listening):
            if pipes[i] in ready or procs[i].sentinel in ready:
                try:
                    message = pipes[i].recv()
                # A reset: the child ended with data of ours unread (it died before reading it).
                except (EOFError, ConnectionResetError):
                    procs[i].join()
                    message = Died(procs[i].exitcode)
                yield i, message


def reap(procs: Iterable[BaseProcess]) -> None:
    """Kill the children still running and wait for every started one."""
    for proc in procs:
        if proc.pid is not None:
            proc.kill()
            proc.join()
