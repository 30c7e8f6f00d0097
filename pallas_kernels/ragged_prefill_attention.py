"""Ragged prefill attention: bidirectional GQA over a packed prefix, each batch row with its own valid length.

Axis legend: B batch, S sequence (queries and keys), N q heads, K kv heads, G group (N // K), H head dim,
R query rows of one KV head (S * G; row r is token r // G, head r % G).

The valid tokens of row b are packed at the front: positions < lengths[b] attend to keys < lengths[b]. The wrapper
views q [B,S,N,H] as [B,K,R,H] (a free reshape when K == 1, as in pi0.5), so the G query heads that share a KV
head form one [block_rows, H] matrix against that head's K and V. The grid is (B, K, row blocks); each program
runs an online softmax (fp32 max, sum and accumulator) over KV tiles whose count comes from the row's length:
tiles past the length are never loaded, and only the last, partial tile is masked. Rows >= length are zeros.

No padding copies: the last row block and the last KV tile are shifted back to end at the array's edge (S*G and
S need only be >= the block sizes), and the overlap is masked (keys) or recomputed identically (rows).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels._interpret import resolve_interpret

# Finite mask value for logits of keys outside the valid range. Every tile that is processed holds at least one
# valid key, so after the first tile the running max is a real logit and masked keys get exp(...) == 0 exactly.
MASK_VALUE = -1e30
# The reference's mask value (upstream's).
REFERENCE_MASK_VALUE = -2.3819763e38
MIN_TILE = 16  # smallest dot dimension the Triton lowering accepts
# float32 inputs take exact (IEEE, non-tensor-core) dots, whose tiles need twice the shared memory and many more
# registers: at head_dim 256, 64 x 64 float32 tiles need 272 KiB of shared memory (over the H100's 227 KiB) and
# 64 x 32 spill; 64 x 16 fits without spills (ptxas, sm_90a). float32 is the parity path, not the fast one.
FLOAT32_MAX_BLOCK_K = 16


def is_power_of_2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _prev_power_of_2(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def tile_for(extent: int, block: int) -> int:
    """The tile actually used along an axis of `extent`: `block`, shrunk to a power of 2 <= extent (>= 16)."""
    return max(MIN_TILE, min(block, _prev_power_of_2(extent)))


def key_block_for(dtype, block_k: int) -> int:
    """block_k as requested, capped at FLOAT32_MAX_BLOCK_K for float32 inputs."""
    return min(block_k, FLOAT32_MAX_BLOCK_K) if jnp.dtype(dtype).itemsize >= 4 else block_k


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the ragged prefill kernel (powers of 2, >= 16).

    block_rows: query rows per program, counted as (token, head) pairs of one KV head (16 tokens x 8 heads = 128).
    block_k: keys per inner step (capped at FLOAT32_MAX_BLOCK_K for float32 inputs).
    num_warps / num_stages: Triton launch parameters.
    """

    block_rows: int = 64
    block_k: int = 64
    num_warps: int = 8  # at head_dim 256, 4 warps spill the [64, 256] fp32 accumulator (ptxas, sm_90a)
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_rows", "block_k"):
            value = getattr(self, name)
            if not (is_power_of_2(value) and value >= MIN_TILE):
                raise ValueError(f"BlockSizes.{name} must be a power of 2 >= {MIN_TILE}; got {value=}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"BlockSizes needs num_warps, num_stages >= 1; got {self.num_warps=}, {self.num_stages=}")


def dot_precision(dtype) -> lax.Precision | None:
    """float32 inputs get exact (IEEE) dots, not TF32; bf16/f16 use the tensor cores' native precision."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# --- the online-softmax sweep shared by the attention kernels --------------------------------------------------------


def init_carry(rows: int, head_dim: int):
    """(acc [rows,H], running max [rows], running sum [rows]) in float32, before any key."""
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def _attend_tile(q, k, v, carry, key_ok, precision):
    acc, m, total = carry
    s = plgpu_triton.dot(q, k, trans_b=True, precision=precision)  # [rows, tile] float32
    if key_ok is not None:
        s = jnp.where(key_ok[None, :], s, MASK_VALUE)
        v = jnp.where(key_ok[:, None], v, jnp.zeros_like(v))  # garbage (even NaN) past the range stays out
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    total_new = alpha * total + jnp.sum(p, axis=1)
    acc_new = alpha[:, None] * acc + plgpu_triton.dot(p.astype(v.dtype), v, precision=precision)
    return acc_new, m_new, total_new


def attend_key_range(q, k_ref, v_ref, carry, *, begin, end, block_k: int, precision):
    """Fold keys [begin, end) of k_ref/v_ref ([S, H] refs, S >= block_k) into the online-softmax carry.

    Full tiles are unmasked; the last partial tile is shifted back to end inside the ref (so it never reads past
    S) and masks keys outside [its nominal start, end). `begin` must be a multiple of block_k; an empty range
    (end <= begin) loads nothing.
    """
    kv_len = k_ref.shape[0]
    count = jnp.maximum(end - begin, 0)
    n_full = lax.div(count, block_k)
    n_all = lax.div(count + (block_k - 1), block_k)

    def full_tile(t, carry):
        start = pl.multiple_of(begin + t * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        return _attend_tile(q, k, v, carry, None, precision)

    def tail_tile(t, carry):
        nominal = begin + t * block_k
        start = jnp.minimum(nominal, kv_len - block_k)
        keys = start + jnp.arange(block_k, dtype=jnp.int32)
        key_ok = (keys >= nominal) & (keys < end)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        return _attend_tile(q, k, v, carry, key_ok, precision)

    carry = lax.fori_loop(0, n_full, full_tile, carry)
    return lax.fori_loop(n_full, n_all, tail_tile, carry)


def normalize(acc, total):
    """acc / total row-wise; rows that saw no key (total == 0) give zeros."""
    return acc * (1.0 / jnp.where(total > 0, total, 1.0))[:, None]


# --- the kernel -------------------------------------------------------------------------------------------------------


def _prefill_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *, group, seq_len, block_rows, block_k, precision):
    rows_total, head_dim = q_ref.shape
    length = jnp.clip(len_ref[()], 0, seq_len)
    row_start = jnp.minimum(pl.program_id(2) * block_rows, rows_total - block_rows)
    tokens = lax.div(row_start + jnp.arange(block_rows, dtype=jnp.int32), group)
    # A row block holding no valid token loads no key at all.
    end = jnp.where(lax.div(row_start, group) < length, length, 0)
    q = q_ref[pl.ds(row_start, block_rows), :]
    acc, _, total = attend_key_range(
        q, k_ref, v_ref, init_carry(block_rows, head_dim), begin=0, end=end, block_k=block_k, precision=precision
    )
    out = jnp.where((tokens < length)[:, None], normalize(acc, total), 0.0)
    o_ref[pl.ds(row_start, block_rows), :] = out.astype(o_ref.dtype)


def _check_inputs(q, k, v, lengths):
    if q.ndim != 4:
        raise ValueError(f"q must be [B,S,N,H]; got {q.shape=}")
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [B,S,K,H]; got {k.shape=}, {v.shape=}")
    b, s, n, h = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != h:
        raise ValueError(f"k/v [B,S,K,H] must match q [B,S,N,H] in B, S and H; got {q.shape=}, {k.shape=}")
    if n % k.shape[2]:
        raise ValueError(f"q heads must be a multiple of kv heads (GQA); got {q.shape=}, {k.shape=}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integer [B] with {b=}; got {lengths.shape=}, {lengths.dtype=}")


def ragged_prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool | None = None,
) -> jax.Array:
    """Bidirectional GQA attention over packed prefixes.

    q [B,S,N,H] (RoPE'd and pre-scaled by H**-0.5), k/v [B,S,K,H], lengths int [B] (valid tokens at the front;
    clamped to [0, S]). Returns [B,S,N,H] in q.dtype: rows < length attend to keys < length, rows >= length are 0.
    `interpret=None` runs Pallas interpret mode when the default backend is the CPU.
    """
    lengths = jnp.asarray(lengths)
    _check_inputs(q, k, v, lengths)
    interpret = resolve_interpret(interpret)
    if not interpret and not is_power_of_2(q.shape[3]):
        raise ValueError(f"the Triton lowering needs a power-of-2 head dim; got {q.shape=}")
    return _ragged_prefill(q, k, v, lengths.astype(jnp.int32), block_sizes=block_sizes, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _ragged_prefill(q, k, v, lengths, *, block_sizes: BlockSizes, interpret: bool):
    b, s, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    rows = s * g
    block_rows = tile_for(rows, block_sizes.block_rows)
    block_k = tile_for(s, key_block_for(q.dtype, block_sizes.block_k))
    # [B,S,K,G,H] -> [B,K,S*G,H]; a bitcast when K == 1.
    qr = q.reshape(b, s, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    if rows < block_rows:  # only tiny inputs: fewer query rows than one tile
        qr = jnp.pad(qr, ((0, 0), (0, 0), (0, block_rows - rows), (0, 0)))
    if s < block_k:  # fewer keys than one (16-key) tile
        pad = ((0, 0), (0, block_k - s), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    rows_padded, s_kv = qr.shape[2], k.shape[1]

    kernel = functools.partial(
        _prefill_kernel,
        group=g,
        seq_len=s,
        block_rows=block_rows,
        block_k=block_k,
        precision=dot_precision(q.dtype),
    )
    row_spec = pl.BlockSpec((None, None, rows_padded, h), lambda bi, ki, ri: (bi, ki, 0, 0))
    kv_spec = pl.BlockSpec((None, s_kv, None, h), lambda bi, ki, ri: (bi, 0, ki, 0))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qr.shape, q.dtype),
        grid=(b, kh, pl.cdiv(rows_padded, block_rows)),
        in_specs=[
            pl.BlockSpec((None,), lambda bi, ki, ri: (bi,)),
            row_spec,
            kv_spec,
            kv_spec,
        ],
        out_specs=row_spec,
        compiler_params=plgpu_triton.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="ragged_prefill_attention",
    )(lengths, qr, k, v)
    out = out[:, :, :rows]
    return out.reshape(b, kh, s, g, h).transpose(0, 2, 1, 3, 4).reshape(b, s, n, h)


def ragged_prefill_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """Plain-JAX ragged prefill attention: upstream's masked softmax (fp32 logits, probs in q.dtype), rows >= length
    set to 0. Same arguments and result as `ragged_prefill_attention`."""
    lengths = jnp.asarray(lengths)
    _check_inputs(q, k, v, lengths)
    b, s, n, h = q.shape
    kh = k.shape[2]
    valid = jnp.arange(s)[None, :] < lengths[:, None]  # [B,S]
    qg = q.reshape(b, s, kh, n // kh, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = jnp.where(valid[:, None, None, None, :], logits, REFERENCE_MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, s, n, h)
    return jnp.where(valid[:, :, None, None], out, jnp.zeros_like(out)).astype(q.dtype)


def main():
    """Micro-benchmark on a GPU (`python -m pallas_kernels.ragged_prefill_attention`): the kernel at the prefill's
    shapes (8 q heads : 1 KV head, head_dim 256, bf16; a compacted 576-slot bucket holding 572 valid tokens, and
    upstream's padded 968 slots) against the plain-JAX reference. 18 layers chained in one jit (each its own q/k/v,
    each q nudged by the previous output), median of interleaved calls after warm-up, per layer."""
    import sys
    import time

    import numpy as np

    if jax.default_backend() != "gpu":
        sys.exit("pallas_kernels.ragged_prefill_attention main(): a GPU micro-benchmark; JAX sees no GPU")
    layers, heads, head_dim, repeats = 18, 8, 256, 30
    variants = {"XLA reference": ragged_prefill_attention_reference,
                "Pallas, default tiles": functools.partial(ragged_prefill_attention, interpret=False)}

    def chain(op):
        def run(qkvs, lengths):
            out = None
            for q, k, v in qkvs:
                q = q if out is None else (q + 1e-3 * out).astype(q.dtype)
                out = op(q, k, v, lengths)
            return out
        return jax.jit(run)

    print(f"{jax.devices()[0].device_kind}: ragged prefill attention, bf16, {layers} layers chained; us per layer")
    for slots, length in ((576, 572), (968, 572), (968, 968)):
        keys = jax.random.split(jax.random.key(slots + length), 3 * layers)
        qkvs = [tuple((jax.random.normal(keys[3 * i + j], (1, slots, n, head_dim), jnp.float32) * s)
                      .astype(jnp.bfloat16) for j, (n, s) in enumerate(((heads, head_dim**-0.5), (1, 2.0), (1, 1.0))))
                for i in range(layers)]
        lengths = jnp.asarray([length], jnp.int32)
        fns = {name: chain(op) for name, op in variants.items()}
        outs = {name: np.asarray(jax.block_until_ready(fn(qkvs, lengths)), np.float64) for name, fn in fns.items()}
        times = {name: [] for name in fns}
        for _ in range(3 + repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(qkvs, lengths))
                times[name].append(time.perf_counter() - t0)
        ref = outs["XLA reference"][:, :length]
        flops = 4 * length * length * heads * head_dim  # QK^T and PV over the valid region
        for name in fns:
            per_layer = float(np.median(times[name][3:])) / layers
            err = np.linalg.norm(outs[name][:, :length] - ref) / np.linalg.norm(ref)
            print(f"  S={slots:4d} L={length:4d}  {name:24s} {per_layer * 1e6:8.1f} us  "
                  f"{flops / per_layer / 1e12:6.1f} TFLOP/s  rel err vs reference {err:.1e}")


if __name__ == "__main__":
    main()
