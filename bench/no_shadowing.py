"""Imported first by the bench scripts that load a model in this process.

``python bench/<script>.py`` puts this folder first on ``sys.path``, where ``kernels.py`` (the kernel
benchmark) passes for the ``kernels`` package (Hugging Face's kernel hub), which transformers probes
for and imports from while it loads a model: ``ImportError: cannot import name 'CUDAProperties' from
'kernels' (bench/kernels.py)``. The name is marked absent instead; transformers then loads models
without it, as it does where the package is not installed (its kernels are for GPUs).
"""

import sys

sys.modules.setdefault("kernels", None)
