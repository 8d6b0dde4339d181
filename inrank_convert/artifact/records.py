"""The manifest's records of where an artifact came from: its source checkpoint (``SourceRecord``),
the reference its updates are measured against (``ReferenceRecord``), the rule that chose the ranks
(``RuleRecord``) and, for a training checkpoint, its place in the run (``TrainingRecord``). Each
reads and writes its own JSON object; ``manifest.Manifest`` holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inrank_convert.artifact.fields import Fields, drop_none, file_hashes
from inrank_convert.artifact.format import REFERENCE_MODES, ReferenceMode
from inrank_convert.core.errors import ArtifactError
from inrank_convert.weights.checkpoints import FileHash


@dataclass
class SourceRecord:
    """The trained checkpoint an artifact was made from."""

    path: str
    kind: str  # the checkpoint form ("safetensors", "state-dict", "artifact") or "training"
    run: str | None = None  # the run folder it was the latest step of
    files: list[FileHash] = field(default_factory=list)

    @property
    def is_training(self) -> bool:
        """A training checkpoint: its own original, there is no dense source to compare."""
        return self.kind == "training"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "run": self.run, "files": [f.to_json() for f in self.files]}

    @classmethod
    def from_json(cls, values: Any, place: str = "source") -> SourceRecord:
        fields = Fields(values, place)
        return cls(fields.string("path", required=True), fields.string("kind") or "checkpoint", fields.string("run"),
                   file_hashes(fields, "files") or [])


@dataclass
class ReferenceRecord:
    """How to rebuild and verify the reference: each mode uses its own fields.

    - ``reference``: ``path`` of the init/base checkpoint and the ``files`` hashes;
    - ``seed``: the ``recipe`` (library, class, seed, dtype, config, versions) and per-tensor ``tensors`` hashes;
    - ``embedded``: ``file`` inside the artifact, per-tensor ``tensors`` hashes, and the ``source`` it was taken from;
    - ``zero``: nothing.
    """

    mode: ReferenceMode
    path: str | None = None
    files: list[FileHash] | None = None
    recipe: dict[str, Any] | None = None
    tensors: dict[str, str] | None = None  # name -> sha256_tensor
    file: str | None = None
    source: ReferenceRecord | None = None

    def to_json(self) -> dict[str, Any]:
        return drop_none({
            "mode": self.mode, "path": self.path,
            "files": None if self.files is None else [f.to_json() for f in self.files],
            "recipe": self.recipe, "file": self.file, "tensors": self.tensors,
            "source": None if self.source is None else self.source.to_json()})

    @classmethod
    def from_json(cls, values: Any, place: str = "reference") -> ReferenceRecord:
        """Parse and check what each mode needs; an unknown mode is an ArtifactError (a newer writer)."""
        fields = Fields(values, place)
        mode = fields.string("mode", required=True)
        if mode not in REFERENCE_MODES:
            raise ArtifactError(f"unknown reference mode {mode!r}", None,
                                "this artifact may come from a newer inrank-convert: upgrade it")
        recipe = fields.object("recipe", required=mode == "seed")
        if mode == "seed":
            recipe_fields = fields.fields("recipe")
            recipe_fields.object("config", required=True)
            recipe_fields.integer("seed", required=True)
            if recipe_fields.string("dtype") is not None:
                recipe_fields.dtype("dtype")
        source = fields.object("source")
        return cls(mode, fields.string("path", required=mode == "reference"), file_hashes(fields, "files"),
                   recipe, fields.string_map("tensors"), fields.string("file", required=mode == "embedded"),
                   None if source is None else cls.from_json(source, fields.at("source")))


@dataclass
class RuleRecord:
    """The rank rule the factors were chosen by.

    A global size budget (compress --target-ratio / --target-size) is criterion ``budget`` with
    ``threshold`` the target as a fraction of ``original_bytes`` and ``target_bytes`` the byte
    target; the ranks were allocated across tensors (absent before it existed: optional)."""

    criterion: str
    threshold: float
    rank: int | None = None
    target_bytes: int | None = None

    def describe(self) -> str:
        if self.target_bytes is not None:
            return f"budget<={self.target_bytes} bytes ({self.threshold:.4g} of dense)"
        return f"rank={self.rank}" if self.rank is not None else f"{self.criterion}>={self.threshold:g}"

    def to_json(self) -> dict[str, Any]:
        values = {"criterion": self.criterion, "threshold": self.threshold, "rank": self.rank}
        return values | drop_none({"target_bytes": self.target_bytes})

    @classmethod
    def from_json(cls, values: Any, place: str = "rule") -> RuleRecord:
        fields = Fields(values, place)
        return cls(fields.string("criterion", required=True), fields.number("threshold", required=True),
                   fields.integer("rank"), fields.integer("target_bytes"))


@dataclass
class TrainingRecord:
    """A training checkpoint's place in its run."""

    step: int
    mode: str

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "mode": self.mode}
