"""The gradient norm and clipping of megatron-core's optimizers without apex or
TransformerEngine, as a few fused ``torch._foreach_*`` kernels with no host synchronisation.

Without either package megatron-core falls back to its own multi-tensor ops
(``megatron.core.utils``): ``local_multi_tensor_l2_norm`` takes every parameter's gradient
norm and builds a host tensor of them, which reads each back to the host: one
synchronisation per parameter tensor (292 an iteration for a 24-layer GPT on a GPU), and
``local_multi_tensor_scale`` (clipping, and the float16 optimizer's copy of its float32 main
weights into the model every step) runs two kernels per tensor. The ops here keep the
contract of apex's ``amp_C.multi_tensor_l2norm`` / ``multi_tensor_scale`` that
megatron-core calls them with (``multi_tensor_applier(op, noop_flag, tensor_lists,
*args)``), and its semantics: the norm accumulates in float32 whatever the gradients' dtype
(megatron-core's fallback rounds each tensor's norm and the total to bf16 for bf16
gradients; apex and TransformerEngine do not), an inf or NaN gradient gives an inf or NaN
norm, and ``dst = src * scale`` is computed in the source dtype. Megatron-core itself then
all-reduces the squared norm over the data- and model-parallel groups it always used and
reads the result once.

:func:`use_foreach_grad_norm` puts them where megatron-core fell back (and only there: with
apex or TransformerEngine it uses their fused kernels, which stay); the Megatron-LM hooks
and the GPT example turn it on by default (``--usp-no-foreach-grad-norm`` turns it off).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from megatron.core import utils as core_utils

# The modules of megatron-core's optimizer step that choose their multi-tensor ops at import
# (TransformerEngine, else apex, else megatron-core's own), and the op attributes they call.
_SITES = (
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl"),
    ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl"),
    ("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl"),
)


def foreach_multi_tensor_l2norm(
    chunk_size: int,
    noop_flag: torch.Tensor,
    tensor_lists: list[list[torch.Tensor]],
    per_tensor: bool,
    *args: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``amp_C.multi_tensor_l2norm``: the L2 norm of all of ``tensor_lists[0]`` as a float32
    ``[1]`` tensor on their device, and the per-tensor norms ``[n]`` if ``per_tensor``.
    ``chunk_size`` and ``noop_flag`` belong to apex's kernels and are not used."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float32))
    total = torch.linalg.vector_norm(norms).reshape(1)
    return total, norms if per_tensor else None


def foreach_multi_tensor_scale(
    chunk_size: int,
    noop_flag: torch.Tensor,
    tensor_lists: list[list[torch.Tensor]],
    scale: float,
) -> None:
    """``amp_C.multi_tensor_scale``: ``dst = src * scale`` for ``src, dst`` in
    ``zip(*tensor_lists)``. Megatron-core scales gradients in place (clipping) and copies
    with scale 1 (float32 main weights into the model's bf16/fp16 ones); anything else goes
    through megatron-core's own loop, which needs no temporary for all tensors at once."""
    sources, targets = tensor_lists
    if not sources:
        return
    if scale == 1.0:  # x * 1.0 == x exactly: a copy (with the cast to the target dtype)
        torch._foreach_copy_(targets, sources)
    elif all(t is s for t, s in zip(targets, sources, strict=True)):
        torch._foreach_mul_(targets, scale)
    else:
        core_utils.local_multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale)


_FOREACH = {
    "l2_norm_impl": (core_utils.local_multi_tensor_l2_norm, foreach_multi_tensor_l2norm),
    "multi_tensor_scale_impl": (core_utils.local_multi_tensor_scale, foreach_multi_tensor_scale),
}


class FallbackSite(NamedTuple):
    """A module attribute holding one of megatron-core's fallback multi-tensor ops."""

    module: Any
    name: str
    megatron_op: Callable
    foreach_op: Callable


def fallback_sites() -> list[FallbackSite]:
    """The op attributes of megatron-core's optimizer step that run its per-tensor fallback
    (the module found neither TransformerEngine nor apex at import); empty with either."""
    sites = []
    for module_name, name in _SITES:
        module = importlib.import_module(module_name)
        applier = getattr(module, "multi_tensor_applier", None)
        if applier is not core_utils.local_multi_tensor_applier:
            continue  # TransformerEngine's or apex's fused kernels
        megatron_op, foreach_op = _FOREACH[name]
        sites.append(FallbackSite(module, name, megatron_op, foreach_op))
    return sites


def use_foreach_grad_norm(enabled: bool = True) -> bool:
    """Run megatron-core's gradient norm, clipping and main-weight copy on the foreach ops
    (``enabled``) or on its own fallback again; returns whether the foreach ops are in use,
    False where megatron-core uses TransformerEngine's or apex's kernels (left alone).
    Call it before training; it changes module attributes, so it holds for the process."""
    sites = fallback_sites()
    for site in sites:
        setattr(site.module, site.name, site.foreach_op if enabled else site.megatron_op)
    return enabled and bool(sites)
