"""Training samples: Megatron's GPTDataset over an indexed dataset, cut into micro-batches.

Global batch ``i`` is samples ``[i * G, (i + 1) * G)``; data-parallel rank ``d`` takes its
contiguous ``G / dp`` of them in micro-batches. The union over ranks does not depend on
the parallel layout, which is what lets loss parity compare layouts step by step.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
import torch.distributed as dist
from corpus import ByteTokenizer, ensure_default_corpus
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig


class _VocabTokenizer(ByteTokenizer):
    """A real dataset's vocabulary size; end-of-document is its last id."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.pad = -1


def tokenizer_for(args: argparse.Namespace) -> ByteTokenizer:
    if args.data_path is None or args.vocab_size is None:
        return ByteTokenizer()
    return _VocabTokenizer(args.vocab_size)


def build_dataset(args: argparse.Namespace, num_samples: int) -> GPTDataset:
    """The training split; rank 0 writes the corpus and index caches, the others wait."""
    first = dist.get_rank() == 0
    if first and args.data_path is None:
        ensure_default_corpus(args.data_cache_path)
    dist.barrier()
    prefix = args.data_path or ensure_default_corpus(args.data_cache_path)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=([prefix], None),
        split="100,0,0",
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer_for(args),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    datasets = {}
    for building in (True, False):  # rank 0 builds the index caches, then the rest load them
        if first == building:
            datasets = BlendedMegatronDatasetBuilder(
                GPTDataset, [num_samples, 0, 0], lambda: True, config
            ).build()
        dist.barrier()
    return datasets[0]


def micro_batches(
    dataset: GPTDataset,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    first_iteration: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of this data-parallel rank from global batch ``first_iteration`` on."""
    per_rank = global_batch_size // dp_size
    iteration = first_iteration
    while True:
        start = iteration * global_batch_size + dp_rank * per_rank
        for m in range(per_rank // micro_batch_size):
            ids = range(start + m * micro_batch_size, start + (m + 1) * micro_batch_size)
            samples = [dataset[i % len(dataset)] for i in ids]
            yield {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        iteration += 1
