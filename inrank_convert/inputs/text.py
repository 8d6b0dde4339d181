"""Text -> tokens: the tokenizer of a model folder, and plain text files read as token ids.

Every problem with the text or the tokenizer is a ``UsageError`` that names the file and the fix:
a missing, empty or binary file never reaches the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from inrank_convert.core.errors import UsageError, flag

# A folder holds a tokenizer when it has one of these (file sets, all needed).
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",))
# Characters read per wanted token before tokenizing a prefix of a long text (English BPE: ~4-5).
_CHARS_PER_TOKEN = 8


def has_tokenizer(folder: Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS)


def first_tokenizer_folder(folders: Sequence[str | Path]) -> Path | None:
    """The first of ``folders`` that holds tokenizer files: the one ``load_tokenizer`` reads."""
    return next((Path(folder) for folder in folders if has_tokenizer(Path(folder))), None)


def load_tokenizer(model_dir: str | Path | Sequence[str | Path] | None, tokenizer: str | Path | None = None):
    """The tokenizer to use for a model.

    ``tokenizer`` (``--tokenizer DIR``) wins: a folder with ``tokenizer.json`` (any Hugging Face
    tokenizer), a folder with GPT-2 BPE ``vocab.json`` + ``merges.txt``, or a ``tokenizer.json``
    file. Otherwise the first of ``model_dir`` (one folder or several, in order: the artifact,
    then the original checkpoint's folder) that holds tokenizer files.
    """
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.exists():
            raise UsageError("no such tokenizer folder", str(path), f"check the {flag('--tokenizer')} path")
        if path.is_file():
            if path.name.endswith(".json"):
                return _from_tokenizer_json(path)
            raise UsageError(f"{flag('--tokenizer')} must be a folder (or a tokenizer.json file)", str(path),
                             "pass the folder that holds tokenizer.json, or vocab.json and merges.txt")
        if not has_tokenizer(path):
            raise UsageError("no tokenizer files in folder", str(path),
                             "expected tokenizer.json, or vocab.json and merges.txt (GPT-2 BPE), or tokenizer.model")
        return _from_folder(path)
    folders = [] if model_dir is None else [model_dir] if isinstance(model_dir, (str, Path)) else list(model_dir)
    found = first_tokenizer_folder(folders)
    if found is not None:
        return _from_folder(found)
    where = ", ".join(str(f) for f in folders) or None
    raise UsageError("no tokenizer found beside the model", where,
                     f"pass {flag('--tokenizer')} DIR (a folder with tokenizer.json, or vocab.json and merges.txt)")


def _from_folder(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError, TypeError) as err:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return _gpt2_bpe(folder)
        if (folder / "tokenizer.json").is_file():
            return _from_tokenizer_json(folder / "tokenizer.json")
        raise UsageError(f"cannot load the tokenizer ({_first_line(err)})", str(folder),
                         f"pass {flag('--tokenizer')} DIR with a tokenizer.json") from err


def _gpt2_bpe(folder: Path):
    from transformers import GPT2TokenizerFast

    try:
        # transformers 5 takes vocab=/merges= (the old vocab_file=/merges_file= give an empty tokenizer).
        tokenizer = GPT2TokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise UsageError(f"cannot read vocab.json/merges.txt ({_first_line(err)})", str(folder),
                         "re-download the tokenizer files") from err
    if len(tokenizer) == 0:
        raise UsageError("vocab.json holds no tokens", str(folder), "re-download the tokenizer files")
    return tokenizer


def _from_tokenizer_json(file: Path):
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(file))
    except Exception as err:  # the tokenizers library raises plain Exception on a bad file
        raise UsageError(f"cannot load the tokenizer ({_first_line(err)})", str(file),
                         "re-download the tokenizer files") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def text_files(path: str | Path) -> list[Path]:
    """The file itself, or every visible file in a folder (recursively, sorted by path)."""
    path = Path(path)
    if not path.exists():
        raise UsageError("no such text file or folder", str(path), f"check the {flag('--data')} path")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UsageError("not a regular file or folder", str(path), "pass a text file or a folder of text files")
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UsageError("folder holds no text files", str(path), "pass a text file or a folder of text files")
    return files


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file or a folder of files (joined by blank lines); refuses binary and empty input."""
    parts = []
    for file in text_files(path):
        try:
            raw = file.read_bytes()
        except OSError as err:
            raise UsageError(f"cannot read the text file ({err.strerror})", str(file), "check its permissions") from err
        if b"\x00" in raw:
            raise UsageError("binary file, not text (it holds NUL bytes)", str(file), "pass a UTF-8 text file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"binary file, not text (not valid UTF-8 at byte {err.start})", str(file),
                             "pass a UTF-8 text file (convert it with iconv -t utf-8)") from err
        text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the text
        if text.strip():
            parts.append(text)
        elif Path(path).is_file():
            raise UsageError("the text file is empty", str(file), "pass a file with text in it")
    if not parts:
        raise UsageError("every text file in the folder is empty", str(path), "pass files with text in them")
    return "\n\n".join(parts)


def read_text_tokens(file: str | Path, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The token ids of a text file (or a folder of text files), at most ``max_tokens`` of them.

    No special tokens are added: the ids are exactly the text's. With ``max_tokens`` only a
    growing prefix of the text is tokenized (cut at a line break, far enough beyond the last
    token kept that the kept tokens are those of the whole text).
    """
    check_max_tokens(max_tokens)
    return tokenize_text(read_text(file), tokenizer, max_tokens, str(file))


def check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"{flag('--max-tokens')} must be at least 2", f"{flag('--max-tokens')} {max_tokens}", f"e.g. {flag('--max-tokens')} 4096")


def tokenize_text(text: str, tokenizer, max_tokens: int | None = None, where: str | None = None) -> torch.Tensor:
    """Token ids of ``text`` (1-D, int64), at most ``max_tokens``; see ``read_text_tokens``."""
    check_max_tokens(max_tokens)
    ids = _encode_prefix(text, tokenizer, max_tokens)
    if not ids:
        raise UsageError("the text gives no tokens", where, "pass a file with text in it")
    return torch.tensor(ids, dtype=torch.long)


def _encode_prefix(text: str, tokenizer, max_tokens: int | None) -> list[int]:
    if max_tokens is None:
        return _encode(tokenizer, text)
    chars = max_tokens * _CHARS_PER_TOKEN
    while True:
        if chars >= len(text):
            return _encode(tokenizer, text)[:max_tokens]
        cut = text.rfind("\n", 0, chars)
        prefix = text[:cut] if cut > chars // 2 else text[:chars]
        ids = _encode(tokenizer, prefix)
        # The last few tokens of a prefix may merge differently in the whole text: keep a margin.
        if len(ids) >= max_tokens + 16:
            return ids[:max_tokens]
        chars *= 2


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: no "sequence longer than the model's maximum" warning; windows handle length.
    return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))


# --- training data: a token cache and a reproducible stream of random blocks -----------------

TOKEN_CACHE_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of what the tokenizer does (its serialized rules), to key caches and to
    refuse resuming a run with a different tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # a slow tokenizer: its vocabulary decides the ids
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_tokens(path: str | Path, tokenizer, cache_dir: str | Path | None) -> torch.Tensor:
    """The token ids of a text file or folder, tokenized once and cached as a uint16/uint32 file
    under ``cache_dir`` (keyed by the text's bytes and the tokenizer), read back on later calls."""
    import numpy as np

    text = read_text(path)
    key = hashlib.sha256(text.encode()).hexdigest()[:16] + "-" + tokenizer_fingerprint(tokenizer)
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    cache = Path(cache_dir) / f"{Path(path).name}-{key}-v{TOKEN_CACHE_VERSION}.{np.dtype(dtype).name}" if cache_dir else None
    if cache is not None and cache.is_file():
        return torch.from_numpy(np.fromfile(cache, dtype=dtype).astype(np.int64))
    tokens = tokenize_text(text, tokenizer, None, str(path))
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            temp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
            tokens.numpy().astype(dtype).tofile(temp)
            os.replace(temp, cache)  # atomic: a reader never sees half a cache
        except OSError:
            pass  # a cache is an optimization: an unwritable one only costs a re-tokenization
    return tokens


def check_block_fits(tokens: torch.Tensor, block_size: int, where: str) -> None:
    if tokens.numel() < block_size + 1:
        raise UsageError(f"the text has {tokens.numel()} tokens, fewer than one block of {block_size} + 1",
                         where, f"pass more text, or a smaller {flag('--block-size')}")


class TokenBatches:
    """Random blocks of a token stream: ``batch(step)`` draws one optimizer step's global batch.

    The draw comes from a generator seeded once, so the whole stream is fixed by the seed and
    its position is the generator's state (saved in checkpoints for an exact resume). Every
    process draws the same global batch and keeps its own slice of it.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int):
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> torch.Tensor:
        """[batch_size, block_size + 1] token ids: inputs are [:, :-1], targets [:, 1:]."""
        starts = torch.randint(0, self.tokens.numel() - self.block_size, (self.batch_size,), generator=self.generator)
        offsets = torch.arange(self.block_size + 1)
        return self.tokens[starts[:, None] + offsets]  # [batch, block + 1]

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def validation_blocks(tokens: torch.Tensor, block_size: int, max_blocks: int) -> torch.Tensor:
    """Sequential, non-overlapping [n, block_size + 1] windows from the start of the text."""
    count = min(max_blocks, (tokens.numel() - 1) // block_size)
    starts = torch.arange(count) * block_size
    return tokens[starts[:, None] + torch.arange(block_size + 1)]
