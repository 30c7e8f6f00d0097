"""Matmuls against stored weights, in one place, so quantized weights can stand in for plain arrays.

A weight leaf is either a plain array (cast to the activation dtype, as upstream's `Einsum` does) or an object
with `einsum(eqn, x) -> array in x.dtype` (FP8 / FP4 weights from `checkpoints.quantize`), registered as a pytree
whose leaves keep the stacked depth axis first so `lax.scan` slices them per layer like plain arrays.
"""

from __future__ import annotations

import jax.numpy as jnp


def weight_einsum(eqn: str, x, w):
    """einsum(eqn, x, w) with x the activation and w a stored weight (plain or quantized)."""
    custom = getattr(w, "einsum", None)
    if custom is not None:
        return custom(eqn, x)
    return jnp.einsum(eqn, x, w.astype(x.dtype))
