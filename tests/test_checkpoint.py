"""The GPT example's checkpoints move between parallel layouts: saved under U2R2 on 4 gloo
ranks and resumed under U4R1, U1R4, DP4 and TP2 x U2 (SGD, plain optimizer) or TP2 x DP2
and DP4 (Adam, distributed optimizer), the next iterations match a run that never
stopped. One world runs every case (float32, tiny model)."""

from __future__ import annotations

import pytest
import torch
from helpers.example import example_on_path
from workers.checkpoint_cases import RESUMED, SAVED_AT, TRAIN_ITERS, resume_across_layouts

from usp_megatron.testing import run_distributed

RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("checkpoints")
    per_rank = run_distributed(4, resume_across_layouts, str(directory), timeout_s=300)
    assert all(r == per_rank[0] for r in per_rank[1:]), "ranks disagree on the metrics"
    return per_rank[0]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * abs(b)


@pytest.mark.parametrize("run", RESUMED)
def test_resume_continues_the_uninterrupted_run(results, run):
    optimizer = run.split("/")[0]
    straight, saved, resumed = (
        results[f"{optimizer}/straight"],
        results[f"{optimizer}/saved"],
        results[run],
    )
    assert saved == straight[:SAVED_AT]
    assert [it for it, _, _ in resumed] == [it for it, _, _ in straight[SAVED_AT:]]
    for (it, loss, norm), (_, want_loss, want_norm) in zip(
        resumed, straight[SAVED_AT:], strict=True
    ):
        assert _close(loss, want_loss), f"{run} iteration {it}: loss {loss} vs {want_loss}"
        assert _close(norm, want_norm), f"{run} iteration {it}: grad norm {norm} vs {want_norm}"
    # A load that did nothing would continue from fresh weights: far from the trained loss.
    fresh_loss = straight[0][1]
    assert abs(resumed[0][1] - fresh_loss) > 1000 * RTOL * fresh_loss, f"{run} did not load"


def test_resume_refuses_another_model_or_optimizer(results):
    refused = results["refused"]
    assert "--hidden-size 64" in refused["model"] and "this run has 32" in refused["model"]
    assert "--use-distributed-optimizer True" in refused["optimizer"]
    assert "Adam's state only" in refused["sgd state"]


def test_a_resume_with_another_schedule_follows_megatrons_rule(results):
    """Without a flag it is refused; --use-checkpoint-opt_param-scheduler keeps the saved
    schedule (the uninterrupted run's lr), --override-opt_param-scheduler runs this one's."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    message = results["refused"]["schedule"]
    assert "another learning-rate schedule than this run (--lr-decay-iters saved 4, now 8" in (
        message
    )
    assert "--use-checkpoint-opt_param-scheduler" in message and "\n" not in message
    straight = results["lr straight"]
    assert results["lr --use-checkpoint-opt_param-scheduler"] == straight[SAVED_AT:]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=0.1, min_lr=3e-4, lr_warmup_steps=1, lr_decay_steps=8,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=8,
        wd_incr_style="constant",
    )  # fmt: skip
    expected = []
    for iteration in range(1, TRAIN_ITERS + 1):
        scheduler.step(increment=1)
        expected.append((iteration, scheduler.get_lr(optimizer.param_groups[0])))
    overridden = results["lr --override-opt_param-scheduler"]
    assert [it for it, _ in overridden] == [it for it, _ in expected[SAVED_AT:]]
    assert [lr for _, lr in overridden] == pytest.approx([lr for _, lr in expected[SAVED_AT:]])
    assert overridden[0][1] > 1.5 * straight[SAVED_AT][1]  # the two schedules differ there


@pytest.mark.parametrize(
    "broken, names",
    [
        ("truncated shard", ".distcp is truncated: 100 bytes, the checkpoint's metadata needs"),
        ("corrupted shard", ".distcp holds unreadable bytes at offset"),
        ("bad metadata", f"iter_{SAVED_AT:07d}/metadata.json is not valid JSON"),
        ("bad latest", "broken-bad latest/latest is broken: it holds ''"),
    ],
)
def test_broken_checkpoint_is_one_message_naming_the_file(results, broken, names):
    message = results["refused"][broken]
    assert names in message and "\n" not in message, message
    assert "drop --load to start from scratch" in message, message


def test_missing_load_directory_is_refused_before_building(tmp_path):
    example_on_path()
    from arguments import parse_args
    from preflight import ConfigError, check_configuration

    missing = str(tmp_path / "no-such-run")
    with pytest.raises(ConfigError) as refused:
        check_configuration(parse_args(["--load", missing]), 1)
    assert str(refused.value).startswith(f"--load {missing}: no such directory; to start from "
                                         "scratch, drop --load")  # fmt: skip
    # An existing directory without a checkpoint yet starts from scratch, as in Megatron-LM.
    check_configuration(parse_args(["--load", str(tmp_path), "--train-iters", str(TRAIN_ITERS)]), 1)
