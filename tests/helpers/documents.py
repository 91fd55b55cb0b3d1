"""An indexed dataset of short documents (megatron-core's own ``.bin/.idx`` format), so that
every sample of a few dozen tokens holds document boundaries."""

from __future__ import annotations

from pathlib import Path

import numpy
import torch


def write_short_documents(
    prefix: Path, eod: int, vocab: int, num_docs: int = 400, longest: int = 24, seed: int = 3
) -> str:
    """``num_docs`` documents of 1 to ``longest`` random tokens below ``vocab``, each ended by
    ``eod`` (as Megatron-LM's ``preprocess_data.py --append-eod`` writes them); returns the
    prefix Megatron reads (``--data-path``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    for length in rng.integers(1, longest + 1, size=num_docs):
        document = [*rng.integers(0, vocab, size=length).tolist(), eod]
        builder.add_document(torch.tensor(document), [len(document)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)
