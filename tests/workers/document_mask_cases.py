"""Megatron-LM's document masking and loss normalisation under USP, against one rank, in one
world of 4 gloo processes (test_megatron_lm_documents.py asserts on the numbers).

The data is megatron-core's real GPTDataset over short documents, with Megatron-LM's flags
(``--reset-position-ids --reset-attention-mask --eod-mask-loss``, the mask made in the data
loader). The one-rank reference is megatron-core's GPTModel with its own attention, which
applies the data loader's ``[s, s]`` mask. Under USP the batch takes the plugin's hooks
the way Megatron-LM core_v0.16.1's ``pretrain_gpt.py::get_batch`` calls them (the TP-rank
getter, then the THD split with the packing entries popped), and a GPTModel with USP
attention trains on it; the loss goes through the script's own loss function and, for the
gradient weighing, megatron-core's real schedule and DDP.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from helpers.documents import gpt_dataset, write_short_documents
from helpers.megatron_args import parse
from helpers.oracle import rel_error

WORLD = 4
SEQ, MICRO, VOCAB, HEADS = 32, 2, 100, 4
TOL = 5e-6  # float32, 2 layers; documents attending each other are off by ~1e-2
DEGREES = ((2, 2), (4, 1), (1, 4))
#: What Megatron-LM 0.16's get_batch_on_this_tp_rank holds, in its order (then the packing).
MEGATRON_LM_BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def _init_parallel(cp_sizes: list[int] | None) -> None:
    from megatron.core import parallel_state as ps

    from usp_megatron.megatron import reset_model_parallel

    reset_model_parallel()
    ps.initialize_model_parallel(
        context_parallel_size=1 if cp_sizes is None else cp_sizes[0] * cp_sizes[1],
        hierarchical_context_parallel_sizes=cp_sizes,
        create_gloo_process_groups=False,
    )


def _gpt(spec, positions: str, per_token_loss: bool = False):
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.parallel_state import get_context_parallel_world_size
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(7)
    model_parallel_cuda_manual_seed(7)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=HEADS,
        context_parallel_size=get_context_parallel_world_size(),
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_cpu_initialization=True,
        calculate_per_token_loss=per_token_loss,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB + 28,  # padded: end-of-document and padding ids included
        max_sequence_length=SEQ,
        position_embedding_type=positions,
    )


def _batches(prefix: str, reset_position_ids: bool) -> list[dict]:
    """Two micro-batches of ``MICRO`` samples, as Megatron-LM 0.16's TP-rank getter hands
    them over (its keys, in its order)."""
    dataset = gpt_dataset(
        prefix, SEQ, 2 * MICRO, VOCAB, reset_position_ids=reset_position_ids,
        reset_attention_mask=True, eod_mask_loss=True, create_attention_mask=True,
    )  # fmt: skip
    batches = []
    for first in (0, MICRO):
        samples = [dataset[i] for i in range(first, first + MICRO)]
        stacked = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        batch = {key: stacked[key] for key in MEGATRON_LM_BATCH_KEYS}
        batches.append(batch | {"cu_seqlens": None, "max_seqlen": None, "local_cp_size": None})
    return batches


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """pretrain_gpt.py's loss function (core_v0.16.1, without ModelOpt and rerun checks)."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1),
                                                    num_tokens.view(1)])}  # fmt: skip


def _usp_args(u: int, r: int) -> argparse.Namespace:
    from usp_megatron.megatron import apply_usp_args

    args = parse("--usp-ulysses-degree", str(u), "--usp-ring-degree", str(r),
                 reset_attention_mask=True, create_attention_mask_in_dataloader=True,
                 seq_length=SEQ, num_attention_heads=HEADS)  # fmt: skip
    return apply_usp_args(args)


def _get_batch(batch: dict, args: argparse.Namespace) -> tuple:
    """core_v0.16.1 ``pretrain_gpt.py::get_batch`` with the hooks ``install()`` puts in its
    way: the TP-rank getter, then the THD split of Megatron's packed branch."""
    from megatron.core import utils as core_utils

    from usp_megatron.megatron.megatron_lm import wrap_thd_batch_split, wrap_tp_batch

    batch = wrap_tp_batch(lambda: dict(batch), lambda: args)()
    cu_seqlens = batch.pop("cu_seqlens", None)
    cu_seqlens_padded = batch.pop("cu_seqlens_padded", None)
    max_seqlen = batch.pop("max_seqlen", None)
    batch.pop("local_cp_size", None)
    assert cu_seqlens is not None and max_seqlen.dim() == 1  # Megatron's THD branch
    split = wrap_thd_batch_split(core_utils.get_thd_batch_on_this_cp_rank, lambda: args)
    batch, packed_seq_params = split(batch, cu_seqlens, cu_seqlens_padded, max_seqlen)
    return (*batch.values(), packed_seq_params)


def _reference(batch: dict, positions: str):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    _init_parallel(None)
    model = _gpt(get_gpt_layer_local_spec(), positions)
    losses = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"])  # fmt: skip
    loss = _loss_func(batch["loss_mask"], losses)[0]
    loss.backward()
    return model, loss.detach()


def _usp_model(reference, positions: str, layout):
    from usp_megatron.megatron import get_gpt_layer_usp_spec

    per_token_loss = reference.config.calculate_per_token_loss
    model = _gpt(get_gpt_layer_usp_spec(layout, backend="reference"), positions, per_token_loss)
    with torch.no_grad():
        for (name, param), (ref_name, ref) in zip(
            model.named_parameters(), reference.named_parameters(), strict=True
        ):
            assert name == ref_name
            param.copy_(ref)
    return model


def _documents_case(batch: dict, positions: str, u: int, r: int, reference, ref_loss) -> dict:
    """One micro-batch: forward, loss and backward against one rank's."""
    from megatron.core import parallel_state as ps

    from usp_megatron.megatron.arguments import usp_layout

    args = _usp_args(u, r)
    _init_parallel([u, r])
    model = _usp_model(reference, positions, usp_layout(args))
    tokens, labels, loss_mask, attention_mask, position_ids, params = _get_batch(batch, args)
    assert attention_mask is None and params.qkv_format == "thd"
    losses = model(tokens, position_ids, attention_mask, labels=labels, packed_seq_params=params)
    loss = _loss_func(loss_mask, losses)[0]
    loss.backward()
    cp_group = ps.get_context_parallel_group()
    total = loss.detach().clone()
    dist.all_reduce(total, group=cp_group)
    errors = {"loss": rel_error(total, ref_loss), "grads": 0.0}
    for param, ref in zip(model.parameters(), reference.parameters(), strict=True):
        dist.all_reduce(param.grad, group=cp_group)
        errors["grads"] = max(errors["grads"], rel_error(param.grad, ref.grad))
    return errors


def _ignoring_the_mask(batch: dict, reference) -> float:
    """Negative control: the same batch, dense and causal (the mask left out); the error of
    its gradients."""
    from megatron.core import parallel_state as ps

    from usp_megatron.megatron import get_batch_on_this_usp_rank

    _init_parallel([2, 2])
    model = _usp_model(reference, "rope", "zigzag")
    dense = {key: batch[key] for key in ("tokens", "labels", "loss_mask", "position_ids")}
    split = get_batch_on_this_usp_rank(dense, "zigzag")
    losses = model(split["tokens"], split["position_ids"], None, labels=split["labels"])
    _loss_func(split["loss_mask"], losses)[0].backward()
    error = 0.0
    for param, ref in zip(model.parameters(), reference.parameters(), strict=True):
        dist.all_reduce(param.grad, group=ps.get_context_parallel_group())
        error = max(error, rel_error(param.grad, ref.grad))
    return error


def _train_step(batches: list[dict], model, forward_step) -> tuple[list, torch.Tensor]:
    """One step of megatron-core's schedule over both micro-batches, through its DDP
    (gradients reduced over data- and context-parallel ranks, Megatron's scaling): each
    parameter's reduced gradient, and the summed loss and tokens the schedule reports."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    ddp.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
        num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=MICRO,
        forward_only=False,
    )  # fmt: skip
    report = torch.stack([r["lm loss"] for r in reports]).sum(0)
    return [param.main_grad.clone() for param in model.parameters()], report


def _reference_step(data_iterator, model):
    batch = next(data_iterator)
    losses = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"])  # fmt: skip
    return losses, partial(_loss_func, batch["loss_mask"])


def _usp_step(args, data_iterator, model):
    tokens, labels, loss_mask, _, position_ids, params = _get_batch(next(data_iterator), args)
    losses = model(tokens, position_ids, None, labels=labels, packed_seq_params=params)
    return losses, partial(_loss_func, loss_mask)


def _weighing_cases(batches: list[dict]) -> dict[str, dict[str, float]]:
    """Without --calculate-per-token-loss: one rank (DP only) against U2 x R2 with the loss
    hook (gradients equal) and without (each rank's loss over its own tokens: they differ).
    With it (Megatron's own normalisation by the tokens of all ranks), the hook stays out."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import schedules

    from usp_megatron.megatron.arguments import usp_layout
    from usp_megatron.megatron.megatron_lm import wrap_loss_calculation

    args = _usp_args(2, 2)
    plain = schedules.forward_step_calc_loss
    results = {}
    cases = (("weighed", True, False), ("unweighed", False, False), ("per-token", True, True))
    for name, hooked, per_token_loss in cases:
        if name != "unweighed":  # its reference is the one before
            _init_parallel(None)
            reference = _gpt(get_gpt_layer_local_spec(), "rope", per_token_loss)
            want_grads, want_report = _train_step(batches, reference, _reference_step)
        _init_parallel([2, 2])
        model = _usp_model(reference, "rope", usp_layout(args))
        if hooked:
            schedules.forward_step_calc_loss = wrap_loss_calculation(plain, lambda: args)
        try:
            grads, report = _train_step(batches, model, partial(_usp_step, args))
        finally:
            schedules.forward_step_calc_loss = plain
        dist.all_reduce(report, group=ps.get_context_parallel_group())
        results[f"schedule U2R2 {name}"] = {
            "grads": max(rel_error(g, w) for g, w in zip(grads, want_grads, strict=True)),
            "reported loss": rel_error(report, want_report),
        }
    return results


def _mismatch_case() -> dict[str, float]:
    """cu_seqlens that differ between the ranks of one sequence: refused on every rank of
    the group, said by its first, naming both."""
    from usp_megatron.megatron import get_thd_batch_on_this_usp_rank
    from usp_megatron.megatron.validation import USPRefusal

    _init_parallel([2, 2])
    rank = dist.get_rank()
    middle = 16 if rank != 2 else 24
    cu = torch.tensor([0, middle, SEQ], dtype=torch.int32)
    batch = {"tokens": torch.zeros(1, SEQ, dtype=torch.int64)}
    try:
        get_thd_batch_on_this_usp_rank(batch, cu, cu, None, "zigzag")
    except USPRefusal as refusal:
        said = str(refusal) == (
            "context-parallel ranks 0 and 2 of one sequence hold different documents: "
            "cu_seqlens [0, 16, 32] (padded [0, 16, 32]) and [0, 24, 32] (padded [0, 24, 32]); "
            "every rank of a context-parallel group must get the same batch"
        )
        return {"refused as said": float(said), "speaks": float(refusal.speaks)}
    return {"refused as said": 0.0, "speaks": 0.0}


def run_document_cases(data_dir: str) -> list[tuple[str, dict[str, float]]]:
    """(case, errors) of this rank for every case."""
    from usp_megatron.megatron import install_cpu_shim

    install_cpu_shim(force=True)
    prefix = str(Path(data_dir) / "docs")
    if dist.get_rank() == 0:
        write_short_documents(Path(prefix), eod=VOCAB, vocab=VOCAB, longest=12)
    dist.barrier()
    results = []
    # RoPE with per-document position ids; learned absolute positions with the sample's own
    # (Megatron's without --reset-position-ids), which the packing must carry.
    for positions, reset_position_ids in (("rope", True), ("learned_absolute", False)):
        batch = _batches(prefix, reset_position_ids)[0]
        reference, ref_loss = _reference(batch, positions)
        for u, r in DEGREES:
            errors = _documents_case(batch, positions, u, r, reference, ref_loss)
            results.append((f"documents {positions} U{u}R{r}", errors))
        if positions == "rope":
            results.append(("mask ignored", {"grads": _ignoring_the_mask(batch, reference)}))
    results += list(_weighing_cases(_batches(prefix, True)).items())
    results.append(("cu_seqlens mismatch", _mismatch_case()))
    return results
