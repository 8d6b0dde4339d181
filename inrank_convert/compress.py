"""Execute a plan: stream tensors one at a time, factorize each update, write the artifact.

``compress`` is the whole job; ``open_inputs``, ``plan_compression`` and ``iter_compress`` are
its steps, public so that ``--dry-run``, ``spectrum`` and training can reuse them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifact import (
    ARTIFACT_FILE,
    INIT_FILE,
    ArtifactCheckpoint,
    TensorFileWriter,
    artifact_bytes,
    atomic_output_dir,
    check_output_free,
    copy_side_files,
    dtype_name,
    factor_names,
    manifest_metadata,
    new_manifest,
)
from .checkpoints import Checkpoint, is_run_folder, open_checkpoint, resolve_run, run_steps, sha256_tensor
from .errors import NonFiniteError, UsageError
from .plan import Plan, PlanOptions, TensorPlan, make_plan
from .reference import (
    CheckpointReference,
    Reference,
    ZeroReference,
    check_seed_matches,
    read_init_recipe,
    seed_reference,
)
from .spectrum import CRITERIA, ENGINES, factorize, frobenius_energy, stored_as_lowrank


@dataclass
class LayerResult:
    """What compress stored for one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str  # "lowrank" | "dense" | "zero"
    rank: int | None
    energy: float  # fraction of the update's squared Frobenius norm kept
    bytes: int  # bytes stored for this tensor
    original_bytes: int
    engine: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def manifest_entry(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "dtype": dtype_name(self.dtype), "rank": self.rank,
                "energy": round(self.energy, 8), "bytes": self.bytes, "original_bytes": self.original_bytes,
                "svd": self.engine or None}

    def to_json(self) -> dict:
        return {"name": self.name, **self.manifest_entry()}


@dataclass
class CompressResult:
    output: Path | None
    source: str
    reference_mode: str
    rule: str
    layers: list[LayerResult]
    tied: dict[str, str]
    original_bytes: int
    compressed_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / self.original_bytes if self.original_bytes else 0.0

    def to_json(self) -> dict:
        return {"output": str(self.output) if self.output else None, "source": self.source,
                "reference": self.reference_mode, "rule": self.rule, "original_bytes": self.original_bytes,
                "compressed_bytes": self.compressed_bytes, "ratio": self.ratio, "seconds": round(self.seconds, 3),
                "tied": self.tied, "notes": self.notes, "layers": [layer.to_json() for layer in self.layers]}


@dataclass
class Inputs:
    """The trained checkpoint and its reference, resolved from the user's options."""

    trained: Checkpoint
    reference: Reference
    embed_init: bool
    paths: tuple[Path, ...]  # every input path, so outputs never overwrite one
    run_folder: Path | None = None

    def close(self) -> None:
        self.trained.close()
        self.reference.close()


def check_options(options: PlanOptions) -> None:
    """Reject option values that cannot work, before any input is opened."""
    rule = options.rule
    if rule.fixed_rank is not None and rule.fixed_rank < 0:
        raise UsageError(f"rank must be 0 or more, got {rule.fixed_rank}", "--rank", "pass --rank 0 or a positive rank")
    if not (0.0 < rule.threshold <= 1.0):
        raise UsageError(f"threshold must be in (0, 1], got {rule.threshold:g}", "--threshold",
                         "e.g. --threshold 0.9 keeps 90% of each update's energy")
    if rule.criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {rule.criterion!r}", "--criterion", f"choose one of {', '.join(CRITERIA)}")
    if options.engine not in ENGINES:
        raise UsageError(f"unknown SVD engine {options.engine!r}", "--svd", f"choose one of {', '.join(ENGINES)}")
    if options.engine == "randomized" and rule.criterion == "inrank" and rule.fixed_rank is None:
        raise UsageError("the inrank criterion needs the full spectrum, which the randomized SVD does not compute",
                         "--svd randomized --criterion inrank", "use --svd exact or auto, or --criterion energy")
    check_device(options.device)


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("CUDA is not available on this machine", f"--device {device}", "use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UsageError(f"unknown device {device!r}", "--device", "use cpu or cuda (cuda:N)")


def open_inputs(source: str | Path, init: str | Path | None = None, init_seed: int | None = None,
                no_init: bool = False, embed_init: bool = False) -> Inputs:
    """Resolve CKPT and the reference options into (trained checkpoint, reference).

    A training-run folder's latest step is the trained model and its earliest the init (a
    seed recipe there, written by ``train``, turns it into a seed reference). An artifact is
    measured against its own reference unless told otherwise.
    """
    source = Path(source)
    if no_init and (init is not None or init_seed is not None):
        raise UsageError("--no-init conflicts with --init/--init-seed", None, "pass only one reference option")
    if no_init and embed_init:
        raise UsageError("--embed-init has nothing to embed with --no-init", None, "drop one of the two options")
    explicit = init is not None or init_seed is not None or no_init
    run_folder = None
    default_init: Path | None = None
    if is_run_folder(source):
        run_folder = source
        steps = run_steps(source)
        if not explicit:
            default_init, _ = resolve_run(source)
        trained = open_checkpoint(steps[-1][1])
    else:
        trained = open_checkpoint(source)
    paths = [source] + ([Path(init)] if init is not None else [])
    if isinstance(trained, ArtifactCheckpoint):
        paths.extend(trained.artifact.input_paths())
    try:
        reference = _open_reference(trained, init, init_seed, no_init, default_init)
    except BaseException:
        trained.close()
        raise
    if reference is None:
        trained.close()
        raise UsageError("no reference given for the update", str(source),
                         "pass --init PATH (init or base model), --init-seed N, or --no-init to factorize the weights")
    embed_init = embed_init or reference.mode == "embedded"
    if isinstance(reference, CheckpointReference):
        paths.append(Path(reference.checkpoint.path))
    return Inputs(trained, reference, embed_init, tuple(paths), run_folder)


def _open_reference(trained: Checkpoint, init: str | Path | None, init_seed: int | None, no_init: bool,
                    default_init: Path | None) -> Reference | None:
    if no_init:
        return ZeroReference()
    init_path = Path(init) if init is not None else default_init
    if init_path is None and init_seed is None:
        # Re-compressing an artifact: measure against the reference it was made with.
        return trained.artifact.reference if isinstance(trained, ArtifactCheckpoint) else None
    init_checkpoint = open_checkpoint(init_path) if init_path is not None else None
    seed = init_seed
    if seed is None and init is None and default_init is not None:
        seed = read_init_recipe(default_init)
    if seed is None:
        return CheckpointReference(init_checkpoint)
    config = trained.config() or (init_checkpoint.config() if init_checkpoint is not None else None)
    if config is None:
        raise UsageError("--init-seed needs the model's config.json beside the checkpoint", str(trained.path),
                         "put config.json next to the weights, or pass --init PATH")
    if init_checkpoint is None:
        return seed_reference(config, seed)
    with init_checkpoint:
        reference = seed_reference(config, seed, _float_dtype(init_checkpoint))
        check_seed_matches(reference, init_checkpoint, seed)
    return reference


def _float_dtype(checkpoint: Checkpoint) -> torch.dtype:
    for info in checkpoint.infos().values():
        if info.dtype.is_floating_point:
            return info.dtype
    return torch.float32


def plan_compression(inputs: Inputs, options: PlanOptions) -> Plan:
    return make_plan(inputs.trained, inputs.reference, options, inputs.reference.aliases())


def _raise_non_finite(inputs: Inputs, name: str) -> None:
    """Name the checkpoint that holds NaN/Inf (a full check, run only once a cheap one failed)."""
    weight = inputs.trained.get(name)
    if not bool(torch.isfinite(weight).all()):
        raise NonFiniteError(f"tensor {name!r} holds NaN or Inf", str(inputs.trained.path),
                             "this checkpoint is broken (diverged training?): use an earlier one")
    reference = inputs.reference.get(name)
    where = getattr(getattr(inputs.reference, "checkpoint", None), "path", f"the {inputs.reference.mode} init")
    if reference is not None and not bool(torch.isfinite(reference).all()):
        raise NonFiniteError(f"init tensor {name!r} holds NaN or Inf", str(where), "pass a valid init")
    raise NonFiniteError(f"the update of {name!r} overflows float32", str(inputs.trained.path),
                         "the weights are too large to compare: check the checkpoint")


def check_finite_fast(tensor: torch.Tensor) -> bool:
    """One pass, no temporary mask: NaN or Inf anywhere makes the norm non-finite."""
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return True
    return math.isfinite(frobenius_energy(tensor))


def load_update(inputs: Inputs, entry: TensorPlan, device: torch.device) -> tuple[torch.Tensor, float]:
    """delta = W - W_ref in float32 on ``device`` and its exact ||delta||_F^2.

    The trained and reference tensors are dropped as soon as they are subtracted, so at most
    one of them and the update are alive at once. bf16/fp16 inputs are subtracted in float32
    (bf16 rounding of W would add noise to the update's energy).
    """
    weight = inputs.trained.get(entry.name)
    delta = weight.to(device=device, dtype=torch.float32, copy=True)  # [rows, cols]
    del weight
    reference = inputs.reference.get(entry.name)
    if reference is not None:
        delta.sub_(reference.to(device))
        del reference
    total = frobenius_energy(delta)
    if not math.isfinite(total):
        _raise_non_finite(inputs, entry.name)
    return delta, total


def planned_work(plan: Plan, inputs: Inputs, actions: tuple[str, ...] = ("factorize", "dense")
                 ) -> Iterator[tuple[int, TensorPlan]]:
    """(index, entry) of the plan entries to execute, in order. Before handing out an entry it
    asks the kernel to start reading the next one's tensors (posix_fadvise), so disk reads
    overlap the current SVD without mapping or copying anything early."""
    work = [entry for entry in plan.entries if entry.action in actions]
    for index, entry in enumerate(work):
        if index + 1 < len(work):
            following = work[index + 1]
            inputs.trained.prefetch(following.name)
            if following.action == "factorize":
                inputs.reference.prefetch(following.name)
        yield index, entry


@dataclass
class LayerOutput:
    """One executed plan entry: its result, the tensors to store, and its reference (to embed)."""

    result: LayerResult
    stored: dict[str, torch.Tensor]
    reference: torch.Tensor | None


def iter_compress(plan: Plan, inputs: Inputs, options: PlanOptions) -> Iterator[LayerOutput]:
    """Execute the plan one tensor at a time."""
    device = torch.device(options.device)
    for index, entry in planned_work(plan, inputs):
        yield _execute(entry, inputs, options, device, index)


def _execute(entry: TensorPlan, inputs: Inputs, options: PlanOptions, device: torch.device,
             index: int) -> LayerOutput:
    started = time.perf_counter()
    result = LayerResult(entry.name, entry.shape, entry.dtype, "dense", None, 1.0, entry.nbytes, entry.nbytes)
    if entry.action == "dense":
        weight = inputs.trained.get(entry.name)
        if not check_finite_fast(weight):
            _raise_non_finite(inputs, entry.name)
        result.notes.append(entry.reason)
        result.seconds = time.perf_counter() - started
        return LayerOutput(result, {entry.name: weight}, None)

    delta, total = load_update(inputs, entry, device)
    generator = torch.Generator(device=device).manual_seed(options.seed + index)
    factors = factorize(delta, options.rule, options.engine, options.float64, generator, total_energy=total)
    del delta
    rows, cols = entry.shape
    result.engine, result.notes = factors.engine, list(factors.notes)
    if factors.rank == 0:
        result.kind, result.rank, result.bytes = "zero", 0, 0
        result.energy = 1.0 if factors.total_energy == 0.0 else 0.0
        stored = {}
    elif not stored_as_lowrank(factors.rank, rows, cols):
        result.kind, result.rank, result.energy = "dense", factors.rank, 1.0
        result.notes.append(f"rank {factors.rank} is not smaller than dense")
        stored = {entry.name: inputs.trained.get(entry.name)}  # re-read: a memory map, no copy
    else:
        dtype = options.factor_dtype or entry.dtype
        b_name, a_name = factor_names(entry.name)
        stored = {b_name: factors.B.to("cpu", dtype), a_name: factors.A.to("cpu", dtype)}
        result.kind, result.rank, result.energy = "lowrank", factors.rank, factors.energy
        result.bytes = sum(t.numel() * t.element_size() for t in stored.values())
    embed = inputs.embed_init and result.kind in ("lowrank", "zero")
    result.seconds = time.perf_counter() - started
    return LayerOutput(result, stored, inputs.reference.get(entry.name) if embed else None)


def compress(source: str | Path, output: str | Path, *, init: str | Path | None = None, init_seed: int | None = None,
             no_init: bool = False, embed_init: bool = False, options: PlanOptions | None = None,
             force: bool = False, on_plan: Callable[[Plan], None] | None = None,
             on_layer: Callable[[LayerResult], None] | None = None) -> CompressResult:
    """Compress ``source`` into the artifact folder ``output``.

    Everything is written into a temporary folder that is renamed into place at the end, so a
    failure or a kill leaves no output that looks valid; inputs are only ever read.
    """
    options = options or PlanOptions()
    check_options(options)
    check_output_free(Path(output), force)  # fail before any expensive input work
    started = time.perf_counter()
    inputs = open_inputs(source, init, init_seed, no_init, embed_init)
    try:
        plan = plan_compression(inputs, options)
        if on_plan is not None:
            on_plan(plan)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inrank-hash") as hasher, \
                atomic_output_dir(Path(output), force, inputs.paths) as temp:
            # Hash the inputs while the SVDs run: hashing a large checkpoint costs a full read.
            source_hashes = hasher.submit(inputs.trained.file_hashes)
            reference_manifest = hasher.submit(inputs.reference.manifest)
            writer = TensorFileWriter(temp / ARTIFACT_FILE)
            init_writer = TensorFileWriter(temp / INIT_FILE) if inputs.embed_init else None
            try:
                layers: list[LayerResult] = []
                embedded: dict[str, str] = {}
                for layer in iter_compress(plan, inputs, options):
                    for name, tensor in layer.stored.items():
                        writer.add(name, tensor)
                    if init_writer is not None and layer.reference is not None:
                        init_writer.add(layer.result.name, layer.reference)
                        embedded[layer.result.name] = sha256_tensor(layer.reference)
                    layers.append(layer.result)
                    if on_layer is not None:
                        on_layer(layer.result)
                reference = reference_manifest.result()
                if init_writer is not None:
                    reference = {"mode": "embedded", "file": INIT_FILE, "tensors": embedded, "source": reference}
                    init_writer.finish({"format": "pt"})
                manifest = build_manifest(plan, inputs, options, layers, source_hashes.result(), reference,
                                          writer.checksums)
                writer.finish(manifest_metadata(manifest))
            except BaseException:
                writer.abort()
                if init_writer is not None:
                    init_writer.abort()
                raise
            copy_side_files(inputs.trained.config_dir, temp)
            compressed = artifact_bytes(temp)
        notes = sorted({note for layer in layers for note in layer.notes if "float64" in note})
        return CompressResult(Path(output), str(source), reference["mode"], options.rule.describe(), layers,
                              plan.tied, plan.original_bytes, compressed, time.perf_counter() - started, notes)
    finally:
        inputs.close()


def build_manifest(plan: Plan, inputs: Inputs, options: PlanOptions, layers: list[LayerResult],
                   source_files: list[dict], reference: dict, checksums: dict[str, str]) -> dict:
    """The JSON manifest stored in the artifact's safetensors header (format version 1)."""
    tensors: dict[str, dict] = {layer.name: layer.manifest_entry() for layer in layers}
    for entry in plan.entries:
        if entry.action == "alias":
            tensors[entry.name] = {"kind": "alias", "of": entry.alias_of, "shape": list(entry.shape),
                                   "dtype": dtype_name(entry.dtype)}
    # Keep the source's tensor order, so a decompressed checkpoint lists names as the original did.
    ordered = {entry.name: tensors[entry.name] for entry in plan.entries}
    rule = options.rule
    return {**new_manifest(
        source={"path": str(Path(inputs.trained.path).resolve()), "kind": inputs.trained.kind,
                "run": str(inputs.run_folder.resolve()) if inputs.run_folder else None, "files": source_files},
        reference=reference,
        rule={"criterion": rule.criterion, "threshold": rule.threshold, "rank": rule.fixed_rank},
        svd={"engine": options.engine, "device": options.device, "float64": options.float64, "seed": options.seed},
        factor_dtype=dtype_name(options.factor_dtype) if options.factor_dtype else None,
        embeddings=options.embeddings, include=list(options.include), exclude=list(options.exclude),
        original_bytes=plan.original_bytes, tensors=ordered), "checksums": checksums}
