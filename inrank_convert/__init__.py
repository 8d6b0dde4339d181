"""inrank-convert: compact low-rank artifacts from trained checkpoints (InRank cumulative updates)."""

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
