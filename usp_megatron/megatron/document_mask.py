"""Megatron-LM's document masking (``--reset-attention-mask``) as packed documents.

With ``--reset-attention-mask`` and the mask made in the data loader, megatron-core's
``GPTDataset`` gives each sample an ``[s, s]`` mask in which a token sees only the earlier
tokens of its own document (a document ends after each end-of-document token), and
Megatron's attention applies it on one rank. Context parallelism takes no such mask
(Megatron's own does not either), but USP attends packed documents (THD):
:func:`pack_masked_documents` turns the batch into one packed sequence, which Megatron-LM's
script then splits and hands the model as it does packed (SFT) data:

- the documents the mask keeps apart, in order, the micro-batch's samples one after
  another, each document padded to a multiple of ``2 x`` context-parallel size (padding has
  loss mask 0 and sees, and is seen by, nothing);
- tokens, labels, loss mask and the data loader's own position ids go along, so learned
  absolute positions see what they see on one rank; RoPE counts from 0 in every document
  (megatron-core's THD RoPE), the same scores as the one-rank positions, which differ from
  them by a constant within a document;
- the model's loss comes back ``[1, t]``: the loss function sums it flattened, over the
  same tokens with the same mask as on one rank.

The boundaries are read from the mask itself, on its device, which is checked to be such a
mask: one host read per batch, none in the layers.
"""

from __future__ import annotations

from typing import Any

import torch

#: The per-token entries of a Megatron-LM batch, ``[b, s]``, that are packed.
TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def document_starts(attention_mask: torch.Tensor) -> list[list[int]]:
    """The first position of every document of each sample.

    ``attention_mask``: ``[b, 1, s, s]`` bool, True where a query must not see a key
    (Megatron's convention). Refused unless each query sees exactly the keys from the start
    of its document to itself, documents one after another: what ``--reset-attention-mask``
    makes (and, with one document, a causal mask).
    """
    mask = attention_mask
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(
            "the data loader's attention mask must be [b, 1, s, s] bool (True: masked, as "
            f"megatron-core's GPTDataset makes it), got {mask.dtype} {tuple(mask.shape)}"
        )
    s = mask.shape[-1]
    positions = torch.arange(s, device=mask.device)
    causal = positions[None, :] <= positions[:, None]
    is_document_mask = torch.ones((), dtype=torch.bool, device=mask.device)
    firsts = []
    for sample in mask[:, 0]:  # one sample at a time: temporaries of one [s, s]
        visible = ~sample
        first = visible.to(torch.uint8).argmax(-1)  # [s] the first key each query sees
        expected = causal & (positions[None, :] >= first[:, None])
        same_or_new = (first[1:] == first[:-1]) | (first[1:] == positions[1:])
        is_document_mask &= (expected == visible).all() & same_or_new.all()
        firsts.append(first)
    # The one host read: whether it is a document mask, and where documents start.
    starts = torch.stack(firsts) == positions
    read = torch.cat([is_document_mask.view(1), starts.flatten()]).cpu()
    if not bool(read[0]):
        raise ValueError(
            "the data loader's attention mask is not --reset-attention-mask's document mask "
            "(each token sees the earlier tokens of its own document): USP attends documents "
            "as packed documents and takes no other [s, s] mask; drop the mask or --usp-* flags"
        )
    rows = read[1:].view(-1, s)
    return [row.nonzero().flatten().tolist() for row in rows]


def pack_masked_documents(batch: dict[str, Any], multiple: int) -> dict[str, Any]:
    """``batch`` (Megatron-LM's, ``[b, s]`` entries and an ``attention_mask`` from
    ``--reset-attention-mask``) as one packed sequence of documents, each padded to a
    multiple of ``multiple``: the per-token entries ``[1, t]`` (padding: token, label and
    position 0, loss mask 0), ``attention_mask`` None, and the packing entries Megatron-LM's
    THD path reads: ``cu_seqlens`` (real lengths) and ``cu_seqlens_padded`` ``[1, n + 1]``
    int32, ``max_seqlen`` ``[1]`` int32 (the longest padded document). Other entries are
    kept; the keys keep their order (Megatron-LM 0.16 returns the values in order)."""
    tokens = batch["tokens"]
    b, s = tokens.shape
    starts = document_starts(batch["attention_mask"])
    real, source = [], []
    for sample, sample_starts in enumerate(starts):
        bounds = [*sample_starts, s]
        real += [stop - start for start, stop in zip(bounds, bounds[1:])]
        source += [sample * s + start for start in sample_starts]
    real_t = torch.tensor(real)
    padded_t = (real_t + multiple - 1) // multiple * multiple
    zero = torch.zeros(1, dtype=torch.int64)
    cu_real, cu_padded = (torch.cat([zero, x.cumsum(0)]) for x in (real_t, padded_t))
    # Token i of the packed sequence: document n, offset i - cu_padded[n] inside it.
    document = torch.repeat_interleave(torch.arange(len(real)), padded_t)
    offset = torch.arange(int(cu_padded[-1])) - cu_padded[document]
    is_real = offset < real_t[document]
    index = torch.where(is_real, torch.tensor(source)[document] + offset, 0)
    device = tokens.device
    index, is_real = index.to(device), is_real.to(device)
    packed = dict(batch)
    for key in TOKEN_KEYS:
        value = batch.get(key)
        if value is not None:
            taken = value.reshape(-1).index_select(0, index)
            packed[key] = torch.where(is_real, taken, torch.zeros_like(taken))[None]
    packed["attention_mask"] = None

    def int32(values: torch.Tensor) -> torch.Tensor:
        return values.to(device=device, dtype=torch.int32)

    packed["cu_seqlens"] = int32(cu_real)[None]
    packed["cu_seqlens_padded"] = int32(cu_padded)[None]
    packed["max_seqlen"] = int32(padded_t.max().view(1))
    return packed
