"""``LongContextAttention`` with the cuDNN-frontend kernel on one GPU, against float64.

One rank (U1 x R1), and four ranks sharing the GPU (U2 x R2, U1 x R4) over gloo with
every exchange staged through host memory (``helpers.host_staged``: NCCL refuses two
ranks on one device, gloo's send/recv cannot read device memory), so that every ring
offset of a window's band and every ring block pair of packed documents reaches the
kernel. On CPU: that transport gives exactly what the unstaged calls give, and USP
attention through it matches float64 (so on the GPU only the device copies are new).
"""

import pytest
from helpers.worlds import failed_cases
from workers.cudnn_cases import transport_cases, usp_cases

from usp_megatron.testing import run_distributed


def test_host_staged_transport_gives_what_the_plain_calls_give():
    per_rank = run_distributed(4, transport_cases, timeout_s=300)
    assert len(per_rank[0]) >= 5, per_rank[0]
    failures = failed_cases(per_rank, 0.0)
    assert not failures, "\n".join(failures)


def test_usp_through_the_host_staged_transport_matches_float64():
    per_rank = run_distributed(4, usp_cases, "cpu", "float32", "reference", True, 16, 16, 8,
                               timeout_s=300)  # fmt: skip
    assert len(per_rank[0]) == 2 * (6 + 8), [case for case, _ in per_rank[0]]
    failures = failed_cases(per_rank, 1e-5)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.gpu
@pytest.mark.parametrize("world_size,staged", [(1, False), (4, True)], ids=["U1xR1", "4 ranks"])
def test_gpu_usp_cudnn_bf16_one_gpu(world_size, staged):
    per_rank = run_distributed(world_size, usp_cases, "cuda", "bfloat16", "cudnn", staged,
                               128, 64, 64, timeout_s=420)  # fmt: skip
    degrees = 1 if world_size == 1 else 2
    assert len(per_rank[0]) == degrees * (6 + 8), [case for case, _ in per_rank[0]]
    failures = failed_cases(per_rank, 1e-2)
    assert not failures, "\n".join(failures[:20])
