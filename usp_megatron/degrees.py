"""Which ``U x R`` for a context-parallel size: the rules, and a small cost model among them.

Rules, never broken: ``U * R == cp_size``; ``U`` divides ``gpus_per_node`` (a ulysses group
is ``U`` consecutive context-parallel ranks, and its all-to-all, the heaviest traffic, must
never leave a node); ``U <= num_heads`` (the heads of a tensor-parallel rank are what the
all-to-all splits; ``U`` need not divide them).

Among the degrees the rules allow, :class:`CostModel` estimates one attention layer's
forward + backward on one rank, and :func:`choose_degrees` takes the largest ``U`` whose
estimate is within ``preference_margin`` of the cheapest: the all-to-all keeps every
kernel call whole, so ties go to it. How the constants were fitted and how the choice
ranks measured configurations: ``docs/choosing_degrees.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from usp_megatron.checks import check_positive_int
from usp_megatron.heads import head_split


@dataclass(frozen=True)
class CostModel:
    """Seconds of one causal attention layer, forward + backward, per rank (bf16).

    Terms, for ``S`` tokens, ``h`` query heads and ``U x R``:

    - compute: the ``ceil(h / U)`` heads of the busiest rank over ``S / R`` queries at
      ``kernel_flops``; an uneven head split costs ``ceil(h/U) / (h/U)``.
    - all-to-all: bytes leaving a rank (q, k, v, out forward; dout, dq, dk, dv backward, each
      ``(U-1)/U`` of the rank's ``S / (U R)`` tokens) at ``all_to_all_bytes_per_s``; key/value
      heads count ``lcm(hkv, U)`` when ``U`` does not divide ``hkv`` (they are replicated).
    - ring, each of ``R - 1`` steps: key/value (bf16, forward and backward) and their float32
      gradients (backward) sent while the step computes; the part that outlasts the compute
      counts whole, the hidden part counts ``ring_contention`` (NCCL shares the SMs with the
      kernels), and ``ring_step_s`` per step (launches, the log-sum-exp merge, smaller
      kernels: why short ring blocks run less efficiently than one long block).

    Defaults: fitted on 4 x H100 (NVLink), cuDNN, head dim 128; ``ring_bytes_per_s_across_nodes``
    is assumed (one 400 Gb/s NIC per GPU), not measured.
    """

    head_dim: int = 128
    kernel_flops: float = 527e12
    all_to_all_bytes_per_s: float = 194e9
    ring_bytes_per_s: float = 128e9
    ring_bytes_per_s_across_nodes: float = 40e9
    ring_contention: float = 0.40
    ring_step_s: float = 0.42e-3
    preference_margin: float = 0.03


@dataclass(frozen=True)
class DegreeCost:
    """One candidate ``U x R`` and its modelled seconds per layer (forward + backward)."""

    ulysses: int
    ring: int
    compute_s: float
    all_to_all_s: float
    ring_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.all_to_all_s + self.ring_s


def _check_inputs(
    cp_size: int, num_heads: int, num_kv_heads: int, gpus_per_node: int, seq_len: int | None
) -> None:
    check_positive_int("cp_size", cp_size)
    check_positive_int("num_heads", num_heads)
    check_positive_int("num_kv_heads", num_kv_heads)
    check_positive_int("gpus_per_node", gpus_per_node)
    if seq_len is not None:
        check_positive_int("seq_len", seq_len)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} "
            "(each key/value head serves a group of query heads)"
        )


def ulysses_candidates(cp_size: int, num_heads: int, gpus_per_node: int) -> list[int]:
    """Every ``U`` the rules allow, ascending; ``U = 1`` (a pure ring) always is one."""
    return [
        u
        for u in range(1, min(cp_size, num_heads, gpus_per_node) + 1)
        if cp_size % u == 0 and gpus_per_node % u == 0
    ]


def _ring_phase_s(send_s: float, compute_s: float, model: CostModel) -> float:
    exposed = max(0.0, send_s - compute_s)
    return exposed + model.ring_contention * min(send_s, compute_s)


def _cost(
    u: int, r: int, heads: int, kv_heads: int, ring_crosses_nodes: bool, seq_len: int | None,
    model: CostModel,
) -> DegreeCost:  # fmt: skip
    d = model.head_dim
    # Causal: S/R queries of this ring rank see S/2 keys on average (balanced layouts).
    tokens = 1 if seq_len is None else seq_len
    flops = 3.5 * 4 * d * math.ceil(heads / u) * (tokens / r) * tokens / 2
    compute_s = flops / model.kernel_flops
    if seq_len is None:
        return DegreeCost(u, r, compute_s, 0.0, 0.0)
    split = head_split(heads, kv_heads, u)
    kv_travel = sum(split.kv_heads)  # key/value heads sent, replicas included
    local_tokens = seq_len / (u * r)
    heads_moved = 2 * (heads + 2 * kv_travel) + 2 * heads
    a2a_bytes = local_tokens * d * 2 * heads_moved * (u - 1) / u
    all_to_all_s = a2a_bytes / model.all_to_all_bytes_per_s
    ring_s = 0.0
    if r > 1:
        bandwidth = model.ring_bytes_per_s
        if ring_crosses_nodes:
            bandwidth = model.ring_bytes_per_s_across_nodes
        kv_block = (seq_len / r) * max(split.kv_heads) * d
        forward = _ring_phase_s(kv_block * 4 / bandwidth, compute_s / 3.5 / r, model)
        backward = _ring_phase_s(kv_block * 12 / bandwidth, compute_s * 2.5 / 3.5 / r, model)
        ring_s = (r - 1) * (forward + backward + model.ring_step_s)
    return DegreeCost(u, r, compute_s, all_to_all_s, ring_s)


def degree_costs(
    cp_size: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    gpus_per_node: int = 8,
    seq_len: int | None = None,
    model: CostModel | None = None,
) -> list[DegreeCost]:
    """The modelled cost of every ``U x R`` the rules allow, by ascending ``U``.

    Arguments as in :func:`choose_degrees`. Without ``seq_len`` only the compute term is
    given (per squared token): it is the one that grows fastest with the sequence, so it
    alone decides for long sequences.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _check_inputs(cp_size, num_heads, num_kv_heads, gpus_per_node, seq_len)
    model = model or CostModel()
    # A ring group spans the whole context-parallel group: it leaves a node unless the
    # group fits inside one (nodes are filled with whole groups when cp_size divides them).
    crosses = gpus_per_node % cp_size != 0
    return [
        _cost(u, cp_size // u, num_heads, num_kv_heads, crosses, seq_len, model)
        for u in ulysses_candidates(cp_size, num_heads, gpus_per_node)
    ]


def pick(costs: list[DegreeCost], model: CostModel | None = None) -> DegreeCost:
    """The largest ``U`` within the model's preference margin of the cheapest candidate."""
    margin = (model or CostModel()).preference_margin
    cheapest = min(cost.total_s for cost in costs)
    return max((c for c in costs if c.total_s <= cheapest * (1 + margin)), key=lambda c: c.ulysses)


def choose_degrees(
    cp_size: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    gpus_per_node: int = 8,
    seq_len: int | None = None,
) -> tuple[int, int]:
    """``(ulysses_degree, ring_degree)`` for ``cp_size`` context-parallel ranks.

    ``num_heads`` / ``num_kv_heads``: query and key/value heads per tensor-parallel rank
    (``num_kv_heads`` defaults to ``num_heads``). ``gpus_per_node``: context-parallel ranks
    that share a node (GPUs per node / TP size under Megatron's rank order, TP innermost).
    ``seq_len``: the global sequence length; without it, only the head split's balance and
    the preference for large ``U`` decide.
    """
    chosen = pick(degree_costs(cp_size, num_heads, num_kv_heads, gpus_per_node, seq_len))
    return chosen.ulysses, chosen.ring
