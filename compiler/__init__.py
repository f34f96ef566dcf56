"""lowbit's front door: compile a language model into low-bit kernels, load the artifact, generate."""

from .api import CompileResult, compile, load
from .errors import LowbitError
from .recipes import Recipe, WeightQuant, get_recipe
from .runtime import Generation, Session, perplexity

__all__ = ["compile", "load", "CompileResult", "LowbitError", "Recipe", "WeightQuant", "get_recipe",
           "Session", "Generation", "perplexity"]
