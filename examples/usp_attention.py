"""USP attention on its own: shard a sequence, attend, compare with one-rank attention.

    torchrun --nproc-per-node 4 examples/usp_attention.py --ulysses-degree 2 --ring-degree 2

Runs on CPU processes (gloo, the reference kernel, float32) or on GPUs (NCCL, bf16).
Checks the output and the gradients dq, dk, dv against one-rank attention; exits 1 when
any relative error exceeds ``--rtol``. A bad flag, or a shape the package refuses, is one
message from rank 0 and exit 1 on every rank.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

import usp_megatron as um


def _refuse(message: str) -> NoReturn:
    """One message from rank 0, exit 1 everywhere (every rank refuses the same input)."""
    from usp_megatron.megatron.launch import exit_refused  # only on this path: imports Megatron

    exit_refused(f"usp_attention.py: {message}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _refuse(f"{message} (--help lists the flags)")


def main() -> int:
    try:
        return _main()
    except ValueError as error:  # the package's refusals, the same on every rank
        _refuse(str(error))


def _main() -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--ulysses-degree", type=int, default=2)
    parser.add_argument("--ring-degree", type=int, default=2)
    parser.add_argument("--layout", default="zigzag", choices=um.LAYOUT_NAMES)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--rtol", type=float, default=None, help="default 1e-4 in float32, 2e-2 in bf16"
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count()) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32

    groups = um.init_usp_groups(args.ulysses_degree, args.ring_degree)
    attn = um.LongContextAttention(groups, layout=args.layout)

    gen = torch.Generator().manual_seed(0)  # the same full problem on every rank
    shape_q = (1, args.seq_len, args.heads, args.head_dim)
    shape_kv = (1, args.seq_len, args.kv_heads, args.head_dim)
    q = torch.randn(shape_q, generator=gen).to(device, dtype)
    k, v = (torch.randn(shape_kv, generator=gen).to(device, dtype) for _ in range(2))

    local = [attn.shard(t).requires_grad_() for t in (q, k, v)]
    out = attn(*local, causal=True)
    out.float().square().sum().backward()  # the loss of the whole sequence is the sum over ranks
    full_out = attn.gather(out.detach())

    full = [t.float().requires_grad_() for t in (q, k, v)]
    group = args.heads // args.kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        full[0].transpose(1, 2),
        full[1].repeat_interleave(group, 2).transpose(1, 2),
        full[2].repeat_interleave(group, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    expected.to(dtype).float().square().sum().backward()

    errors = {"out": _relative_error(full_out, expected.detach())}
    for name, mine, theirs in zip(("dq", "dk", "dv"), local, full, strict=True):
        # Each rank compares its own shard; the world's verdict is the worst rank's.
        theirs_local = attn.shard(theirs.grad)
        errors[name] = _relative_error(mine.grad, theirs_local)
    worst = torch.tensor(list(errors.values()), dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    rtol = args.rtol if args.rtol is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    ok = bool((worst <= rtol).all())
    if dist.get_rank() == 0:
        found = ", ".join(f"{n} {e:.2e}" for n, e in zip(errors, worst.tolist(), strict=True))
        print(
            f"USP U={args.ulysses_degree} x R={args.ring_degree} ({args.layout}, "
            f"kernel {um.get_kernel('auto', device, dtype).name}, {dtype}): "
            f"{args.seq_len} tokens, {args.seq_len // groups.cp_size} per rank; relative error "
            f"vs one-rank attention: {found} -> {'ok' if ok else 'MISMATCH'} (rtol {rtol:g})"
        )
    # Every rank done with every collective before any rank closes its connections: without
    # it, a rank still finishing gloo's last all-reduce aborted at exit ("terminate called
    # without an active exception", most runs of 4 CPU processes), after printing "ok".
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def _relative_error(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.float()
    return ((mine.float() - theirs).norm() / theirs.norm().clamp_min(1e-30)).item()


if __name__ == "__main__":
    sys.exit(main())
