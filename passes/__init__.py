"""Graph rewrites on Relax and the numerics of quantization.

Owns: the model in Relax as frontends hand it over (:mod:`.model_ir`), the recipe as data
(:mod:`.recipe`), the quantization schemes and their grids (:mod:`.schemes`), calibration
statistics (:mod:`.statistics`), the rewrites (linear matching, weight quantization into kernel
calls, scale folding, instrumentation for calibration, bounded gathers) and the numerical methods
(GPTQ, AWQ, SmoothQuant, sensitivity). Each pass module documents what it requires and guarantees;
none changes a dict its caller owns.

May import: ``lowbit.codegen`` and ``lowbit.targets``.
"""
