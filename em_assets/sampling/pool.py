"""Sampling on CPU in several worker processes, each with its own model copy and few threads.

Why processes: a decode step on a small model is hundreds of small ops, and with every thread of one process
on them, the cores idle while Python dispatches the next op (about 1.45 of 2 cores busy on these machines).
Two single-thread workers overlap one's Python with the other's kernels. That pays where the kernels are fast
(CPUs with AMX) and need not where they are slow (an AVX-512 CPU without AMX was slower with two), so `workers:
auto` is settled by timing both (`em_assets.sampling.calibrate`). On a GPU one process is right and the pool is
not used.

Each request keeps its own seed, so a request's text does not depend on which worker drew it, up to the
differences between batch mixes that `em_assets.sampling.engine` documents (most texts, in bf16).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

from em_assets.models.processes import (
    Died,
    child,
    child_messages,
    cpu_processes,
    die_with_parent,
    load_in_worker,
    reap,
    start_children,
    threads_each,
)
from em_assets.sampling.engine import SampleRequest, SampleResult

Loader = Callable[[], tuple[Any, Any]]


class WorkerError(RuntimeError):
    """A sampling worker failed or died; the message carries its traceback or exit code."""


def auto_workers(device: str, weight_bytes: int, requests: int, min_requests: int = 16) -> int:
    """The most workers `workers: auto` tries (`em_assets.sampling.calibrate` times which count up to it is
    fastest): `cpu_processes` for model copies of `weight_bytes`, 1 off the CPU."""
    if device != "cpu":
        return 1
    # A worker costs a few seconds to start, so small jobs (under `min_requests` per worker) use fewer.
    return max(1, min(cpu_processes(weight_bytes), requests // min_requests))


def _worker(
    parent: int,
    loader: Loader,
    threads: int,
    requests: list[SampleRequest],
    options: dict,
    out: Connection,
) -> None:
    die_with_parent(parent)
    try:
        from em_assets.sampling.engine import iter_samples

        model, tokenizer = load_in_worker(loader, threads)
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
    threads_per_worker: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    **options,
) -> Iterator[list[SampleResult]]:
    """`sampling.iter_samples` split over `workers` spawned processes that each call the picklable `loader()` for
    a model, yielding chunks as any worker finishes them; a worker's exception or death stops the others and raises
    WorkerError."""
    if workers < 1 or (threads_per_worker is not None and threads_per_worker < 1):
        raise ValueError("need workers >= 1 and threads_per_worker >= 1")
    # Workers share the cores unless `threads_per_worker` says otherwise.
    threads = threads_each(workers) if threads_per_worker is None else threads_per_worker
    # Interleaving gives every worker the same mix of questions, so they finish at about the same time.
    parts = [list(requests[w::workers]) for w in range(workers)]
    children = [
        child(_worker, (loader, threads), f"em-sampler-{i}", (part, options))
        for i, part in enumerate(p for p in parts if p)
    ]
    procs, pipes = [c.proc for c in children], [c.pipe for c in children]
    try:
        start_children(children)
        running, done = set(range(len(procs))), 0
        for i, message in child_messages(procs, pipes, running):
            if isinstance(message, Died):
                raise WorkerError(
                    f"sampling worker {i} died with exit code {message.exitcode} "
                    "(a negative code is the signal that killed it; -9 is often the OOM killer)"
                )
            kind, payload = message
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
        reap(procs)
        for pipe in pipes:
            pipe.close()
