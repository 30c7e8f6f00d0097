"""NVFP4-style 4-bit weights: e2m1 values, an e4m3 scale per 16 contracted elements, a float32 scale per tensor.

A weight `w` with a contracted (input) axis `contract_axis` of length K (a multiple of 16) is stored as three
arrays. Every other axis keeps its length and position, so the layout of `w` is still recognisable:

    packed        uint8, w.shape with the contracted axis K -> K // 2
                  byte j along the contracted axis holds elements 2j and 2j + 1:
                      low nibble  (bits 0-3) = e2m1 code of element 2j
                      high nibble (bits 4-7) = e2m1 code of element 2j + 1
    block_scales  float8_e4m3fn, w.shape with K -> K // 16 (or its uint8 bytes, see `scale_bytes`)
                  scale b along the contracted axis covers elements 16b .. 16b + 15 (bytes 8b .. 8b + 7);
                  never negative (sign bit 0), which the kernel's decoding relies on
    tensor_scale  float32, shape w.shape[:per_tensor_axes]: one scale per tensor, or one per stacked layer when
                  the weight is stacked over depth on axis 0 (per_tensor_axes=1)

    w[..., k, ...] ~= e2m1(code[..., k, ...]) * float(block_scales[..., k // 16, ...]) * tensor_scale[lead]

An e2m1 code is 4 bits s e1 e0 m: sign s, exponent e = 2*e1 + e0 (bias 1), one mantissa bit m. Its value is
(-1)^s * (m / 2 if e == 0 else 2^(e-1) * (1 + m / 2)), i.e. the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 for
codes 0..7. Zero is always stored as +0 (code 0).

Scales (NVIDIA's NVFP4 recipe): tensor_scale = amax(|w|) / (6 * 448) over the tensor (or layer), so the largest
block scale lands at e4m3's maximum 448; each block's scale = amax(|block|) / 6 / tensor_scale, rounded to e4m3
(nearest, ties to even); the elements are then divided by block_scale * tensor_scale and rounded to the nearest
e2m1 value (ties to the even code), saturating at +-6. All of this is float32 arithmetic, in this order. A block
whose scale rounds to zero stores zeros; an all-zero tensor gets tensor_scale 1.

Everything here is numpy (host side, used by `pi05 quantize`); stacked weights are processed one leading index at
a time so a full-size prefix MLP never needs several float32 copies in memory at once.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

BLOCK = 16  # contracted elements per e4m3 block scale
E2M1_MAX = 6.0
E4M3_MAX = 448.0
# e2m1 magnitudes of codes 0..7 (code 8..15 are the same with the sign bit set).
E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


class Fp4Tensor(NamedTuple):
    packed: np.ndarray  # uint8, contracted axis halved
    block_scales: np.ndarray  # float8_e4m3fn, contracted axis / 16
    tensor_scale: np.ndarray  # float32, shape w.shape[:per_tensor_axes]


def _axis(contract_axis: int, ndim: int) -> int:
    if not -ndim <= contract_axis < ndim:
        raise ValueError(f"contract_axis {contract_axis} out of range for a weight of rank {ndim}")
    return contract_axis % ndim


def encode_e2m1(v: np.ndarray) -> np.ndarray:
    """Nearest e2m1 code (uint8, 0..15) of float values already divided by their scales; ties to the even code,
    magnitudes above 6 saturate to 6, zero and values rounding to zero give +0."""
    a = np.abs(v)
    # Midpoint i lies between codes i and i+1; a tie goes to the even code of the two.
    mids = (E2M1_MAGNITUDES[:-1] + E2M1_MAGNITUDES[1:]) / 2
    code = np.zeros(v.shape, np.uint8)
    for i, mid in enumerate(mids):
        code += (a > mid) if i % 2 == 0 else (a >= mid)
    sign = (v < 0) & (code > 0)
    return code | (sign.astype(np.uint8) << 3)


def decode_e2m1(code: np.ndarray) -> np.ndarray:
    """float32 values of e2m1 codes (any integer array with values 0..15)."""
    code = np.asarray(code, np.uint8)
    mag = E2M1_MAGNITUDES[code & 7]
    return np.where(code & 8, -mag, mag).astype(np.float32)


def scale_bytes(block_scales: np.ndarray) -> np.ndarray:
    """The uint8 bytes of e4m3 block scales (what the kernel reads and checkpoints store)."""
    block_scales = np.asarray(block_scales)
    if block_scales.dtype == np.uint8:
        return block_scales
    if block_scales.dtype != ml_dtypes.float8_e4m3fn:
        raise ValueError(f"block scales must be float8_e4m3fn or uint8, got {block_scales.dtype=}")
    return block_scales.view(np.uint8)


def scale_values(block_scales: np.ndarray) -> np.ndarray:
    """float32 values of block scales given as float8_e4m3fn or as their uint8 bytes."""
    b = np.asarray(block_scales)
    if b.dtype == np.uint8:
        b = b.view(ml_dtypes.float8_e4m3fn)
    return b.astype(np.float32)


def _quantize_one(w: np.ndarray, axis: int) -> Fp4Tensor:
    """One tensor (no per-layer axis): w float32 with the contracted axis moved last."""
    amax = np.float32(np.max(np.abs(w))) if w.size else np.float32(0)
    tensor_scale = amax / np.float32(E2M1_MAX * E4M3_MAX) if amax > 0 else np.float32(1.0)
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    block_amax = np.max(np.abs(blocks), axis=-1)
    raw = np.minimum(block_amax / E2M1_MAX / tensor_scale, E4M3_MAX)
    scales = raw.astype(ml_dtypes.float8_e4m3fn)  # round to nearest, ties to even
    denom = scales.astype(np.float32)[..., None] * tensor_scale
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(denom > 0, blocks / denom, 0.0).astype(np.float32)
    codes = encode_e2m1(scaled).reshape(w.shape)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return Fp4Tensor(packed.astype(np.uint8), scales, np.asarray(tensor_scale, np.float32))


def quantize_fp4(w, contract_axis: int, *, per_tensor_axes: int = 0) -> Fp4Tensor:
    """Quantize `w` (any float array) to the format in the module docstring.

    `contract_axis` is the axis the matmul sums over (its length must be a multiple of 16); `per_tensor_axes`
    leading axes get their own tensor scale (1 for weights stacked over depth on axis 0).
    """
    w = np.asarray(w)
    if not np.issubdtype(w.dtype, np.floating) and w.dtype != ml_dtypes.bfloat16:
        raise ValueError(f"quantize_fp4 needs a float weight, got {w.dtype=}")
    axis = _axis(contract_axis, w.ndim)
    if not 0 <= per_tensor_axes <= axis:
        raise ValueError(f"per_tensor_axes must be in 0..{axis} (before the contracted axis), got {per_tensor_axes=}")
    if w.shape[axis] % BLOCK:
        raise ValueError(f"contracted axis {axis} of shape {w.shape} must be a multiple of {BLOCK}")
    if per_tensor_axes:
        lead = w.shape[:per_tensor_axes]
        parts = [quantize_fp4(w[idx], axis - per_tensor_axes) for idx in np.ndindex(*lead)]
        stack = lambda xs: np.stack(xs).reshape(*lead, *xs[0].shape)
        return Fp4Tensor(stack([p.packed for p in parts]), stack([p.block_scales for p in parts]),
                         stack([p.tensor_scale for p in parts]))
    wf = np.moveaxis(w.astype(np.float32), axis, -1)
    if not np.all(np.isfinite(wf)):
        raise ValueError(f"quantize_fp4: weight of shape {w.shape} holds NaN or Inf")
    q = _quantize_one(wf, axis)
    return Fp4Tensor(np.moveaxis(q.packed, -1, axis), np.moveaxis(q.block_scales, -1, axis), q.tensor_scale)


def dequantize_fp4(packed, block_scales, tensor_scale, contract_axis: int, *, dtype=np.float32) -> np.ndarray:
    """Inverse of `quantize_fp4`: float values [..., K, ...] (K = 2 * packed's contracted length) in `dtype`."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise ValueError(f"packed FP4 weights must be uint8, got {packed.dtype=}")
    axis = _axis(contract_axis, packed.ndim)
    scales = scale_values(block_scales)
    tensor_scale = np.asarray(tensor_scale, np.float32)
    expect = (*packed.shape[:axis], packed.shape[axis] * 2 // BLOCK, *packed.shape[axis + 1:])
    if packed.shape[axis] % (BLOCK // 2) or scales.shape != expect:
        raise ValueError(f"block scales of shape {scales.shape} do not match packed weights of shape "
                         f"{packed.shape} (contracted axis {axis}; expected {expect})")
    if tensor_scale.shape != packed.shape[: tensor_scale.ndim]:
        raise ValueError(f"tensor scale of shape {tensor_scale.shape} must be a prefix of {packed.shape}")
    p = np.moveaxis(packed, axis, -1)
    codes = np.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    values = decode_e2m1(codes)
    s = np.repeat(np.moveaxis(scales, axis, -1), BLOCK, axis=-1)
    ts = tensor_scale.reshape(tensor_scale.shape + (1,) * (p.ndim - tensor_scale.ndim))
    return np.moveaxis(values * s * ts, -1, axis).astype(dtype)
