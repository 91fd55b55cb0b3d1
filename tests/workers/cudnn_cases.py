"""USP attention with the cuDNN-frontend kernel on one GPU (one rank, or several ranks
sharing it through ``helpers.host_staged``), and the proof of that transport on CPU; run
inside one world per size.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.distributed as dist
from helpers.host_staged import StagedWork, staged_through_host
from helpers.worlds import factorizations

from usp_megatron import init_usp_groups
from usp_megatron.layout import LAYOUT_NAMES
from workers.packed_cases import document_configs, run_packed_case
from workers.usp_cases import run_case

#: gloo has the list form of ``all_to_all`` from torch 2.13 on.
GLOO_LIST_ALL_TO_ALL = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 13)


def _exchanges(x: torch.Tensor) -> dict:
    """Each call the package's all-to-all and ring make: name -> (the torch.distributed
    function it calls, a function returning what arrived and the works it returned)."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def ring():
        out = torch.empty_like(x)
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, x, (rank + 1) % world),
            dist.P2POp(dist.irecv, out, (rank - 1) % world),
        ])  # fmt: skip
        return [out], works

    def single():
        out = torch.empty_like(x)
        return [out], [dist.all_to_all_single(out, x, async_op=True)]

    def single_with_splits():
        sent = [(rank + j) % 2 + 1 for j in range(world)]  # rows to rank j; j sends as many
        out = x.new_empty(sum(sent), x.shape[1])
        work = dist.all_to_all_single(out, x[: sum(sent)], sent, sent, async_op=True)
        return [out], [work]

    def listed():
        outs = [torch.empty_like(piece) for piece in x.chunk(world)]
        return outs, [dist.all_to_all(outs, list(x.chunk(world)), async_op=True)]

    def gather():
        outs = [torch.empty_like(x[:2]) for _ in range(world)]
        return outs, [dist.all_gather(outs, x[:2].contiguous(), async_op=True)]

    def gather_blocking():
        outs = [torch.empty_like(x[:2]) for _ in range(world)]
        return outs, [dist.all_gather(outs, x[:2].contiguous())]

    calls = {
        "ring": ("batch_isend_irecv", ring),
        "even pieces": ("all_to_all_single", single),
        "pieces with split sizes": ("all_to_all_single", single_with_splits),
        "gather": ("all_gather", gather),
        "gather, blocking": ("all_gather", gather_blocking),
    }
    if GLOO_LIST_ALL_TO_ALL:
        calls["list of pieces"] = ("all_to_all", listed)
    return calls


def transport_cases() -> list[tuple[str, dict[str, float]]]:
    """Each exchange staged through the host against the same exchange unstaged (CPU
    tensors, gloo): the largest difference of what arrived (must be 0.0), and whether the
    staged version ran and the original came back after (0.0 if so)."""
    world = dist.get_world_size()
    x = torch.randn(3 * world, 5, generator=torch.Generator().manual_seed(dist.get_rank()))
    results = []
    for name, (function, exchange) in _exchanges(x).items():
        original = getattr(dist, function)
        plain, plain_works = exchange()
        for work in plain_works:
            if work is not None:
                work.wait()
        with staged_through_host():
            staged, works = exchange()
            for work in works:
                if work is not None:
                    work.wait()
            replaced = getattr(dist, function) is not original
        ran = replaced and all(work is None or isinstance(work, StagedWork) for work in works)
        restored = getattr(dist, function) is original
        difference = max(float((a - b).abs().max()) for a, b in zip(plain, staged))
        missed = 0.0 if ran and restored else 1.0
        results.append((name, {"largest difference": difference, "staged path missed": missed}))
    return results


def _degrees(world: int) -> list[tuple[int, int]]:
    """(U, R) of the world with a ring (all of it for one rank)."""
    return [(u, r) for u, r in factorizations(world) if r > 1 or world == 1]


def usp_cases(
    device_kind: str, dtype_name: str, backend: str, staged: bool, seq_per_rank: int,
    head_dim: int, packed_head_dim: int,
) -> list[tuple[str, dict[str, float]]]:  # fmt: skip
    """For each (U, R) with a ring: dense causal; causal windows spanning chunks (every
    impl) and smaller than a chunk; a two-sided window; packed documents (one-token,
    tiny, empty, shorter than a chunk; causal and not). ``staged``: every exchange
    through the host (several ranks on one GPU). Returns [(case, errors)]."""
    device = torch.device("cpu")
    if device_kind == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype, results = getattr(torch, dtype_name), []
    with staged_through_host() if staged else contextlib.nullcontext():
        for ulysses, ring in _degrees(dist.get_world_size()):
            groups = init_usp_groups(ulysses, ring)
            seq_len = seq_per_rank * groups.cp_size
            dense = [
                ("zigzag", True, (8, 2, 1), None),
                *((impl, True, (8, 2, 1), (seq_len // 3, 0)) for impl in LAYOUT_NAMES),
                ("stripe", True, (8, 1, 1), (3, 0)),
                ("zigzag", False, (8, 8, 1), (seq_len // 5, seq_len // 7)),
            ]
            for impl, causal, heads, window in dense:
                errors = run_case(groups, impl, causal, heads, device, dtype, backend,
                                  seq_per_rank, head_dim, window)  # fmt: skip
                results.append((f"U{ulysses}xR{ring} {impl} causal={causal} heads={heads} "
                                f"window={window}", errors))  # fmt: skip
            configs = document_configs(groups.cp_size)
            names = ("one token document first", "many tiny", "empty document",
                     "shorter than a chunk")  # fmt: skip
            kinds = ((True, (4, 1)), (False, (4, 4)))  # (causal, heads): MQA causal, MHA not
            for name, (causal, heads) in itertools.product(names, kinds):
                errors = run_packed_case(groups, configs[name], causal, heads, dtype, backend,
                                         packed_head_dim, device)  # fmt: skip
                results.append((f"U{ulysses}xR{ring} packed {name} causal={causal} "
                                f"heads={heads}", errors))  # fmt: skip
    return results
