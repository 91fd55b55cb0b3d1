"""Per-rank checks of the batch split, RoPE slice, USPAttention's construction checks and
the Megatron-LM hooks on real Megatron groups (test_megatron_layout.py runs them in one
world of 4 CPU processes)."""

from __future__ import annotations

import argparse
import inspect

import torch
import torch.distributed as dist

WORLD, SEQ = 4, 32
LAYOUTS = ((4, 1), (2, 2), (1, 4))


def _init(cp_sizes: list[int] | None, cp: int) -> None:
    from megatron.core import parallel_state as ps

    from usp_megatron.megatron import reset_model_parallel

    reset_model_parallel()
    ps.initialize_model_parallel(
        context_parallel_size=cp,
        hierarchical_context_parallel_sizes=cp_sizes,
        create_gloo_process_groups=False,
    )


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "tokens": torch.randint(0, 100, (2, SEQ), generator=gen),
        "labels": torch.randint(0, 100, (2, SEQ), generator=gen),
        "loss_mask": torch.rand(2, SEQ, generator=gen),
        "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous(),
        "attention_mask": torch.rand(2, 1, SEQ, SEQ, generator=gen) > 0.5,
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _megatron_split_options() -> dict:
    """What Megatron's ``get_batch_on_this_cp_rank`` needs besides the batch: megatron-core
    0.19 added a required ``is_hybrid_cp`` and takes the world for a missing ``cp_group``."""
    from megatron.core import parallel_state as ps
    from megatron.core import utils as mcore_utils

    options: dict = {"cp_group": ps.get_context_parallel_group()}
    if "is_hybrid_cp" in inspect.signature(mcore_utils.get_batch_on_this_cp_rank).parameters:
        options["is_hybrid_cp"] = False
    return options


def _layout_checks(impl_positions: dict) -> dict[str, bool]:
    from megatron.core import utils as mcore_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from usp_megatron import local_positions
    from usp_megatron.megatron import (
        USPRotaryEmbedding,
        get_batch_on_this_usp_rank,
        usp_groups_from_megatron,
    )
    from usp_megatron.megatron.batch import PACKED_SEQUENCE_KEYS
    from usp_megatron.megatron.megatron_lm import wrap_batch_split, wrap_rotary_embedding

    checks = {}
    batch = _batch()
    options = _megatron_split_options()
    megatron_split = mcore_utils.get_batch_on_this_cp_rank(dict(batch), **options)
    checks["zigzag batch == Megatron's"] = _same(
        get_batch_on_this_usp_rank(batch, "zigzag"), megatron_split
    )
    unpacked = dict.fromkeys(PACKED_SEQUENCE_KEYS)  # Megatron-LM core_v0.19.0's batch has them
    split = get_batch_on_this_usp_rank(batch | unpacked, "zigzag")
    checks["None packed-sequence entries kept"] = all(
        split.pop(key, "missing") is None for key in unpacked
    ) and _same(split, megatron_split)
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)
    full = rope.get_emb(SEQ)
    checks["zigzag RoPE == Megatron's"] = torch.equal(
        USPRotaryEmbedding.adopt(rope, "zigzag")(SEQ), rope(SEQ)
    )
    args = argparse.Namespace(usp_ulysses_degree=1, usp_ring_degree=1, usp_ring_impl="zigzag")
    split_hook = wrap_batch_split(mcore_utils.get_batch_on_this_cp_rank, lambda: args)
    rope_hook = wrap_rotary_embedding(RotaryEmbedding, lambda: args)
    checks["hooks off: Megatron's split"] = _same(
        split_hook(dict(batch), **options), megatron_split
    )
    checks["hooks off: Megatron's RoPE"] = type(rope_hook(16, 1.0)) is RotaryEmbedding
    g = usp_groups_from_megatron()  # the flags' degrees are the groups' (the hooks resolve them)
    args.usp_ulysses_degree, args.usp_ring_degree = g.ulysses_degree, g.ring_degree
    for impl in ("basic", "zigzag", "stripe"):
        positions = local_positions(
            SEQ, g.ulysses_degree, g.ring_degree, g.ulysses_rank, g.ring_rank, impl
        )
        impl_positions[impl] = positions
        mine = get_batch_on_this_usp_rank(batch, impl)
        checks[f"{impl} batch at local_positions"] = all(
            torch.equal(
                mine[k], batch[k].index_select(2 if k == "attention_mask" else 1, positions)
            )
            for k in batch
        )
        usp_rope = USPRotaryEmbedding.adopt(rope, impl)
        checks[f"{impl} RoPE rows at local_positions"] = torch.equal(
            usp_rope(SEQ), full.index_select(0, positions)
        )
        args.usp_ring_impl = impl
        checks[f"{impl} batch hook"] = _same(split_hook(dict(batch), **options), mine)
        built = rope_hook(16, 1.0, use_cpu_initialization=True)
        checks[f"{impl} RoPE hook"] = torch.equal(built(SEQ), usp_rope(SEQ))
    return checks


def _covers_sequence_once(positions: torch.Tensor) -> bool:
    gathered = [torch.empty_like(positions) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, positions)
    return torch.equal(torch.cat(gathered).sort().values, torch.arange(SEQ))


def _attention_error(**overrides) -> str:
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from usp_megatron.megatron import USPAttention

    options = dict(num_layers=1, hidden_size=64, num_attention_heads=8, attention_dropout=0.0,
                   context_parallel_size=4)  # fmt: skip
    mask = overrides.pop("attn_mask_type", AttnMaskType.causal)
    options.update(overrides)
    try:
        USPAttention(TransformerConfig(**options), 1, mask, "self")
    except ValueError as error:
        return str(error)
    return "no error"


def _packed_batch_error() -> str:
    from usp_megatron.megatron import get_batch_on_this_usp_rank

    packed = _batch() | {"local_cp_size": 2, "cu_seqlens": None}
    try:
        get_batch_on_this_usp_rank(packed)
    except ValueError as error:
        return str(error)
    return "no error"


def run_layout_checks() -> dict[str, object]:
    from megatron.core.transformer.enums import AttnMaskType

    from usp_megatron.megatron import install_cpu_shim

    install_cpu_shim(force=True)
    results: dict[str, object] = {}
    for u, r in LAYOUTS:
        _init([u, r], u * r)
        impl_positions: dict = {}
        for name, ok in _layout_checks(impl_positions).items():
            results[f"U{u}R{r} {name}"] = ok
        for impl, positions in impl_positions.items():
            results[f"U{u}R{r} {impl} covers the sequence once"] = _covers_sequence_once(positions)
    _init([4, 1], 4)
    results["error: packed"] = _packed_batch_error()
    results["error: heads"] = _attention_error(num_attention_heads=2)
    results["error: dropout"] = _attention_error(attention_dropout=0.1)
    results["error: mask"] = _attention_error(attn_mask_type=AttnMaskType.padding)
    _init(None, 4)
    results["error: no hierarchical groups"] = _attention_error()
    return results
