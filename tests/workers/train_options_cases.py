"""Run in one gloo world of 4 by test_train_options.py: the GPT example's activation
recompute and the foreach gradient norm, through megatron-core's own optimizers.

- ``grad_norm_cases``: for the plain and the distributed optimizer, float32 and bf16, DP4
  and TP2 x DP2, the example's model, DDP and optimizer are built twice from the same seed,
  given the same seeded gradients (each tensor-parallel rank its own, seven orders of
  magnitude), and
  stepped once with megatron-core's fallback ops and once with the foreach ones: the norm
  (all-reduced by megatron-core over its own groups), the clipped gradients and the updated
  weights (the float16 optimizer copies its float32 main weights into them) must agree.
  Also ``get_grad_norm_fp32`` itself, summed over the world, with float32 and bf16 lists.
- ``training_runs``: the example trained under U2 x R2 without recompute, with full
  (uniform, block) and selective recompute, and with megatron-core's own grad norm; each
  run counts the USP attention's forward calls, with and without autograd recording.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from helpers.example import example_on_path

U2R2 = ["--usp-ulysses-degree", "2", "--usp-ring-degree", "2"]
RECOMPUTE = {
    "full-uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                     "--recompute-num-layers", "1"],
    "full-block": ["--recompute-granularity", "full", "--recompute-method", "block",
                   "--recompute-num-layers", "1"],
    "selective": ["--recompute-granularity", "selective", "--recompute-modules", "core_attn"],
}  # fmt: skip
TRAINING_RUNS = {"plain": [], **RECOMPUTE, "megatron-grad-norm": ["--usp-no-foreach-grad-norm"]}
OPTIMIZER_CASES = {
    "fp32-DP4": ["--optimizer", "sgd"],
    "bf16-TP2xDP2": ["--bf16", "--tensor-model-parallel-size", "2"],
    "fp32-DP4-distributed": ["--use-distributed-optimizer"],
    "bf16-TP2xDP2-distributed": ["--bf16", "--tensor-model-parallel-size", "2",
                                 "--use-distributed-optimizer"],
}  # fmt: skip
CLIP = 0.05  # below every case's norm: the step clips


def _common(directory: str) -> list[str]:
    return ["--device", "cpu", "--seq-length", "64", "--global-batch-size", "8",
            "--lr", "0.01", "--lr-warmup-iters", "0", "--log-interval", "1000",
            "--data-cache-path", f"{directory}/data"]  # fmt: skip


def _seeded_gradients(ddp: torch.nn.Module) -> None:
    """Gradients as data parallelism leaves them: the same on every data-parallel rank, each
    tensor-parallel rank its own; each tensor at another magnitude, one tensor zero."""
    from megatron.core import parallel_state as ps

    gen = torch.Generator().manual_seed(100 + ps.get_tensor_model_parallel_rank())
    for index, param in enumerate(ddp.module.parameters()):
        scale = 0.0 if index == 2 else 10.0 ** (index % 7 - 4)
        param.main_grad.copy_(torch.randn(param.shape, generator=gen) * scale)


def _one_step(argv: list[str], foreach: bool) -> dict:
    """The example's model, DDP and optimizer (same seed), seeded gradients, one step."""
    example_on_path()
    from arguments import parse_args
    from training import build_model, build_optimizer, initialize

    from usp_megatron.megatron.arguments import usp_layout
    from usp_megatron.megatron.grad_norm import use_foreach_grad_norm

    args = parse_args(argv)
    initialize(args)
    use_foreach_grad_norm(foreach)
    config, model = build_model(args, usp_layout(args))
    ddp, optimizer = build_optimizer(args, config, model)
    _seeded_gradients(ddp)
    optimizer.prepare_grads()  # the model's gradients into the optimizer's main ones
    norm = optimizer.get_grad_norm()
    ok, step_norm, _ = optimizer.step()  # prepares again (the same), norm, clips, steps
    grads = [g.clone() for g in optimizer.get_main_grads_for_grad_norm()]
    weights = [p.detach().float().clone() for p in ddp.module.parameters()]
    return {"norm": norm, "step_ok": ok, "step_norm": step_norm, "clipped": grads,
            "clipped_norm": _global_norm(grads, optimizer), "weights": weights}  # fmt: skip


def _global_norm(grads: list[torch.Tensor], optimizer) -> float:
    """The float64 norm of these gradients summed over the optimizer's grad-stats group."""
    squares = torch.zeros(1, dtype=torch.float64)
    for grad in grads:
        squares += grad.double().pow(2).sum()
    dist.all_reduce(squares, group=optimizer.get_grad_stats_parallel_group())
    return float(squares.sqrt())


def _reference_norm(argv: list[str]) -> float:
    """What the step's norm must be: the float64 norm of this rank's main gradients that
    count, summed over megatron-core's grad-stats group (fallback sites untouched)."""
    example_on_path()
    from arguments import parse_args
    from training import build_model, build_optimizer, initialize

    from usp_megatron.megatron.arguments import usp_layout

    args = parse_args(argv)
    initialize(args)
    config, model = build_model(args, usp_layout(args))
    ddp, optimizer = build_optimizer(args, config, model)
    _seeded_gradients(ddp)
    optimizer.prepare_grads()
    return _global_norm(optimizer.get_main_grads_for_grad_norm(), optimizer)


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        scale = float(y.double().abs().max())
        worst = max(worst, float((x.double() - y.double()).abs().max()) / max(scale, 1e-30))
    return worst


def _grad_norm_fp32_over_the_world() -> dict:
    """``get_grad_norm_fp32`` on lists of every rank's own tensors, summed over the world."""
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    from usp_megatron.megatron.grad_norm import use_foreach_grad_norm

    gen = torch.Generator().manual_seed(7 + dist.get_rank())
    shapes = [(5,), (33, 7), (128, 64), (2, 3, 4)]
    grads = [torch.randn(s, generator=gen) * 10.0 ** (i - 2) for i, s in enumerate(shapes)]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        tensors = [g.to(dtype) for g in grads]
        use_foreach_grad_norm(True)
        ours = get_grad_norm_fp32(tensors, grad_stats_parallel_group=dist.group.WORLD)
        use_foreach_grad_norm(False)
        theirs = get_grad_norm_fp32([t.float() for t in tensors],
                                    grad_stats_parallel_group=dist.group.WORLD)  # fmt: skip
        rounded = get_grad_norm_fp32(tensors, grad_stats_parallel_group=dist.group.WORLD)
        squares = torch.tensor([sum(float(t.double().pow(2).sum()) for t in tensors)],
                               dtype=torch.float64)  # fmt: skip
        dist.all_reduce(squares)
        out[str(dtype)] = (ours, theirs, rounded, float(squares.sqrt()))
    return out


def grad_norm_cases(directory: str) -> dict:
    """Per optimizer case: norms, clipped gradients and weights, foreach against fallback."""
    results = {}
    for name, flags in OPTIMIZER_CASES.items():
        argv = [*_common(directory), "--clip-grad", str(CLIP), *flags]
        megatron = _one_step(argv, foreach=False)
        foreach = _one_step(argv, foreach=True)
        results[name] = {
            "norm": (foreach["norm"], megatron["norm"]),
            "step_norm": (foreach["step_norm"], megatron["step_norm"]),
            "step_ok": (foreach["step_ok"], megatron["step_ok"]),
            "reference": _reference_norm(argv),
            "clipped_rel": _max_rel(foreach["clipped"], megatron["clipped"]),
            "clipped_norm": (foreach["clipped_norm"], megatron["clipped_norm"]),
            "weights_rel": _max_rel(foreach["weights"], megatron["weights"]),
        }
    results["get_grad_norm_fp32"] = _grad_norm_fp32_over_the_world()
    return results


def training_runs(directory: str) -> dict:
    """Per run: (loss, grad norm) per iteration, the fallback op in use after it, and the USP
    attention's forward calls per iteration, with and without autograd recording."""
    example_on_path()
    from arguments import parse_args
    from megatron.core.optimizer import clip_grads
    from training import train

    from usp_megatron.megatron import USPAttention

    calls: list[bool] = []
    forward = USPAttention.forward

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    USPAttention.forward = counted
    common = [*_common(directory), "--train-iters", "3", "--optimizer", "sgd", "--lr", "0.1",
              "--lr-warmup-iters", "1", *U2R2]  # fmt: skip
    results = {}
    try:
        for name, flags in TRAINING_RUNS.items():
            calls.clear()
            history = train(parse_args([*common, *flags]))
            results[name] = {
                "metrics": [(h["loss"], h["grad_norm"]) for h in history],
                "l2_norm_impl": clip_grads.l2_norm_impl.__name__,
                "forward_calls": {"recording": calls.count(True), "not": calls.count(False)},
            }
    finally:
        USPAttention.forward = forward
    return results


def all_cases(directory: str) -> dict:
    """Both groups in one world (one start of 4 processes)."""
    return {"optimizers": grad_norm_cases(directory), "training": training_runs(directory)}
