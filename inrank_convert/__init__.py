"""inrank-convert: compact low-rank artifacts from trained checkpoints (InRank cumulative updates)."""

from .artifact import Artifact, Manifest, TensorEntry, read_manifest
from .compress import CompressResult, LayerResult, compress
from .errors import InrankError
from .layers import LowRankLinear
from .modeling import load_compressed
from .plan import PlanOptions
from .sources import open_artifact
from .spectrum import RankRule
from .train_options import TrainOptions, TrainResult
from .training import resume, train
from .version import __version__

__all__ = ["Artifact", "CompressResult", "InrankError", "LayerResult", "LowRankLinear", "Manifest", "PlanOptions",
           "RankRule", "TensorEntry", "TrainOptions", "TrainResult", "__version__", "compress", "load_compressed",
           "open_artifact", "read_manifest", "resume", "train"]
