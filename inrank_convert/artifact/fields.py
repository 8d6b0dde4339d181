"""Typed reads of the manifest's JSON: every value is checked for presence and type as it is read,
so that a damaged or edited manifest is one clear message naming the key's place
(``tensors['h.0.weight'].rank``), never a KeyError or a wrong number taken on trust.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from inrank_convert.artifact.format import DAMAGED
from inrank_convert.core.errors import ArtifactError
from inrank_convert.core.tensors import SAFETENSORS_CODES, dtype_from_name
from inrank_convert.weights.checkpoints import FileHash


class ManifestFormatError(ValueError):
    """A manifest value that is missing or of the wrong type; the message names its place
    (``tensors['h.0.weight'].rank``) so that a user can see what was edited or damaged."""


def shown(value: Any) -> str:
    """A manifest value as JSON, cut short: what a message quotes."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}


class Fields:
    """Typed reads of one JSON object of the manifest. A missing required key, or a value of the
    wrong type (a string where a number belongs, a list where an object does), raises
    ManifestFormatError naming the key's place; optional keys read as None when absent or null."""

    def __init__(self, values: Any, place: str):
        if not isinstance(values, dict):
            raise ManifestFormatError(f"{place or 'the manifest'} is {_JSON_KINDS.get(type(values), 'a number')}, "
                                      "not an object")
        self.values = values
        self.place = place

    def at(self, key: str) -> str:
        return f"{self.place}.{key}" if self.place else key

    def _raw(self, key: str, required: bool) -> Any:
        value = self.values.get(key)
        if value is None and required:
            raise ManifestFormatError(f"{self.at(key)} is missing")
        return value

    def _wrong(self, key: str, value: Any, expected: str) -> ManifestFormatError:
        found = _JSON_KINDS[type(value)] if isinstance(value, (dict, list)) else shown(value)
        return ManifestFormatError(f"{self.at(key)} is {found}, not {expected}")

    def string(self, key: str, required: bool = False) -> str | None:
        value = self._raw(key, required)
        if value is not None and not isinstance(value, str):
            raise self._wrong(key, value, "a string")
        return value

    def integer(self, key: str, required: bool = False, minimum: int = 0) -> int | None:
        value = self._raw(key, required)
        if value is None:
            return None
        # bool is an int in Python, not in JSON; 4.0 (another writer's integer) is accepted as 4.
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole:
            raise self._wrong(key, value, "a whole number")
        if value < minimum:
            raise ManifestFormatError(f"{self.at(key)} is {shown(value)}, below {minimum}")
        return int(value)

    def number(self, key: str, required: bool = False, low: float = -math.inf, high: float = math.inf) -> float | None:
        value = self._raw(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._wrong(key, value, "a finite number")
        if not low <= value <= high:
            raise ManifestFormatError(f"{self.at(key)} is {shown(value)}, outside [{low:g}, {high:g}]")
        return float(value)

    def boolean(self, key: str) -> bool | None:
        value = self._raw(key, False)
        if value is not None and not isinstance(value, bool):
            raise self._wrong(key, value, "true or false")
        return value

    def object(self, key: str, required: bool = False) -> dict[str, Any] | None:
        value = self._raw(key, required)
        if value is not None and not isinstance(value, dict):
            raise self._wrong(key, value, "an object")
        return value

    def fields(self, key: str, place: str | None = None) -> Fields:
        """The required object ``key``, to read in turn."""
        return Fields(self.object(key, required=True), place or self.at(key))

    def array(self, key: str, required: bool = False) -> list[Any] | None:
        value = self._raw(key, required)
        if value is not None and not isinstance(value, list):
            raise self._wrong(key, value, "a list")
        return value

    def strings(self, key: str) -> list[str] | None:
        values = self.array(key)
        if values is not None and not all(isinstance(item, str) for item in values):
            raise ManifestFormatError(f"{self.at(key)} holds something other than strings")
        return values

    def string_map(self, key: str, required: bool = False) -> dict[str, str] | None:
        values = self.object(key, required)
        if values is not None and not all(isinstance(item, str) for item in values.values()):
            raise ManifestFormatError(f"{self.at(key)} maps a name to something other than a string")
        return None if values is None else dict(values)

    def shape(self, key: str) -> tuple[int, ...]:
        values = self.array(key, required=True)
        if not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in values):
            raise ManifestFormatError(f"{self.at(key)} is {shown(values)}, not a list of sizes")
        return tuple(values)

    def pairs(self, key: str) -> tuple[tuple[int, int], ...] | None:
        """A list of [whole number, whole number] pairs (a mixed entry's bands)."""
        values = self.array(key)
        if values is None:
            return None
        if not all(isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(item, int) and not isinstance(item, bool) for item in pair) for pair in values):
            raise ManifestFormatError(f"{self.at(key)} is {shown(values)}, not a list of [bits, components] pairs")
        return tuple((int(a), int(b)) for a, b in values)

    def dtype(self, key: str) -> torch.dtype:
        name = self.string(key, required=True)
        dtype = dtype_from_name(name)
        if dtype not in SAFETENSORS_CODES:  # not a torch dtype, or none a safetensors file can hold
            raise ArtifactError(f"unknown dtype {name!r} in manifest ({self.at(key)})", None, DAMAGED)
        return dtype


def file_hashes(fields: Fields, key: str) -> list[FileHash] | None:
    items = fields.array(key)
    if items is None:
        return None
    hashes = []
    for index, item in enumerate(items):
        record = Fields(item, f"{fields.at(key)}[{index}]")
        hashes.append(FileHash(record.string("file", required=True), record.integer("bytes") or 0,
                               record.string("sha256", required=True)))
    return hashes


def drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}
