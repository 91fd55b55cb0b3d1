"""Bad inputs to the public API, tried on every rank of a small world."""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_megatron import LongContextAttention, init_usp_groups
from usp_megatron.layout import get_layout


def _raises(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


def try_bad_inputs() -> dict[str, str]:
    """Each bad input's ValueError message (or 'no error'); world size 4."""
    assert dist.get_world_size() == 4
    messages = {
        "degree product": _raises(lambda: init_usp_groups(2, 3)),
        "zero degree": _raises(lambda: init_usp_groups(0, 4)),
    }
    groups = init_usp_groups(2, 2)
    attn = LongContextAttention(groups, layout="zigzag", backend="reference")
    x = torch.randn(1, 4, 4, 8)
    one_head = torch.randn(1, 4, 1, 8)
    messages["heads vs ulysses"] = _raises(lambda: attn(one_head, one_head, one_head))
    three_heads = torch.randn(1, 4, 3, 8)
    messages["uneven head chunks"] = _raises(
        lambda: LongContextAttention(groups, head_chunks=2)(three_heads, three_heads, three_heads)
    )
    messages["gqa ratio"] = _raises(
        lambda: attn(x, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    )
    messages["zigzag seq len"] = _raises(lambda: attn(*(torch.randn(1, 3, 4, 8) for _ in range(3))))
    messages["dtype mismatch"] = _raises(lambda: attn(x, x.double(), x.double()))
    messages["shape mismatch"] = _raises(lambda: attn(x, x[:, :2], x[:, :2]))
    messages["not 4-D"] = _raises(lambda: attn(x[0], x[0], x[0]))
    messages["unknown impl"] = _raises(lambda: LongContextAttention(groups, layout="spiral"))
    messages["layout vs ring_impl"] = _raises(
        lambda: LongContextAttention(groups, "stripe", ring_impl="basic")
    )
    messages["layout of other degrees"] = _raises(
        lambda: LongContextAttention(groups, get_layout("zigzag", 4, 1))
    )
    messages["stripe shard, zigzag attention"] = _raises(
        lambda: attn(x, x, x, layout=get_layout("stripe", 2, 2))
    )
    messages["unknown backend"] = _raises(lambda: LongContextAttention(groups, backend="xformers"))
    messages["head chunks"] = _raises(lambda: LongContextAttention(groups, head_chunks=3)(x, x, x))
    messages["zero head chunks"] = _raises(lambda: LongContextAttention(groups, head_chunks=0))
    messages["backend on wrong device"] = _raises(
        lambda: LongContextAttention(groups, backend="torch_flash")(x, x, x)
    )
    # Ranks with different shards would crash gloo in the all-to-all: one message instead.
    longer = torch.randn(1, 4 if dist.get_rank() == 0 else 8, 4, 8)
    messages["lengths differ"] = _raises(lambda: attn(longer, longer, longer))
    messages["causal differs"] = _raises(lambda: attn(x, x, x, causal=dist.get_rank() != 3))
    # [b, h, s, d] would be read as [b, s, h, d]: refused where the caller states the heads.
    stated = LongContextAttention(groups, num_heads=4, num_kv_heads=4, head_dim=8)
    bhsd = torch.randn(1, 4, 8, 8)
    messages["[b, h, s, d] for bshd"] = _raises(lambda: stated(bhsd, bhsd, bhsd))
    messages["unknown qkv_format"] = _raises(
        lambda: LongContextAttention(groups, qkv_format="bhsd")
    )
    messages["zero num_heads"] = _raises(lambda: LongContextAttention(groups, num_heads=0))
    messages["shard dim"] = _raises(lambda: attn.shard(x, dim=4))
    messages["integer q"] = _raises(lambda: attn(x.int(), x.int(), x.int()))
    messages["head_dim 0"] = _raises(lambda: attn(*(x[..., :0] for _ in range(3))))
    messages["softmax_scale"] = _raises(lambda: attn(x, x, x, softmax_scale="0.1"))
    messages["gather shapes differ"] = _raises(lambda: attn.gather(longer))
    # After all the refusals the world still works: nothing was left half-way in a collective.
    out = attn(x, x, x)
    messages["still works"] = "ok" if out.shape == x.shape else "bad shape"
    # Megatron's [s, b, h, d] order gives the same attention, transposed.
    sbhd = LongContextAttention(groups, layout="zigzag", qkv_format="sbhd", num_heads=4)
    seq_first = torch.randn(16, 2, 4, 8, generator=torch.Generator().manual_seed(3))
    shard = sbhd.shard(seq_first)  # along dim 0
    same = torch.allclose(
        sbhd(shard, shard, shard).transpose(0, 1),
        attn(*(shard.transpose(0, 1) for _ in range(3))),
        rtol=0, atol=1e-6,
    )  # fmt: skip
    messages["sbhd matches bshd"] = "ok" if shard.shape[0] == 4 and same else "differs"
    out = attn(three_heads, three_heads[:, :, :1], three_heads[:, :, :1])
    messages["uneven heads run"] = "ok" if out.shape == three_heads.shape else "bad shape"
    return messages
