"""The manifest: the JSON in the artifact file's safetensors header (key ``inrank``), typed.

Every JSON key of the manifest is named here and nowhere else (file names and tensor-name suffixes
are ``format``'s): other modules build and read manifests through these dataclasses. ``Manifest.from_json`` validates (a newer format version,
or a damaged manifest, is one ArtifactError); ``to_json`` writes the version-1 layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from inrank_convert.artifact.bands import Bands, check_bands
from inrank_convert.artifact.fields import Fields, ManifestFormatError, drop_none, shown
from inrank_convert.artifact.format import (
    DAMAGED,
    FORMAT_NAME,
    FORMAT_VERSION,
    STORAGES,
    TENSOR_KINDS,
    Storage,
    TensorKind,
    row_names,
)
from inrank_convert.artifact.records import ReferenceRecord, RuleRecord, SourceRecord, TrainingRecord
from inrank_convert.artifact.storage import QUANTIZE_SCHEMES, factors_layout, rows_layout
from inrank_convert.core.errors import ArtifactError, UsageError
from inrank_convert.core.tensors import SAFETENSORS_CODES, dtype_name, numel
from inrank_convert.core.version import __version__

SOURCE_DATE_EPOCH = "SOURCE_DATE_EPOCH"


def creation_time() -> str:
    """A manifest's ``created``: now, in UTC to the second; or $SOURCE_DATE_EPOCH (seconds since 1970,
    the reproducible-builds convention) when set, so that the same inputs and options write the
    same bytes."""
    epoch = os.environ.get(SOURCE_DATE_EPOCH)
    if epoch is None:
        return datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not epoch.strip().isdigit():
        raise UsageError(f"{SOURCE_DATE_EPOCH} must be a whole number of seconds since 1970, got {epoch!r}",
                         SOURCE_DATE_EPOCH, f"unset it, or e.g. {SOURCE_DATE_EPOCH}=$(date +%s)")
    return datetime.fromtimestamp(int(epoch), timezone.utc).isoformat(timespec="seconds")


@dataclass
class TensorEntry:
    """What the artifact holds for one tensor of the source checkpoint."""

    kind: TensorKind
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the source tensor (the reconstruction is cast back to it)
    rank: int | None = None
    energy: float = 1.0  # fraction of the update's squared Frobenius norm kept
    bytes: int = 0  # stored bytes
    original_bytes: int = 0  # dense bytes of the source tensor
    svd: str | None = None  # the engine that factorized it
    of: str | None = None  # the canonical name of an alias
    # Version 2 (absent in version 1, where factors are stored in the entry's own float dtype):
    rows: int | None = None  # K, the stored rows of a lowrank+rows tensor
    storage: Storage | None = None  # precision of the stored factors and rows
    error: float | None = None  # ||delta - stored||_F / ||delta||_F, storage rounding included
    reference_rows: int | None = None  # a reference with fewer rows (a grown vocabulary): they are its rows
    # Version 4, mixed storage only: ((bits, components), ...) widest first, the components in order.
    bands: Bands | None = None
    # Calibrated layers only (compress --calibrate; optional in version 4, older readers skip it):
    # ||X (delta - stored)^T||_F / ||X delta^T||_F on the calibration text's inputs X of the layer.
    output_error: float | None = None

    @property
    def is_alias(self) -> bool:
        return self.kind == "alias"

    @property
    def has_factors(self) -> bool:
        return self.kind in ("lowrank", "lowrank+rows")

    @property
    def uses_reference(self) -> bool:
        """Whether rebuilding the tensor needs the reference (lowrank, rows and zero are updates to it)."""
        return self.kind in ("lowrank", "lowrank+rows", "zero")

    @property
    def expected_error(self) -> float:
        """The relative error ||delta - stored|| / ||delta|| this entry promises: the recorded one
        (rounding included), else the truncation's, implied by the recorded energy (version 1)."""
        if self.error is not None:
            return self.error
        # A zero entry under a rule or budget that gave it rank 0 dropped its update (energy 0).
        return max(0.0, 1.0 - self.energy) ** 0.5 if self.has_factors or self.kind == "zero" else 0.0

    def stored_names(self, name: str) -> tuple[str, ...]:
        """Every tensor the artifact file must hold for this entry."""
        return tuple(self.stored_layout(name))

    def stored_layout(self, name: str) -> dict[str, tuple[tuple[int, ...], frozenset[str]]]:
        """stored name -> (shape, the safetensors dtype codes it may have) of every tensor this entry needs.

        A dense tensor is stored whole in its own dtype. Factors at rank r of a [rows, cols] tensor are
        B [rows, r] and A [r, cols] at the entry's storage (version 1, no storage: any float), int8
        ones with a float scale [r], int4 ones as ``storage.factors_layout`` says; K stored rows are
        [K, cols] with a [K] int64 index (and a [K] scale under int8; int4: ``storage.rows_layout``)."""
        if self.kind == "dense":
            return {name: (self.shape, frozenset({SAFETENSORS_CODES[self.dtype]}))}
        if not self.has_factors:
            return {}
        rows, cols = self.shape
        rank = self.rank or 0
        layout = {name + suffix: spec
                  for suffix, spec in factors_layout(self.storage, rows, cols, rank, self.bands).items()}
        if self.kind == "lowrank+rows":
            count = self.rows or 0
            layout |= {name + suffix: spec for suffix, spec in rows_layout(self.storage, count, cols).items()}
            layout[row_names(name)[1]] = ((count,), frozenset({"I64"}))
        return layout

    def to_json(self) -> dict[str, Any]:
        if self.kind == "alias":
            return {"kind": "alias", "of": self.of, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}
        values = {"kind": self.kind, "shape": list(self.shape), "dtype": dtype_name(self.dtype), "rank": self.rank,
                  "energy": round(self.energy, 8), "bytes": self.bytes, "original_bytes": self.original_bytes,
                  "svd": self.svd}
        return values | drop_none({"rows": self.rows, "storage": self.storage,
                                    "error": None if self.error is None else round(self.error, 8),
                                    "reference_rows": self.reference_rows,
                                    "bands": None if self.bands is None else [list(band) for band in self.bands],
                                    "output_error": None if self.output_error is None else round(self.output_error, 8)})

    @classmethod
    def from_json(cls, values: Any, place: str = "tensor") -> TensorEntry:
        """One entry of ``tensors``; ``place`` names it in messages (``tensors['h.0.weight']``)."""
        fields = Fields(values, place)
        kind = fields.string("kind", required=True)
        if kind not in TENSOR_KINDS:
            raise ArtifactError(f"unknown tensor kind {kind!r} in {fields.at('kind')} (this reader knows "
                                f"{', '.join(TENSOR_KINDS)})", None, DAMAGED)
        shape, dtype = fields.shape("shape"), fields.dtype("dtype")
        if kind == "alias":
            return cls("alias", shape, dtype, of=fields.string("of", required=True))
        storage = fields.string("storage")
        if storage is not None and storage not in STORAGES:
            raise ManifestFormatError(f"{fields.at('storage')} is {storage!r}, not one of {', '.join(STORAGES)}")
        energy = fields.number("energy", low=0.0, high=1.0 + 1e-6)
        return cls(kind, shape, dtype, fields.integer("rank"), 1.0 if energy is None else energy,
                   fields.integer("bytes") or 0, fields.integer("original_bytes") or 0, fields.string("svd"), None,
                   fields.integer("rows"), storage, fields.number("error", low=0.0),
                   fields.integer("reference_rows", minimum=1), fields.pairs("bands"),
                   fields.number("output_error", low=0.0))

    def check(self, name: str, tensors: dict[str, TensorEntry]) -> None:
        """What the entry says must hang together (before any tensor is looked at): a factorized
        tensor is a matrix with a rank, a rows entry has its row count, an alias points at a stored
        tensor of its own shape. Raises ManifestFormatError."""
        place = f"tensors[{name!r}]"
        if self.is_alias:
            target = tensors.get(self.of or "")
            if self.of == name:
                raise ManifestFormatError(f"alias {name!r} points at itself")
            if target is None:
                raise ManifestFormatError(f"alias {name!r} points at {self.of!r}, which the manifest lacks")
            if target.is_alias:
                raise ManifestFormatError(f"alias {name!r} points at {self.of!r}, itself an alias")
            if target.shape != self.shape:
                raise ManifestFormatError(f"alias {name!r} has shape {list(self.shape)}, the tensor it points at "
                                          f"{list(target.shape)}")
            return
        if self.has_factors:
            if len(self.shape) != 2:
                raise ManifestFormatError(f"{place} is {self.kind} but its shape {list(self.shape)} is not a matrix")
            if self.rank is None:
                raise ManifestFormatError(f"{place}.rank is missing")
        if self.kind == "lowrank+rows" and self.rows is None:
            raise ManifestFormatError(f"{place}.rows is missing")
        if self.rows is not None and (self.kind != "lowrank+rows" or self.rows > self.shape[0]):
            raise ManifestFormatError(f"{place}.rows is {self.rows}, but the tensor is {self.kind} "
                                      f"{list(self.shape)}")
        if self.storage in QUANTIZE_SCHEMES and not self.has_factors:
            raise ManifestFormatError(f"{place}.storage is {self.storage}, but a {self.kind} tensor has no factors")
        if (self.storage == "mixed") != (self.bands is not None):
            raise ManifestFormatError(f"{place} has storage {self.storage} and "
                                      f"{'bands' if self.bands is not None else 'no bands'}: bands go with mixed storage")
        if self.bands is not None:
            problem = check_bands(self.bands, self.rank or 0)
            if problem is not None:
                raise ManifestFormatError(f"{place}.bands: {problem}")
        if self.output_error is not None and not self.has_factors:
            raise ManifestFormatError(f"{place}.output_error is recorded, but a {self.kind} tensor has no factors")
        if self.reference_rows is not None and (not self.shape or self.reference_rows > self.shape[0]):
            raise ManifestFormatError(f"{place}.reference_rows is {self.reference_rows}, more than the tensor's "
                                      f"{list(self.shape)}")


@dataclass
class Manifest:
    """The JSON in the safetensors header (key ``inrank``): everything a reader needs to rebuild the model."""

    source: SourceRecord
    reference: ReferenceRecord
    rule: RuleRecord
    tensors: dict[str, TensorEntry]  # in the source's tensor order
    original_bytes: int  # dense bytes of the source tensors (tied ones once)
    checksums: dict[str, str] = field(default_factory=dict)  # stored name -> sha256 of its bytes
    version: int = FORMAT_VERSION
    tool_version: str = __version__
    created: str = field(default_factory=lambda: creation_time())
    # How compress made it (absent in training checkpoints).
    svd: dict[str, Any] | None = None
    factor_dtype: str | None = None
    embeddings: bool | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    training: TrainingRecord | None = None
    # compress --calibrate: the text the layers' input Grams came from (text_sha256, tokens, window,
    # windows, layers, damping); the factors of "whitened" entries minimize the output error on it.
    calibration: dict[str, Any] | None = None
    # compress --max-perplexity-increase: the target, the eval text (sha256, tokens), the dense and
    # the artifact's measured perplexity, the budget chosen and the search's steps.
    perplexity_target: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer minor writer, kept as they are

    def canonical(self, name: str) -> str:
        """The name whose data an alias shares (the name itself otherwise)."""
        entry = self.tensors[name]
        return entry.of if entry.is_alias and entry.of is not None else name

    def stored_entries(self) -> dict[str, TensorEntry]:
        """Every tensor but the aliases."""
        return {name: entry for name, entry in self.tensors.items() if not entry.is_alias}

    def aliases(self) -> dict[str, str]:
        """alias -> canonical name."""
        return {name: entry.of for name, entry in self.tensors.items() if entry.is_alias and entry.of is not None}

    def stored_parameters(self) -> int:
        """Numbers the artifact stores: dense tensors whole, factorized ones as r * (rows + cols),
        plus K * cols for stored rows (indices and scales not counted)."""
        total = 0
        for entry in self.stored_entries().values():
            if entry.kind == "dense":
                total += numel(entry.shape)
            elif entry.has_factors:
                total += (entry.rank or 0) * (entry.shape[0] + entry.shape[-1]) + (entry.rows or 0) * entry.shape[-1]
        return total

    def to_json(self) -> dict[str, Any]:
        made_by_compress = {"svd": self.svd, "factor_dtype": self.factor_dtype, "embeddings": self.embeddings,
                            "include": self.include, "exclude": self.exclude} if self.svd is not None else {}
        training = {"training": self.training.to_json()} if self.training is not None else {}
        optional = {key: value for key, value in (("calibration", self.calibration),
                                                  ("perplexity_target", self.perplexity_target)) if value is not None}
        return {"format": FORMAT_NAME, "version": self.version, "tool_version": self.tool_version,
                "created": self.created, "source": self.source.to_json(), "reference": self.reference.to_json(),
                "rule": self.rule.to_json(), **made_by_compress, **training, **optional, **self.extra,
                "original_bytes": self.original_bytes,
                "tensors": {name: entry.to_json() for name, entry in self.tensors.items()},
                "checksums": dict(self.checksums)}

    @classmethod
    def from_json(cls, values: Any, where: str = "manifest") -> Manifest:
        """Parse and validate; a newer format version or a damaged manifest is an ArtifactError."""
        if not isinstance(values, dict) or values.get("format") != FORMAT_NAME:
            raise ArtifactError("not an inrank-convert manifest", where, DAMAGED)
        version = values.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ArtifactError(f"manifest has no format version (version is {shown(version)})", where, DAMAGED)
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"artifact format version {version} is newer than this inrank-convert reads (version {FORMAT_VERSION})",
                where, "upgrade: pip install -U inrank-convert")
        known = {"format", "version", "tool_version", "created", "source", "reference", "rule", "svd",
                 "factor_dtype", "embeddings", "include", "exclude", "training", "original_bytes", "tensors",
                 "checksums", "calibration", "perplexity_target"}
        try:
            fields = Fields(values, "")
            reference = ReferenceRecord.from_json(fields.object("reference", required=True))
            source = SourceRecord.from_json(fields.object("source", required=True))
            rule = RuleRecord.from_json(fields.object("rule", required=True))
            entries = fields.object("tensors", required=True)
            tensors = {name: TensorEntry.from_json(entry, f"tensors[{name!r}]") for name, entry in entries.items()}
            for name, entry in tensors.items():
                entry.check(name, tensors)
            training = None
            if fields.object("training") is not None:
                record = fields.fields("training")
                training = TrainingRecord(record.integer("step", required=True), record.string("mode", required=True))
            return cls(
                source=source, reference=reference, rule=rule, tensors=tensors,
                original_bytes=fields.integer("original_bytes", required=True),
                checksums=fields.string_map("checksums") or {}, version=version,
                tool_version=fields.string("tool_version") or "", created=fields.string("created") or "",
                svd=fields.object("svd"), factor_dtype=fields.string("factor_dtype"),
                embeddings=fields.boolean("embeddings"), include=fields.strings("include"),
                exclude=fields.strings("exclude"), training=training,
                calibration=fields.object("calibration"), perplexity_target=fields.object("perplexity_target"),
                extra={key: value for key, value in values.items() if key not in known})
        except ManifestFormatError as err:
            raise ArtifactError(f"corrupt manifest: {err}", where, DAMAGED) from err
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # a check above forgot a case
            raise ArtifactError(f"corrupt manifest ({type(err).__name__}: {err})", where, DAMAGED) from err
        except ArtifactError as err:
            if err.where is not None:
                raise
            raise ArtifactError(err.what, where, err.fix) from err  # name the file (the records cannot)
