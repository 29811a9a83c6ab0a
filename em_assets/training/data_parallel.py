"""Data-parallel LoRA training on CPU: helper processes compute a share of every optimizer step's gradients.

Why: as with sampling (`em_assets.sampling.pool`), one process can keep two cores only partly busy on a small
model's training step; whether two single-thread processes do more depends on the CPU, so `workers: auto`
times it on the run (`em_assets.training.loop`). The training loop stays in
the calling process (rank 0: optimizer, checkpoints, callbacks, divergence checks); helpers hold no state of
their own. Each step rank 0 broadcasts the step number and the adapter weights, every rank backpropagates its
share of the step's examples, and one gloo all-reduce sums the gradients, losses and token counts.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from em_assets.models.processes import Died, child, child_messages, die_with_parent, reap, start_children

# A helper that dies mid-collective makes its peers fail at once, and one that died between steps is found
# before the next (Helpers.ensure_alive): this only bounds a silent hang.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


STOP = -1


class HelperError(RuntimeError):
    """A training helper process failed; its traceback is in the step's stderr."""


def share(batches: list[list[Any]], rank: int, world: int) -> list[list[Any]]:
    """Rank's part of one step's micro-batches: whole micro-batches when they divide evenly, else rows of each."""
    if len(batches) % world == 0:
        return batches[rank::world]
    return [part for batch in batches if (part := batch[rank::world])]


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed a rank's dropout for one step, so a resumed run draws what an uninterrupted one drew on every rank."""
    torch.manual_seed(hash((seed, step, rank)) & (2**63 - 1))


def _store(port: int, world: int) -> dist.TCPStore:
    """The rendezvous: rank 0 serves it on a free loopback port (port 0) and the helpers join it. It lives in
    rank 0's memory rather than in a file, so a run killed outright leaves nothing on disk."""
    return dist.TCPStore(
        "127.0.0.1", port, world, is_master=port == 0, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT
    )


def _group(store: dist.Store, rank: int, world: int) -> dist.ProcessGroup:
    # A process group object of our own, not torch.distributed's global one: the caller's process (a Dagster
    # step, a test) may train again or hold another group.
    options = dist.ProcessGroupGloo._Options()
    options._timeout = COLLECTIVE_TIMEOUT
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(store, rank, world, options)


class GradientGroup:
    """One rank's view of the group: step broadcast, weight broadcast and the gradient all-reduce."""

    def __init__(self, group: dist.ProcessGroup, params: Sequence[torch.Tensor]):
        self.group, self.params = group, list(params)
        self._flat = torch.empty(1 + sum(p.numel() for p in self.params), dtype=torch.float32)

    def broadcast_step(self, step: int = STOP) -> int:
        """Rank 0 sends `step` (STOP ends the helpers) with its weights; every rank gets both and returns step."""
        if self.group.rank() == 0:
            self._flat[0] = step
            torch.cat([p.detach().flatten().float() for p in self.params], out=self._flat[1:])
        self.group.broadcast([self._flat], dist.BroadcastOptions()).wait()
        step = int(self._flat[0])
        if self.group.rank() != 0 and step != STOP:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self._split(self._flat[1:]))
        return step

    def sum_gradients(self, loss_sum: float, tokens: int) -> tuple[float, int]:
        """Every rank's gradients summed into each rank's .grad; returns the summed loss and tokens."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat(
            [torch.tensor([loss_sum, tokens], dtype=torch.float64)] + [g.double().flatten() for g in grads]
        )
        self.group.allreduce([flat]).wait()
        for p, g in zip(self.params, self._split(flat[2:]), strict=True):
            p.grad = g.to(p.dtype)
        return float(flat[0]), int(flat[1])

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        sizes = [p.numel() for p in self.params]
        return [part.view_as(p) for part, p in zip(flat.split(sizes), self.params, strict=True)]


@dataclass
class Helpers:
    """The spawned helper ranks 1..world-1 and rank 0's GradientGroup."""

    procs: list[Any]
    group: GradientGroup
    store: dist.TCPStore

    @classmethod
    def start(cls, world: int, params: Sequence[torch.Tensor], job: dict) -> Helpers:
        """Spawn world - 1 helpers for `job` (what `_helper` needs to rebuild the model and the step plan).

        Returns once every helper has its model; one that fails first raises HelperError with its traceback.
        """
        store = _store(0, world)
        children = [
            child(_helper, (rank, world, store.port), f"em-train-{rank}", (job,)) for rank in range(1, world)
        ]
        procs, pipes = [c.proc for c in children], [c.pipe for c in children]
        try:
            start_children(children)
            # Wait for every model before the rendezvous: gloo would wait out its whole timeout for a dead peer.
            waiting = set(range(len(procs)))
            for i, message in child_messages(procs, pipes, waiting):
                if isinstance(message, Died):
                    message = f"exited with code {message.exitcode} while starting"
                if message:
                    raise HelperError(f"training helper {procs[i].name} failed: {message}")
                waiting.discard(i)
            group = GradientGroup(_group(store, 0, world), params)
        except BaseException as exc:
            reap(procs)
            if isinstance(exc, HelperError):
                raise
            raise HelperError(f"training helpers did not join: {exc}") from exc
        finally:
            for pipe in pipes:
                pipe.close()
        return cls(procs, group, store)

    def check(self, exc: BaseException) -> BaseException:
        """The error to raise when a collective failed: a dead helper's exit code where that is the cause."""
        return self._died() or exc

    def ensure_alive(self) -> None:
        """Before a step's collectives: a helper that died since the last one fails the run now. Gloo's sender
        may not notice a peer that died between collectives and would wait out COLLECTIVE_TIMEOUT."""
        died = self._died()
        if died is not None:
            raise died

    def _died(self) -> HelperError | None:
        dead = [(p.name, p.exitcode) for p in self.procs if p.exitcode not in (None, 0)]
        return (
            HelperError(f"training helper(s) died: {dead} (their tracebacks are in stderr)") if dead else None
        )

    def finish(self) -> None:
        """End the helpers after the last step: STOP (not sent once one has died: gloo could wait on it), then
        stop."""
        if self._died() is None:
            self.group.broadcast_step(STOP)
        self.stop()

    def stop(self) -> None:
        """Wait for the helpers to leave (on STOP); killed if they have not within 10 s."""
        for p in self.procs:
            p.join(timeout=10)
        self.kill()

    def kill(self) -> None:
        reap(self.procs)


def _helper(parent: int, rank: int, world: int, port: int, job: dict, ready: Connection) -> None:
    die_with_parent(parent)
    try:
        torch.set_num_threads(job["threads"])
        from em_assets.training.step import accumulate_gradients, build_model, step_labels

        model, params = build_model(**job["model"])
    except BaseException:
        ready.send(traceback.format_exc())
        raise
    ready.send("")
    ready.close()
    group = GradientGroup(_group(_store(port, world), rank, world), params)
    encoded, steps = job["encoded"], job["steps"]
    while (step := group.broadcast_step()) != STOP:
        batches = [[encoded[i] for i in micro] for micro in steps[step - 1]]
        for p in params:
            p.grad = None
        seed_step(job["seed"], step, rank)
        # No divergence check here: a NaN share reaches rank 0 through the sum, which names the step.
        loss_sum, tokens = accumulate_gradients(
            model, step, share(batches, rank, world), job["pad_id"], step_labels(batches), check=False
        )
        group.sum_gradients(loss_sum, tokens)
