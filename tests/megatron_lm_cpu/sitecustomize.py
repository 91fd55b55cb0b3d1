"""Run a Megatron-LM checkout's ``pretrain_gpt.py`` on CPU processes (gloo), for the test
in ``tests/test_megatron_lm_pretrain.py``; active only with ``USP_MEGATRON_LM_CPU=1``.

Python imports ``sitecustomize`` at start-up from this folder (first on ``PYTHONPATH``), so
every torchrun worker gets, before Megatron-LM is imported: the project's CPU shim (CUDA
calls to the CPU), and what Megatron-LM's training script itself asks of a GPU machine:

- ``torch.cuda.is_available()`` true and one device (``initialize_megatron`` asserts CUDA);
- no runtime builds: the fused kernels are not loaded (the run disables every fusion) and the
  dataset helpers come from an installed megatron-core of the same version when the checkout
  has not compiled its own;
- the fusion warm-up's random tensors drawn outside the generator that initializes the
  weights (on GPUs they come from the CUDA generator; on CPU they would shift the weights
  by ``seq_length / cp`` rows and break the comparison between degrees);
- an inert ``triton`` where none is installed (imported at module level, used on GPUs only).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("USP_MEGATRON_LM_CPU") == "1":
    import importlib.util
    import sysconfig
    import types
    from pathlib import Path

    tools = Path(__file__).resolve().parents[2] / "tools"
    if importlib.util.find_spec("triton") is None:
        sys.path.insert(0, str(tools))
        from dump_megatron_lm_defaults import _StubFinder

        sys.path.remove(str(tools))
        finder = _StubFinder()
        finder.stubbed.add("triton")
        sys.meta_path.append(finder)

    import torch

    from usp_megatron.megatron.cpu_shim import install_cpu_shim

    install_cpu_shim(force=True)
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_name = lambda *a, **k: "cpu"
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        major=9, minor=0, name="cpu", total_memory=1 << 34, multi_processor_count=1
    )

    import megatron.core.datasets.utils as dataset_utils

    def compile_helpers() -> None:
        """Use the checkout's compiled helpers, else those of an installed megatron-core."""
        try:
            import megatron.core.datasets.helpers_cpp  # noqa: F401
        except ImportError:
            suffix = sysconfig.get_config_var("EXT_SUFFIX")
            for site in map(Path, sys.path):
                so = site / "megatron" / "core" / "datasets" / f"helpers_cpp{suffix}"
                if so.is_file():
                    name = "megatron.core.datasets.helpers_cpp"
                    spec = importlib.util.spec_from_file_location(name, so)
                    module = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(module)
                    sys.modules[name] = module
                    return
            raise

    dataset_utils.compile_helpers = compile_helpers

    import megatron.legacy.fused_kernels as fused_kernels

    fused_kernels.load = lambda args: None

    import megatron.training.initialize as initialize

    warmup = initialize._warmup_jit_function

    def _warmup_jit_function() -> None:
        with torch.random.fork_rng(devices=[]):
            warmup()

    initialize._warmup_jit_function = _warmup_jit_function
