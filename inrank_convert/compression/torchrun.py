"""compress under torchrun: the plan's tensors shared out over the processes, one artifact written
by rank 0, byte for byte the one a single process writes.

    torchrun --nproc_per_node N -m inrank_convert compress CKPT -o OUT ...

Every process opens the inputs and makes the plan (shapes only: cheap); they check that their
plans agree. The tensors to factorize are dealt out largest first, each to the process with the
least estimated SVD work so far (``torchrun_schedule.share_out``); the tensors kept whole are rank 0's (a copy, no
compute). Each process factorizes its share in plan order into a ``RecordingWriter`` (what would
be stored, not written) and sends each tensor's stored form to rank 0 as soon as it is done,
without waiting for rank 0 to take it (``isend``). Rank 0 factorizes its own share in a thread
while its main thread walks the plan in order, takes each tensor from that thread or receives it
from the process that owns it, and writes it at once. So the file is written in plan order as
the work completes: only tensors done ahead of their turn wait, in memory, and those are
factors (a tensor stored whole travels as its name: rank 0 re-reads it from its own source).

Why the file is the same as one process's: a tensor's factors depend only on the tensor, the
options and its plan index (its random generator is seeded with seed + index), never on which
process computes it or when, and rank 0 writes in the single-process order. What can differ is
the number of BLAS threads, which changes an SVD's last bits: torchrun runs each process with
OMP_NUM_THREADS=1, so a single process run with OMP_NUM_THREADS=1 writes the same bytes.

Results travel over gloo, also for CUDA processes: they are on the CPU to be written anyway, and
no collective here needs NCCL. The message format is pickle, as torch's own ``*_object``
collectives use, between the processes of one job only (never read from a file).

Errors print one line, from rank 0: a process whose setup or tensor fails hands the error to
rank 0 (in place of that tensor), rank 0 raises it when it gets there, and the other processes
exit without a word once rank 0 is gone (they wait for it, so that torchrun, which stops every
process when one exits with an error, does not stop rank 0 before it has printed). A killed
process: rank 0 loses its connection, or torchrun stops rank 0 with SIGTERM; either way rank 0
removes its temporary folder and no artifact appears.
"""

from __future__ import annotations

import atexit
import contextlib
import pickle
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from inrank_convert.artifact import ArtifactWriter, RecordingWriter, StoredTensor
from inrank_convert.compression.execution import HintChains, execute_entry
from inrank_convert.compression.job import (
    CompressionJob,
    check_options,
    check_target_options,
    compress,
    plan_compression,
)
from inrank_convert.compression.plan import Plan, PlanOptions, TensorPlan
from inrank_convert.compression.results import CompressResult, LayerResult
from inrank_convert.compression.targets import Assigned
from inrank_convert.compression.torchrun_schedule import (
    check_one_process,
    hashing_cost,
    plan_digest,
    share_out,
)
from inrank_convert.compression.updates import planned_entries, prefetching
from inrank_convert.core.distributed import (
    SigtermGuard,
    World,
    close_world,
    env_world,
    init_world,
    process_device,
)
from inrank_convert.core.errors import DistributedError, InrankError, ReportedElsewhere, UsageError, flag
from inrank_convert.inputs.sources import Inputs, open_inputs
from inrank_convert.weights.outputs import check_output_free, check_output_outside, claimed_output

# One receive may wait for the slowest process's next tensor, and a process that is done waits
# for rank 0 to finish writing: a large SVD on a CPU takes far longer than torch's default 30 min.
RESULTS_TIMEOUT = timedelta(days=7)
_HEADER, _PAYLOAD, _FINAL = 1, 2, 3  # message tags: a payload's length, the payload, rank 0's "done"
_USER_ERRORS = (InrankError, OSError)  # what a process hands to rank 0 to print; anything else is a bug


def compress_distributed(source: str | Path, output: str | Path, *, init: str | Path | None = None,
                         init_seed: int | None = None, no_init: bool = False, embed_init: bool = False,
                         options: PlanOptions | None = None, force: bool = False,
                         on_plan: Callable[[Plan], None] | None = None,
                         on_layer: Callable[[LayerResult], None] | None = None) -> CompressResult | None:
    """``compress`` in a process of a torchrun job (see the module's description): the result
    on rank 0, None on the other ranks. Outside torchrun it is plain ``compress``."""
    options = options or PlanOptions()
    world = env_world()
    if not world.enabled:
        return compress(source, output, init=init, init_seed=init_seed, no_init=no_init, embed_init=embed_init,
                        options=options, force=force, on_plan=on_plan, on_layer=on_layer)
    world, group = _join()
    reference = dict(init=init, init_seed=init_seed, no_init=no_init, embed_init=embed_init)
    sigterm = SigtermGuard()
    finished = False
    try:
        if world.is_main:
            sigterm.install()
            result = _run_main(world, group, source, output, reference, options, force, on_plan, on_layer, sigterm)
        else:
            _run_worker(world, group, source, output, reference, options, force)
            result = None
        finished = True
        return result
    finally:
        if finished:
            sigterm.uninstall()
        else:
            # Stopping on an error: a SIGTERM from now on (torchrun stopping every process) must
            # not cut the CLI short before it has printed the error; the process exits next.
            sigterm.failing = True
            atexit.register(sigterm.uninstall)
        _leave(world, finished)


def hand_error_to_main(error: BaseException) -> NoReturn:
    """On a rank other than 0, for a user error met before ``compress_distributed`` (the CLI's own
    checks): join the job, hand the error to rank 0 at the setup check, and leave without a word
    once rank 0 is gone. If rank 0 met it too, it never joins; torchrun stops this process when
    rank 0 has printed it and exited."""
    world, group = _join()
    try:
        _agree(("error", error), world, group)
        _wait_for_main([], group)
    finally:
        _leave(world, False)
    raise ReportedElsewhere(_exit_code(error))


# -- the job's life: join, agree, leave

def _join() -> tuple[World, dist.ProcessGroup]:
    # gloo for everything, CUDA processes included (see the module's description).
    world = init_world("cpu")
    return world, dist.new_group(backend="gloo", timeout=RESULTS_TIMEOUT)


def _leave(world: World, finished: bool) -> None:
    if finished:
        close_world(world)
    else:
        # Not now: the other processes leave as soon as this one's connections close, and
        # torchrun would stop this process before the CLI has printed the error.
        atexit.register(close_world, world)


def _agree(outcome: tuple, world: World, group: dist.ProcessGroup) -> tuple[bool, float]:
    """Every process's setup outcome, ("ok", plan digest[, rank 0's hashing head start]) or
    ("error", error), in every process. Rank 0 raises the first error (by rank), or the processes'
    disagreement; the others return whether the job stops there. All return rank 0's head start
    (``hashing_cost``): the share-out must be the same in every process, and what the hash cache
    remembers changes while rank 0 hashes, so only rank 0's view of it counts."""
    outcomes = [None] * world.size
    dist.all_gather_object(outcomes, outcome, group=group)
    errors = [found[1] for found in outcomes if found[0] == "error"]
    digests = {found[1] for found in outcomes if found[0] == "ok"}
    head_start = float(outcomes[0][2]) if outcomes[0][0] == "ok" and len(outcomes[0]) > 2 else 0.0
    if not world.is_main:
        return bool(errors) or len(digests) > 1, head_start
    if errors:
        raise errors[0]
    if len(digests) > 1:
        differing = [rank for rank, (_, value) in enumerate(outcomes) if value != outcomes[0][1]]
        raise DistributedError("the processes of this torchrun job see different inputs (their plans differ)",
                               f"rank {differing[0]}", "give every process the same checkpoint files")
    return False, head_start


def _check_setup(source, output, reference: dict, options: PlanOptions, force: bool, world: World) -> torch.device:
    """compress's checks before any input is opened, in every process; the device this one runs on."""
    check_options(options)
    check_target_options(options, reference["embed_init"], None)
    check_one_process(options)
    check_output_outside(Path(output), (source, reference["init"]))
    check_output_free(Path(output), force)  # check_options checked the device
    device = process_device(options.device, world)
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UsageError(f"torchrun started more processes on this machine than it has GPUs "
                             f"({torch.cuda.device_count()})", f"{flag('--device')} {options.device}",
                             f"pass --nproc_per_node {torch.cuda.device_count()} or less, or {flag('--device')} cpu")
        torch.cuda.set_device(device)
    return device


def _exit_code(error: BaseException) -> int:
    return error.exit_code if isinstance(error, InrankError) else 1


# -- rank 0

class _SharedJob(CompressionJob):
    """Rank 0's compress: the same job (inputs, plan, hashes, manifest), its tensors shared out."""

    world: World
    group: dist.ProcessGroup
    device: torch.device
    sigterm: SigtermGuard
    head_start: float  # its hashing's cost, as every process shares the tensors out by it

    def execute(self, writer: ArtifactWriter, budget: dict[str, Assigned] | None) -> Iterator[LayerResult]:
        work = planned_entries(self.plan)
        owners = share_out(work, self.world.size, self.head_start)
        own = _OwnShare(self.inputs, self.options, self.device, [(i, e) for i, e in work if owners[i] == 0],
                        HintChains(work))
        own.start()
        try:
            for index, _ in work:
                owner = owners[index]
                layer, stored = own.result(index) if owner == 0 else _receive_tensor(owner, index, self.group)
                for item in stored:
                    added = writer.add_stored(item, self.inputs.trained.get, self.inputs.reference.get)
                    if item.name == layer.name:
                        layer.entry = added
                yield layer
        except BaseException:
            self.sigterm.failing = True  # from here on, this error is the one to remove the temporary folder and print
            raise
        finally:
            own.stop()


def _run_main(world: World, group, source, output, reference: dict, options: PlanOptions, force: bool,
              on_plan, on_layer, sigterm: SigtermGuard) -> CompressResult:
    job = None
    held = contextlib.ExitStack()  # rank 0 writes: it holds the output's lock for the whole job
    try:
        try:
            held.enter_context(claimed_output(Path(output), force, (source, reference["init"])))
            device = _check_setup(source, output, reference, options, force, world)
            job = _SharedJob(source, options=options, **reference)
            job.world, job.group, job.device, job.sigterm = world, group, device, sigterm
            job.head_start = hashing_cost(job.inputs, options.device)
            outcome = ("ok", plan_digest(job.plan), job.head_start)
        except _USER_ERRORS as err:
            outcome = ("error", err)
        _agree(outcome, world, group)
        if on_plan is not None:
            on_plan(job.plan)
        result = job.write(output, None, force=force, on_layer=on_layer)
    finally:
        if job is not None:
            job.close()
        held.close()
    for rank in range(1, world.size):
        try:
            dist.send(torch.ones(1, dtype=torch.int64), rank, group=group, tag=_FINAL)
        except RuntimeError:
            pass  # it stopped after sending its last tensor: the artifact is whole all the same
    return result


class _OwnShare:
    """Rank 0's own tensors, factorized in plan order in a thread (torch's kernels release the
    GIL) while the main thread receives the others' tensors and writes."""

    def __init__(self, inputs: Inputs, options: PlanOptions, device: torch.device,
                 mine: list[tuple[int, TensorPlan]], chains: HintChains):
        self._inputs, self._options, self._device, self._mine = inputs, options, device, mine
        self._chains = chains
        self._done: dict[int, tuple[LayerResult, list[StoredTensor]]] = {}
        self._error: BaseException | None = None
        self._stopped = False
        self._ready = threading.Condition()
        # A daemon: if the main thread stops on an error, the process exits without waiting for an SVD.
        self._thread = threading.Thread(target=self._run, name="inrank-own-share", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True

    def _run(self) -> None:
        try:
            for index, entry in prefetching(self._inputs, self._mine):
                if self._stopped:
                    return
                computed = _compute(entry, index, self._inputs, self._options, self._device, self._chains)
                with self._ready:
                    self._done[index] = computed
                    self._ready.notify_all()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
            with self._ready:
                self._error = err
                self._ready.notify_all()

    def result(self, index: int) -> tuple[LayerResult, list[StoredTensor]]:
        """Tensor ``index`` once computed (the thread's error, if it stopped before it)."""
        with self._ready:
            while index not in self._done and self._error is None:
                self._ready.wait()
            if index in self._done:
                return self._done.pop(index)
            raise self._error


def _receive_tensor(owner: int, index: int, group) -> tuple[LayerResult, list[StoredTensor]]:
    """Tensor ``index`` from the process ``owner`` (its next message: each sends in plan order)."""
    try:
        message = _receive(owner, group)
    except RuntimeError as err:  # gloo: the connection closed (the process died)
        raise DistributedError(f"process {owner} of the torchrun job stopped before sending all its tensors",
                               f"rank {owner}", "nothing was written; its own output or torchrun's report says why"
                               ) from err
    kind, sent_index, *rest = message
    if kind == "error":
        raise rest[0]
    if sent_index != index:
        raise RuntimeError(f"rank {owner} sent tensor {sent_index} where {index} was expected")
    return rest[0], rest[1]


# -- the other ranks

def _run_worker(world: World, group, source, output, reference: dict, options: PlanOptions, force: bool) -> None:
    inputs = None
    error: BaseException | None = None
    try:
        try:
            device = _check_setup(source, output, reference, options, force, world)
            inputs = open_inputs(source, **reference)
            plan = plan_compression(inputs, options)
            outcome = ("ok", plan_digest(plan))
        except _USER_ERRORS as err:
            error, outcome = err, ("error", err)
        stop, head_start = _agree(outcome, world, group)
        if stop:
            _wait_for_main([], group)
            raise ReportedElsewhere(_exit_code(error) if error is not None else 1)
        work = planned_entries(plan)
        owners = share_out(work, world.size, head_start)
        mine = [(index, entry) for index, entry in work if owners[index] == world.rank]
        chains = HintChains(work)
        sending = []
        for index, entry in prefetching(inputs, mine):
            try:
                message = ("tensor", index, *_compute(entry, index, inputs, options, device, chains))
            except _USER_ERRORS as err:
                error, message = err, ("error", index, err)
            sending.append(_post(message, 0, group))
            if error is not None:
                break
        if not _wait_for_main(sending, group) or error is not None:
            raise ReportedElsewhere(_exit_code(error) if error is not None else 1)
    finally:
        if inputs is not None:
            inputs.close()


def _wait_for_main(sending: list, group) -> bool:
    """Wait until every message was taken and rank 0 says it is done (True), or is gone (False)."""
    try:
        for *_, works in sending:
            for work in works:
                work.wait()
        done = torch.zeros(1, dtype=torch.int64)
        dist.recv(done, 0, group=group, tag=_FINAL)
        return bool(done.item())
    except RuntimeError:  # gloo: rank 0's connection closed (it failed, and said why)
        return False


# -- computing and carrying one tensor

def _compute(entry: TensorPlan, index: int, inputs: Inputs, options: PlanOptions, device: torch.device,
             chains: HintChains) -> tuple[LayerResult, list[StoredTensor]]:
    """One tensor as compress stores it (same code, same seed, same hint chain), recorded rather
    than written."""
    recorder = RecordingWriter()
    layer = execute_entry(entry, inputs, options, device, index, recorder, hints=chains.hints(index))
    return layer, recorder.take()


def _post(message: tuple, destination: int, group) -> tuple:
    """Send ``message`` without waiting for it to be taken: (its tensors, the sends' works). The
    tensors must live until the works are done."""
    payload = torch.frombuffer(bytearray(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    header = torch.tensor([payload.numel()], dtype=torch.int64)
    return header, payload, [dist.isend(header, destination, group=group, tag=_HEADER),
                             dist.isend(payload, destination, group=group, tag=_PAYLOAD)]


def _receive(source: int, group) -> tuple:
    header = torch.zeros(1, dtype=torch.int64)
    dist.recv(header, source, group=group, tag=_HEADER)
    payload = torch.empty(int(header.item()), dtype=torch.uint8)
    dist.recv(payload, source, group=group, tag=_PAYLOAD)
    return pickle.loads(payload.numpy().tobytes())  # noqa: S301 - a message from a process of this job
