"""The FLOP convention and the figures derived from a time (docs/benchmark_method.md).

One count for every method, so that TF/s ranks methods exactly as milliseconds do.
"""

from __future__ import annotations

BWD_FLOP_FACTOR = 3.5  # forward + backward = 1 + 2.5 forwards (5 matmuls vs 2; no recompute)
FLOP_CONVENTION = (
    "causal forward = 4*b*s^2*hq*d / 2 (QK^T and PV, 2 flops per multiply-add, half the "
    "square unmasked); forward+backward = 3.5 x forward; TFLOP/s per GPU = flops / (N * T)"
)


def attention_flops(batch: int, seq_len: int, heads: int, head_dim: int, mode: str) -> float:
    """FLOPs of causal attention over the whole sequence (FLOP_CONVENTION)."""
    forward = 4 * batch * seq_len**2 * heads * head_dim / 2
    return forward * (BWD_FLOP_FACTOR if mode == "fwdbwd" else 1.0)


def tflops_per_gpu(flops: float, ms: float, gpus: int) -> float:
    """Useful TFLOP/s of each of ``gpus`` GPUs that together took ``ms``."""
    return flops / (ms * 1e-3) / gpus / 1e12


def fraction_of_ideal(t1_ms: float, ms: float, gpus: int) -> float:
    """T_1 / (N T): 1.0 is perfect scaling of the one-GPU time."""
    return t1_ms / (gpus * ms)
