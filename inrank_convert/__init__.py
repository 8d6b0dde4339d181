"""inrank-convert: compact low-rank artifacts from trained checkpoints (InRank cumulative updates).

The packages follow the data's path, each importing only from those below it (docs/design.md §2):

    core        errors, tensors, devices and processes, hub ids, the version
    linalg      rank criteria, SVD engines, stored forms, budgets, whitening (pure math)
    model       transformers module trees from a config; LowRankLinear
    weights     checkpoint files read lazily, the hash cache, atomic outputs, the run folder
    artifact    the on-disk format: names, the typed manifest, the one writer, the reader
    inputs      any input form + its reference (init, base, seed, zero); text -> tokens
    runtime     a running model from an artifact; perplexity and generation
    compression plan, updates, calibration, targets, the compress job, torchrun share-out
    export      dense folder, PEFT adapter, vLLM plan
    training    InRank training and resume: options, rank control, loop, checkpoints
    measure     spectrum, report, sweep, compare-runs, verify, plots
    cli         the Typer app, one module per command group; the only printer

The public API is re-exported here.
"""

from inrank_convert.artifact import Artifact, Manifest, TensorEntry, read_manifest
from inrank_convert.compression.job import compress
from inrank_convert.compression.plan import PlanOptions
from inrank_convert.compression.results import CompressResult, LayerResult
from inrank_convert.core.errors import InrankError
from inrank_convert.core.version import __version__
from inrank_convert.inputs.sources import open_artifact
from inrank_convert.linalg.criteria import RankRule
from inrank_convert.model.layers import LowRankLinear
from inrank_convert.runtime.modeling import load_compressed
from inrank_convert.training.entrypoints import resume, train
from inrank_convert.training.options import TrainOptions, TrainResult

__all__ = ["Artifact", "CompressResult", "InrankError", "LayerResult", "LowRankLinear", "Manifest", "PlanOptions",
           "RankRule", "TensorEntry", "TrainOptions", "TrainResult", "__version__", "compress", "load_compressed",
           "open_artifact", "read_manifest", "resume", "train"]
