"""Tokenwise model code: architectures as HF-compatible models, and the built-in tiny model (models.builtin)."""
