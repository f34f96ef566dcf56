"""Imported first by the bench scripts that load a model in this process.

``python bench/<script>.py`` puts this folder first on ``sys.path``, where ``kernels.py`` (the kernel
benchmark) passes for the ``kernels`` package (Hugging Face's kernel hub), which transformers 5
imports from while it loads a model when the package is installed: ``ImportError: cannot import
name 'CUDAProperties' from 'kernels' (bench/kernels.py)``. This folder moves to the end of
``sys.path``: installed packages come first, the scripts still import each other.
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE] + [str(_HERE)]
