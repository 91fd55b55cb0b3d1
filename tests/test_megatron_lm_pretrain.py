"""Megatron-LM's own ``pretrain_gpt.py`` with USP on CPU processes (gloo): the patched script
and the unpatched one through the launcher train as one process does.

Needs a Megatron-LM checkout (``USP_MEGATRON_LM_DIR``; CI has none): tag core_v0.16.1 (or
core_v0.19.0 on Python >= 3.12, not run so far), with its Python dependencies importable.
``tests/megatron_lm_cpu/sitecustomize.py`` makes the script run on CPU. Slow: about 40 s a
four-process run on two cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CHECKOUT = os.environ.get("USP_MEGATRON_LM_DIR")
pytestmark = pytest.mark.skipif(
    not CHECKOUT, reason="USP_MEGATRON_LM_DIR does not point at a Megatron-LM checkout"
)

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
         "--position-embedding-type", "rope", "--micro-batch-size", "2",
         "--global-batch-size", "2", "--train-iters", "4", "--lr", "1e-3",
         "--lr-decay-style", "constant", "--seed", "1234", "--init-method-std", "0.02",
         "--attention-dropout", "0", "--hidden-dropout", "0", "--transformer-impl", "local",
         "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
         "--distributed-backend", "gloo", "--use-cpu-initialization",
         "--no-gradient-accumulation-fusion", "--no-bias-gelu-fusion",
         "--no-bias-dropout-fusion", "--no-masked-softmax-fusion", "--no-persist-layer-norm",
         "--no-rope-fusion", "--log-interval", "1", "--eval-iters", "0",
         "--eval-interval", "1000", "--num-workers", "0",
         "--no-create-attention-mask-in-dataloader"]  # fmt: skip
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


def _pretrain(scripts, tmp_path, nproc, *flags, launcher=False, ok=True):
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
           *flags]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    if not ok:
        assert done.returncode == 1, output[-4000:]
        return output
    assert done.returncode == 0, output[-6000:]
    history = [(int(i), float(loss), float(norm)) for i, loss, norm in LOSS.findall(output)]
    assert [i for i, *_ in history] == [1, 2, 3, 4], output[-6000:]
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
        for (_, loss, norm), (_, want_loss, want_norm) in zip(history, one, strict=True):
            # Printed with 7 significant digits; float32 sums in another order differ there.
            assert loss == pytest.approx(want_loss, rel=1e-6, abs=0), (name, history, one)
            assert norm == pytest.approx(want_norm, rel=1e-3, abs=0), (name, history, one)
        assert one[-1][1] < one[0][1] - 0.2  # it trained


def test_typed_cp_comm_type_that_contradicts_the_degrees_is_refused_once(scripts, tmp_path):
    output = _pretrain(scripts, tmp_path, 4, "--usp-ulysses-degree", "2", "--usp-ring-degree",
                       "2", "--cp-comm-type", "p2p", launcher=True, ok=False)  # fmt: skip
    refusals = [line for line in output.splitlines() if line.startswith("usp_megatron:")]
    assert refusals == [
        "usp_megatron: --cp-comm-type p2p contradicts --usp-ulysses-degree 2 x "
        "--usp-ring-degree 2: 'p2p' does not describe USP, which communicates as 'a2a+p2p' "
        "with these degrees; drop --cp-comm-type (USP sets it) or pass --cp-comm-type a2a+p2p"
    ]
