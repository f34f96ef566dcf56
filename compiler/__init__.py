"""lowbit's front door: compile a language model into low-bit kernels, load the artifact, generate.

Names are resolved lazily, so that ``lowbit.passes`` and ``lowbit.codegen`` can import
``lowbit.compiler.errors`` without pulling in the whole front end (and TVM, torch) first.
"""

import importlib

_EXPORTS = {
    "compile": "api", "load": "api", "evaluate": "api", "analyze": "api", "build_model": "api",
    "CompileResult": "api", "EvalResult": "evaluate",
    "LowbitError": "errors",
    "Recipe": "recipes", "WeightQuant": "recipes", "get_recipe": "recipes",
    "Session": "runtime", "Generation": "runtime",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
