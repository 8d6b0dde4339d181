"""inrank-convert: compact low-rank artifacts from trained checkpoints (InRank cumulative updates)."""

__version__ = "0.1.0"

from .artifact import Artifact, read_manifest  # noqa: E402
from .compress import CompressResult, LayerResult, compress  # noqa: E402
from .errors import InrankError  # noqa: E402
from .layers import LowRankLinear  # noqa: E402
from .modeling import load_compressed  # noqa: E402
from .plan import PlanOptions  # noqa: E402
from .spectrum import RankRule  # noqa: E402
from .training import TrainOptions, TrainResult, resume, train  # noqa: E402

__all__ = ["Artifact", "CompressResult", "InrankError", "LayerResult", "LowRankLinear", "PlanOptions", "RankRule",
           "TrainOptions", "TrainResult", "__version__", "compress", "load_compressed", "read_manifest", "resume",
           "train"]
