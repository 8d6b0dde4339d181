"""inputs/text.py: text files and folders read (a byte-order mark dropped, empty, binary, non-UTF-8 and
missing files refused), a prefix of the tokens read without tokenizing the rest, and tokenizers from
every source agreeing."""

from __future__ import annotations

import pytest

from inrank_convert.core.errors import UsageError, cli_flags
from inrank_convert.inputs.text import load_tokenizer, read_text, read_text_tokens
from tests.helpers.eval_models import TOKENIZER_DIR, WIKI_TEST, gpt2_tokenizer, needs_data


@needs_data
def test_max_tokens_reads_the_prefix_of_the_whole_text(tmp_path):
    tokenizer = gpt2_tokenizer()
    text = WIKI_TEST.read_text()[:60_000]
    (tmp_path / "slice.txt").write_text(text)
    whole = tokenizer.encode(text, verbose=False)
    assert len(whole) > 3000
    for count in (2, 100, 2048, len(whole), len(whole) + 10):
        ids = read_text_tokens(tmp_path / "slice.txt", tokenizer, max_tokens=count)
        assert ids.tolist() == whole[:count]


@needs_data
def test_tokenizers_from_every_source_agree(eval_models):
    expected = [15496, 995]  # "Hello world" (shared/data/README.md)
    assert load_tokenizer(None, TOKENIZER_DIR).encode("Hello world") == expected  # vocab.json + merges.txt
    assert load_tokenizer(eval_models.half).encode("Hello world") == expected  # tokenizer.json copied by compress
    assert load_tokenizer(None, eval_models.half / "tokenizer.json").encode("Hello world") == expected


def test_no_tokenizer_suggests_the_option(tmp_path):
    with cli_flags({"--tokenizer"}), pytest.raises(UsageError, match="--tokenizer"):
        load_tokenizer([tmp_path])
    with pytest.raises(UsageError, match="pass tokenizer DIR"):  # from Python: the parameter, not a flag
        load_tokenizer([tmp_path])
    with pytest.raises(UsageError, match="no tokenizer files"):
        load_tokenizer([tmp_path], tmp_path)


def test_folder_of_text_files(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first file")
    (folder / "sub" / "b.txt").write_text("\ufeffsecond file")  # a byte-order mark is dropped
    (folder / ".hidden").write_text("never read")
    (folder / "empty.txt").write_text("  \n")
    assert read_text(folder) == "first file\n\nsecond file"


@pytest.mark.parametrize("content, says", [(b"", "empty"), (b" \n\n ", "empty"), (b"text\x00more", "NUL"),
                                           (b"caf\xe9 au lait", "UTF-8")])
def test_bad_text_files(tmp_path, content, says):
    (tmp_path / "data.txt").write_bytes(content)
    with pytest.raises(UsageError, match=says):
        read_text(tmp_path / "data.txt")


def test_missing_text_and_empty_folder(tmp_path):
    with pytest.raises(UsageError, match="no such"):
        read_text(tmp_path / "nothing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no text files"):
        read_text(tmp_path / "empty")
