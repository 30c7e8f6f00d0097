"""Dense layers and activations shared by the vision tower, the LLM and the action head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pi05_jax.model.weights import weight_einsum


def dense(x, kernel, bias, dtype):
    """flax `nn.Dense(dtype=dtype)`: inputs and params cast to `dtype`, then x @ kernel + bias."""
    y = weight_einsum("...i,io->...o", x.astype(dtype), kernel)
    return y + bias.astype(dtype)


def promoted_dense(x, kernel, bias):
    """flax nnx `Linear` with dtype=None: inputs and params promoted to their common dtype."""
    dtype = jnp.result_type(x.dtype, kernel.dtype)
    return dense(x, kernel, bias, dtype)


def gelu_tanh(x):
    """flax's `nn.gelu` default (approximate=True), used by SigLIP and Gemma."""
    return jax.nn.gelu(x, approximate=True)
