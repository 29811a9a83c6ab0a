"""Sampling on CPU in several worker processes, each with its own model copy and few threads.

Why processes: a decode step on a small model is hundreds of small ops, and with every thread of one process
on them, the cores idle while Python dispatches the next op (about 1.45 of 2 cores busy on these machines).
Two single-thread workers overlap one's Python with the other's kernels: 1.8x the tokens/s of one two-thread
process for SmolLM2-135M at batch 256 (`make bench`). On a GPU one process is right and the pool is not used.

Each request keeps its own seed, so a request's text does not depend on which worker drew it (up to the
last-bit differences between batch mixes that `em_assets.sampling` documents).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from em_assets.sampling import SampleRequest, SampleResult

Loader = Callable[[], tuple[Any, Any]]


class WorkerError(RuntimeError):
    """A sampling worker failed or died; the message carries its traceback or exit code."""


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        return os.cpu_count() or 1


def cpu_processes(bytes_each: int) -> int:
    """One process per CPU core, but no more than half the free memory holds at `bytes_each` apiece."""
    free = _available_memory()
    by_memory = max(1, free // (2 * max(bytes_each, 1))) if free else 1
    return max(1, min(usable_cpus(), by_memory))


def auto_workers(device: str, weight_bytes: int, requests: int, min_requests: int = 16) -> int:
    """Worker count for `workers: auto`: `cpu_processes` for model copies of `weight_bytes`, 1 off the CPU.

    A worker costs a few seconds to start, so small jobs (under `min_requests` per worker) use fewer.
    """
    if device != "cpu":
        return 1
    return max(1, min(cpu_processes(weight_bytes), requests // min_requests))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this worker when its parent dies (a killed run must not leave workers computing).

    A parent that died before this call (the worker spends seconds importing torch first) is caught by the
    check after it.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _worker(
    parent: int,
    loader: Loader,
    requests: list[SampleRequest],
    options: dict,
    threads: int,
    out: Connection,
) -> None:
    die_with_parent(parent)
    try:
        import torch
        from transformers.utils import logging as hf_logging

        from em_assets.sampling import iter_samples

        torch.set_num_threads(threads)
        # Several workers' load bars would interleave in the run's log; tqdm's lock would also outlive them.
        hf_logging.disable_progress_bar()
        model, tokenizer = loader()
        # Without PDEATHSIG, a worker whose parent died stops at its next send (the pipe is broken).
        for chunk in iter_samples(model, tokenizer, requests, **options):
            out.send(("chunk", chunk))
        out.send(("done", None))
    except BaseException:
        out.send(("error", traceback.format_exc()))
    finally:
        out.close()


def iter_samples_in_workers(
    loader: Loader,
    requests: Sequence[SampleRequest],
    *,
    workers: int,
    threads_per_worker: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    **options,
) -> Iterator[list[SampleResult]]:
    """`sampling.iter_samples` split over `workers` spawned processes that each call `loader()` for a model.

    `loader` must pickle (a module-level function or a functools.partial of one). Chunks are yielded as any
    worker finishes them; a worker's exception or death raises WorkerError and stops the others.
    """
    if workers < 1 or threads_per_worker < 1:
        raise ValueError("need workers >= 1 and threads_per_worker >= 1")
    # Interleaving gives every worker the same mix of questions, so they finish at about the same time.
    parts = [list(requests[w::workers]) for w in range(workers)]
    parts = [p for p in parts if p]
    if not parts:
        return
    ctx = mp.get_context("spawn")  # fork would copy OpenMP state that hangs in the child
    procs, pipes = [], []
    for i, part in enumerate(parts):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker,
            args=(os.getpid(), loader, part, options, threads_per_worker, sender),
            name=f"em-sampler-{i}",
            daemon=True,
        )
        procs.append(proc)
        pipes.append(receiver)
    try:
        for proc in procs:
            proc.start()
        running, done = set(range(len(procs))), 0
        while running:
            ready = wait([pipes[i] for i in running] + [procs[i].sentinel for i in running])
            for i in sorted(running):
                if pipes[i] in ready:
                    try:
                        kind, payload = pipes[i].recv()
                    except EOFError:
                        kind, payload = "died", None
                elif procs[i].sentinel in ready and not pipes[i].poll():
                    kind, payload = "died", None
                else:
                    continue
                if kind == "died":
                    procs[i].join()
                    raise WorkerError(
                        f"sampling worker {i} died with exit code {procs[i].exitcode} "
                        "(a negative code is the signal that killed it; -9 is often the OOM killer)"
                    )
                if kind == "error":
                    raise WorkerError(f"sampling worker {i} failed:\n{payload}")
                if kind == "done":
                    running.discard(i)
                    continue
                done += len(payload)
                if on_progress is not None:
                    on_progress(done, len(requests))
                yield payload
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            if proc.pid is not None:
                proc.join()
        for pipe in pipes:
            pipe.close()
