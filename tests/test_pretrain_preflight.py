"""The GPT driver's first hour: bad configurations refused before anything is built, in one
message and exit code 1; the banner, log line and summary; the FLOP count behind MFU; the
Megatron-LM launcher's one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers.example import EXAMPLE, example_on_path, run_quiet
from workers.preflight_cases import refusals_in_train

from usp_megatron.testing import run_distributed

example_on_path()

from arguments import parse_args  # noqa: E402
from preflight import ConfigError, attention_kernel, check_configuration  # noqa: E402
from report import Reporter, banner, gpt_flops_per_iteration  # noqa: E402

U2R2 = ["--usp-ulysses-degree", "2", "--usp-ring-degree", "2"]
PACKED = ["--pack-documents", *U2R2]
FULL = ["--recompute-granularity", "full", "--recompute-method"]

# (flags, world size, what the one message must say)
REFUSED = [
    (["--context-parallel-size", "4"], 4, "this driver's context parallelism is USP"),
    (["--context-parallel-size", "4"], 4, "--usp-ulysses-degree 2 --usp-ring-degree 2"),
    (U2R2, 6, "world size 6 is not a multiple of TP 1 x CP 4"),
    (["--num-query-groups", "3"], 1, "--num-query-groups 3 must divide --num-attention-heads 8"),
    (["--usp-ulysses-degree", "16"], 16, "ulysses degree 16 must be at most the attention heads"),
    (["--tensor-model-parallel-size", "2", "--num-query-groups", "1"], 2, "splits the key/va"),
    ([*U2R2, "--seq-length", "100"], 4, "e.g. --seq-length 96 or 104"),
    ([*U2R2, "--usp-attn-backend", "flash_attn"], 4, "flash_attn cannot run on cpu"),
    (["--data-path", "/no/such/corpus"], 1, "--data-path /no/such/corpus: no /no/such/corpus.idx"),
    (["--device", "cuda"], 1, "--device cuda, but this machine has no usable CUDA device"),
    (["--lr-warmup-iters", "5", "--train-iters", "3"], 1, "--lr-warmup-iters 5 must be below"),
    (["--global-batch-size", "3"], 2, "--global-batch-size 3 must be a multiple of"),
    ([*U2R2, "--attention-dropout", "0.1"], 4, "attention_dropout (--attention-dropout) to 0.0"),
    (["--megatron-attention", *U2R2], 4, "--megatron-attention runs Megatron's"),
    (["--save", "ckpt", "--use-distributed-optimizer", "--optimizer", "sgd"], 1, "Adam's state"),
    # Packed documents: refused by the attention in the first forward until preflight did.
    ([*PACKED, "--usp-ring-impl", "stripe"], 4, "--pack-documents needs --usp-ring-impl zigzag"),
    ([*PACKED, "--window-size", "16", "0"], 4, "--window-size 16 0 with --pack-documents"),
    (["--pack-documents", "--usp-ulysses-degree", "3", "--seq-length", "120"], 3,
     "8 query heads of a tensor-parallel rank to split evenly over --usp-ulysses-degree 3"),
    ([*PACKED, "--pack-pad-multiple", "4"], 4, "--pack-pad-multiple 4: the context-parallel"),
    ([*PACKED, "--pack-pad-multiple", "12"], 4, "use --pack-pad-multiple 16, or leave it out"),
    # Were a traceback per rank from parse_args.
    (["--pack-pad-multiple", "16"], 1, "--pack-pad-multiple needs --pack-documents: add"),
    (["--pack-documents", "--micro-batch-size", "2"], 1, "needs --micro-batch-size 1, got 2"),
    (["--pack-documents", "--pack-documents-per-sample", "300"], 1, "and --seq-length 128"),
    # Were argparse's usage and error on every rank.
    (["--seq-lenght", "64"], 1, "unrecognized arguments: --seq-lenght"),
    (["--usp-ring-impl", "foo"], 4, "argument --usp-ring-impl: invalid choice: 'foo'"),
    (["--window-size", "4"], 1, "argument --window-size: expected 2 arguments"),
    # Were a ZeroDivisionError, a SIGFPE, an assert or a shape error after building, or a
    # model other than asked (a zero-width MLP, a right window read as 0).
    (["--log-interval", "0"], 1, "--log-interval must be at least 1 (a log line every N"),
    (["--save-interval", "-2", "--save", "ckpt"], 1, "--save-interval must be at least 1"),
    (["--seq-length", "0"], 1, "--seq-length must be at least 1 (tokens per sequence), got 0"),
    (["--num-layers", "0"], 1, "--num-layers must be at least 1"),
    (["--ffn-hidden-size", "0"], 1, "--ffn-hidden-size must be at least 1"),
    (["--lr-warmup-iters", "-1"], 1, "--lr-warmup-iters must be at least 0"),
    (["--window-attn-skip-freq", "0", "--window-size", "4", "0"], 1, "skip-freq must be at"),
    (["--min-lr", "0.1"], 1, "--min-lr must be between 0 and 0.003 (the cosine decays from"),
    (["--lr", "nan"], 1, "--lr must be >= 0 (the peak learning rate), got nan"),
    (["--weight-decay", "-1"], 1, "--weight-decay must be >= 0"),
    (["--hidden-dropout", "1.5"], 1, "--hidden-dropout must be between 0 and 1"),
    (["--peak-tflops", "0"], 1, "--peak-tflops must be positive"),
    (["--seed", "-1"], 1, "--seed must be between 0 and 2**32 - 1"),
    (["--attention-dropout", "0.1"], 1, "USP attention has no attention-probability dropout"),
    (["--window-size", "4", "4"], 1, "--window-size 4 4: this GPT is causal (token i never sees "
     "a later token), so RIGHT must be 0; 4 would silently act as 0: use --window-size 4 0"),
    ([*U2R2, "--window-size", "4", "-1"], 4, "so RIGHT must be 0; -1 would silently act as 0"),
    (["--window-size", "-2", "0"], 1, "--window-size -2 0: window_size must be (left, right)"),
    (["--hidden-size", "24"], 1, "head dimension 3, but RoPE rotates pairs of channels: it "
     "must be even (e.g. --hidden-size 16 or 32)"),
    (["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "255"], 2,
     "--ffn-hidden-size 255 must be divisible by --tensor-model-parallel-size 2"),
    (["--megatron-attention", "--pack-documents"], 1, "Megatron's DotProductAttention takes no "
     "packed sequences"),
    # Were a NotADirectoryError at the first save, a FileNotFoundError after the last iteration.
    (["--save", __file__], 1, f"--save {__file__} is a file: give a directory"),
    (["--history-json", f"{__file__}/h.json"], 1, f"nothing can be written below {__file__}"),
    (["--history-json", "/"], 1, "--history-json / is a directory: give a file name"),
    # Activation recompute: what TransformerConfig would refuse, or silently ignore.
    (["--recompute-method", "uniform"], 1, "--recompute-method needs --recompute-granularity"),
    (["--recompute-modules", "core_attn"], 1, "selective for --recompute-modules); add it"),
    (["--recompute-granularity", "full"], 1, "add --recompute-method uniform --recompute-num-l"),
    ([*FULL, "uniform", "--recompute-num-layers", "3", "--num-layers", "4"], 1,
     "--recompute-num-layers 3 with --recompute-method uniform must divide --num-layers 4 "
     "(every chunk of that many layers is recomputed): choose one of [1, 2, 4]"),
    ([*FULL, "block", "--recompute-num-layers", "3"], 1, "choose 1 to --num-layers 2"),
    ([*FULL, "uniform", "--recompute-num-layers", "1", "--recompute-modules", "core_attn"], 1,
     "--recompute-modules core_attn applies to --recompute-granularity selective"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"], 1,
     "--recompute-num-layers applies to --recompute-granularity full, not selective"),
    (["--recompute-granularity", "selective", "--recompute-modules", "mlp", "layernorm"], 1,
     "--recompute-modules mlp layernorm: this driver's GPT (megatron-core's local layers) "
     "recomputes only core_attn"),
    # Megatron-LM's document flag packs too, and is named.
    (["--reset-attention-mask", *U2R2, "--usp-ring-impl", "basic"], 4,
     "--reset-attention-mask needs --usp-ring-impl zigzag"),
]  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU refusals (CUDA present here)")
@pytest.mark.parametrize("flags, world_size, message", REFUSED)
def test_bad_configuration_is_one_clear_message(flags, world_size, message):
    with pytest.raises(ConfigError) as refused:
        check_configuration(parse_args(flags), world_size)
    text = str(refused.value)
    assert message in text and "\n" not in text


# (flags, world size, the banner's note): flags this configuration accepts but does not use.
IGNORED = [
    (["--save-interval", "5"], 1, "--save-interval 5 (no --save: nothing is saved)"),
    (["--usp-ring-impl", "stripe"], 1, "--usp-ring-impl stripe (no context parallelism"),
    (["--megatron-attention", "--usp-attn-backend", "reference"], 1,
     "--usp-attn-backend reference (--megatron-attention runs Megatron's"),
    (["--usp-gpus-per-node", "4", *U2R2], 4, "--usp-gpus-per-node 4 (used by --usp-ulysses"),
    (["--count-host-syncs"], 1, "--count-host-syncs (CUDA only; this run is on CPU)"),
    (["--vocab-size", "300"], 1, "--vocab-size 300 (the embedded corpus is byte-level, 258"),
    (["--window-attn-skip-freq", "2"], 1, "--window-attn-skip-freq 2 (no sliding --window-size"),
    (["--use-checkpoint-opt_param-scheduler"], 1, "--use-checkpoint-opt_param-scheduler (no "
     "checkpoint to resume)"),
]  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU configurations (CUDA present here)")
@pytest.mark.parametrize("flags, world_size, note", IGNORED)
def test_ignored_flags_are_named_in_the_banner(flags, world_size, note):
    args = parse_args(flags)
    plan = check_configuration(args, world_size)
    assert note in plan.ignored[0] and len(plan.ignored) == 1, plan.ignored
    assert f"\nignored    {plan.ignored[0]}" in banner(args, plan)


def test_the_demo_ignores_nothing():
    args = parse_args(U2R2)
    assert check_configuration(args, 4).ignored == ()


def test_help_prints_on_rank_0_only(monkeypatch, capsys):
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exited:
            parse_args(["--help"])
        assert exited.value.code == 0
        assert ("--usp-ring-impl" in capsys.readouterr().out) == printed


def test_a_flag_error_is_one_line_from_main(monkeypatch, capsys):
    import pretrain_gpt

    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exited:
        pretrain_gpt.main(["--seq-lenght", "64"])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --seq-lenght" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU configurations (CUDA present here)")
def test_packed_documents_that_train_pass_preflight():
    for flags, world_size in [
        (PACKED, 4),
        ([*PACKED, "--pack-pad-multiple", "16"], 4),
        (["--pack-documents", "--usp-ulysses-degree", "4", "--window-size", "-1", "-1"], 4),
    ]:
        check_configuration(parse_args(flags), world_size)


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import (
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    prefix = str(tmp_path / "gpt2_tokens")
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.uint16)
    for doc in range(4):
        builder.add_document(torch.arange(doc * 1000, doc * 1000 + 300), [300])
    builder.finalize(get_idx_path(prefix))
    data = ["--data-path", prefix]
    with pytest.raises(ConfigError, match="token id 3299, beyond .* pass --vocab-size"):
        check_configuration(parse_args(data), 1)
    with pytest.raises(ConfigError, match="raise --vocab-size to at least 3300"):
        check_configuration(parse_args([*data, "--vocab-size", "1000"]), 1)
    with pytest.raises(ConfigError, match="fewer than one sample of --seq-length 4096"):
        check_configuration(parse_args([*data, "--vocab-size", "4000", "--seq-length", "4096"]), 1)
    plan = check_configuration(parse_args([*data, "--vocab-size", "4000"]), 1)
    assert (plan.data.documents, plan.data.tokens, plan.data.vocab_size) == (4, 1200, 4000)


def test_tensorboard_flag_without_the_package_is_refused(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "tensorboard" else find_spec(name)
    )
    with pytest.raises(ConfigError, match="pip install 'usp_megatron\\[tensorboard\\]'"):
        check_configuration(parse_args(["--tensorboard-dir", "tb"]), 1)


def test_default_warmup_fits_short_runs_explicit_one_is_checked():
    assert parse_args(["--train-iters", "3"]).lr_warmup_iters == 2
    assert parse_args(["--train-iters", "1"]).lr_warmup_iters == 0
    assert parse_args([]).lr_warmup_iters == 3
    check_configuration(parse_args(["--train-iters", "3"]), 1)
    check_configuration(parse_args(["--train-iters", "3", "--lr-warmup-iters", "2"]), 1)


def test_flop_formula_against_counting_every_matrix_multiply():
    b, s, layers, h, a, g, f, v = 8, 4096, 24, 2048, 16, 8, 8192, 50304
    d = h // a
    per_token_and_layer = (
        2 * h * (a * d + 2 * g * d)  # query, key and value projections
        + 2 * a * d * h  # output projection
        + 2 * (2 * a * d * (s / 2))  # Q K^T and (P V), causal: s / 2 keys per query on average
        + 2 * (2 * h * f)  # MLP up and down
    )
    forward = b * s * (layers * per_token_and_layer + 2 * h * v)  # + the logits
    expected = 3 * forward  # backward: gradients of the inputs and of the weights
    formula = gpt_flops_per_iteration(
        batch=b,
        seq_length=s,
        num_layers=layers,
        hidden_size=h,
        num_attention_heads=a,
        num_query_groups=g,
        ffn_hidden_size=f,
        vocab_size=v,
    )
    assert formula == pytest.approx(expected, rel=1e-12)


def test_banner_names_the_kernel_each_kind_of_layer_runs(monkeypatch):
    """The kernel named is the one the layers get: windows and packed documents are their
    own kind of call (cudnn where present), alternating layers name both."""
    import usp_megatron.kernels as kernels

    for kernel in kernels._KERNELS.values():  # as on a GPU machine with every kernel
        monkeypatch.setattr(kernel, "available", lambda device, dtype: device.type == "cuda")
    cuda = torch.device("cuda")

    def kernel_of(*flags):
        return attention_kernel(parse_args([*U2R2, "--bf16", *flags]), cuda, torch.bfloat16)

    assert kernel_of()[0] == "torch_cudnn"
    assert kernel_of("--window-size", "64", "0")[0] == "cudnn"
    assert kernel_of("--pack-documents")[0] == "cudnn"
    assert kernel_of("--window-size", "64", "0", "--window-attn-skip-freq", "2")[0] == (
        "cudnn (windowed layers), torch_cudnn (full-length layers)"
    )
    name, why = kernel_of("--usp-attn-backend", "torch_window", "--window-size", "64", "0")
    assert name == "torch_window" and why == "--usp-attn-backend torch_window"
    with pytest.raises(ConfigError, match="torch_cudnn with --window-size: .* no sliding-window"):
        kernel_of("--usp-attn-backend", "torch_cudnn", "--window-size", "64", "0")
    monkeypatch.undo()
    cpu_args = parse_args([*U2R2, "--window-size", "64", "0"])
    assert attention_kernel(cpu_args, torch.device("cpu"), torch.float32)[0] == "reference"


def test_banner_names_kernel_layout_and_heads_per_rank():
    args = parse_args([*U2R2, "--num-query-groups", "2", "--seq-length", "64"])
    text = banner(args, check_configuration(args, 8))
    assert "TP 1 x CP 4 (USP: Ulysses U 2 x Ring R 2) x DP 2" in text
    assert "kernel reference (auto on CPU" in text
    assert "zigzag: rank c holds chunks c and 7-c of 8" in text
    assert "rank 0 holds 0-7, 56-63" in text
    assert "heads 4 query / 1 key-value (model: 8 / 2)" in text
    assert "embedded corpus (Python's pydoc_data.topics, byte-level)" in text
    assert "no MFU (no peak on CPU" in text
    assert "window" not in text and "ignored" not in text and "resume" not in text
    assert "recompute  none: every activation is kept" in text
    assert "grad norm  fused torch._foreach ops (megatron-core has neither" in text


@pytest.mark.parametrize(
    "flags, line",
    [
        ([*U2R2, "--recompute-granularity", "selective"], "recompute  selective: core_attn run "
         "again in the backward of every layer (core_attn is USP attention: its all-to-all and "
         "ring run again too)"),
        ([*FULL, "uniform", "--recompute-num-layers", "2", "--num-layers", "4"], "recompute  "
         "full, uniform: every layer runs again in the backward, from the kept input of each "
         "chunk of 2 layers"),
        ([*FULL, "block", "--recompute-num-layers", "1"], "recompute  full, block: the first 1 "
         "of 2 layers run again in the backward"),
        (["--usp-no-foreach-grad-norm"], "grad norm  megatron-core's per-tensor fallback"),
    ],
)  # fmt: skip
def test_banner_says_what_is_recomputed_and_what_takes_the_grad_norm(flags, line):
    args = parse_args([*flags, "--seq-length", "64"])
    text = banner(args, check_configuration(args, 4 if "--usp-ring-degree" in flags else 1))
    assert any(row.startswith(line) for row in text.splitlines()), text


def test_banner_shows_the_window_and_every_ranks_heads_when_uneven():
    flags = ["--usp-ulysses-degree", "3", "--seq-length", "96", "--num-layers", "5",
             "--window-size", "8", "0", "--window-attn-skip-freq", "2"]  # fmt: skip
    args = parse_args(flags)
    text = banner(args, check_configuration(args, 3))
    assert "\nwindow     8 0: token i sees tokens i-8 .. i, on layers 1, 3, 5 of 5 (those " in text
    assert (
        "heads 3/3/2 query / 3/3/2 key-value on ulysses ranks 0-2 (model: 8 / 8): uneven, "
        "the busiest rank computes 1.12x the mean" in text
    )
    args = parse_args(["--window-size", "16", "0"])
    text = banner(args, check_configuration(args, 1))
    assert "window     16 0: token i sees tokens i-16 .. i, on every layer" in text


def test_log_line_reports_tflops_mfu_and_memory(tmp_path):
    args = parse_args(["--peak-tflops", "0.5", "--train-iters", "2"])
    plan = check_configuration(args, 1)
    reporter = Reporter(args, plan, padded_vocab_size=384, rank=0)
    record = reporter.record(2, loss=5.0, grad_norm=1.0, lr=1e-3, seconds=0.5)
    expected = reporter.flops / 0.5 / 1e12
    assert record["tflops_per_gpu"] == pytest.approx(expected)
    assert record["mfu"] == pytest.approx(expected / 0.5)
    line = reporter.log_line(record)
    assert f"{1e3 * expected:.3g} GFLOP/s/rank | MFU {100 * expected / 0.5:.1f}% | max RSS" in line


def test_tensorboard_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = parse_args(["--tensorboard-dir", str(tmp_path), "--log-interval", "100"])
    reporter = Reporter(args, check_configuration(args, 1), padded_vocab_size=384, rank=0)
    for iteration in (1, 2):
        reporter.record(iteration, loss=6.0 - iteration, grad_norm=1.0, lr=1e-3, seconds=0.1)
    reporter.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("lm loss")] == [5.0, 4.0]
    for tag in ("grad-norm", "learning-rate", "throughput/tokens-per-sec"):
        assert len(events.Scalars(tag)) == 2


def test_train_refuses_in_a_gloo_world_before_building(tmp_path):
    data = ["--data-cache-path", str(tmp_path / "data")]
    argvs = [
        [*data, "--num-query-groups", "3"],
        [*data, "--context-parallel-size", "2"],
        [*data, "--usp-ulysses-degree", "2", "--usp-attn-backend", "torch_cudnn"],
        [*data, "--usp-ring-degree", "2", "--pack-documents", "--pack-pad-multiple", "2"],
    ]
    per_rank = run_distributed(2, refusals_in_train, argvs, timeout_s=300)
    assert per_rank[0] == per_rank[1]
    assert "--num-query-groups 3 must divide" in per_rank[0][0]
    assert "this driver's context parallelism is USP" in per_rank[0][1]
    assert "torch_cudnn cannot run on cpu" in per_rank[0][2]
    assert "--pack-pad-multiple 2: the context-parallel split" in per_rank[0][3]


def _run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    return run_quiet(cmd, cwd, timeout=300)


def _torchrun(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", str(EXAMPLE / "pretrain_gpt.py"),
                "--data-cache-path", str(tmp_path / "data")]  # fmt: skip
    return _run([*torchrun, *flags], tmp_path)


def test_torchrun_refusal_is_one_message_and_exit_1(tmp_path):
    for flags, message in (
        (["--context-parallel-size", "2"], "pretrain_gpt.py: --context-parallel-size 2: this "),
        (["--seq-lenght", "64"], "pretrain_gpt.py: unrecognized arguments: --seq-lenght"),
    ):
        done = _torchrun(tmp_path, *flags)
        out = done.stdout + done.stderr
        assert done.returncode == 1, out
        assert out.count(message) == 1, out
        assert "[rank" not in out and 'pretrain_gpt.py", line' not in out, out  # no traceback
        assert "usage:" not in out and "USP GPT pretraining" not in out  # before the banner
        assert out.count("exitcode  : 1 ") == 2, out  # every rank exits 1, none is killed


def test_three_iterations_banner_log_summary_then_nothing_to_do(tmp_path):
    flags = ["--usp-ulysses-degree", "2", "--train-iters", "3", "--seq-length", "64",
             "--global-batch-size", "4", "--save", str(tmp_path / "ckpt")]  # fmt: skip
    done = _torchrun(tmp_path, *flags, "--history-json", str(tmp_path / "new" / "h.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "attention  kernel reference (auto on CPU" in out
    assert "layout     zigzag: rank c holds chunks c and 3-c of 4" in out
    assert "per rank   32 of 64 tokens" in out
    assert out.count("GFLOP/s/rank | max RSS") == 3 and "iter     3/3 (100.0%)" in out
    assert "done: 3 iterations in" in out and "(first iteration excluded); final loss" in out
    assert f"wrote: history {tmp_path / 'new' / 'h.json'}; checkpoint of iteration 3" in out
    history = json.loads((tmp_path / "new" / "h.json").read_text())["history"]
    assert [r["iteration"] for r in history] == [1, 2, 3]
    assert all(r["tflops_per_gpu"] > 0 and r["peak_memory_bytes"] > 0 for r in history)

    again = _torchrun(tmp_path, *flags, "--load", str(tmp_path / "ckpt"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do: the checkpoint in" in again.stdout and "iter " not in again.stdout


def test_loss_parity_refuses_once_before_starting_processes(tmp_path):
    script = [sys.executable, str(EXAMPLE / "loss_parity.py"), "--configs", "U2R2-zigzag",
              "--out", str(tmp_path / "lp"), "--", "--num-query-groups", "3"]  # fmt: skip
    refused = _run(script, tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.count("must divide --num-attention-heads 8") == 1, refused.stderr
    assert "runs on" not in refused.stdout  # no world was started


def test_launcher_prints_the_plugins_refusal_once_and_exits_1(tmp_path, monkeypatch, capsys):
    from usp_megatron.megatron import launch

    monkeypatch.setattr(launch, "install", lambda add_flags: None)  # no Megatron-LM here
    script = tmp_path / "pretrain_gpt.py"
    script.write_text(
        "import argparse\n"
        "from usp_megatron.megatron.megatron_lm import wrap_validate_args\n"
        "args = argparse.Namespace(usp_ulysses_degree=3, usp_ring_degree=1,\n"
        "    usp_ring_impl='zigzag', context_parallel_size=1, num_attention_heads=2,\n"
        "    tensor_model_parallel_size=1, seq_length=1026)\n"
        "wrap_validate_args(lambda args: args)(args)\n"
    )
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exited:
        launch.main([str(script)])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("usp_megatron: the ulysses degree 3 must be at most the attention heads")
    assert err.count("\n") == 1

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exited:
        launch.exit_refused("usp_megatron: refused", grace_s=0)
    assert exited.value.code == 1 and capsys.readouterr().err == ""

    script.write_text("raise ValueError('not the plugin')\n")  # other errors pass through
    with pytest.raises(ValueError, match="not the plugin"):
        launch.main([str(script)])
