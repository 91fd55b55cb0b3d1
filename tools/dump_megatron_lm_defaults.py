"""Write the defaults of Megatron-LM's command-line arguments as JSON.

    python tools/dump_megatron_lm_defaults.py /path/to/Megatron-LM core_v0.16.1 \
        tests/data/megatron_lm_core_v0.16.1_defaults.json

Builds Megatron-LM's own parser (``megatron.training.arguments.add_megatron_arguments``, what
its ``parse_args`` builds before the script's ``extra_args_provider``), parses no
command-line flags and writes every argument's name and default value: facts of the
interface, which tests feed the plugin's hooks where no Megatron-LM checkout exists (CI has
only megatron-core from PyPI). Modules the import chain needs but this machine lacks
(``triton``, ``transformer_engine``, ...) are replaced by inert stand-ins and listed in the
output; argument defaults do not depend on them.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import sys
import types
import typing
from pathlib import Path


class _InertBase:
    """What a class derived from a missing module's class derives from instead."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        pass


class _Inert:
    """Any attribute, call, decorator use or subscript of a missing module gives itself."""

    def __getattr__(self, name: str) -> _Inert:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args: object, **kwargs: object) -> object:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a decorator
        return self

    def __getitem__(self, key: object) -> _Inert:
        return self

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (_InertBase,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Inert()


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of the listed top-level packages (and their submodules) with stubs."""

    def __init__(self) -> None:
        self.stubbed: set[str] = set()

    def find_spec(self, name: str, path: object, target: object = None) -> object:
        if name.split(".")[0] in self.stubbed:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0"  # the oldest: version checks then take the no-module path
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _json_value(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return repr(value)  # e.g. a torch dtype: kept as text


def megatron_lm_defaults(checkout: Path) -> tuple[dict[str, object], list[str]]:
    """Every argument's default in the checkout's parser, and what was stubbed to get it."""
    sys.path.insert(0, str(checkout))
    shims = []
    if not hasattr(typing, "override"):  # Python < 3.12 (core_v0.19.0 imports it): a no-op
        typing.override = lambda method: method
        shims.append("typing.override")
    finder = _StubFinder()
    sys.meta_path.append(finder)
    while True:
        try:
            arguments = importlib.import_module("megatron.training.arguments")
            break
        except ModuleNotFoundError as error:
            missing = (error.name or "").split(".")[0]
            if not missing or missing in finder.stubbed or missing == "megatron":
                raise
            finder.stubbed.add(missing)
            for name in [n for n in sys.modules if n.split(".")[0] in ("megatron", missing)]:
                del sys.modules[name]
    parser = arguments.add_megatron_arguments(
        argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    )
    namespace = parser.parse_args([])
    defaults = {name: _json_value(value) for name, value in sorted(vars(namespace).items())}
    return defaults, sorted(finder.stubbed) + shims


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a Megatron-LM checkout (its root)")
    parser.add_argument("tag", help="the tag checked out, recorded in the output")
    parser.add_argument("out", type=Path, help="the JSON file to write")
    ns = parser.parse_args(argv)
    defaults, stubbed = megatron_lm_defaults(ns.checkout.resolve())
    report = {
        "tag": ns.tag,
        "source": "megatron.training.arguments.add_megatron_arguments, parsed with no flags",
        "python": ".".join(map(str, sys.version_info[:3])),
        "stubbed_imports": stubbed,
        "defaults": defaults,
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    print(f"{ns.out}: {len(defaults)} defaults of {ns.tag} (stubbed: {stubbed or 'none'})")


if __name__ == "__main__":
    main()
