"""Kernel definitions (TE/TIR) for lowbit's linear formats, weight packing, and the build driver."""
