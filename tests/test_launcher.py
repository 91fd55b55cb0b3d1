"""The launcher (``python -m usp_megatron.megatron.launch``): bad usage refused, with what is
missing named (one process)."""

from __future__ import annotations

import pytest


def test_launcher_refuses_bad_usage_and_names_what_is_missing(tmp_path):
    from usp_megatron.megatron import launch

    with pytest.raises(SystemExit, match="usage"):
        launch.main(["--usp-ring-degree", "2"])
    with pytest.raises(SystemExit, match="no such script"):
        launch.main([str(tmp_path / "pretrain_gpt.py")])
    script = tmp_path / "pretrain_gpt.py"
    script.write_text("raise SystemExit('ran')\n")
    try:
        import megatron.training  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="Megatron-LM"):
            launch.main([str(script)])
