"""The artifact on disk (format versions 1 and 2, docs/design.md §6): its names, the typed manifest,
the one writer, the reader.

Layout of an artifact folder ``OUT/``::

    inrank.safetensors   factors (``name.lora_B`` [rows, r], ``name.lora_A`` [r, cols]) and
                         dense-stored tensors; header metadata key ``inrank`` = JSON manifest
    init.safetensors     the reference tensors, only with --embed-init
    config.json, generation_config.json, tokenizer files: copied from the source

This package is the only place that knows file names and tensor-name suffixes (``format``),
manifest keys (``manifest``, read through ``fields``' typed checks) and storage encodings
(``storage``): every other module builds and reads the manifest through ``Manifest`` /
``TensorEntry``, writes artifacts through ``ArtifactWriter`` (``writer``) and reads them through
``read_manifest`` / ``Artifact`` (``reader``).
"""

from inrank_convert.artifact.format import (
    ARTIFACT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INIT_FILE,
    REFERENCE_MODES,
    TENSOR_KINDS,
    ReferenceMode,
    TensorKind,
    factor_names,
)
from inrank_convert.artifact.manifest import Manifest, TensorEntry
from inrank_convert.artifact.reader import (
    Artifact,
    ReferenceTensors,
    artifact_bytes,
    check_reference,
    describe_artifact,
    is_artifact,
    read_manifest,
)
from inrank_convert.artifact.records import ReferenceRecord, RuleRecord, SourceRecord, TrainingRecord
from inrank_convert.artifact.writer import (
    ArtifactWriter,
    RecordingWriter,
    SourceTensor,
    StoredTensor,
    manifest_metadata,
    rewrite_manifest,
)

__all__ = [
    "ARTIFACT_FILE", "FORMAT_NAME", "FORMAT_VERSION", "INIT_FILE", "REFERENCE_MODES", "TENSOR_KINDS", "Artifact",
    "ArtifactWriter", "Manifest", "RecordingWriter", "ReferenceMode", "ReferenceRecord", "ReferenceTensors",
    "RuleRecord", "SourceRecord", "SourceTensor", "StoredTensor", "TensorEntry", "TensorKind", "TrainingRecord",
    "artifact_bytes", "check_reference", "describe_artifact",
    "factor_names", "is_artifact", "manifest_metadata", "read_manifest", "rewrite_manifest",
]
