"""Kernels for mhc-jax, one folder per op (reference, XLA custom VJP, Pallas, benchmark)."""
