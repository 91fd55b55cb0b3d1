"""The GPT example's training options on 4 gloo processes (one world for every case,
float32 unless named): the foreach gradient norm against megatron-core's own through its
optimizers (plain and distributed, float32 and bf16, DP4 and TP2 x DP2), and activation
recompute (full uniform, full block, selective core attention) under U2 x R2 against the
run without it. Selective recompute of the core attention reruns USP's all-to-all and ring
in the backward: the losses and gradient norms must not move, and the attention must run
again (counted), or the flag did nothing."""

from __future__ import annotations

import pytest
from workers.train_options_cases import OPTIMIZER_CASES, RECOMPUTE, all_cases

from usp_megatron.testing import run_distributed

# 3 iterations x 8 micro-batches x 2 layers: the USP attention's forward calls per rank.
CALLS = 3 * 8 * 2


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("train_options")
    per_rank = run_distributed(4, all_cases, str(directory), timeout_s=600)
    for rank, result in enumerate(per_rank[1:], 1):  # what megatron-core reduced agrees
        for name in OPTIMIZER_CASES:
            assert result["optimizers"][name]["norm"] == per_rank[0]["optimizers"][name]["norm"]
        assert result["training"] == per_rank[0]["training"], f"rank {rank} disagrees"
    return per_rank[0]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_optimizer_step_with_foreach_grad_norm_is_megatrons(results, case):
    r = results["optimizers"][case]
    (ours, theirs), (step_ours, step_theirs) = r["norm"], r["step_norm"]
    assert _rel(ours, theirs) <= 1e-6, (ours, theirs)
    assert _rel(step_ours, step_theirs) <= 1e-6 and _rel(step_ours, ours) <= 1e-6
    assert _rel(ours, r["reference"]) <= 1e-5, (ours, r["reference"])  # float64, all ranks
    assert r["step_ok"] == (True, True)
    # The step clipped (to --clip-grad 0.05 of a larger norm), the same in both.
    assert ours > 1.0
    assert all(_rel(norm, 0.05) <= 1e-5 for norm in r["clipped_norm"]), r["clipped_norm"]
    assert r["clipped_rel"] <= 1e-6 and r["weights_rel"] <= 1e-6, r


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_get_grad_norm_fp32_summed_over_the_world(results, dtype):
    """Megatron-core's function with the foreach op equals it with its own fallback on the
    float32 values (and the float64 truth); for bf16 lists its fallback rounds to bf16."""
    ours, theirs, rounded, exact = results["optimizers"]["get_grad_norm_fp32"][dtype]
    assert _rel(ours, theirs) <= 1e-6 and _rel(ours, exact) <= 1e-5, (ours, theirs, exact)
    if dtype == "torch.bfloat16":
        assert 10 * abs(ours - exact) < abs(rounded - exact) <= 1e-2 * exact, (ours, rounded)


@pytest.mark.parametrize("run", [*RECOMPUTE, "megatron-grad-norm"])
def test_training_matches_the_run_without_the_option(results, run):
    plain, other = results["training"]["plain"], results["training"][run]
    for (loss, norm), (want_loss, want_norm) in zip(other["metrics"], plain["metrics"],
                                                     strict=True):  # fmt: skip
        assert _rel(loss, want_loss) <= 1e-6 and _rel(norm, want_norm) <= 1e-6, (run, other)
    assert plain["metrics"][-1][0] < plain["metrics"][0][0]  # it trained


def test_recompute_reruns_the_usp_attention_in_the_backward(results):
    runs = results["training"]
    assert runs["plain"]["forward_calls"] == {"recording": CALLS, "not": 0}
    # Full, uniform and selective core attention: every forward without autograd, then
    # again with it in the backward; block: the first of the 2 layers only.
    for run in ("full-uniform", "selective"):
        assert runs[run]["forward_calls"] == {"recording": CALLS, "not": CALLS}, run
    assert runs["full-block"]["forward_calls"] == {"recording": CALLS, "not": CALLS // 2}


def test_example_turns_the_foreach_grad_norm_on_by_default(results):
    runs = results["training"]
    assert runs["plain"]["l2_norm_impl"] == "foreach_multi_tensor_l2norm"
    assert runs["megatron-grad-norm"]["l2_norm_impl"] == "local_multi_tensor_l2_norm"
