"""Packed-document (THD) USP attention cases, run inside one process world per size.

Each rank builds the whole packed problem from a fixed seed, computes the float64
document-causal reference (``helpers.oracle.document_attention_float64``), runs
``LongContextAttention`` with ``cu_seqlens`` / ``cu_seqlens_padded`` on its THD shard and
reports errors on real tokens (relative to the whole sequence's), the largest magnitude
at padding positions (outputs and gradients must be exactly 0 there), inf where anything
is not finite.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from helpers.oracle import document_attention_float64
from helpers.worlds import factorizations

from usp_megatron import LongContextAttention, init_usp_groups, shard_sequence


def document_configs(cp: int) -> dict[str, list[int]]:
    """Real document lengths for C = ``cp`` (each padded to a multiple of 2C), covering a
    one-token document, documents shorter than a chunk, a document spanning the whole
    sequence, many tiny ones, an empty one, and ranks whose tokens are all padding."""
    m = 2 * cp
    return {
        "one document, no padding": [4 * m],
        "one token document first": [1, 3 * m, m - 1],
        "shorter than a chunk": [3, cp // 2 + 1, 2 * m + 1, 2],
        "many tiny": [1, 2, 1, 1, 3, 1, 2, 1],
        "empty document": [m + 3, 0, 5],
        "only rank 0 holds real tokens": [1],
    }


def padded_lengths(real: list[int], cp: int) -> list[int]:
    m = 2 * cp
    return [max(m, -(-n // m) * m) for n in real]


def cumulative(lengths: list[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


def run_packed_case(
    groups, real_lens, causal, heads, dtype, backend="reference", head_dim=8, device="cpu"
):
    hq, hkv = heads
    cp = groups.cp_size
    cu = cumulative(real_lens)
    cu_padded = cumulative(padded_lengths(real_lens, cp))
    seq_len = cu_padded[-1]
    gen = torch.Generator().manual_seed(seq_len + 7 * hq + hkv + int(causal))
    f64 = dict(generator=gen, dtype=torch.float64)
    q, dout = (torch.randn(1, seq_len, hq, head_dim, **f64).to(device) for _ in range(2))
    k, v = (torch.randn(1, seq_len, hkv, head_dim, **f64).to(device) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = document_attention_float64(*leaves, cu, cu_padded, causal)
    ref.backward(dout)

    cu_t = torch.tensor(cu, dtype=torch.int32)
    cu_padded_t = torch.tensor(cu_padded, dtype=torch.int32)
    real_token = torch.zeros(seq_len, dtype=torch.bool)
    for start, n in zip(cu_padded, real_lens):
        real_token[start : start + n] = True

    def local(t, dim=1):
        return shard_sequence(t, dim, groups, "zigzag", cu_padded_t)

    mine = [local(t).to(dtype).requires_grad_() for t in (q, k, v)]
    attn = LongContextAttention(groups, backend=backend)
    out = attn(*mine, causal=causal, cu_seqlens=cu_t, cu_seqlens_padded=cu_padded_t)
    out.backward(local(dout).to(dtype))
    real = local(real_token, 0).to(device)
    got = {"out": out, "dq": mine[0].grad, "dk": mine[1].grad, "dv": mine[2].grad}
    want = {"out": ref, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    errors = {}
    for name, tensor in got.items():
        tensor = tensor.detach()
        if not torch.isfinite(tensor).all():
            errors[name] = float("inf")
            continue
        # Relative to the whole sequence's real tokens (absolute below norm 1): a rank holding
        # only first tokens of documents has dq = 0 exactly, which no error relative to its
        # own values can measure (nor one-token documents: dq = dk = 0 everywhere).
        difference = (tensor[:, real].double() - local(want[name])[:, real]).norm()
        errors[name] = float(difference / want[name][:, real_token].norm().clamp_min(1.0))
        errors[f"{name} at padding"] = float(tensor[:, ~real].abs().max()) if (~real).any() else 0.0
    return errors


def run_packed_cases(
    dtype_name: str = "float32", backend: str = "reference", device_kind: str = "cpu"
):
    """Every (U, R) x document config x causal x heads; returns [(case, errors)]."""
    dtype = getattr(torch, dtype_name)
    device = torch.device("cpu")
    if device_kind == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    results = []
    for ulysses, ring in factorizations(dist.get_world_size()):
        groups = init_usp_groups(ulysses, ring)
        for (name, lens), causal, heads in itertools.product(
            document_configs(groups.cp_size).items(), (True, False), ((4, 4), (4, 1))
        ):
            if not causal and heads != (4, 4):
                continue
            errors = run_packed_case(
                groups,
                lens,
                causal,
                heads,
                dtype,
                backend,
                64 if device.type == "cuda" else 8,
                device,
            )
            case = f"U{ulysses}xR{ring} {name} {lens} causal={causal} (hq, hkv)={heads}"
            results.append((case, errors))
        results.append((f"U{ulysses}xR{ring} refusals", packed_refusals(groups)))
    return results


def packed_refusals(groups) -> dict[str, float]:
    """0.0 for each bad call refused with a ValueError saying why, inf otherwise."""
    cp = groups.cp_size
    cu = torch.tensor([0, 2 * cp, 4 * cp], dtype=torch.int32)
    x = torch.randn(1, 4, 2 * groups.ulysses_degree, 8)
    calls = {
        "stripe": (dict(layout="stripe"), dict(cu_seqlens=cu), "need the zigzag layout"),
        "window": ({}, dict(cu_seqlens=cu, window_size=(2, 0)), "with packed documents"),
        "batch 2": ({}, dict(cu_seqlens=cu, batch=2), "batch 1"),
        "padded alone": ({}, dict(cu_seqlens_padded=cu), "without cu_seqlens"),
        "length": ({}, dict(cu_seqlens=cu * 2), "must equal cu_seqlens_padded"),
    }
    outcome = {}
    for name, (module_kwargs, call_kwargs, message) in calls.items():
        attn = LongContextAttention(groups, **module_kwargs)
        batch = call_kwargs.pop("batch", 1)
        q = x.expand(batch, *x.shape[1:])
        try:
            attn(q, q, q, **call_kwargs)
            outcome[name] = float("inf")
        except ValueError as error:
            outcome[name] = 0.0 if message in str(error) else float("inf")
    return outcome
