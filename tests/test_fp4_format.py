"""The FP4 weight format (checkpoints/fp4_format.py) against an encoder/decoder written here from the definitions.

The reference below shares no code with the module: the e2m1 and e4m3 value tables are built from their bit
definitions, rounding is brute force over every representable value (ties to the even code), and the nibble
order is written out byte by byte.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from checkpoints import fp4_format
from pi05_jax.quantized import QuantizationError
from pi05_jax.quantized.fp4_weight import Fp4Weight, quantize_weight

# --- independent reference ------------------------------------------------------------------------------------------


def e2m1_table() -> np.ndarray:
    """Values of the 16 e2m1 codes from the bit layout s e1 e0 m (exponent bias 1, subnormal at e = 0)."""
    vals = []
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 3, code & 1
        mag = m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
        vals.append(-mag if s else mag)
    return np.array(vals, np.float64)


def e4m3_positive_table() -> tuple[np.ndarray, np.ndarray]:
    """(bytes, values) of every finite non-negative e4m3fn number (bias 7; 0x7F is NaN)."""
    codes, vals = [], []
    for b in range(0x7F):
        e, m = b >> 3, b & 7
        vals.append(2.0**-6 * m / 8 if e == 0 else 2.0 ** (e - 7) * (1 + m / 8))
        codes.append(b)
    return np.array(codes, np.uint8), np.array(vals, np.float64)


def nearest_code(v: float, table: np.ndarray, codes: np.ndarray) -> int:
    """Brute force: the code whose value is nearest v; ties go to the even code, then the smaller code."""
    d = np.abs(table - v)
    best = np.flatnonzero(d == d.min())
    even = [i for i in best if codes[i] % 2 == 0]
    return int(codes[min(even or best)])


E2M1 = e2m1_table()
E2M1_CODES = np.arange(16)
E4M3_BYTES, E4M3_VALUES = e4m3_positive_table()


def ref_encode_e2m1(v: float) -> int:
    return nearest_code(min(max(v, -6.0), 6.0), E2M1, E2M1_CODES)


def ref_round_e4m3(v: float) -> int:
    return nearest_code(min(v, 448.0), E4M3_VALUES, E4M3_BYTES)


def ref_quantize_2d(w: np.ndarray):
    """w [K, N] float32, contracted axis 0 -> (packed [K/2, N] uint8, scale bytes [K/16, N], tensor scale)."""
    k, n = w.shape
    amax = np.float32(np.abs(w).max())
    ts = np.float32(amax / np.float32(6 * 448)) if amax > 0 else np.float32(1)
    scale_b = np.zeros((k // 16, n), np.uint8)
    codes = np.zeros((k, n), np.int64)
    for b, col in itertools.product(range(k // 16), range(n)):
        block = w[16 * b:16 * b + 16, col]
        raw = np.float32(np.float32(np.abs(block).max()) / np.float32(6)) / ts
        byte = ref_round_e4m3(float(raw))
        scale_b[b, col] = byte
        s = np.float32(E4M3_VALUES[byte]) * ts
        for i in range(16):
            codes[16 * b + i, col] = 0 if s == 0 else ref_encode_e2m1(float(np.float32(block[i] / s)))
    packed = np.zeros((k // 2, n), np.uint8)
    for j, col in itertools.product(range(k // 2), range(n)):
        packed[j, col] = codes[2 * j, col] | (codes[2 * j + 1, col] << 4)  # element 2j low, 2j+1 high
    return packed, scale_b, ts


def ref_dequantize_2d(packed: np.ndarray, scale_b: np.ndarray, ts) -> np.ndarray:
    half_k, n = packed.shape
    out = np.zeros((2 * half_k, n), np.float64)
    for j, col in itertools.product(range(half_k), range(n)):
        byte = int(packed[j, col])
        for elem, code in ((2 * j, byte & 0xF), (2 * j + 1, byte >> 4)):
            out[elem, col] = E2M1[code] * E4M3_VALUES[scale_b[elem // 16, col]] * float(ts)
    return out


def weights(rng, shape, *, zero_block=False):
    """Gaussian weights whose magnitude varies ~50x from row to row (so within blocks), optionally a zero block."""
    w = rng.standard_normal(shape).astype(np.float32) * np.exp(rng.uniform(-3, 1, size=(*shape[:-1], 1)))
    w = w.astype(np.float32)
    if zero_block:
        w[..., :16, :1] = 0
    return w


# --- e2m1 -----------------------------------------------------------------------------------------------------------


def test_decode_all_codes_matches_bit_definition():
    np.testing.assert_array_equal(fp4_format.decode_e2m1(np.arange(16)), E2M1.astype(np.float32))


def test_encode_matches_brute_force_including_ties_and_saturation():
    rng = np.random.default_rng(0)
    mids = (E2M1[:7] + E2M1[1:8]) / 2  # every tie between neighbouring magnitudes
    v = np.concatenate([rng.uniform(-8, 8, 2000), mids, -mids, E2M1, [0.0, -0.0, 6.5, -7.0, 1e9, -1e9]])
    v = v.astype(np.float32)
    got = fp4_format.encode_e2m1(v)
    want = np.array([ref_encode_e2m1(float(x)) for x in v])
    np.testing.assert_array_equal(got, want)


# --- whole tensors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(32, 8), (64, 5), (16, 3)])
def test_quantize_2d_matches_reference_encoder(k, n):
    w = weights(np.random.default_rng(k + n), (k, n), zero_block=True)
    q = fp4_format.quantize_fp4(w, contract_axis=0)
    packed, scale_b, ts = ref_quantize_2d(w)
    assert q.packed.dtype == np.uint8 and q.block_scales.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(q.packed, packed)
    np.testing.assert_array_equal(fp4_format.scale_bytes(q.block_scales), scale_b)
    assert q.tensor_scale.shape == () and q.tensor_scale == ts


def test_contract_axis_and_stacking_follow_the_layout():
    """[L, C, K, N] contracted on axis 2 with a scale per layer == the 2-D reference on every [K, N] slice;
    a weight contracted on its last axis == the reference on its transpose."""
    rng = np.random.default_rng(1)
    w = weights(rng, (2, 2, 32, 6))
    q = fp4_format.quantize_fp4(w, contract_axis=2, per_tensor_axes=1)
    assert q.packed.shape == (2, 2, 16, 6) and q.block_scales.shape == (2, 2, 2, 6) and q.tensor_scale.shape == (2,)
    for layer in range(2):
        # One tensor scale per layer: quantize the layer's two matrices as one [2*K, N] stack along K.
        stacked = np.concatenate([w[layer, 0], w[layer, 1]], axis=0)
        packed, scale_b, ts = ref_quantize_2d(stacked)
        np.testing.assert_array_equal(np.concatenate(q.packed[layer], axis=0), packed)
        np.testing.assert_array_equal(np.concatenate(fp4_format.scale_bytes(q.block_scales)[layer], axis=0), scale_b)
        assert q.tensor_scale[layer] == ts
    wt = weights(rng, (5, 48))
    qt = fp4_format.quantize_fp4(wt, contract_axis=-1)
    packed, scale_b, ts = ref_quantize_2d(wt.T.copy())
    np.testing.assert_array_equal(qt.packed, packed.T)
    np.testing.assert_array_equal(fp4_format.scale_bytes(qt.block_scales), scale_b.T)


def test_dequantize_matches_reference_decoder():
    rng = np.random.default_rng(2)
    w = weights(rng, (3, 64, 4), zero_block=True)
    q = fp4_format.quantize_fp4(w, contract_axis=1, per_tensor_axes=1)
    got = fp4_format.dequantize_fp4(*q, contract_axis=1)
    for layer in range(3):
        want = ref_dequantize_2d(q.packed[layer], fp4_format.scale_bytes(q.block_scales)[layer], q.tensor_scale[layer])
        np.testing.assert_array_equal(got[layer], want.astype(np.float32))
    # uint8 scale bytes decode the same as float8 scales
    np.testing.assert_array_equal(
        fp4_format.dequantize_fp4(q.packed, fp4_format.scale_bytes(q.block_scales), q.tensor_scale, 1), got)


def test_round_trip_error_is_within_half_a_step():
    """Each element lands on the nearest grid point of its block (saturating at 6 * scale)."""
    w = weights(np.random.default_rng(3), (128, 16))
    q = fp4_format.quantize_fp4(w, contract_axis=0)
    dq = fp4_format.dequantize_fp4(*q, contract_axis=0).astype(np.float64)
    step = np.repeat(fp4_format.scale_values(q.block_scales), 16, axis=0).astype(np.float64) * float(q.tensor_scale)
    grid = E2M1[None, None, :] * step[:, :, None]  # every representable value of each element's block
    nearest = np.min(np.abs(grid - w[:, :, None]), axis=-1)
    np.testing.assert_allclose(np.abs(dq - w), nearest, rtol=0, atol=1e-6 * step.max())  # float32 rounding


def test_all_zero_tensor():
    q = fp4_format.quantize_fp4(np.zeros((32, 4), np.float32), 0)
    assert not q.packed.any() and q.tensor_scale == 1
    assert not fp4_format.dequantize_fp4(*q, 0).any()


@pytest.mark.parametrize("bad,msg", [
    (np.zeros((24, 4), np.float32), "multiple of 16"),
    (np.full((32, 4), np.nan, np.float32), "NaN or Inf"),
    (np.zeros((32, 4), np.int32), "float weight"),
])
def test_quantize_rejects_bad_weights(bad, msg):
    with pytest.raises(ValueError, match=msg):
        fp4_format.quantize_fp4(bad, contract_axis=0)


def test_dequantize_rejects_mismatched_scales():
    q = fp4_format.quantize_fp4(np.ones((32, 4), np.float32), 0)
    with pytest.raises(ValueError, match="block scales of shape"):
        fp4_format.dequantize_fp4(q.packed, q.block_scales[:1], q.tensor_scale, 0)


# --- Fp4Weight (de)serialization ---------------------------------------------------------------------------------


def test_fp4_weight_arrays_round_trip_and_dequantize():
    w = weights(np.random.default_rng(4), (2, 2, 32, 8))
    fw = quantize_weight(w, stacked=True)
    assert fw.shape == w.shape
    arrays = fw.to_arrays()
    assert {k: v.dtype for k, v in arrays.items()} == {
        "fp4_packed": np.uint8, "fp4_block_scales": np.uint8, "fp4_tensor_scale": np.float32}
    back = Fp4Weight.from_arrays(arrays)
    for a, b in zip((fw.packed, fw.block_scales, fw.tensor_scale), (back.packed, back.block_scales,
                                                                     back.tensor_scale), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = fp4_format.quantize_fp4(w, -2, per_tensor_axes=1)
    np.testing.assert_array_equal(np.asarray(fw.dequantize()), fp4_format.dequantize_fp4(*q, -2))


def test_fp4_weight_from_arrays_errors_name_the_problem():
    arrays = quantize_weight(np.ones((32, 4), np.float32), stacked=False).to_arrays()
    with pytest.raises(QuantizationError, match="missing"):
        Fp4Weight.from_arrays({"fp4_packed": arrays["fp4_packed"]}, where="mlp_1/linear")
    with pytest.raises(QuantizationError, match="uint8"):
        Fp4Weight.from_arrays({**arrays, "fp4_packed": arrays["fp4_packed"].astype(np.int32)})
    with pytest.raises(QuantizationError, match="does not match"):
        Fp4Weight.from_arrays({**arrays, "fp4_block_scales": arrays["fp4_block_scales"][:1]})
    with pytest.raises(QuantizationError, match="negative"):
        Fp4Weight.from_arrays({**arrays, "fp4_block_scales": arrays["fp4_block_scales"] | 0x80})
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_weight(Fp4Weight.from_arrays(arrays), stacked=False)


# --- Fp4Weight.einsum -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["dequant", "pallas"])
@pytest.mark.parametrize("eqn,x_shape,w_shape", [
    ("BTD,CDF->CBTF", (2, 5, 32), (2, 32, 48)),
    ("BTF,FD->BTD", (2, 5, 64), (64, 16)),
    ("...i,io->...o", (3, 32), (32, 8)),
    ("BSD,CKDH->CBSKH", (1, 4, 32), (2, 1, 32, 16)),  # no kernel plan: dequantize + einsum on any backend
])
def test_fp4_weight_einsum_equals_einsum_of_dequantized(eqn, x_shape, w_shape, backend):
    import jax.numpy as jnp

    rng = np.random.default_rng(5)
    fw = quantize_weight(weights(rng, w_shape), stacked=False, backend=backend)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    got = fw.einsum(eqn, x)
    want = jnp.einsum(eqn, x, jnp.asarray(fp4_format.dequantize_fp4(*fp4_format.quantize_fp4(
        np.asarray(weights(np.random.default_rng(5), w_shape)), -2), -2)), precision="highest")
    assert got.dtype == x.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_fp4_weight_einsum_rejects_a_stacked_weight_on_the_kernel_path():
    import jax.numpy as jnp

    fw = quantize_weight(weights(np.random.default_rng(6), (3, 64, 16)), stacked=True, backend="pallas")
    with pytest.raises(ValueError, match="still stacked over depth"):
        fw.einsum("BTF,FD->BTD", jnp.ones((1, 2, 64), jnp.float32))
