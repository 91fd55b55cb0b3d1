"""FlashAttention 2 (``flash-attn`` >= 2.6), used when it is importable.

Calls its low-level forward/backward, which return and take the log-sum-exp, by
keyword so that the positional changes between 2.6 and 2.8 do not matter. Not
installable on the project's build machines: not exercised by CI.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from usp_megatron.mask import BlockMask

_HALF = (torch.float16, torch.bfloat16)
Pair = tuple[Tensor, Tensor]
Triple = tuple[Tensor, Tensor, Tensor]


def flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


class FlashAttnKernel:
    name = "flash_attn"
    takes_windows = True
    takes_documents = False

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda" and dtype in _HALF and flash_attn_importable()

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float) -> Pair:
        left, right = mask.flash_window(q.shape[1], k.shape[1])
        from flash_attn.flash_attn_interface import _flash_attn_forward

        out, lse, *_ = _flash_attn_forward(
            q,
            k,
            v,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=False,
            window_size_left=left,
            window_size_right=right,
            softcap=0.0,
            alibi_slopes=None,
            return_softmax=False,
        )
        return out, lse

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        mask: BlockMask,
        scale: float,
    ) -> Triple:
        from flash_attn.flash_attn_interface import _flash_attn_backward

        left, right = mask.flash_window(q.shape[1], k.shape[1])
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out,
            lse.contiguous(),
            dq,
            dk,
            dv,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=False,
            window_size_left=left,
            window_size_right=right,
            softcap=0.0,
            alibi_slopes=None,
            deterministic=False,
            rng_state=None,
        )
        return dq, dk, dv
