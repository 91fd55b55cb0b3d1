"""USP core attention inside megatron-core's GPTModel vs a one-rank GPTModel, per rank.

Every rank builds the one-rank reference (plain ``DotProductAttention``, TP 1, CP 1) from a
fixed seed, then the USP model of the case (its weights copied from the reference, split
by TP), runs forward and backward on its share of the batch, gathers the logits and
reduces the gradients over the context-parallel group, and reports relative errors. The
tests (test_megatron_model.py) run every case in one world and assert on the numbers.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers.oracle import rel_error

WORLD = 4
SEQ, BATCH, VOCAB, HEADS = 32, 2, 128, 8
TOL = 5e-6  # float32, 2 layers: errors are ~1e-6; a wrong RoPE slice is off by ~1e-2


def _cases() -> list[dict]:
    cases = []
    for u, r in ((4, 1), (2, 2), (1, 4)):
        for impl in ("basic", "zigzag", "stripe"):
            for kv in (HEADS, 2):
                cases.append(dict(tp=1, u=u, r=r, impl=impl, kv=kv, fix_rope=True))
    for impl in ("zigzag", "stripe"):
        for kv in (HEADS, 2):
            cases.append(dict(tp=2, u=2, r=1, impl=impl, kv=kv, fix_rope=True))
    # Heads that U does not divide (6 over U=4; 6 / TP 2 = 3 over U=2): uneven splits.
    cases.append(dict(tp=1, u=4, r=1, impl="zigzag", heads=6, kv=6, fix_rope=True))
    cases.append(dict(tp=1, u=4, r=1, impl="stripe", heads=6, kv=2, fix_rope=True))
    cases.append(dict(tp=2, u=2, r=1, impl="zigzag", heads=6, kv=2, fix_rope=True))
    cases.append(dict(tp=1, u=2, r=2, impl="zigzag", kv=HEADS, fix_rope=False))
    # Selective recomputation runs the core attention (and its collectives) again in backward.
    cases.append(dict(tp=1, u=2, r=2, impl="stripe", kv=2, fix_rope=True, recompute=True))
    # Negative controls: Megatron's (zigzag) RoPE slice with another layout.
    for impl in ("stripe", "basic"):
        cases.append(dict(tp=1, u=2, r=2, impl=impl, kv=HEADS, fix_rope=False))
    return cases


def _heads(case: dict) -> int:
    return case.get("heads", HEADS)


def label(case: dict) -> str:
    heads = "" if _heads(case) == HEADS else f"H{_heads(case)}-"
    mha = heads + ("MHA" if case["kv"] == _heads(case) else f"GQA{case['kv']}")
    rope = "" if case["fix_rope"] else "-megatron-rope"
    recompute = "-recompute" if case.get("recompute") else ""
    return f"TP{case['tp']}xU{case['u']}R{case['r']}-{case['impl']}-{mha}{rope}{recompute}"


def _init_parallel(tp: int, cp_sizes: list[int] | None) -> None:
    """Megatron's groups for one layout; built once per layout (each build adds threads)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        context_parallel_size=1 if cp_sizes is None else cp_sizes[0] * cp_sizes[1],
        hierarchical_context_parallel_sizes=cp_sizes,
        create_gloo_process_groups=False,
    )


def _gpt(heads: int, kv: int, spec, recompute: bool = False):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(7)
    model_parallel_cuda_manual_seed(7)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=8 * heads,
        ffn_hidden_size=128,
        num_attention_heads=heads,
        num_query_groups=kv,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_cpu_initialization=True,
        recompute_granularity="selective" if recompute else None,
        recompute_modules=["core_attn"] if recompute else None,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        parallel_output=False,
    )


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    loss_mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.2).float()
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
    }


def _forward_backward(model, batch):
    logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V]
    losses = F.cross_entropy(
        logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), reduction="none"
    )
    loss = (losses * batch["loss_mask"].reshape(-1)).sum()
    loss.backward()
    return logits.detach(), loss.detach()


class _Reference:
    """The one-rank model's parameters (with gradients), logits and loss on the full batch."""

    def __init__(self, heads: int, kv: int, batch: dict[str, torch.Tensor]) -> None:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        model = _gpt(heads, kv, get_gpt_layer_local_spec())
        self.logits, self.loss = _forward_backward(model, batch)
        self.params = dict(model.named_parameters())

    def shard(self, name: str, param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """``full`` cut like ``param`` is cut by tensor parallelism."""
        from megatron.core import parallel_state as ps

        if not getattr(param, "tensor_model_parallel", False):
            return full
        tp = ps.get_tensor_model_parallel_world_size()
        return full.chunk(tp, dim=param.partition_dim)[ps.get_tensor_model_parallel_rank()]


def _run_case(case: dict, reference: _Reference, batch: dict) -> dict[str, float]:
    from megatron.core import parallel_state as ps

    from usp_megatron.megatron import (
        USPAttention,
        get_batch_on_this_usp_rank,
        get_gpt_layer_usp_spec,
        use_usp_rotary_embedding,
        usp_groups_from_megatron,
    )
    from usp_megatron.sharding import gather_sequence

    impl = case["impl"]
    spec = get_gpt_layer_usp_spec(layout=impl, backend="reference")
    model = _gpt(_heads(case), case["kv"], spec, case.get("recompute", False))
    refused = {}
    if case["fix_rope"]:
        use_usp_rotary_embedding(model, impl)
    elif impl != "zigzag":
        refused["refused without the call"] = _refused_without_rope_call(model, batch, impl)
        # Negative control: let it run with Megatron's own (zigzag) RoPE slice.
        for module in model.modules():
            if isinstance(module, USPAttention):
                module.positions_confirmed = True
    named = list(model.named_parameters())
    with torch.no_grad():
        for name, param in named:
            param.copy_(reference.shard(name, param, reference.params[name].detach()))
    logits, loss = _forward_backward(model, get_batch_on_this_usp_rank(batch, impl))
    cp_group = ps.get_context_parallel_group()
    dist.all_reduce(loss, group=cp_group)
    groups = usp_groups_from_megatron()
    errors = {
        "loss": rel_error(loss, reference.loss),
        "logits": rel_error(gather_sequence(logits, 1, groups, impl), reference.logits),
        "grads": 0.0,
    }
    for name, param in named:
        dist.all_reduce(param.grad, group=cp_group)
        ref_grad = reference.shard(name, param, reference.params[name].grad)
        errors["grads"] = max(errors["grads"], rel_error(param.grad, ref_grad))
    return errors | refused


def _refused_without_rope_call(model, batch: dict, impl: str) -> float:
    """1.0 if the first forward of a stripe/basic model whose RoPE was not given the
    layout's slice stops with an error naming the call, else 0.0."""
    from usp_megatron.megatron import get_batch_on_this_usp_rank

    try:
        _forward_backward(model, get_batch_on_this_usp_rank(batch, impl))
    except ValueError as error:
        return float("use_usp_rotary_embedding(model, " in str(error))
    return 0.0


class _Messages(logging.Handler):
    """The messages a logger passes on."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_model_cases(cases: list[dict]) -> list[tuple[str, dict[str, float], list[str]]]:
    """(label, errors, messages the core attention logged while the case ran) per case."""
    from usp_megatron.megatron import install_cpu_shim

    install_cpu_shim(force=True)
    batch = _batch()
    _init_parallel(1, None)
    references = {
        key: _Reference(*key, batch) for key in sorted({(_heads(c), c["kv"]) for c in cases})
    }
    logger = logging.getLogger("usp_megatron.megatron.core_attention")
    logger.setLevel(logging.INFO)
    results = []
    for layout in sorted({(c["tp"], c["u"], c["r"]) for c in cases}):
        tp, u, r = layout
        _init_parallel(tp, [u, r])
        for case in cases:
            if (case["tp"], case["u"], case["r"]) == layout:
                handler = _Messages()
                logger.addHandler(handler)
                errors = _run_case(case, references[(_heads(case), case["kv"])], batch)
                logger.removeHandler(handler)
                results.append((label(case), errors, handler.messages))
    return results
