"""The Megatron plugin: USP as megatron-core's context parallelism.

- :func:`get_gpt_layer_usp_spec` / :func:`with_usp_attention`: GPT specs whose core attention
  is :class:`USPAttention` (groups from ``initialize_model_parallel(context_parallel_size=U*R,
  hierarchical_context_parallel_sizes=[U, R])``).
- :func:`get_batch_on_this_usp_rank`: the batch split of the USP layout;
  :func:`get_thd_batch_on_this_usp_rank`: that of packed documents (THD), with the
  ``PackedSeqParams`` the model takes.
- :func:`use_usp_rotary_embedding`: the RoPE slice of stripe and basic.
- :func:`add_usp_args` / :func:`validate_usp_args`: Megatron-LM flags; ``megatron_lm`` and
  ``launch`` wire them into Megatron-LM's ``pretrain_gpt.py``.
- :func:`install_cpu_shim`: megatron-core training on CPU processes (gloo).
"""

from usp_megatron.megatron.arguments import add_usp_args, apply_usp_args, validate_usp_args
from usp_megatron.megatron.batch import (
    get_batch_on_this_usp_rank,
    get_thd_batch_on_this_usp_rank,
)
from usp_megatron.megatron.core_attention import USPAttention
from usp_megatron.megatron.cpu_shim import install_cpu_shim
from usp_megatron.megatron.process_groups import reset_model_parallel, usp_groups_from_megatron
from usp_megatron.megatron.rope import USPRotaryEmbedding, use_usp_rotary_embedding
from usp_megatron.megatron.specs import (
    get_gpt_layer_usp_spec,
    get_gpt_layer_usp_te_spec,
    usp_core_attention,
    with_usp_attention,
)

__all__ = [
    "USPAttention",
    "USPRotaryEmbedding",
    "add_usp_args",
    "apply_usp_args",
    "get_batch_on_this_usp_rank",
    "get_thd_batch_on_this_usp_rank",
    "get_gpt_layer_usp_spec",
    "get_gpt_layer_usp_te_spec",
    "install_cpu_shim",
    "reset_model_parallel",
    "use_usp_rotary_embedding",
    "usp_core_attention",
    "usp_groups_from_megatron",
    "validate_usp_args",
    "with_usp_attention",
]
