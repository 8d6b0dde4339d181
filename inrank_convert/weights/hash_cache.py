"""The sha256 of weight files, remembered by their stat as git's index remembers its files.

compress records the sha256 of every input weight file and every load of an artifact made against
an ``--init`` folder checks it again; on a 500 MB file that costs ~0.45 CPU-s (sha256 at
~1.2 GB/s), several times reading it. A file whose (device, inode, size, mtime_ns, ctime_ns) are
the same as when it was hashed is not read again: its hash is taken from a small JSON entry under
the cache folder (``cache_dir``). Any stat field differing means a re-hash. ctime is set by the
kernel on every write or ``utime``, so a rewrite that keeps the size and restores the mtime is
still seen.

Git's "racily clean" case is guarded the same way git guards it: timestamps have a granularity
(a kernel tick, or whole seconds on some file systems), so a file written within that time of
being hashed could change again without its stat changing. Such a file's hash is not remembered
(``RACY_NS``); it is simply hashed again next time.

The cache is an optimization only: an unreadable, corrupt or unwritable cache costs a re-hash,
never a failure or a wrong hash. ``INRANK_CONVERT_HASH_CACHE=0`` turns it off. ``fresh=True``
(``verify``) never trusts an entry, but still records what it read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HASH_CHUNK = 8 << 20
SWITCH_ENV = "INRANK_CONVERT_HASH_CACHE"  # "0", "false", "no" or "off": every file is read and hashed
FOLDER_ENV = "INRANK_CONVERT_CACHE"  # the tool's cache folder: hashes here, token caches (run_folder) too
ENTRY_VERSION = 1
# A file changed less than this before its hashing began is not remembered (the racy case above):
# above a kernel tick (<= 10 ms) and the 1-2 s timestamps of ext3, FAT and some network file systems.
RACY_NS = 3_000_000_000


@dataclass
class Counts:
    """What the calls of this process did, per file: read and hashed, or answered by an entry."""

    hashed: int = 0
    remembered: int = 0


counts = Counts()
_counts_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """$INRANK_CONVERT_CACHE/hashes, else $XDG_CACHE_HOME/inrank-convert/hashes, else
    ~/.cache/inrank-convert/hashes."""
    configured = os.environ.get(FOLDER_ENV)
    if configured:
        return Path(configured) / "hashes"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inrank-convert" / "hashes"


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the platform tells)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def sha256_files(paths: Sequence[Path], fresh: bool = False) -> list[str]:
    """The sha256 of each file, in the order given. Several files are hashed in parallel
    (hashlib releases the GIL while it hashes a chunk), at most one thread per core."""
    paths = list(paths)
    workers = min(len(paths), usable_cores())
    if workers <= 1:
        return [sha256_file(path, fresh) for path in paths]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inrank-sha256") as pool:
        return list(pool.map(lambda path: sha256_file(path, fresh), paths))


def sha256_file(path: Path, fresh: bool = False) -> str:
    """The file's sha256: from its cache entry when its stat is unchanged (unless ``fresh``), else
    read, and remembered when the file held still while read and is not racily new."""
    located = _locate(path)
    if located is None:  # off, no stat (the read raises what the caller expects) or no home folder
        return _read(path)
    resolved, before, entry = located
    if not fresh:
        digest = _lookup(entry, resolved, before)
        if digest is not None:
            with _counts_lock:
                counts.remembered += 1
            return digest
    started = time.time_ns()
    digest = _read(resolved)
    try:
        after = os.stat(resolved)
    except OSError:
        return digest
    if _stat_key(after) == _stat_key(before) and max(before.st_mtime_ns, before.st_ctime_ns) < started - RACY_NS:
        _store(entry, resolved, before, digest)
    return digest


def remembered(path: Path) -> str | None:
    """The file's sha256 if its cache entry holds for its current stat (None: it would be read)."""
    located = _locate(path)
    return None if located is None else _lookup(located[2], located[0], located[1])


def _locate(path: Path) -> tuple[Path, os.stat_result, Path] | None:
    """(the resolved path, its stat, its cache entry's file); None when the cache is off or the
    file has no stat, or there is no home folder for the cache."""
    if not enabled():
        return None
    try:
        resolved = Path(path).resolve()
        return resolved, os.stat(resolved), _entry_file(resolved)
    except (OSError, RuntimeError):
        return None


def _entry_file(resolved: Path) -> Path:
    """One entry per file, named by the sha256 of its resolved absolute path."""
    return cache_dir() / (hashlib.sha256(str(resolved).encode()).hexdigest() + ".json")


def _read(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    with _counts_lock:
        counts.hashed += 1
    return digest.hexdigest()


def _stat_key(stat: os.stat_result) -> dict[str, int]:
    return {"device": stat.st_dev, "inode": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns}


def _lookup(entry: Path, resolved: Path, stat: os.stat_result) -> str | None:
    try:
        record = json.loads(entry.read_text())
        if (isinstance(record, dict) and record.get("version") == ENTRY_VERSION
                and record.get("path") == str(resolved) and record.get("stat") == _stat_key(stat)):
            digest = record.get("sha256")
            if isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
                return digest
    except (OSError, ValueError):  # missing, unreadable or not JSON: hashed again (UnicodeError is a ValueError)
        pass
    return None


def _store(entry: Path, resolved: Path, stat: os.stat_result, digest: str) -> None:
    record = {"version": ENTRY_VERSION, "path": str(resolved), "stat": _stat_key(stat), "sha256": digest}
    temp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=entry.name + ".", suffix=".tmp", dir=entry.parent)
        with os.fdopen(handle, "w") as out:
            json.dump(record, out)
        os.replace(temp, entry)  # atomic: a reader sees the old entry or the new one, never half of one
    except OSError:
        # Unwritable: the hash is still right, the next run reads the file again.
        if temp is not None:
            try:
                os.unlink(temp)
            except OSError:
                pass
