"""Training samples: Megatron's GPTDataset over an indexed dataset, cut into micro-batches.

Global batch ``i`` is samples ``[i * G, (i + 1) * G)``; data-parallel rank ``d`` takes its
contiguous ``G / dp`` of them in micro-batches. The union over ranks does not depend on
the parallel layout, which is what lets loss parity compare layouts step by step.

``--pack-documents``: every sample is cut at its end-of-document tokens into documents,
each padded to a multiple of ``--pack-pad-multiple`` (default ``2 * C``, what the THD
layout needs), and carries ``cu_seqlens``, ``cu_seqlens_padded`` and ``max_seqlen``: the
packed (THD) batch Megatron's SFT datasets give, with batch size 1.

Megatron-LM's ``--reset-position-ids`` and ``--eod-mask-loss`` go to the GPTDataset, which
makes the position ids and loss mask as in Megatron-LM; ``--reset-attention-mask`` packs
the documents as ``--pack-documents`` does but keeps those (``--pack-documents`` alone is
the three flags together).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from corpus import ByteTokenizer, ensure_default_corpus, ensure_line_corpus
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
    ensure_corpus = ensure_line_corpus if args.pack_documents else ensure_default_corpus
    if first and args.data_path is None:
        ensure_corpus(args.data_cache_path)
    dist.barrier()
    prefix = args.data_path or ensure_corpus(args.data_cache_path)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=([prefix], None),
        split="100,0,0",
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer_for(args),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=False,  # documents are packed (pack_documents), not masked
        eod_mask_loss=args.eod_mask_loss,
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


def pack_documents(
    sample: dict[str, torch.Tensor],
    eod: int,
    multiple: int,
    per_sample: int | None = None,
    sample_masks: bool = False,
) -> dict[str, torch.Tensor]:
    """One GPTDataset sample as packed documents (THD): cut after every end-of-document
    token (or, with ``per_sample``, into that many equal documents), each document padded
    to a multiple of ``multiple``. Padding has loss mask 0, and so has a document's
    end-of-document token, whose label is the next document's first token (which document
    masking makes unpredictable). Position ids count per document. ``sample_masks``: the
    sample's own position ids and loss mask instead (Megatron-LM's ``--reset-attention-mask``,
    the other two flags deciding them in the dataset); padding gets position 0."""
    tokens = sample["tokens"]
    if per_sample is None:
        ends = (tokens == eod).nonzero().flatten().add(1).tolist()
    else:
        ends = [len(tokens) * (n + 1) // per_sample for n in range(per_sample)]
    bounds = sorted({0, *ends, len(tokens)})
    pieces: dict[str, list[torch.Tensor]] = {k: [] for k in ("tokens", "labels", "loss_mask")}
    positions, real, padded = [], [], []
    for start, stop in zip(bounds, bounds[1:]):
        length = stop - start
        pad = -length % multiple
        loss_mask = sample["loss_mask"][start:stop].clone()
        if tokens[stop - 1] == eod and not sample_masks:
            loss_mask[-1] = 0.0
        pieces["tokens"] += [tokens[start:stop], torch.full((pad,), eod, dtype=tokens.dtype)]
        pieces["labels"] += [sample["labels"][start:stop], torch.zeros(pad, dtype=tokens.dtype)]
        pieces["loss_mask"] += [loss_mask, torch.zeros(pad, dtype=loss_mask.dtype)]
        if sample_masks:
            positions += [sample["position_ids"][start:stop], torch.zeros(pad, dtype=torch.long)]
        else:
            positions.append(torch.arange(length + pad))
        real.append(length)
        padded.append(length + pad)
    packed = {key: torch.cat(value) for key, value in pieces.items()}
    packed["position_ids"] = torch.cat(positions)
    packed["cu_seqlens"] = torch.tensor([0, *real]).cumsum(0, dtype=torch.int32)
    packed["cu_seqlens_padded"] = torch.tensor([0, *padded]).cumsum(0, dtype=torch.int32)
    packed["max_seqlen"] = torch.tensor(max(padded), dtype=torch.int32)
    return packed


def micro_batches(
    dataset: GPTDataset,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    first_iteration: int,
    transform: Callable[[dict], dict] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of this data-parallel rank from global batch ``first_iteration`` on;
    ``transform`` (e.g. :func:`pack_documents`) applies to each sample."""
    per_rank = global_batch_size // dp_size
    iteration = first_iteration
    while True:
        start = iteration * global_batch_size + dp_rank * per_rank
        for m in range(per_rank // micro_batch_size):
            ids = range(start + m * micro_batch_size, start + (m + 1) * micro_batch_size)
            samples = [dataset[i % len(dataset)] for i in ids]
            if transform is not None:
                samples = [transform(sample) for sample in samples]
            yield {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        iteration += 1
