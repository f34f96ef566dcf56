"""lowbit's front door: compile a language model into low-bit kernels, load the artifact, generate.

Owns: the Python API (:mod:`.api`) and the ``lowbit`` command (:mod:`.cli`); the recipe grammar
(:mod:`.recipes`); model and text sources (:mod:`.sources`); the frontends into Relax
(:mod:`.frontend`); calibration on the host (:mod:`.calibration`, :mod:`.output_probe`); the
pipeline of steps (:mod:`.pipeline`); building in memory (:mod:`.building`); and what a deployment
runs (:mod:`.runtime`: artifact, manifest, signatures, session, evaluation).

May import: everything (``lowbit.passes``, ``lowbit.targets``, ``lowbit.codegen``). Names are
resolved lazily, so ``import lowbit.compiler`` does not load TVM or torch.
"""

import importlib

_EXPORTS = {
    "compile": "api", "build": "api", "load": "runtime.loading", "evaluate": "api", "analyze": "api", "explain": "api",
    "CompileResult": "api", "prepare": "building", "BuiltModel": "building", "PreparedModel": "building",
    "CalibrationText": "calibration", "EvalResult": "runtime.evaluation",
    "LowbitError": "lowbit.codegen.errors", "LowbitArgumentError": "lowbit.codegen.errors",
    "LowbitWarning": "lowbit.codegen.errors",
    "Recipe": "lowbit.passes.recipe", "WeightQuant": "lowbit.passes.recipe", "get_recipe": "recipes",
    "Session": "runtime.session", "Generation": "runtime.session",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if module.startswith("lowbit.") else f".{module}", __name__),
                       name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
