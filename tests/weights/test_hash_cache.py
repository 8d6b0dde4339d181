"""weights/hash_cache.py: the stat-keyed sha256 cache: a file unchanged since it was hashed is not
read again, any change is hashed again, a broken cache only costs a re-hash, and verify never trusts it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inrank_convert import read_manifest
from inrank_convert.compression.job import CompressionJob, compress
from inrank_convert.compression.plan import PlanOptions
from inrank_convert.core.errors import InitReferenceError
from inrank_convert.inputs.sources import open_artifact, open_checkpoint
from inrank_convert.linalg.criteria import RankRule
from inrank_convert.measure.verify import verify_artifact
from inrank_convert.weights import hash_cache
from inrank_convert.weights.hash_cache import usable_cores

SETTLE_NS = 50_000_000  # the racy window in these tests (the default, 3 s, would make every test wait)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The cache in a folder of this test (never the user's home), on, with a short racy window."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("INRANK_CONVERT_CACHE", str(folder))
    monkeypatch.delenv("INRANK_CONVERT_HASH_CACHE", raising=False)
    monkeypatch.setattr(hash_cache, "RACY_NS", SETTLE_NS)
    return folder / "hashes"


def settle() -> None:
    """Wait out the racy window, so that what was just written may be remembered."""
    time.sleep(2 * SETTLE_NS / 1e9)


def weights_file(path: Path, rows: int = 16, seed: int = 0, prefix: str = "layer") -> Path:
    generator = torch.Generator().manual_seed(seed)
    save_file({f"{prefix}.weight": torch.randn(rows, 8, generator=generator),
               f"{prefix}.bias": torch.randn(rows, generator=generator)}, str(path), metadata={"format": "pt"})
    return path


def flip_last_float(file: Path) -> None:
    """Change the file's last float32 in place: same inode, same size (flipping twice restores it)."""
    with open(file, "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        last = handle.read(4)
        handle.seek(-4, os.SEEK_END)
        handle.write(bytes(255 - b for b in last))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hashing(call):
    """(what ``call`` returned, files it read and hashed, files answered by the cache)."""
    before = dataclasses.replace(hash_cache.counts)
    result = call()
    return result, hash_cache.counts.hashed - before.hashed, hash_cache.counts.remembered - before.remembered


def entries(folder: Path) -> dict[str, dict]:
    """The cache's entries by the path they describe."""
    found = {}
    for entry in sorted(folder.glob("*.json")):
        record = json.loads(entry.read_text())
        found[record["path"]] = record
    return found


def test_an_unchanged_file_is_not_read_again(tmp_path, cache):
    file = weights_file(tmp_path / "model.safetensors")
    settle()
    digest, read, remembered = hashing(lambda: hash_cache.sha256_file(file))
    assert (digest, read, remembered) == (sha256_of(file), 1, 0)
    assert entries(cache)[str(file.resolve())]["sha256"] == digest
    again, read, remembered = hashing(lambda: hash_cache.sha256_file(file))
    assert (again, read, remembered) == (digest, 0, 1)
    # Through a symlink it is the same file (a Hugging Face snapshot links to its blob).
    link = tmp_path / "link.safetensors"
    link.symlink_to(file)
    assert hashing(lambda: hash_cache.sha256_file(link)) == (digest, 0, 1)


def test_a_racily_new_file_is_not_remembered(tmp_path, monkeypatch, cache):
    """A file written within the racy window of its hashing could change again without its stat
    changing (timestamps have a granularity): it is hashed again each time until it has settled."""
    monkeypatch.setattr(hash_cache, "RACY_NS", 3_000_000_000)
    file = weights_file(tmp_path / "model.safetensors")
    for _ in range(2):
        assert hashing(lambda: hash_cache.sha256_file(file)) == (sha256_of(file), 1, 0)
    assert not cache.exists() or entries(cache) == {}


def test_same_size_rewrite_with_the_mtime_restored_is_hashed_again(tmp_path, cache):
    file = weights_file(tmp_path / "model.safetensors")
    settle()
    old = hash_cache.sha256_file(file)
    assert hashing(lambda: hash_cache.sha256_file(file)) == (old, 0, 1)
    stat = file.stat()
    flip_last_float(file)  # then put the mtime back
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = file.stat()
    assert (changed.st_ino, changed.st_size, changed.st_mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    assert changed.st_ctime_ns != stat.st_ctime_ns  # the kernel's record of the change
    new, read, remembered = hashing(lambda: hash_cache.sha256_file(file))
    assert (new, read, remembered) == (sha256_of(file), 1, 0)
    assert new != old


@pytest.mark.parametrize("damage", [b"{not json", b"\xff\xfe\x00", b"[]", b"null", b"",
                                    b'{"version": 1, "sha256": "zz"}'])
def test_a_corrupt_entry_is_ignored_and_rewritten(tmp_path, cache, damage):
    file = weights_file(tmp_path / "model.safetensors")
    settle()
    digest = hash_cache.sha256_file(file)
    (entry,) = cache.glob("*.json")
    entry.write_bytes(damage)
    assert hashing(lambda: hash_cache.sha256_file(file)) == (digest, 1, 0)
    assert json.loads(entry.read_text())["sha256"] == digest  # rewritten whole
    assert hashing(lambda: hash_cache.sha256_file(file)) == (digest, 0, 1)
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]  # no temporary file left behind


def test_an_entry_with_another_stat_is_not_used(tmp_path, cache):
    """The entry's hash is trusted only for exactly the stat it was made for: a forged entry
    whose stat differs in any field (here the size) is not used."""
    file = weights_file(tmp_path / "model.safetensors")
    settle()
    digest = hash_cache.sha256_file(file)
    (entry,) = cache.glob("*.json")
    record = json.loads(entry.read_text())
    for field in record["stat"]:
        forged = {**record, "sha256": "0" * 64, "stat": {**record["stat"], field: record["stat"][field] + 1}}
        entry.write_text(json.dumps(forged))
        assert hashing(lambda: hash_cache.sha256_file(file)) == (digest, 1, 0), field


def test_an_unwritable_cache_still_hashes(tmp_path, monkeypatch, cache, gpt2_pair):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("INRANK_CONVERT_CACHE", str(blocker))
    file = weights_file(tmp_path / "model.safetensors")
    settle()
    for _ in range(2):
        assert hashing(lambda: hash_cache.sha256_file(file)) == (sha256_of(file), 1, 0)
    # A whole compress with it: the hashes recorded are the files'.
    out = tmp_path / "out"
    compress(gpt2_pair.trained_dir, out, init=gpt2_pair.init_dir, options=PlanOptions(rule=RankRule("energy-rest", 0.9)))
    with open_artifact(out) as artifact:
        recorded = artifact.manifest.source.files
    assert [entry.sha256 for entry in recorded] == [sha256_of(gpt2_pair.trained_dir / "model.safetensors")]
    assert blocker.read_text() == "a file where the cache folder would be"


@pytest.mark.parametrize("switch", ["0", "off", "false"])
def test_switched_off_every_hash_reads(tmp_path, monkeypatch, cache, switch):
    monkeypatch.setenv("INRANK_CONVERT_HASH_CACHE", switch)
    file = weights_file(tmp_path / "model.safetensors")
    settle()
    for _ in range(2):
        assert hashing(lambda: hash_cache.sha256_file(file)) == (sha256_of(file), 1, 0)
    assert not cache.exists()


def test_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("INRANK_CONVERT_CACHE", str(tmp_path / "mine"))
    assert hash_cache.cache_dir() == tmp_path / "mine" / "hashes"
    monkeypatch.delenv("INRANK_CONVERT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hash_cache.cache_dir() == tmp_path / "xdg" / "inrank-convert" / "hashes"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hash_cache.cache_dir() == tmp_path / "home" / ".cache" / "inrank-convert" / "hashes"


def _forge(cache: Path, file: Path, sha256: str) -> None:
    """Make the cache say ``file``, as it is now, has ``sha256``: what a stale or tampered entry
    would say. Only ``fresh`` hashing can tell."""
    (entry,) = [p for p in cache.glob("*.json") if json.loads(p.read_text())["path"] == str(file.resolve())]
    record = json.loads(entry.read_text())
    stat = file.stat()
    record["stat"] = {"device": stat.st_dev, "inode": stat.st_ino, "size": stat.st_size,
                      "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}
    record["sha256"] = sha256
    entry.write_text(json.dumps(record))


def test_verify_hashes_the_files_again(tmp_path, cache, gpt2_pair):
    trained, init = tmp_path / "trained", tmp_path / "init"
    shutil.copytree(gpt2_pair.trained_dir, trained)
    shutil.copytree(gpt2_pair.init_dir, init)
    settle()
    out = tmp_path / "out"
    compress(trained, out, init=init, options=PlanOptions(rule=RankRule("energy-rest", 0.9)))
    with open_artifact(out) as artifact:
        source_hash = artifact.manifest.source.files[0].sha256
        init_hash = artifact.manifest.reference.files[0].sha256
    for folder in (trained, init):
        flip_last_float(folder / "model.safetensors")
    settle()
    _forge(cache, trained / "model.safetensors", source_hash)
    _forge(cache, init / "model.safetensors", init_hash)

    # The forged entries work: a normal load takes the changed files for the recorded ones...
    with open_checkpoint(trained) as checkpoint:
        assert [entry.sha256 for entry in checkpoint.file_hashes()] == [source_hash]
    with open_artifact(out) as artifact:
        assert artifact.reference.get("transformer.h.0.mlp.c_fc.weight") is not None
    # ...verify does not: it reads the init again and finds it changed.
    result = verify_artifact(out)
    assert not result.ok and not result.reference_ok
    assert "sha256 mismatch in model.safetensors" in result.reference_message
    # What verify read, it recorded: the next normal load sees the change too.
    with pytest.raises(InitReferenceError, match="sha256 mismatch"), open_artifact(out) as artifact:
        artifact.reference.get("transformer.h.0.mlp.c_fc.weight")

    # The init restored, the source still changed (and still forged in the cache): verify reads
    # the source again and does not measure the artifact against it.
    flip_last_float(init / "model.safetensors")
    settle()
    with open_checkpoint(trained) as checkpoint:
        assert [entry.sha256 for entry in checkpoint.file_hashes()] == [source_hash]
    result = verify_artifact(out)
    assert result.reference_ok, result.reference_message
    assert not result.source_checked and "changed since compression" in result.source_message


def test_shards_are_hashed_in_parallel_in_the_index_order(tmp_path, cache):
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for seed, (name, rows) in enumerate(zip(names, (16, 48, 32), strict=True)):
        weights_file(folder / name, rows, seed, prefix=f"shard{seed}")
    # The index lists shard 2 first: the recorded order is the index's, not the names'.
    weight_map = {f"shard{i}.{kind}": names[i] for i in (1, 2, 0) for kind in ("weight", "bias")}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    settle()
    with open_checkpoint(folder) as checkpoint:
        expected = [(name, (folder / name).stat().st_size, sha256_of(folder / name))
                    for name in (names[1], names[2], names[0])]
        hashes, read, remembered = hashing(checkpoint.file_hashes)
        assert [(h.file, h.bytes, h.sha256) for h in hashes] == expected and (read, remembered) == (3, 0)
        hashes, read, remembered = hashing(checkpoint.file_hashes)
        assert [(h.file, h.bytes, h.sha256) for h in hashes] == expected and (read, remembered) == (0, 3)
        hashes, read, remembered = hashing(lambda: checkpoint.file_hashes(fresh=True))
        assert [(h.file, h.bytes, h.sha256) for h in hashes] == expected and (read, remembered) == (3, 0)


@pytest.mark.parametrize("cached", [False, True])
def test_compress_hashes_first_where_torch_uses_every_core(tmp_path, monkeypatch, cache, gpt2_pair, cached):
    """With torch on every core, the inputs are hashed before any tensor is computed (a hash thread
    beside torch's stalls them), and torch's thread count is never changed: the artifact's tensors
    are the same bits whether the hashes were read or remembered."""
    found = torch.get_num_threads()
    monkeypatch.setenv("INRANK_CONVERT_HASH_CACHE", "1" if cached else "0")
    if cached:  # remember both inputs first
        settle()
        compress(gpt2_pair.trained_dir, tmp_path / "warm", init=gpt2_pair.init_dir)
    try:
        torch.set_num_threads(usable_cores())
        seen: list[tuple[int, bool]] = []
        with CompressionJob(gpt2_pair.trained_dir, init=gpt2_pair.init_dir,
                            options=PlanOptions(rule=RankRule("energy-rest", 0.9))) as job:
            result = job.write(tmp_path / "out", on_layer=lambda layer: seen.append(
                (torch.get_num_threads(), job._source_hashes.done() and job._reference_record.done())))
        assert seen and all(entry == (usable_cores(), True) for entry in seen), seen
        assert torch.get_num_threads() == usable_cores() and result.layers
    finally:
        torch.set_num_threads(found)
    other = tmp_path / "again"
    monkeypatch.setenv("INRANK_CONVERT_HASH_CACHE", "0" if cached else "1")
    settle()
    torch.set_num_threads(usable_cores())
    try:
        compress(gpt2_pair.trained_dir, other, init=gpt2_pair.init_dir, options=PlanOptions(rule=RankRule("energy-rest", 0.9)))
    finally:
        torch.set_num_threads(found)
    assert read_manifest(other).checksums == read_manifest(tmp_path / "out").checksums
