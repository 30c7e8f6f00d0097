"""Quantized weights that stand in for plain weight arrays in the model's matmuls.

A quantized weight is a pytree dataclass with an `einsum(eqn, x) -> array in x.dtype` method;
`pi05_jax.model.weights.weight_einsum` dispatches to it, and `lax.scan` slices its leaves per layer (the stacked depth
axis is first), so the model code (gemma.py, siglip.py, linear.py) is the same for float and quantized params.

- `fp8_weight.Fp8Weight`: e4m3 values with a float32 scale per output channel; activations quantized to e4m3
  per token (dynamic) or with a calibrated per-tensor scale (static). Backends: see `fp8_weight.Fp8Options`.
- `fp4_weight` (NVFP4-style weight-only MLPs): written alongside, see checkpoints/fp4_format.py.

Checkpoints: `checkpoints/quantize.py` writes them (`pi05 quantize`), `checkpoints/quantized_io.py` reads them and
`pi05_jax.runtime.Model.load` picks them up when the checkpoint holds a `pi05_quantization.json` manifest.
"""

from __future__ import annotations


class QuantizationError(ValueError):
    """A weight or activation that cannot be quantized (NaN/Inf, a zero scale, an unknown format, ...);
    the message names the parameter key."""
