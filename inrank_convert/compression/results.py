"""What compress reports: one ``LayerResult`` per tensor (its manifest entry and how it got there)
and the ``CompressResult`` of the whole job, with their ``--json`` forms."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from inrank_convert.artifact import Manifest, TensorEntry, TensorKind
from inrank_convert.artifact.storage import precision_bands


@dataclass
class LayerResult:
    """What compress stored for one tensor: its manifest entry, and how it got there."""

    name: str
    entry: TensorEntry
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> TensorKind:
        return self.entry.kind

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.entry.dtype

    @property
    def rank(self) -> int | None:
        return self.entry.rank

    @property
    def energy(self) -> float:
        """Fraction of the update's squared Frobenius norm kept."""
        return self.entry.energy

    @property
    def bytes(self) -> int:
        return self.entry.bytes

    @property
    def original_bytes(self) -> int:
        return self.entry.original_bytes

    @property
    def engine(self) -> str:
        return self.entry.svd or ""

    def to_json(self) -> dict:
        """The manifest entry, its bands as ``inspect --json`` shows them (components and bits)."""
        entry = self.entry
        bands = precision_bands(entry.storage, entry.rank or 0, entry.bands) if entry.has_factors else None
        return {"name": self.name, **entry.to_json()} | ({} if bands is None else {"bands": bands})


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
    manifest: Manifest | None = None

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / self.original_bytes if self.original_bytes else 0.0

    def to_json(self) -> dict:
        records = {} if self.manifest is None else \
            {key: value for key, value in (("calibration", self.manifest.calibration),
                                           ("perplexity_target", self.manifest.perplexity_target)) if value is not None}
        return {**records, "output": str(self.output) if self.output else None, "source": self.source,
                "reference": self.reference_mode, "rule": self.rule, "original_bytes": self.original_bytes,
                "compressed_bytes": self.compressed_bytes, "ratio": self.ratio, "seconds": round(self.seconds, 3),
                "tied": self.tied, "notes": self.notes, "layers": [layer.to_json() for layer in self.layers]}
