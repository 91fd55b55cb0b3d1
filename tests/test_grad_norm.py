"""The foreach replacement of megatron-core's fallback multi-tensor ops (one process): the
L2 norm and the scale against megatron-core's own fallback on the same tensors (shapes,
dtypes, inf and NaN, empty lists), where it is installed and where not, and the Megatron-LM
hook that picks it by flag. The optimizers that call them, with data and tensor parallelism
and the distributed optimizer, are in test_train_options.py."""

from __future__ import annotations

import argparse

import pytest
import torch
from megatron.core import utils as core_utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as megatron_optimizer

from usp_megatron.megatron.grad_norm import (
    fallback_sites,
    foreach_multi_tensor_l2norm,
    foreach_multi_tensor_scale,
    use_foreach_grad_norm,
)
from usp_megatron.megatron.megatron_lm import wrap_multi_tensor_op

SHAPES = [(3,), (17, 5), (64, 33), (2, 3, 4), (1,), (257, 129)]
SITES = [(clip_grads, "l2_norm_impl"), (clip_grads, "multi_tensor_scale_impl"),
         (megatron_optimizer, "multi_tensor_scale_impl")]  # fmt: skip


_TENSOR = torch.tensor


def _host_tensor(*args, device=None, **kwargs):
    """``torch.tensor`` with megatron-core's hard-coded ``device="cuda"`` read as the CPU
    (what the project's CPU shim does in the gloo workers)."""
    return _TENSOR(*args, **kwargs)


@pytest.fixture(autouse=True)
def _restore_sites(monkeypatch):
    """Every test leaves megatron-core's module attributes as it found them; its fallback
    norm runs on the CPU."""
    for module, name in SITES:
        monkeypatch.setattr(module, name, getattr(module, name))
    for module in (clip_grads, megatron_optimizer):
        monkeypatch.setattr(module, "multi_tensor_applier", module.multi_tensor_applier)
    monkeypatch.setattr(torch, "tensor", _host_tensor)


def _grads(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Seeded gradients over six orders of magnitude, one of them all zeros."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(shape, generator=gen) * 10.0 ** (i - 3) for i, shape in enumerate(SHAPES)]
    grads[1].zero_()
    return [g.to(dtype) for g in grads]


def _norm(op, tensors: list[torch.Tensor], per_tensor: bool = False):
    noop_flag = torch.zeros(1, dtype=torch.int)
    return core_utils.local_multi_tensor_applier(op, noop_flag, [tensors], per_tensor)


def _float64_norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.cat([t.double().flatten() for t in tensors]).norm())


def test_l2norm_equals_megatrons_fallback_in_float32():
    grads = _grads(torch.float32)
    ours, per_tensor = _norm(foreach_multi_tensor_l2norm, grads)
    theirs, _ = _norm(core_utils.local_multi_tensor_l2_norm, grads)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape == (1,)
    assert per_tensor is None
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6, abs=0)
    assert float(ours) == pytest.approx(_float64_norm(grads), rel=1e-5, abs=0)
    _, norms = _norm(foreach_multi_tensor_l2norm, grads, per_tensor=True)
    expected = torch.stack([g.double().norm() for g in grads])
    torch.testing.assert_close(norms.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_l2norm_of_half_precision_grads_accumulates_in_float32(dtype):
    """Apex's and TransformerEngine's semantics: the norm of the values as they are, in
    float32. Megatron-core's fallback rounds each tensor's norm and the total to the
    gradients' dtype: within that dtype's rounding of the exact value, and further off."""
    grads = _grads(dtype, seed=1)
    ours, _ = _norm(foreach_multi_tensor_l2norm, grads)
    upcast, _ = _norm(core_utils.local_multi_tensor_l2_norm, [g.float() for g in grads])
    rounded, _ = _norm(core_utils.local_multi_tensor_l2_norm, grads)
    exact = _float64_norm(grads)
    assert ours.dtype == torch.float32
    assert float(ours) == pytest.approx(float(upcast), rel=1e-6, abs=0)
    assert float(ours) == pytest.approx(exact, rel=1e-5, abs=0)  # float32 sums
    assert abs(float(rounded) - exact) / exact < 1e-2  # the fallback's own rounding
    assert abs(float(rounded) - exact) > 10 * abs(float(ours) - exact)


@pytest.mark.parametrize("bad, expected", [(float("inf"), float("inf")), (float("-inf"),
                         float("inf")), (float("nan"), float("nan"))])  # fmt: skip
def test_l2norm_of_inf_and_nan_is_megatrons(bad, expected):
    for dtype in (torch.float32, torch.bfloat16):
        grads = _grads(dtype, seed=2)
        grads[3].view(-1)[5] = bad
        ours, _ = _norm(foreach_multi_tensor_l2norm, grads)
        theirs, _ = _norm(core_utils.local_multi_tensor_l2_norm, grads)
        torch.testing.assert_close(ours, theirs.float(), equal_nan=True)
        torch.testing.assert_close(ours, torch.tensor([expected]), equal_nan=True)


def test_l2norm_of_no_tensors_is_zero():
    norm, per_tensor = _norm(foreach_multi_tensor_l2norm, [])
    assert norm.tolist() == [0.0] and norm.dtype == torch.float32 and per_tensor is None


def _scaled(op, sources, targets, scale):
    targets = [t.clone() for t in targets]
    sources = targets if sources is None else sources
    core_utils.local_multi_tensor_applier(op, torch.zeros(1, dtype=torch.int),
                                          [sources, targets], scale)  # fmt: skip
    return targets


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_copy_main_weights_into_the_model_is_bitwise_megatrons(target_dtype):
    """Scale 1: the float16 optimizer's copy of its float32 main weights every step."""
    sources = _grads(torch.float32, seed=3)
    targets = [torch.empty_like(s, dtype=target_dtype) for s in sources]
    ours = _scaled(foreach_multi_tensor_scale, sources, targets, 1.0)
    theirs = _scaled(core_utils.local_multi_tensor_scale, sources, targets, 1.0)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == target_dtype and torch.equal(a, b)


@pytest.mark.parametrize("scale", [0.37, 0.0, 1e-30])
def test_clipping_in_place_is_bitwise_megatrons(scale):
    grads = _grads(torch.float32, seed=4)
    grads[2].view(-1)[0] = float("inf")  # inf * 0 is NaN in both
    ours = _scaled(foreach_multi_tensor_scale, None, grads, scale)
    theirs = _scaled(core_utils.local_multi_tensor_scale, None, grads, scale)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(ours[0], grads[0]) or scale == 1.0  # it scaled


def test_scale_into_other_tensors_rounds_in_the_source_dtype():
    sources = _grads(torch.float32, seed=5)
    targets = [torch.empty_like(s, dtype=torch.bfloat16) for s in sources]
    ours = _scaled(foreach_multi_tensor_scale, sources, targets, 0.3)
    theirs = _scaled(core_utils.local_multi_tensor_scale, sources, targets, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert _scaled(foreach_multi_tensor_scale, [], [], 0.5) == []


def test_installed_only_where_megatron_core_fell_back(monkeypatch):
    assert {(s.module, s.name) for s in fallback_sites()} == set(SITES)  # CI: no TE, no apex
    assert use_foreach_grad_norm() is True
    assert clip_grads.l2_norm_impl is foreach_multi_tensor_l2norm
    assert clip_grads.multi_tensor_scale_impl is foreach_multi_tensor_scale
    assert megatron_optimizer.multi_tensor_scale_impl is foreach_multi_tensor_scale
    assert use_foreach_grad_norm(False) is False
    assert clip_grads.l2_norm_impl is core_utils.local_multi_tensor_l2_norm
    assert megatron_optimizer.multi_tensor_scale_impl is core_utils.local_multi_tensor_scale

    # Where megatron-core imported apex's (or TransformerEngine's) kernels, they stay.
    def apex_applier(op, noop_flag, tensor_lists, *args):
        return op(2048 * 32, noop_flag, tensor_lists, *args)

    def apex_l2norm(*args):
        return torch.zeros(1), None

    monkeypatch.setattr(clip_grads, "multi_tensor_applier", apex_applier)
    monkeypatch.setattr(clip_grads, "l2_norm_impl", apex_l2norm)
    assert use_foreach_grad_norm() is True  # the optimizer module still fell back
    assert clip_grads.l2_norm_impl is apex_l2norm
    assert megatron_optimizer.multi_tensor_scale_impl is foreach_multi_tensor_scale
    monkeypatch.setattr(megatron_optimizer, "multi_tensor_applier", apex_applier)
    assert fallback_sites() == [] and use_foreach_grad_norm() is False


def test_megatron_lm_hook_picks_the_op_by_flag():
    """``install`` wraps every fallback site; the wrapper reads --usp-no-foreach-grad-norm
    from Megatron-LM's arguments at each call. bf16 gradients tell the two apart."""
    flags = argparse.Namespace(usp_foreach_grad_norm=True)
    grads = _grads(torch.bfloat16, seed=6)
    (site,) = [s for s in fallback_sites() if s.name == "l2_norm_impl"]
    hooked = wrap_multi_tensor_op(site, lambda: flags)
    site.module.l2_norm_impl = hooked
    assert wrap_multi_tensor_op(site, lambda: flags) is hooked  # idempotent
    foreach, _ = _norm(hooked, grads)
    flags.usp_foreach_grad_norm = False
    megatron, _ = _norm(hooked, grads)
    assert torch.equal(foreach, _norm(foreach_multi_tensor_l2norm, grads)[0])
    assert torch.equal(megatron, _norm(core_utils.local_multi_tensor_l2_norm, grads)[0])
    assert not torch.equal(foreach, megatron.float())


@pytest.mark.gpu
def test_on_cuda_no_host_synchronisation_and_megatrons_values():
    """The point of the replacement: no operation waits for the GPU (PyTorch's sync debug
    mode raises on one), and the fused CUDA kernels agree with the fallback's values."""
    grads = {dtype: [g.cuda() for g in _grads(dtype, seed=7)]
             for dtype in (torch.float32, torch.bfloat16)}  # fmt: skip
    main = [g.clone() for g in grads[torch.float32]]
    model = [torch.empty_like(g, dtype=torch.bfloat16) for g in main]
    noop_flag = torch.zeros(1, dtype=torch.int, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norms = {dtype: foreach_multi_tensor_l2norm(0, noop_flag, [tensors], False)[0]
                 for dtype, tensors in grads.items()}  # fmt: skip
        foreach_multi_tensor_scale(0, noop_flag, [main, main], 0.25)
        foreach_multi_tensor_scale(0, noop_flag, [main, model], 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for dtype, tensors in grads.items():
        upcast = [t.float() for t in tensors]
        theirs, _ = _norm(core_utils.local_multi_tensor_l2_norm, upcast)
        assert float(norms[dtype]) == pytest.approx(float(theirs), rel=1e-6, abs=0), dtype
    for scaled, grad, copied in zip(main, grads[torch.float32], model, strict=True):
        assert torch.equal(scaled, grad * 0.25) and torch.equal(copied, scaled.bfloat16())
