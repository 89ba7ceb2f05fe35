"""Tokenwise fused ops (Triton on CUDA, torch reference elsewhere).

Note: this top-level package shares its import name with Hugging Face's hub-kernels package `kernels`. transformers
probes for that package by name; tests/test_packaging.py checks that it does not take this one for it.
"""
