"""The matmul precision a model's dtype asks for: float32 weights get float32 GEMMs on every backend.

JAX's default precision computes float32 dot products with reduced-precision arithmetic where the hardware has it
(TF32 tensor cores on Ampere and newer NVIDIA GPUs; JAX's "Matmul precision" docs), so a float32 model on an H200
was a TF32 model: on the card, the same rows alone and in a batch of 4 differed by 1.2e-4 (docs/PERF.md,
session 7), where the CPU gives 1e-7. A user who loads float32 weights asks for float32 numerics (upstream's
float32 outputs are the reference), so every phase of a float32 model is traced under
`jax.default_matmul_precision("float32")`. bfloat16 models are untouched: their dots take bfloat16 inputs, and
their few float32 dots (time embedding, action projections) keep JAX's default, as upstream's do.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from pi05_jax.model.reference import params_dtype


def matmul_precision(dtype):
    """A context manager: float32 -> JAX's default matmul precision "float32"; any other dtype -> no change."""
    if jnp.dtype(dtype) == jnp.float32:
        return jax.default_matmul_precision("float32")
    return contextlib.nullcontext()


def exact_float32(phase):
    """phase(params, ...) traced under `matmul_precision` of the params' dtype."""

    @functools.wraps(phase)
    def traced(params, *args, **kwargs):
        with matmul_precision(params_dtype(params)):
            return phase(params, *args, **kwargs)

    return traced
