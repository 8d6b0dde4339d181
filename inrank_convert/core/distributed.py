"""Devices and processes: the --device check every command makes, and under ``torchrun`` the
process group setup, the few collectives training needs, and the SIGTERM guard of a process
that writes for the whole job.

Outside torchrun (no WORLD_SIZE, or 1) everything here is a no-op, so the training loop has one
code path. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from inrank_convert.core.errors import DistributedError, UsageError, flag


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> World:
    """This process's place in a torchrun job, from the environment torchrun sets (no process
    group joined: for decisions that must come before ``init_world``)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_world(device: str) -> World:
    """Join the torchrun process group when launched by torchrun: NCCL when ``device`` is CUDA,
    else gloo."""
    world = env_world()
    if not world.enabled:
        return world
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend)
    return world


def close_world(world: World) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


def check_device(device: str) -> None:
    """A device name this machine can run on: cpu, or cuda[:N] where CUDA is available."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("CUDA is not available on this machine", f"{flag('--device')} {device}", f"use {flag('--device')} cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UsageError(f"unknown device {device!r}", flag("--device"), "use cpu or cuda (cuda:N)")


def process_device(device: str, world: World) -> torch.device:
    """Each process's device: under torchrun, ``cuda`` means this process's local GPU."""
    if world.enabled and device == "cuda":
        return torch.device("cuda", world.local_rank)
    return torch.device(device)


def broadcast_object(value, world: World):
    """``value`` as rank 0 has it, in every process (rank 0 decides, everyone follows)."""
    if not world.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    if not world.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world.size


def any_true(flag: bool, world: World, device: torch.device) -> bool:
    """True in every process if it is true in any (e.g. one process got Ctrl-C)."""
    if not world.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_objects(value, world: World) -> list:
    """Every process's ``value``, in rank order (on every process)."""
    if not world.enabled:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()


class SigtermGuard:
    """torchrun stops the other processes with SIGTERM when one fails: in the process that writes
    (rank 0) the first one becomes an error, so that its temporary output is removed and the reason
    said; once that process is stopping on an error (``failing``) it is ignored, so that the error
    in flight is the one printed and its clean-up is not cut short."""

    def __init__(self):
        self.failing = False
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._stop)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _stop(self, signum, frame) -> None:
        if self.failing:
            return
        self.failing = True
        raise DistributedError("stopped by SIGTERM: another process of the torchrun job failed, or the job was "
                               "cancelled", "rank 0", "nothing was written; torchrun's report says which process "
                               "stopped first")
