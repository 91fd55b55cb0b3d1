"""USP flags parsed as ``add_usp_args`` adds them, with the Megatron-LM arguments that
validation reads (the flag, spec and hook tests share it; imports megatron.core)."""

from __future__ import annotations

import argparse

from usp_megatron.megatron import add_usp_args


def parse(*flags: str, **megatron_args) -> argparse.Namespace:
    """USP flags parsed, plus the Megatron-LM arguments validation reads."""
    args = add_usp_args(argparse.ArgumentParser()).parse_args(list(flags))
    defaults = dict(
        context_parallel_size=1,
        hierarchical_context_parallel_sizes=None,
        num_attention_heads=16,
        tensor_model_parallel_size=1,
        seq_length=1024,
        attention_dropout=0.0,
        position_embedding_type="rope",
    )
    vars(args).update(defaults | megatron_args)
    return args
