"""USP attention cases run inside one process world; results are checked by the tests.

Each rank builds the full problem from a fixed seed, computes the one-rank float64
reference, runs ``LongContextAttention`` on its shard, and reports the relative error of
its output and gradient shards. Worlds are started once per world size (CI has 2 cores).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from helpers.oracle import attention_float64, rel_error
from helpers.worlds import factorizations

from usp_megatron import LongContextAttention, init_usp_groups, shard_sequence
from usp_megatron.layout import LAYOUT_NAMES


def head_configs(ulysses: int) -> list[tuple[int, int, int]]:
    """(hq, hkv, head_chunks): MHA with and without chunked all-to-all, GQA, MQA, and a GQA
    whose kv heads do not divide by U (needs replication)."""
    configs = [(8, 8, 1), (8, 2, 1), (8, 1, 1)]
    if (8 // ulysses) % 2 == 0:
        configs.append((8, 8, 2))
    if 12 % ulysses == 0:
        configs.append((12, 6, 1))
    return [config for config in configs if config[0] % ulysses == 0]


def uneven_head_configs(ulysses: int) -> list[tuple[int, int, int]]:
    """(hq, hkv, 1) for query heads that U does not divide (uneven split), with every
    hkv | hq: MHA, MQA and GQA whose groups straddle the ranks' ranges."""
    return [
        (hq, hkv, 1)
        for hq in (3, 5, 6, 7, 9, 10, 12)
        if ulysses <= hq and hq % ulysses
        for hkv in range(1, hq + 1)
        if hq % hkv == 0
    ]


def uneven_cases(ulysses: int, ring: int) -> list[tuple[str, bool, tuple[int, int, int]]]:
    """(impl, causal, heads) with uneven splits: every impl (the all-to-all's pieces differ
    by impl), causal or not by turns. Worlds of 8 are slow on 2 cores: there only ``U = 8``
    (which smaller worlds lack) runs, one impl per head config by turns."""
    configs = uneven_head_configs(ulysses)
    if ulysses * ring <= 4:
        return [
            (impl, (i + j) % 2 == 0, heads)
            for i, heads in enumerate(configs)
            for j, impl in enumerate(LAYOUT_NAMES)
        ]
    if ring > 1:
        return []
    return [(LAYOUT_NAMES[i % 3], i % 2 == 0, heads) for i, heads in enumerate(configs)]


def run_case(
    groups, impl, causal, heads, device, dtype, backend, seq_per_rank, head_dim, window=None
):
    hq, hkv, head_chunks = heads
    cp = groups.cp_size
    seq_len = seq_per_rank * cp
    gen = torch.Generator().manual_seed(1234 + 7 * hq + hkv + 31 * cp + int(causal))
    batch = 1 if causal else 2  # batch 1 sends the kernels' outputs as they are; 2 copies
    shape_q, shape_kv = (batch, seq_len, hq, head_dim), (batch, seq_len, hkv, head_dim)
    f64 = dict(generator=gen, dtype=torch.float64)
    q, dout = (torch.randn(shape_q, **f64).to(device) for _ in range(2))
    k, v = (torch.randn(shape_kv, **f64).to(device) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention_float64(*leaves, causal=causal, window=window)
    ref.backward(dout)

    def local(t):
        return shard_sequence(t, 1, groups, impl).to(dtype=dtype)

    mine = [local(t).requires_grad_() for t in (q, k, v)]
    attn = LongContextAttention(groups, layout=impl, backend=backend, head_chunks=head_chunks)
    out = attn(*mine, causal=causal, window_size=window)
    out.backward(local(dout))
    return {
        "out": rel_error(out, local(ref)),
        "dq": rel_error(mine[0].grad, local(leaves[0].grad)),
        "dk": rel_error(mine[1].grad, local(leaves[1].grad)),
        "dv": rel_error(mine[2].grad, local(leaves[2].grad)),
    }


def windows_for(seq_len: int) -> list[tuple[int, int]]:
    """Smaller than a chunk, spanning several chunks, larger than the sequence."""
    return [(2, 0), (seq_len // 3, 1), (2 * seq_len, 2 * seq_len)]


def dense_cases(ulysses: int, ring: int, seq_per_rank: int):
    """impl x causal x heads (even splits), and every impl for uneven ones, full attention:
    (impl, causal, heads, window, tokens per rank)."""
    even = [
        (impl, causal, heads, None, seq_per_rank)
        for impl, causal, heads in itertools.product(
            LAYOUT_NAMES, (True, False), head_configs(ulysses)
        )
    ]
    # The head split does not depend on the length: the shortest zigzag shard.
    return even + [(*case, None, 2) for case in uneven_cases(ulysses, ring)]


def window_cases(ulysses: int, ring: int, seq_per_rank: int):
    """impl x causal x sliding windows, GQA."""
    seq_len = seq_per_rank * ulysses * ring
    return [
        (impl, causal, (8, 2, 1), window, seq_per_rank)
        for impl, causal, window in itertools.product(
            LAYOUT_NAMES, (True, False), windows_for(seq_len)
        )
    ]


def _sweep(cases_of, device_kind, dtype_name, backend, seq_per_rank, head_dim):
    """Every (U, R) factorisation of the world x ``cases_of(U, R, seq_per_rank)``."""
    device = torch.device("cpu")
    if device_kind == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, dtype_name)
    results = []
    for ulysses, ring in factorizations(dist.get_world_size()):
        groups = init_usp_groups(ulysses, ring)
        for impl, causal, heads, window, seq in cases_of(ulysses, ring, seq_per_rank):
            errors = run_case(
                groups, impl, causal, heads, device, dtype, backend, seq, head_dim, window
            )
            case = f"U{ulysses}xR{ring} {impl} causal={causal} (hq, hkv, chunks)={heads}"
            results.append((f"{case} window={window} {backend}", errors))
    return results


def run_all_cases(
    device_kind: str = "cpu",
    dtype_name: str = "float32",
    backend: str = "auto",
    seq_per_rank: int = 16,
    head_dim: int = 16,
):
    """Every (U, R) factorisation x impl x causal x heads (even splits), and every impl for
    uneven ones; returns [(case, errors)]."""
    return _sweep(dense_cases, device_kind, dtype_name, backend, seq_per_rank, head_dim)


def run_window_cases(
    device_kind: str = "cpu",
    dtype_name: str = "float32",
    backend: str = "auto",
    seq_per_rank: int = 16,
    head_dim: int = 16,
):
    """Sliding windows: every (U, R) x impl x causal x window, GQA; returns [(case, errors)]."""
    return _sweep(window_cases, device_kind, dtype_name, backend, seq_per_rank, head_dim)
