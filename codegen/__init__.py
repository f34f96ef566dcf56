"""Kernel definitions and weight formats: what lowbit computes, independent of any chip.

Owns: the TE definitions of the linear kernels (:mod:`.kernels`), the weight formats and layouts
they read (:mod:`.formats`), the bit packing both sides share (:mod:`.packing`), and the exception
and warning types every layer raises (:mod:`.errors`).

May import: nothing from lowbit (TVM and numpy only). Every other package builds on this one:
``codegen`` < ``targets`` < ``passes`` < ``compiler``.
"""
