"""weights/outputs.py: the safetensors file written one tensor at a time (in the foreground, or
spooled on a writer thread whose errors the next call raises), and the kernel copy of what a reader
has not consumed."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from inrank_convert.core.tensors import checksum
from inrank_convert.weights.outputs import TensorFileWriter, copy_rest


def _spooled(path, background: bool, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    writer = TensorFileWriter(path, background=background)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    checksums = dict(writer.checksums)
    writer.finish({"format": "pt"})
    return checksums


def test_a_background_writer_writes_the_same_file(tmp_path):
    """Spooled on a writer thread (compress) or in the foreground (training checkpoints): the same
    bytes, tensors and checksums, in the order added."""
    generator = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(300, 7, generator=generator).bfloat16(), "a": torch.randn(7, 50, generator=generator),
               "empty": torch.zeros(0, 4), "index": torch.arange(9)}
    foreground = _spooled(tmp_path / "f.safetensors", False, tensors)
    background = _spooled(tmp_path / "b.safetensors", True, tensors)
    assert foreground == background == {name: checksum(tensor) for name, tensor in tensors.items()}
    assert (tmp_path / "f.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as handle:
        assert list(handle.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["b.safetensors", "f.safetensors"]  # no spool left


def test_an_error_on_the_writer_thread_is_raised_by_the_next_call(tmp_path):
    """A spool write that fails on the writer thread (its file closed under it) is raised by the
    next add, and abort leaves nothing behind."""
    writer = TensorFileWriter(tmp_path / "x.safetensors", background=True)
    writer.add("first", torch.ones(4))
    writer.checksums  # noqa: B018 -- waits for the first tensor
    writer._spool.close()  # the disk "fails" under the writer thread
    writer.add("second", torch.ones(4))  # queued; it fails on the thread
    with pytest.raises(ValueError, match="closed file"):
        writer.add("third", torch.ones(4))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_copy_rest_appends_what_the_reader_has_not_consumed(tmp_path):
    """The kernel copy starts where the buffered reader is, not where its read-ahead left the file
    descriptor (rewrite_manifest reads the old header first)."""
    payload = bytes(range(256)) * 4096  # 1 MiB, more than one read-ahead buffer
    (tmp_path / "source").write_bytes(payload)
    with open(tmp_path / "source", "rb") as source, open(tmp_path / "out", "wb") as out:
        assert source.read(1000) == payload[:1000]
        out.write(b"head")
        copy_rest(source, out)
    assert (tmp_path / "out").read_bytes() == b"head" + payload[1000:]
