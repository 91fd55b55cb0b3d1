"""USP attention on its own: shard a sequence, attend, compare with one-rank attention.

    torchrun --nproc-per-node 4 examples/usp_attention.py --ulysses-degree 2 --ring-degree 2

Runs on CPU processes (gloo, the reference kernel, float32) or on GPUs (NCCL, bf16).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import usp_megatron as um


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ulysses-degree", type=int, default=2)
    parser.add_argument("--ring-degree", type=int, default=2)
    parser.add_argument("--ring-impl", default="zigzag", choices=um.RING_IMPLS)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count()) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32

    groups = um.init_usp_groups(args.ulysses_degree, args.ring_degree)
    attn = um.LongContextAttention(groups, ring_impl=args.ring_impl)

    gen = torch.Generator().manual_seed(0)  # the same full problem on every rank
    shape_q = (1, args.seq_len, args.heads, args.head_dim)
    shape_kv = (1, args.seq_len, args.kv_heads, args.head_dim)
    q = torch.randn(shape_q, generator=gen).to(device, dtype)
    k, v = (torch.randn(shape_kv, generator=gen).to(device, dtype) for _ in range(2))

    local = [um.shard_sequence(t, 1, groups, args.ring_impl).requires_grad_() for t in (q, k, v)]
    out = attn(*local, causal=True)
    out.float().square().sum().backward()
    full_out = um.gather_sequence(out.detach(), 1, groups, args.ring_impl)

    group = args.heads // args.kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(),
        k.repeat_interleave(group, 2).transpose(1, 2).float(),
        v.repeat_interleave(group, 2).transpose(1, 2).float(),
        is_causal=True,
    ).transpose(1, 2)
    error = ((full_out.float() - expected).norm() / expected.norm()).item()
    if dist.get_rank() == 0:
        print(
            f"USP U={args.ulysses_degree} x R={args.ring_degree} ({args.ring_impl}, "
            f"kernel {um.get_kernel('auto', device, dtype).name}, {dtype}): "
            f"{args.seq_len} tokens, {args.seq_len // groups.cp_size} per rank; "
            f"output vs one-rank attention: relative error {error:.2e}; "
            f"dq shard norm {local[0].grad.norm():.3f}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
