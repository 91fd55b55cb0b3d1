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


class DocumentsTokenizer:
    """What megatron-core's GPTDataset asks of a tokenizer, for ids below ``vocab``:
    end-of-document ``vocab``, padding ``vocab + 1``."""

    def __init__(self, vocab: int) -> None:
        self.eod, self.pad, self.vocab_size = vocab, vocab + 1, vocab + 2

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "vocab_size": self.vocab_size}


def gpt_dataset(prefix: str, seq_length: int, num_samples: int, vocab: int, **flags: bool):
    """megatron-core's GPTDataset (train split) over ``prefix``, with Megatron-LM's dataset
    flags (``reset_position_ids``, ``reset_attention_mask``, ``eod_mask_loss``,
    ``create_attention_mask``); rank 0 writes the index caches, the other ranks then load
    them (every rank of the world calls it)."""
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="100,0,0",
        path_to_cache=str(Path(prefix).parent / "cache"),
        tokenizer=DocumentsTokenizer(vocab),
        mid_level_dataset_surplus=0.005,
        **flags,
    )
    first = dist.get_rank() == 0
    datasets: list = []
    for building in (True, False):
        if first == building:
            datasets = BlendedMegatronDatasetBuilder(
                GPTDataset, [num_samples, 0, 0], lambda: True, config
            ).build()
        dist.barrier()
    return datasets[0]
