"""Build and train a GPT with megatron-core alone: GPTModel, its DDP, optimizer, schedule.

``train(args)`` runs in a process whose ``torch.distributed`` is up (torchrun, or the
loss-parity world) and returns the per-iteration metrics. On CPU the project's shim lets
the same code run on gloo.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from checkpoint import load_checkpoint, save_checkpoint
from data import build_dataset, micro_batches, pack_documents, tokenizer_for
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig
from preflight import Plan, check_configuration, lr_schedule, use_cuda
from report import Reporter, nothing_to_do

from usp_megatron.layout import SequenceLayout
from usp_megatron.megatron import (
    get_batch_on_this_usp_rank,
    get_gpt_layer_usp_spec,
    get_thd_batch_on_this_usp_rank,
    install_cpu_shim,
    reset_model_parallel,
    use_usp_rotary_embedding,
)
from usp_megatron.megatron.arguments import usp_enabled, usp_layout
from usp_megatron.megatron.grad_norm import use_foreach_grad_norm

_LAYOUT: tuple | None = None


def initialize(args: argparse.Namespace) -> Plan:
    """Check the configuration (preflight.py), choose the optimizer step's multi-tensor ops
    and build Megatron's groups for it (once per layout)."""
    global _LAYOUT
    plan = check_configuration(args, dist.get_world_size())
    if not use_cuda(args):
        install_cpu_shim(force=True)
    use_foreach_grad_norm(args.usp_foreach_grad_norm)
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    hierarchical = [args.usp_ulysses_degree, args.usp_ring_degree] if usp_enabled(args) else None
    layout = (tp, cp, tuple(hierarchical or ()))
    if layout != _LAYOUT:
        reset_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            context_parallel_size=cp,
            hierarchical_context_parallel_sizes=hierarchical,
            create_gloo_process_groups=False,
        )
        _LAYOUT = layout
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    return plan


def padded_vocab_size(args: argparse.Namespace) -> int:
    """Padded to a multiple of 128 that TP divides: the same model for every TP size."""
    multiple = math.lcm(128, args.tensor_model_parallel_size)
    return math.ceil(tokenizer_for(args).vocab_size / multiple) * multiple


def build_model(
    args: argparse.Namespace, layout: SequenceLayout
) -> tuple[TransformerConfig, torch.nn.Module]:
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        window_size=tuple(args.window_size) if args.window_size else None,
        window_attn_skip_freq=args.window_attn_skip_freq,
        normalization=args.normalization,
        attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        calculate_per_token_loss=True,
        use_cpu_initialization=not args.device_initialization,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=args.recompute_modules,
    )
    if args.megatron_attention:
        spec = get_gpt_layer_local_spec(normalization=args.normalization)
    else:
        spec = get_gpt_layer_usp_spec(
            layout=layout,
            backend=args.usp_attn_backend,
            normalization=args.normalization,
        )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(args),
        max_sequence_length=args.seq_length,
        position_embedding_type=args.position_embedding_type,
    )
    use_usp_rotary_embedding(model, layout)
    if use_cuda(args):
        model.cuda(torch.cuda.current_device())
    if args.bf16:
        model = Float16Module(config, model)
    return config, model


def _loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Summed per-token loss and token count (Megatron's --calculate-per-token-loss)."""
    losses = output.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.detach().float()])
    return loss, num_tokens, {"lm loss": report}


_PACKING = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")


def _forward_step(
    args: argparse.Namespace, layout: SequenceLayout, documents: list[int], data_iterator, model
):
    batch = next(data_iterator)
    if use_cuda(args):
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    packed_seq_params = None
    if "cu_seqlens" in batch:
        documents.append(batch["cu_seqlens"].shape[-1] - 1)
        packing = [batch.pop(key) for key in _PACKING]
        if args.document_mask:
            batch, packed_seq_params = get_thd_batch_on_this_usp_rank(
                batch, *packing, layout=layout
            )
    if packed_seq_params is None and args.context_parallel_size > 1:
        batch = get_batch_on_this_usp_rank(batch, layout=layout)
    output = model(
        batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
        packed_seq_params=packed_seq_params,
    )  # fmt: skip
    return output, partial(_loss, batch["loss_mask"])


@contextlib.contextmanager
def counting_host_syncs(enabled: bool) -> Iterator[list[str]]:
    """Collects, as ``file:line``, every CUDA operation inside the block that makes the host
    wait for the GPU (PyTorch's sync debug mode), e.g. a ``.item()`` or ``.tolist()``."""
    sites: list[str] = []
    if not enabled:
        yield sites
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode("default")
            for w in caught:
                if "synchroniz" in str(w.message):
                    sites.append(f"{'/'.join(Path(w.filename).parts[-3:])}:{w.lineno}")


def build_optimizer(
    args: argparse.Namespace, config: TransformerConfig, model: torch.nn.Module
) -> tuple[DistributedDataParallel, MegatronOptimizer]:
    """Megatron's DDP around ``model`` and its optimizer, wired into ``config`` for the
    schedule (loss scaling, gradient finalisation, no-sync)."""
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer
        ),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=args.optimizer,
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        [ddp],
        use_gloo_process_groups=False,
    )
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp, optimizer


def train(args: argparse.Namespace) -> list[dict]:
    """Train ``args.train_iters`` iterations; returns loss, grad norm and speed per iteration."""
    plan = initialize(args)
    layout = usp_layout(args)  # the flags' layout, resolved once and handed down
    config, model = build_model(args, layout)
    ddp, optimizer = build_optimizer(args, config, model)
    # On resume, preflight.py has decided whose schedule runs (Megatron's flags and rule).
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        **lr_schedule(args),
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
    )
    # The scheduler's load_state_dict steps it by the saved count, from where it is now.
    first_iteration = load_checkpoint(args, ddp, optimizer, scheduler) if args.load else 0
    if first_iteration >= args.train_iters:
        if dist.get_rank() == 0:
            print(nothing_to_do(args, first_iteration), flush=True)
        return []
    if first_iteration == 0:
        scheduler.step(increment=1)  # iteration i trains with the learning rate of step i

    dp_size = args.data_parallel_size
    dataset = build_dataset(args, args.train_iters * args.global_batch_size)
    pack = None
    if args.pack_documents:
        multiple = args.pack_pad_multiple or 2 * args.context_parallel_size
        pack = partial(
            pack_documents, eod=tokenizer_for(args).eod, multiple=multiple,
            per_sample=args.pack_documents_per_sample, sample_masks=args.reset_attention_mask,
        )  # fmt: skip
    data = micro_batches(
        dataset,
        args.global_batch_size,
        args.micro_batch_size,
        ps.get_data_parallel_rank(),
        dp_size,
        first_iteration,
        pack,
    )
    num_micro = args.global_batch_size // (args.micro_batch_size * dp_size)
    forward_backward = get_forward_backward_func()
    history = []
    reporter = Reporter(args, plan, padded_vocab_size(args), dist.get_rank())
    for iteration in range(first_iteration, args.train_iters):
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        documents: list[int] = []  # per packed sample of this rank
        with counting_host_syncs(args.count_host_syncs and use_cuda(args)) as syncs:
            reports = forward_backward(
                forward_step_func=partial(_forward_step, args, layout, documents),
                data_iterator=data,
                model=[ddp],
                num_microbatches=num_micro,
                seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size,
                forward_only=False,
            )
            lr = optimizer.param_groups[0]["lr"]
            _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        totals = torch.stack([r["lm loss"] for r in reports]).sum(0)
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
        if use_cuda(args):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        loss = float(totals[0] / totals[1])
        per_sample = sum(documents) / len(documents) if documents else None
        history.append(
            reporter.record(iteration + 1, loss, float(grad_norm), lr, seconds, per_sample)
        )
        if args.count_host_syncs:
            history[-1]["host_syncs"] = len(syncs)
            history[-1]["host_sync_sites"] = dict(collections.Counter(syncs).most_common(8))
        if args.save and args.save_interval and (iteration + 1) % args.save_interval == 0:
            save_checkpoint(args, iteration + 1, ddp, optimizer, scheduler)
    if args.save and (not args.save_interval or args.train_iters % args.save_interval):
        save_checkpoint(args, args.train_iters, ddp, optimizer, scheduler)
    reporter.close()
    return history
