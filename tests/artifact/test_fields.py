"""artifact/fields.py: typed reads of the manifest's JSON: a missing key or a value of the wrong type
is one message naming the key's place (``tensors['w'].rank``), never a KeyError or a wrong number
taken on trust; optional keys read as None."""

from __future__ import annotations

import math

import pytest
import torch

from inrank_convert.artifact.fields import Fields, ManifestFormatError, drop_none, file_hashes, shown
from inrank_convert.core.errors import ArtifactError
from inrank_convert.weights.checkpoints import FileHash

ENTRY = {"kind": "lowrank", "rank": 4, "energy": 0.9, "shape": [6, 5], "dtype": "bfloat16", "flag": True,
         "tags": ["a", "b"], "hashes": {"w": "ab"}, "tensors": {"w": {"rank": 2}}, "nothing": None}


def entry(**changes) -> Fields:
    return Fields({**ENTRY, **changes}, "tensors['w']")


def test_values_of_the_right_type_are_read():
    fields = entry()
    assert fields.string("kind", required=True) == "lowrank"
    assert fields.integer("rank", required=True) == 4 and isinstance(fields.integer("rank"), int)
    assert fields.number("energy", low=0.0, high=1.0) == 0.9
    assert fields.shape("shape") == (6, 5)
    assert fields.dtype("dtype") is torch.bfloat16
    assert fields.boolean("flag") is True and fields.strings("tags") == ["a", "b"]
    assert fields.string_map("hashes") == {"w": "ab"}
    assert fields.fields("tensors").fields("w", "tensors['w']").integer("rank") == 2
    assert fields.at("rank") == "tensors['w'].rank" and Fields({}, "").at("version") == "version"


def test_optional_keys_read_as_none_when_absent_or_null():
    fields = entry()
    for read in (fields.string, fields.integer, fields.number, fields.object, fields.array, fields.string_map):
        assert read("absent") is None and read("nothing") is None
    assert fields.boolean("absent") is None and fields.strings("absent") is None


@pytest.mark.parametrize("read, key, value, says", [
    ("string", "kind", 3, "tensors['w'].kind is 3, not a string"),
    ("integer", "rank", "4", 'tensors[\'w\'].rank is "4", not a whole number'),
    ("integer", "rank", True, "tensors['w'].rank is true, not a whole number"),  # a bool is no JSON number
    ("integer", "rank", 2.5, "tensors['w'].rank is 2.5, not a whole number"),
    ("integer", "rank", -1, "tensors['w'].rank is -1, below 0"),
    ("number", "energy", "high", 'tensors[\'w\'].energy is "high", not a finite number'),
    ("number", "energy", math.inf, "not a finite number"),
    ("object", "tensors", [1], "tensors['w'].tensors is a list, not an object"),
    ("array", "tags", {"a": 1}, "tensors['w'].tags is an object, not a list"),
    ("strings", "tags", ["a", 1], "tensors['w'].tags holds something other than strings"),
    ("string_map", "hashes", {"w": 1}, "tensors['w'].hashes maps a name to something other than a string"),
    ("shape", "shape", [6, -5], "tensors['w'].shape is [6, -5], not a list of sizes"),
    ("shape", "shape", [6, True], "not a list of sizes"),
    ("boolean", "flag", "yes", 'tensors[\'w\'].flag is "yes", not true or false'),
])
def test_a_value_of_the_wrong_type_names_its_place(read, key, value, says):
    with pytest.raises(ManifestFormatError) as caught:
        getattr(entry(**{key: value}), read)(key)
    assert says in str(caught.value)


def test_required_keys_and_bounds():
    with pytest.raises(ManifestFormatError, match=r"^tensors\['w'\]\.absent is missing$"):
        entry().string("absent", required=True)
    with pytest.raises(ManifestFormatError, match="missing"):
        entry().integer("nothing", required=True)  # null is missing too
    with pytest.raises(ManifestFormatError, match=r"energy is 0.9, outside \[0, 0.5\]"):
        entry().number("energy", low=0.0, high=0.5)
    assert entry(rank=4.0).integer("rank") == 4  # another writer's 4.0 is the whole number 4
    assert entry(rank=3).integer("rank", minimum=3) == 3
    with pytest.raises(ManifestFormatError, match="below 5"):
        entry().integer("rank", minimum=5)


def test_something_other_than_an_object_is_refused_where_it_is():
    with pytest.raises(ManifestFormatError, match=r"^the manifest is a list, not an object$"):
        Fields([1, 2], "")
    with pytest.raises(ManifestFormatError, match=r"^tensors\['v'\] is a number, not an object$"):
        Fields(3, "tensors['v']")
    with pytest.raises(ManifestFormatError, match=r"^tensors\.v is 3, not an object$"):
        Fields({"tensors": {"v": 3}}, "").fields("tensors").fields("v", "tensors['v']")


@pytest.mark.parametrize("name", ["float99", "Tensor", "complex64"])  # complex64: a dtype safetensors cannot hold
def test_an_unknown_dtype_is_an_artifact_error(name):
    with pytest.raises(ArtifactError, match=rf"unknown dtype '{name}' in manifest \(tensors\['w'\]\.dtype\)"):
        entry(dtype=name).dtype("dtype")


def test_file_hashes_and_the_helpers():
    fields = Fields({"files": [{"file": "a.safetensors", "bytes": 10, "sha256": "ab"}, {"file": "b", "sha256": "cd"}]},
                    "source")
    assert file_hashes(fields, "files") == [FileHash("a.safetensors", 10, "ab"), FileHash("b", 0, "cd")]
    assert file_hashes(fields, "absent") is None
    with pytest.raises(ManifestFormatError, match=r"source\.files\[1\]\.sha256 is missing"):
        file_hashes(Fields({"files": [{"file": "a", "sha256": "ab"}, {"file": "b"}]}, "source"), "files")
    assert drop_none({"a": 1, "b": None, "c": 0}) == {"a": 1, "c": 0}
    assert shown("x" * 100) == '"' + "x" * 36 + "..." and shown([1, 2]) == "[1, 2]" and shown(object()) == "object"


@pytest.mark.parametrize("value", ["8x2", [[8, 2, 1]], [[8, "2"]], [[8, True]], [8, 2], [[8.5, 2]]])
def test_bands_that_are_not_bits_and_count_pairs_are_named(value):
    with pytest.raises(ManifestFormatError, match=r"tensors\['w'\]\.bands .*pairs|tensors\['w'\]\.bands is"):
        entry(bands=value).pairs("bands")
    assert entry(bands=[[8, 2], [3, 5]]).pairs("bands") == ((8, 2), (3, 5)) and entry().pairs("absent") is None
