"""Hugging Face hub ids as model inputs, offline: ``owner/name`` is read from the local hub cache.

Every place a user names a model (compress's CKPT and ``--init``, report's ``--original`` and
``--also``, verify's ``--source``, train's and resume's SOURCE) goes through :func:`resolve_model`.
A local path always wins; a name shaped like a hub id that is no local path is looked up in the
cache with ``local_files_only=True``, so the network is never reached, and a miss says which
command downloads it.
"""

from __future__ import annotations

import os
from pathlib import Path

from inrank_convert.core.errors import CheckpointError, UsageError, flag

# A missing "model.safetensors" is a mistyped file, not the hub repo of that name.
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")


def cache_dir() -> Path:
    """The hub cache folder (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``).

    Read from the environment at each call, by the rules of ``huggingface_hub.constants``: those
    constants are computed once, when huggingface_hub is first imported, so a cache named after
    that (a library caller setting os.environ, a test) would be missed.
    """
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def is_hub_id(name: str | Path) -> bool:
    """``name`` or ``owner/name`` by huggingface_hub's own repo id rules, and not a file name."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(name)
    if Path(text).suffix.lower() in _FILE_SUFFIXES:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_model(name: str | Path, revision: str | None = None, option: str = "--revision") -> Path:
    """The local folder or file a user-named model stands for.

    An existing path is returned as it is (never taken for a hub id); a hub id that is no local
    path becomes its snapshot folder in the cache (``models--owner--name/snapshots/<commit>``, the
    commit that ``refs/<revision>`` names, ``main`` by default); anything else is returned as it
    is, for the caller's own "no such file" message. ``revision`` (a branch, tag or commit) is
    only for hub ids; ``option`` is how messages name it.
    """
    path = Path(name)
    if path.exists():
        if revision is not None:
            raise UsageError(f"{flag(option)} selects a version of a Hugging Face hub id, but this is a local path",
                             str(path), f"drop {flag(option)}")
        return path
    if not is_hub_id(name):
        if revision is not None:
            raise UsageError(f"{flag(option)} selects a version of a Hugging Face hub id (owner/name), "
                             "and this is neither a hub id nor an existing path", str(path), "check the name")
        return path
    return _cached_snapshot(str(name), revision)


def _cached_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    folder = cache_dir()
    named = repo_id if revision is None else f"{repo_id} at revision {revision}"
    command = f"hf download {repo_id}" + ("" if revision is None else f" --revision {revision}")
    try:
        # local_files_only: read refs/ and snapshots/ in the cache, never ask the Hub (even when
        # HF_HUB_OFFLINE is unset).
        snapshot = snapshot_download(repo_id, revision=revision, cache_dir=folder, local_files_only=True)
    except IncompleteSnapshotError as err:
        raise CheckpointError(f"{named} is only partly in the Hugging Face cache ({folder}): "
                              f"complete it with `{command}`", None, "or pass a local folder") from err
    except LocalEntryNotFoundError as err:
        where = "is not" if revision is not None else "is not a local path and is not"
        raise CheckpointError(f"{named} {where} in the Hugging Face cache ({folder}): download it with `{command}`",
                              None, "or pass a local folder") from err
    return Path(snapshot)
