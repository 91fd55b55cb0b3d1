"""The embedded default corpus: Python's own ``pydoc_data.topics`` text, byte-level tokens.

It is on every machine with Python, needs no download and no tokenizer files, and is
written once in Megatron's indexed format (``.bin``/``.idx``), so the rest of the driver
reads it exactly as it reads a real ``--data-path`` dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path


class ByteTokenizer:
    """Bytes 0-255, then end-of-document and padding: what GPTDataset asks of a tokenizer."""

    eod = 256
    pad = 257
    vocab_size = 258

    @property
    def unique_identifiers(self) -> dict:
        """Part of the dataset's cache key (GPTDataset hashes its tokenizer's identity)."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def default_documents() -> list[str]:
    """One document per pydoc topic, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def write_indexed_dataset(path_prefix: str, documents: list[str]) -> None:
    """Tokenize ``documents`` (each ends with EOD) into ``path_prefix``.bin/.idx."""
    tokenizer = ByteTokenizer()
    Path(path_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f"{path_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=np.uint16)
    for text in documents:
        ids = tokenizer.tokenize(text) + [tokenizer.eod]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(get_idx_path(tmp_prefix))
    # Rename last, .idx after .bin: a reader that sees the .idx sees a complete dataset.
    os.replace(get_bin_path(tmp_prefix), get_bin_path(path_prefix))
    os.replace(get_idx_path(tmp_prefix), get_idx_path(path_prefix))


def ensure_default_corpus(data_dir: str) -> str:
    """The default dataset's path prefix under ``data_dir``, written on first use."""
    prefix = str(Path(data_dir) / "pydoc_topics_bytes")
    if not Path(get_idx_path(prefix)).exists():
        write_indexed_dataset(prefix, default_documents())
    return prefix


def default_line_documents() -> list[str]:
    """The same topics one line per document (blank lines dropped): documents shorter than
    a CI-sized sample, so that packed samples (``--pack-documents``) hold several."""
    return [line for text in default_documents() for line in text.splitlines() if line.strip()]


def ensure_line_corpus(data_dir: str) -> str:
    """:func:`ensure_default_corpus` with one document per line."""
    prefix = str(Path(data_dir) / "pydoc_lines_bytes")
    if not Path(get_idx_path(prefix)).exists():
        write_indexed_dataset(prefix, default_line_documents())
    return prefix
