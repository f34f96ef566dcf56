"""The entry functions of a compiled model: what the passes produce and the runtime calls.

* ``prefill``: a prompt chunk of any length; logits of every position (perplexity needs them all);
* ``prefill_last``: the same, logits of the last position only (generation; the output head runs on
  that row alone: :mod:`lowbit.passes.last_position`);
* ``decode``: one token.

Here, below both sides, so that the runtime can check an artifact against them without loading the
compiler.
"""

ENTRY_FUNCTIONS = ("prefill", "prefill_last", "decode")
PROMPT, PROMPT_LAST, STEP = ENTRY_FUNCTIONS
