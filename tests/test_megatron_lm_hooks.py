"""The Megatron-LM hook wrappers (``validate_args``, ``parse_args``, the spec provider's
core attention), ``install`` at every place each tag looks, and the pretrain_gpt.py patches
that call it (one process)."""

from __future__ import annotations

import argparse
import inspect
import sys
import types
from pathlib import Path

import pytest
from helpers.megatron_args import parse
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.dot_product_attention import DotProductAttention

from usp_megatron.layout import get_layout
from usp_megatron.megatron.grad_norm import fallback_sites
from usp_megatron.megatron.megatron_lm import (
    USPArgumentError,
    with_usp_args,
    wrap_core_attention,
    wrap_parse_args,
    wrap_validate_args,
)
from usp_megatron.megatron.specs import USPCoreAttention

PATCHES = Path(__file__).parents[1] / "patches"


def test_validate_args_hook_applies_before_and_checks_after():
    seen = {}

    def megatron_validate_args(args, defaults=None):  # Megatron-LM's signature, less its {}
        seen["cp"] = args.context_parallel_size
        seen["hcp"] = args.hierarchical_context_parallel_sizes
        return args

    hooked = wrap_validate_args(megatron_validate_args)
    assert wrap_validate_args(hooked) is hooked  # idempotent
    hooked(parse("--usp-ulysses-degree", "2", "--usp-ring-degree", "2"), {})
    assert seen == {"cp": 4, "hcp": [2, 2]}
    with pytest.raises(ValueError, match="must be at most the attention heads"):
        hooked(parse("--usp-ulysses-degree", "4", num_attention_heads=2))
    # Megatron-LM's own check of the length would name --context-parallel-size, which USP
    # set: refused before it runs, naming the flags the user typed.
    seen.clear()
    with pytest.raises(USPArgumentError) as error:
        hooked(parse("--usp-ulysses-degree", "2", "--usp-ring-degree", "3", seq_length=100))
    assert seen == {} and str(error.value) == (
        "--seq-length 100 must be a multiple of 2 x --usp-ulysses-degree 2 x "
        "--usp-ring-degree 3 = 12 (Megatron-LM cuts every sequence into 2 x U x R chunks): "
        "e.g. --seq-length 96 or 108"
    )


U4R2 = ("--usp-ulysses-degree", "4", "--usp-ring-degree", "2")
DOCUMENTS = dict(reset_attention_mask=True, create_attention_mask_in_dataloader=True)


@pytest.mark.parametrize(
    "flags, megatron_args, message",
    [
        (U4R2 + ("--usp-ring-impl", "stripe"), DOCUMENTS, "--reset-attention-mask needs "
         "--usp-ring-impl zigzag, got stripe: the context-parallel split of packed documents"),
        (U4R2, DOCUMENTS | dict(window_size=(64, 0)), "--window-size 64 0 with "
         "--reset-attention-mask is not supported"),
        (U4R2, DOCUMENTS | dict(num_attention_heads=6), "--reset-attention-mask needs the 6 "
         "query heads of a tensor-parallel rank to split evenly over --usp-ulysses-degree 4"),
        (U4R2, DOCUMENTS | dict(pipeline_model_parallel_size=2), "--reset-attention-mask with "
         "--pipeline-model-parallel-size 2 is not supported under USP"),
    ],
)  # fmt: skip
def test_document_masking_refuses_what_packed_documents_cannot_run(flags, megatron_args, message):
    hooked = wrap_validate_args(lambda args: args)
    with pytest.raises(USPArgumentError) as error:
        hooked(parse(*flags, **megatron_args))
    assert str(error.value).startswith(message)


def test_document_masking_is_accepted_or_said_to_have_no_effect(capsys):
    """With the data loader's mask, --reset-attention-mask runs (as packed documents);
    without it Megatron-LM ignores the flag, and rank 0 says so once."""
    hooked = wrap_validate_args(lambda args: args)
    hooked(parse(*U4R2, **DOCUMENTS))
    assert capsys.readouterr().out == ""
    said = {}
    for rank in (0, 1):
        hooked(parse(*U4R2, reset_attention_mask=True, create_attention_mask_in_dataloader=False,
                     rank=rank))  # fmt: skip
        said[rank] = capsys.readouterr().out.splitlines()
    assert said[1] == [] and len(said[0]) == 1, said
    assert said[0][0].startswith(
        "USP: --reset-attention-mask has no effect without the data loader's attention mask "
        "(--no-create-attention-mask-in-dataloader)"
    )


def test_loss_hook_weighs_only_usp_without_per_token_loss(monkeypatch):
    """The schedule's loss function is wrapped under USP without --calculate-per-token-loss,
    and handed over as it is otherwise (per-token loss: Megatron's own normalisation)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    from usp_megatron.megatron.megatron_lm import wrap_loss_calculation

    monkeypatch.setattr(parallel_state, "get_context_parallel_group", lambda: "cp group")
    handed = []

    def calc(*a, **kwargs):  # megatron-core's own signature, recording the loss function
        handed.append(inspect.signature(forward_step_calc_loss).bind(*a, **kwargs))

    calc.__signature__ = inspect.signature(forward_step_calc_loss)

    def loss_func(output_tensor):
        return output_tensor

    for u, per_token, wrapped in ((1, False, False), (2, True, False), (2, False, True)):
        args = parse("--usp-ulysses-degree", str(u))
        hooked = wrap_loss_calculation(calc, lambda args=args: args)
        config = types.SimpleNamespace(calculate_per_token_loss=per_token)
        hooked(None, None, loss_func, config, None, False, 1, [])
        given = handed[-1].arguments["loss_func"]
        assert (given is not loss_func) == wrapped, (u, per_token)
        assert not wrapped or given.__wrapped__ is loss_func


def test_flags_hook_chains_extra_args_providers_once():
    calls = []

    def modelopt_args(parser):
        calls.append("modelopt")
        parser.add_argument("--modelopt-flag", type=int, default=0)
        return parser

    provider = with_usp_args(modelopt_args)
    assert with_usp_args(provider) is provider
    parser = provider(argparse.ArgumentParser())
    args = parser.parse_args(["--usp-ring-degree", "2", "--modelopt-flag", "3"])
    assert (args.usp_ring_degree, args.modelopt_flag, calls) == (2, 3, ["modelopt"])

    def megatron_parse_args(extra_args_provider=None, ignore_unknown_args=False):
        return extra_args_provider(argparse.ArgumentParser()).parse_args(["--usp-ring-degree", "4"])

    # The launcher's parse_args hook adds the flags once, also to a patched script's provider.
    assert wrap_parse_args(megatron_parse_args)(None).usp_ring_degree == 4
    assert wrap_parse_args(megatron_parse_args)(provider).usp_ring_degree == 4


def test_spec_provider_hook_answers_usp_only_when_enabled():
    args = parse()
    hooked = wrap_core_attention(LocalSpecProvider.core_attention, lambda: args)
    assert hooked(LocalSpecProvider()) is DotProductAttention
    args.usp_ulysses_degree, args.usp_ring_impl = 2, "basic"
    core = hooked(LocalSpecProvider())
    assert core == USPCoreAttention(get_layout("basic", 2, 1), rope_sliced_for_layout=True)


def _megatron_lm_training(tag: str, args: argparse.Namespace) -> dict[str, types.ModuleType]:
    """Megatron-LM's ``megatron.training`` modules as ``tag`` lays out what the hooks replace."""
    from megatron.core import utils as core_utils

    def validate_args(args, defaults={}):  # noqa: B006 (Megatron-LM's signature)
        return args

    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        return extra_args_provider(argparse.ArgumentParser()).parse_args([])

    modules = {name: types.ModuleType(f"megatron.training.{name}")
               for name in ("arguments", "initialize", "utils", "global_vars")}  # fmt: skip
    modules["arguments"].validate_args = validate_args
    modules["arguments"].parse_args = parse_args
    modules["global_vars"].get_args = lambda: args
    if tag == "core_v0.16.1":  # imported by name where 0.19 no longer does
        modules["initialize"].validate_args = validate_args
        modules["initialize"].parse_args = parse_args
        modules["utils"].get_batch_on_this_cp_rank = core_utils.get_batch_on_this_cp_rank
        modules["utils"].get_batch_on_this_tp_rank = lambda data_iterator: {}  # 0.19: core's
    return {f"megatron.training.{name}": module for name, module in modules.items()}


@pytest.mark.parametrize("tag", ["core_v0.16.1", "core_v0.19.0"])
def test_install_hooks_every_place_each_tag_looks(monkeypatch, tag):
    from megatron.core import utils as core_utils
    from megatron.core.models.gpt import gpt_model
    from megatron.core.pipeline_parallel import schedules

    from usp_megatron.megatron.megatron_lm import install

    args = parse()
    training = _megatron_lm_training(tag, args)
    for name, module in training.items():
        monkeypatch.setitem(sys.modules, name, module)
    replaced = [(LocalSpecProvider, "core_attention"), (core_utils, "get_batch_on_this_cp_rank"),
                (gpt_model, "RotaryEmbedding"), (schedules, "forward_step_calc_loss"),
                (sys, "excepthook")]  # fmt: skip
    # megatron-core's fallback optimizer ops (no TransformerEngine or apex here)
    replaced += [(site.module, site.name) for site in fallback_sites()]
    if tag == "core_v0.19.0":  # 0.19's script imports the TP-rank batch getter from core
        monkeypatch.setattr(core_utils, "get_batch_on_this_tp_rank", lambda batch: batch,
                            raising=False)  # fmt: skip
        replaced.append((core_utils, "get_batch_on_this_tp_rank"))
    if hasattr(core_utils, "get_thd_batch_on_this_cp_rank"):
        replaced.append((core_utils, "get_thd_batch_on_this_cp_rank"))
    try:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        replaced.append((TESpecProvider, "core_attention"))
    except ImportError:
        pass
    for owner, name in replaced:  # restored after the test
        monkeypatch.setattr(owner, name, getattr(owner, name))
    install(add_flags=True)
    install(add_flags=True)  # idempotent
    hooked = [getattr(owner, name) for owner, name in replaced] + [
        getattr(module, name)
        for module in training.values()
        for name in ("validate_args", "parse_args", "get_batch_on_this_cp_rank",
                     "get_batch_on_this_tp_rank")
        if hasattr(module, name)
    ]  # fmt: skip
    assert len(hooked) == len(replaced) + (6 if tag == "core_v0.16.1" else 2)
    assert all(getattr(fn, "_usp_megatron_hook", False) for fn in hooked)
    parsed = training["megatron.training.arguments"].parse_args(None)
    assert parsed.usp_ulysses_degree == 1  # the flags reach 0.19's parse_and_validate_args


@pytest.mark.parametrize("tag", ["core_v0.16.1", "core_v0.19.0"])
def test_patch_installs_hooks_and_flags(tag):
    text = (PATCHES / f"megatron-lm-{tag}-pretrain_gpt.patch").read_text()
    added = [line[1:].strip() for line in text.splitlines() if line.startswith("+") and
             not line.startswith("+++")]  # fmt: skip
    assert "usp_megatron_lm.install()  # imports below pick them up" in added
    assert "extra_args_provider=usp_megatron_lm.with_usp_args(" in added
    assert "--- a/pretrain_gpt.py" in text and "+++ b/pretrain_gpt.py" in text
    # The hook line sits above the imports it has to precede.
    assert text.index("usp_megatron_lm.install()") < text.index(" from gpt_builders import")
