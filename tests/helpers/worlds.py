"""The U x R factorisations a world of processes runs, and its per-rank results to failures
(standard library only: every worker process imports it)."""

from __future__ import annotations


def factorizations(world_size: int) -> list[tuple[int, int]]:
    """Every ``(U, R)`` with ``U * R == world_size``, smallest ``U`` first."""
    return [(u, world_size // u) for u in range(1, world_size + 1) if world_size % u == 0]


def failed_cases(per_rank: list[list[tuple[str, dict[str, float]]]], tol: float) -> list[str]:
    """One line per case of any rank with an error above ``tol``; an error named for padding
    (``... at padding``: outputs and gradients there must be exactly 0) must be 0.0."""
    return [
        f"rank {rank}: {case}: {errors}"
        for rank, results in enumerate(per_rank)
        for case, errors in results
        if not all(
            value == 0.0 if "padding" in name else value <= tol for name, value in errors.items()
        )
    ]
