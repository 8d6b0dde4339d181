"""core/distributed.py: outside torchrun every collective is the identity (one code path for the
loop); a torchrun process's place read from its environment; the --device check; and the SIGTERM
guard of the process that writes: the first SIGTERM an error, later ones ignored, the old handler
put back."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from inrank_convert.core.distributed import (
    SigtermGuard,
    World,
    any_true,
    barrier,
    broadcast_object,
    check_device,
    env_world,
    gather_objects,
    mean,
    process_device,
)
from inrank_convert.core.errors import DistributedError, UsageError, cli_flags


def test_one_process_is_the_whole_world_and_every_collective_is_the_identity():
    world = World()
    assert (world.rank, world.size, world.local_rank, world.enabled, world.is_main) == (0, 1, 0, False, True)
    value = torch.tensor([1.5, -2.0])
    assert mean(value, world) is value
    assert broadcast_object({"step": 3}, world) == {"step": 3}
    assert any_true(True, world, torch.device("cpu")) is True and any_true(False, world, torch.device("cpu")) is False
    assert gather_objects("mine", world) == ["mine"]
    barrier(world)  # no process group: returns at once


def test_a_torchrun_process_reads_its_place_from_the_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert env_world() == World()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert env_world() == World()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = env_world()
    assert world == World(3, 4, 1) and world.enabled and not world.is_main


def test_each_process_gets_its_local_gpu():
    assert process_device("cpu", World(1, 2, 1)) == torch.device("cpu")
    assert process_device("cuda", World(3, 4, 1)) == torch.device("cuda", 1)
    assert process_device("cuda:0", World(3, 4, 1)) == torch.device("cuda", 0)  # a named GPU is kept
    assert process_device("cuda", World()) == torch.device("cuda")


def test_the_device_check():
    check_device("cpu")
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        check_device("tpu")
    if torch.cuda.is_available():
        check_device("cuda")
        check_device("cuda:0")
    else:
        with cli_flags({"--device"}), pytest.raises(UsageError, match=r"CUDA is not available.*--device cpu"):
            check_device("cuda")


def test_the_first_sigterm_is_an_error_and_a_later_one_is_ignored():
    previous = signal.getsignal(signal.SIGTERM)
    guard = SigtermGuard()
    guard.install()
    try:
        assert signal.getsignal(signal.SIGTERM) == guard._stop
        with pytest.raises(DistributedError, match="stopped by SIGTERM") as caught:
            os.kill(os.getpid(), signal.SIGTERM)
        assert guard.failing and "nothing was written" in str(caught.value)
        os.kill(os.getpid(), signal.SIGTERM)  # the error is in flight: no second one
        assert guard.failing
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGTERM) == previous
