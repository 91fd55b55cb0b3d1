"""Packed documents (THD) in Megatron: the batch split against Megatron's THD index rule,
the PackedSeqParams it gives back, the Megatron-LM hook, and RoPE: Megatron's own THD
rotary on a USP shard gives every token the angle of its position in its document."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers.oracle import thd_partitioned_indices

from usp_megatron.groups import USPGroups
from usp_megatron.megatron.batch import get_batch_on_this_usp_rank, get_thd_batch_on_this_usp_rank

DEGREES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]
PADDED = [0, 16, 24, 56, 64]
REAL = [0, 13, 14, 44, 45]


def _groups(ulysses, ring, cp_rank):
    return USPGroups(None, None, ulysses, ring, cp_rank % ulysses, cp_rank // ulysses)


def _batch(seq_len):
    gen = torch.Generator().manual_seed(5)
    return {
        "tokens": torch.randint(0, 100, (1, seq_len), generator=gen),
        "labels": torch.randint(0, 100, (1, seq_len), generator=gen),
        "loss_mask": torch.rand(1, seq_len, generator=gen),
        "position_ids": torch.arange(seq_len)[None],
        "attention_mask": None,
    }


@pytest.mark.parametrize("ulysses,ring", DEGREES)
def test_thd_batch_split_is_megatrons(ulysses, ring):
    cp = ulysses * ring
    padded = torch.tensor(PADDED, dtype=torch.int32)
    real = torch.tensor(REAL, dtype=torch.int32)
    batch = _batch(PADDED[-1])
    for c in range(cp):
        split, params = get_thd_batch_on_this_usp_rank(
            batch, real, padded, torch.tensor([32]), groups=_groups(ulysses, ring, c)
        )
        index = thd_partitioned_indices(PADDED, cp, c)
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(split[key], batch[key].index_select(1, index)), (key, c)
        assert split["attention_mask"] is None
        assert params.qkv_format == "thd" and params.max_seqlen_q == params.max_seqlen_kv == 32
        assert params.cu_seqlens_q is real and params.cu_seqlens_kv is real
        assert params.cu_seqlens_q_padded is padded and params.cu_seqlens_kv_padded is padded


def test_batch_with_cu_seqlens_is_split_as_thd():
    padded = torch.tensor([PADDED], dtype=torch.int32)  # as a data loader batches it
    batch = dict(_batch(PADDED[-1]), cu_seqlens=torch.tensor([REAL]), cu_seqlens_padded=padded)
    split = get_batch_on_this_usp_rank(batch, groups=_groups(2, 2, 3))
    index = thd_partitioned_indices(PADDED, 4, 3)
    assert torch.equal(split["tokens"], batch["tokens"].index_select(1, index))
    assert split["cu_seqlens"] is batch["cu_seqlens"]
    params = split["packed_seq_params"]
    assert params.max_seqlen_q == 32  # the longest padded document
    assert params.cu_seqlens_q_padded.tolist() == PADDED


def test_thd_batch_split_refuses_stripe():
    with pytest.raises(ValueError, match="need the zigzag layout, got 'stripe'"):
        get_thd_batch_on_this_usp_rank(
            _batch(PADDED[-1]), torch.tensor(REAL), torch.tensor(PADDED), 32, "stripe",
            _groups(2, 1, 0),
        )  # fmt: skip


class _FakeCPGroup:
    """What Megatron's THD RoPE reads of the context-parallel group: size and rank."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("ulysses,ring", DEGREES)
def test_megatron_thd_rope_on_a_usp_shard_is_per_document(ulysses, ring, monkeypatch):
    """GPTModel's packed path (unsliced table, ``_apply_rotary_pos_emb_thd`` with the CP
    group) on this rank's tokens = the one-rank rotary at each token's document position."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # RoPE's table device
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from usp_megatron import local_positions

    cp, dim = ulysses * ring, 8
    rotary = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, use_cpu_initialization=True)
    freqs = rotary(32, packed_seq=True)  # [max_seqlen, 1, 1, dim]: what GPTModel passes
    padded = torch.tensor(PADDED, dtype=torch.int32)
    full = torch.randn(PADDED[-1], 2, dim, dtype=torch.float64).float()
    one_rank = _apply_rotary_pos_emb_thd(full, padded, freqs, cp_group=_FakeCPGroup(1, 0))
    for c in range(cp):
        u, r = c % ulysses, c // ulysses
        positions = local_positions(PADDED[-1], ulysses, ring, u, r, "zigzag", padded)
        mine = _apply_rotary_pos_emb_thd(
            full[positions], padded, freqs, cp_group=_FakeCPGroup(cp, c)
        )
        assert torch.equal(mine, one_rank[positions]), c


@pytest.mark.parametrize("ulysses,ring", DEGREES)
def test_vectorised_packed_rope_equals_megatrons_per_document_loop(ulysses, ring, monkeypatch):
    """USP's RoPE for packed batches (the rows of the batch's ``PackedBatch``, one gather)
    gives exactly what Megatron's per-document ``_apply_rotary_pos_emb_thd`` gives on every
    rank's shard, queries [t, h, d] and [t, 1, h, d], plain and interleaved."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from usp_megatron.megatron.packed_rope import apply_rotary_pos_emb_usp

    cp, dim = ulysses * ring, 8
    padded = torch.tensor(PADDED, dtype=torch.int32)
    real = torch.tensor(REAL, dtype=torch.int32)
    gen = torch.Generator().manual_seed(11)
    full = torch.randn(PADDED[-1], 3, dim, generator=gen)
    for interleaved in (False, True):
        rotary = RotaryEmbedding(
            kv_channels=dim, rotary_percent=1.0, rotary_interleaved=interleaved,
            use_cpu_initialization=True,
        )  # fmt: skip
        freqs = rotary(32, packed_seq=True)
        config = argparse.Namespace(apply_rope_fusion=False, rotary_interleaved=interleaved)
        for c in range(cp):
            boundaries = padded.clone()  # each rank its own batch, as in training
            split, _ = get_thd_batch_on_this_usp_rank(
                {"tokens": torch.arange(PADDED[-1])[None]}, real, boundaries, 32,
                groups=_groups(ulysses, ring, c),
            )  # fmt: skip
            mine = full[split["tokens"][0]]
            want = _apply_rotary_pos_emb_thd(
                mine, boundaries, freqs, rotary_interleaved=interleaved,
                cp_group=_FakeCPGroup(cp, c),
            )  # fmt: skip
            got = apply_rotary_pos_emb_usp(mine, freqs, config, cu_seqlens=boundaries)
            assert torch.equal(got, want), (interleaved, c)
            got4 = apply_rotary_pos_emb_usp(mine[:, None], freqs, config, cu_seqlens=boundaries)
            assert torch.equal(got4[:, 0], want), (interleaved, c)


def test_packed_layout_is_built_once_per_batch(monkeypatch):
    """The batch split reads the boundaries on the host once and attaches the layout; a
    layer (and RoPE) then finds it without reading them again; another rank's split of the
    same tensor gets its own rows."""
    from usp_megatron.layout import ZigzagLayout, get_layout
    from usp_megatron.megatron import packed_batch

    builds = []
    real_build = ZigzagLayout.packed
    monkeypatch.setattr(
        ZigzagLayout, "packed", lambda *a, **k: builds.append(1) or real_build(*a, **k)
    )
    padded, real = torch.tensor(PADDED, dtype=torch.int32), torch.tensor(REAL, dtype=torch.int32)
    groups, zigzag = _groups(2, 2, 1), get_layout("zigzag", 2, 2)
    _, params = get_thd_batch_on_this_usp_rank(_batch(PADDED[-1]), real, padded, 32, groups=groups)
    for _ in range(24):  # every layer asks
        found = packed_batch.attach_packed_batch(
            params.cu_seqlens_q_padded, params.cu_seqlens_q, zigzag, groups
        )
    assert len(builds) == 1 and found is packed_batch.packed_batch_of(padded)
    other = packed_batch.attach_packed_batch(padded, real, zigzag, _groups(2, 2, 2))
    assert len(builds) == 2 and (other.ulysses_rank, other.ring_rank) == (0, 1)


def test_boundaries_refilled_in_place_get_a_new_layout():
    """A boundaries tensor refilled in place with another batch's documents (its version
    counter moves) gets the layout of the new documents, not the attached old one."""
    from usp_megatron.layout import get_layout
    from usp_megatron.megatron import packed_batch

    groups, zigzag = _groups(2, 2, 1), get_layout("zigzag", 2, 2)
    padded, real = torch.tensor(PADDED, dtype=torch.int32), torch.tensor(REAL, dtype=torch.int32)
    first = packed_batch.attach_packed_batch(padded, real, zigzag, groups)
    assert packed_batch.attach_packed_batch(padded, real, zigzag, groups) is first
    padded.copy_(torch.tensor([0, 8, 32, 48, 64]))
    real.copy_(torch.tensor([0, 5, 29, 45, 60]))
    second = packed_batch.attach_packed_batch(padded, real, zigzag, groups)
    assert second is not first and second.layout.cu_seqlens_padded == (0, 8, 32, 48, 64)
    real[1] = 7  # the real boundaries alone refilled
    third = packed_batch.attach_packed_batch(padded, real, zigzag, groups)
    assert third.layout.cu_seqlens == (0, 7, 29, 45, 60)


def test_megatron_lm_thd_hook_routes_to_usp_when_enabled():
    from usp_megatron.megatron.megatron_lm import wrap_thd_batch_split

    calls = []

    def megatron_split(batch, cu_seqlens, cu_seqlens_padded, max_seqlen):
        calls.append("megatron")
        return batch, None

    enabled = argparse.Namespace(usp_ulysses_degree=1, usp_ring_degree=1, usp_ring_impl="zigzag")
    hooked = wrap_thd_batch_split(megatron_split, lambda: enabled)
    assert wrap_thd_batch_split(hooked, lambda: enabled) is hooked
    hooked(_batch(PADDED[-1]), torch.tensor(REAL), torch.tensor(PADDED), torch.tensor([32]))
    assert calls == ["megatron"]
