"""Graph rewrites on Relax: each module is one pass with its requirements and guarantees documented."""
