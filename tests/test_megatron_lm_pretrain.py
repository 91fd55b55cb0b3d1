"""Megatron-LM's own ``pretrain_gpt.py`` with USP on CPU processes (gloo): the patched script
and the unpatched one through the launcher train as one process does.

Needs a Megatron-LM checkout (``USP_MEGATRON_LM_DIR``; CI has none): tag core_v0.16.1 (or
core_v0.19.0 on Python >= 3.12, not run so far), with its Python dependencies importable.
``tests/megatron_lm_cpu/sitecustomize.py`` makes the script run on CPU. Slow: about 40 s a
four-process run on two cores. Document masking trains on an indexed dataset of short
documents (``helpers/documents.py``), written once per module.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.documents import write_short_documents

ROOT = Path(__file__).parents[1]
CHECKOUT = os.environ.get("USP_MEGATRON_LM_DIR")
pytestmark = pytest.mark.skipif(
    not CHECKOUT, reason="USP_MEGATRON_LM_DIR does not point at a Megatron-LM checkout"
)

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
         "--position-embedding-type", "rope", "--micro-batch-size", "2",
         "--global-batch-size", "2", "--lr", "1e-3",
         "--lr-decay-style", "constant", "--seed", "1234", "--init-method-std", "0.02",
         "--attention-dropout", "0", "--hidden-dropout", "0", "--transformer-impl", "local",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
         "--distributed-backend", "gloo", "--use-cpu-initialization",
         "--no-gradient-accumulation-fusion", "--no-bias-gelu-fusion",
         "--no-bias-dropout-fusion", "--no-masked-softmax-fusion", "--no-persist-layer-norm",
         "--no-rope-fusion", "--log-interval", "1", "--eval-iters", "0",
         "--eval-interval", "1000", "--num-workers", "0"]  # fmt: skip
MOCK = ["--mock-data", "--no-create-attention-mask-in-dataloader", "--train-iters", "4"]
#: NullTokenizer's end-of-document id is its vocabulary size.
EOD = 128
LOSS = re.compile(r"iteration +(\d+)/ +\d+ \|.*lm loss: (\S+) \|.*grad norm: (\S+) \|")


def _tag(checkout: Path) -> str:
    info = (checkout / "megatron" / "core" / "package_info.py").read_text()
    major, minor, patch = (re.search(rf"^{k} = (\d+)", info, re.M)[1]
                           for k in ("MAJOR", "MINOR", "PATCH"))  # fmt: skip
    tag = f"core_v{major}.{minor}.{patch}"
    if not (ROOT / "patches" / f"megatron-lm-{tag}-pretrain_gpt.patch").is_file():
        pytest.skip(f"{checkout} is Megatron-LM {tag}, not a tag with a patch here")
    return tag


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> dict[str, Path]:
    """The checkout's ``pretrain_gpt.py`` as it is, and a patched copy."""
    checkout = Path(CHECKOUT).resolve()
    tag = _tag(checkout)
    patched = tmp_path_factory.mktemp("patched")
    shutil.copy(checkout / "pretrain_gpt.py", patched / "pretrain_gpt.py")
    patch = ROOT / "patches" / f"megatron-lm-{tag}-pretrain_gpt.patch"
    subprocess.run(["patch", "-p1", "-d", str(patched), "-i", str(patch)], check=True)
    return {"checkout": checkout, "plain": checkout / "pretrain_gpt.py",
            "patched": patched / "pretrain_gpt.py"}  # fmt: skip


def _pretrain(scripts, tmp_path, nproc, *flags, launcher=False, ok=True, data=MOCK):
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, USP_MEGATRON_LM_CPU="1", TORCHDYNAMO_DISABLE="1",
               OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "megatron_lm_cpu"), str(ROOT),
                                           str(scripts["checkout"]),
                                           os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    entry = (["-m", "usp_megatron.megatron.launch", str(scripts["plain"])] if launcher
             else [str(scripts["patched"])])  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), *entry, *MODEL, "--data-cache-path", str(tmp_path / "cache"),
           *data, *flags]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    if not ok:
        assert done.returncode == 1, output[-4000:]
        return output
    assert done.returncode == 0, output[-6000:]
    history = [(int(i), float(loss), float(norm)) for i, loss, norm in LOSS.findall(output)]
    iterations = int(data[data.index("--train-iters") + 1])
    assert [i for i, *_ in history] == list(range(1, iterations + 1)), output[-6000:]
    return history, output


def test_usp_trains_as_one_process(scripts, tmp_path):
    one, _ = _pretrain(scripts, tmp_path / "one", 1)
    runs = {
        "patched U2xR2": _pretrain(scripts, tmp_path / "u2r2", 4, "--usp-ulysses-degree", "2",
                                   "--usp-ring-degree", "2"),
        "launcher U4xR1": _pretrain(scripts, tmp_path / "u4r1", 4, "--usp-ulysses-degree", "4",
                                    "--usp-ring-degree", "1", launcher=True),
    }  # fmt: skip
    comm = {"patched U2xR2": "a2a+p2p", "launcher U4xR1": "a2a"}
    for name, (history, output) in runs.items():
        # Megatron-LM prints its arguments: USP set the communication its degrees do.
        assert re.search(rf"cp_comm_type \.+ \['{re.escape(comm[name])}'\]", output), name
        _compare(history, one, name)
    assert one[-1][1] < one[0][1] - 0.2  # it trained


def _compare(history, one, name):
    for (_, loss, norm), (_, want_loss, want_norm) in zip(history, one, strict=True):
        # Printed with 7 significant digits; float32 sums in another order differ there.
        assert loss == pytest.approx(want_loss, rel=1e-6, abs=0), (name, history, one)
        assert norm == pytest.approx(want_norm, rel=1e-3, abs=0), (name, history, one)


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory) -> list[str]:
    """An indexed dataset of 1-24-token documents: every 64-token sample holds boundaries."""
    prefix = write_short_documents(tmp_path_factory.mktemp("documents") / "docs", EOD, EOD)
    return ["--data-path", prefix, "--split", "100,0,0", "--train-iters", "3",
            "--global-batch-size", "4"]  # fmt: skip


def test_document_masking_trains_as_one_process(scripts, tmp_path, short_documents):
    """--reset-attention-mask --reset-position-ids --eod-mask-loss, the mask made in the data
    loader, 2 micro-batches of 2 samples an iteration, no --calculate-per-token-loss: one
    process applies the [s, s] mask in Megatron's own attention; USP runs the documents
    packed, its loss weighed by the group's tokens. Without the mask the loss differs."""
    masking = [*short_documents, "--reset-attention-mask", "--reset-position-ids",
               "--eod-mask-loss"]  # fmt: skip
    one, _ = _pretrain(scripts, tmp_path / "one", 1, data=masking)
    unmasked, _ = _pretrain(scripts, tmp_path / "unmasked", 1,
                            "--no-create-attention-mask-in-dataloader", data=masking)  # fmt: skip
    assert abs(unmasked[-1][1] - one[-1][1]) > 1e-3  # the mask matters in this data
    runs = {
        # One --cp-comm-type per layer (megatron-core 0.16.1 alone fails on it).
        "patched U2xR2": _pretrain(scripts, tmp_path / "u2r2", 4, "--usp-ulysses-degree", "2",
                                   "--usp-ring-degree", "2", "--cp-comm-type", "a2a+p2p",
                                   "a2a+p2p", data=masking),
        "launcher U4xR1": _pretrain(scripts, tmp_path / "u4r1", 4, "--usp-ulysses-degree", "4",
                                    launcher=True, data=masking),
        "patched U1xR4": _pretrain(scripts, tmp_path / "u1r4", 4, "--usp-ring-degree", "4",
                                   data=masking),
        # Every TP rank packs the batch it was broadcast.
        "patched TP2xU2": _pretrain(scripts, tmp_path / "tp2u2", 4, "--usp-ulysses-degree",
                                    "2", "--tensor-model-parallel-size", "2", data=masking),
    }  # fmt: skip
    for name, (history, _) in runs.items():
        _compare(history, one, name)


def test_uneven_loss_masks_train_as_one_process(scripts, tmp_path, short_documents):
    """--eod-mask-loss without --calculate-per-token-loss: the ranks of a sequence count
    different loss tokens; USP weighs each by its group's count, so the gradient is one
    process's (unweighed, U2 x R2's grad norm was 2.528 against 2.517 at iteration 1)."""
    loss_mask = [*short_documents, "--eod-mask-loss", "--no-create-attention-mask-in-dataloader"]
    one, _ = _pretrain(scripts, tmp_path / "one", 1, data=loss_mask)
    history, _ = _pretrain(scripts, tmp_path / "u2r2", 4, "--usp-ulysses-degree", "2",
                           "--usp-ring-degree", "2", data=loss_mask)  # fmt: skip
    _compare(history, one, "U2xR2")


def _refusal_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("usp_megatron:")]


@pytest.mark.parametrize("launcher", [False, True], ids=["patched", "launcher"])
def test_refusals_are_one_line_from_rank_0(scripts, tmp_path, launcher):
    """Every rank refuses; rank 0 alone says it, once, and no rank prints a traceback (the
    one left is torchrun's own report of the exit codes). A length U x R cannot split is
    refused before Megatron-LM's check, which would name --context-parallel-size."""
    output = _pretrain(scripts, tmp_path, 4, "--usp-ulysses-degree", "2", "--usp-ring-degree",
                       "2", "--seq-length", "60", launcher=launcher, ok=False)  # fmt: skip
    assert _refusal_lines(output) == [
        "usp_megatron: --seq-length 60 must be a multiple of 2 x --usp-ulysses-degree 2 x "
        "--usp-ring-degree 2 = 8 (Megatron-LM cuts every sequence into 2 x U x R chunks): "
        "e.g. --seq-length 56 or 64"
    ]
    assert output.count("Traceback") == 1 and "ChildFailedError" in output, output[-4000:]


def test_typed_cp_comm_type_that_contradicts_the_degrees_is_refused_once(scripts, tmp_path):
    output = _pretrain(scripts, tmp_path, 4, "--usp-ulysses-degree", "2", "--usp-ring-degree",
                       "2", "--cp-comm-type", "p2p", ok=False)  # fmt: skip
    assert _refusal_lines(output) == [
        "usp_megatron: --cp-comm-type p2p contradicts --usp-ulysses-degree 2 x "
        "--usp-ring-degree 2: 'p2p' does not describe USP, which communicates as 'a2a+p2p' "
        "with these degrees; drop --cp-comm-type (USP sets it) or pass --cp-comm-type a2a+p2p"
    ]
