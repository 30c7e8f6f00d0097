"""GQA cross-attention for the action tokens: queries over (valid prefix KV ++ their own KV), flash-decoding style.

Axis legend: B batch, T action (query) tokens, S prefix slots, N q heads, K kv heads, G group (N // K), H head dim,
R query rows of one KV head (T * G; row r is token r // G, head r % G), P prefix splits, J splits (P + 1).

pi0.5's denoise step has 50 action tokens x 8 query heads sharing one KV head (head_dim 256): per KV head that is
400 query rows against the prefix cache (lengths[b] valid slots at the front) plus the 50 tokens' own K/V. With
batch 1 a kernel that loops over all keys in one program per row block leaves most SMs idle, so the key axis is split
over the grid (flash decoding): split j < P covers prefix keys [j*split_k, (j+1)*split_k) clipped to the row's length
(splits past it load nothing), split P covers the self keys. Each program writes its fp32 partial (accumulator, max,
sum); a small plain-JAX step (`combine_splits`, ~3 XLA kernels) merges the J partials.

q, k and v come as one array in the expert's fused QKV GEMM's layout [B,T,K,G+2,H], read in place: the grid is
(B, K, J, G, token blocks), one program per (split, query head, block of tokens), q read as a strided [tokens, H]
view of its head, so XLA needs one elementwise fusion before the kernel (RoPE, q scale) instead of three slicing ones.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels.ragged_prefill_attention import (
    MIN_TILE,
    REFERENCE_MASK_VALUE,
    attend_key_range,
    dot_precision,
    init_carry,
    is_power_of_2,
    key_block_for,
    tile_for,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the GQA cross-attention kernel.

    block_rows: action tokens per program (of one query head; power of 2, >= 16).
    block_k: keys per inner step (power of 2, >= 16; capped at 16 for float32 inputs).
    split_k: prefix keys per program, the flash-decoding split (a multiple of block_k).
    num_warps / num_stages: Triton launch parameters.
    """

    block_rows: int = 64
    # 128-key blocks in one pipeline stage: each program of a 128-key split loads its K and V tiles at once instead
    # of in two dependent 64-key steps (what the fast path runs; docs/PERF.md, session 4)
    block_k: int = 128
    split_k: int = 128
    num_warps: int = 8  # at head_dim 256, 4 warps spill the [64, 256] fp32 accumulator (ptxas, sm_90a)
    num_stages: int = 1

    def __post_init__(self):
        for name in ("block_rows", "block_k"):
            value = getattr(self, name)
            if not (is_power_of_2(value) and value >= MIN_TILE):
                raise ValueError(f"BlockSizes.{name} must be a power of 2 >= {MIN_TILE}; got {value=}")
        if self.split_k < self.block_k or self.split_k % self.block_k:
            raise ValueError(f"BlockSizes.split_k must be a multiple of block_k; got {self.split_k=}, {self.block_k=}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"BlockSizes needs num_warps, num_stages >= 1; got {self.num_warps=}, {self.num_stages=}")


def _cross_kernel(
    len_ref, q_ref, kp_ref, vp_ref, ks_ref, vs_ref, acc_ref, max_ref, sum_ref,
    *, prefix_len, self_len, num_prefix_splits, split_k, block_rows, block_k, block_k_self, precision,
):  # fmt: skip
    """One (split, query head, token block) program of the grid (B, K, J, G, token blocks)."""
    rows_total, head_dim = q_ref.shape
    split, row_block = pl.program_id(2), pl.program_id(4)
    row_start = jnp.minimum(row_block * block_rows, rows_total - block_rows)  # the last block may overlap
    length = jnp.clip(len_ref[()], 0, prefix_len)
    is_prefix = split < num_prefix_splits
    q = q_ref[pl.ds(row_start, block_rows), :]
    carry = init_carry(block_rows, head_dim)

    begin = split * split_k
    end = jnp.where(is_prefix, jnp.minimum(begin + split_k, length), 0)
    carry = attend_key_range(q, kp_ref, vp_ref, carry, begin=begin, end=end, block_k=block_k, precision=precision)
    self_end = jnp.where(is_prefix, jnp.int32(0), jnp.int32(self_len))  # two Python ints break the Triton lowering
    carry = attend_key_range(q, ks_ref, vs_ref, carry, begin=0, end=self_end, block_k=block_k_self, precision=precision)

    acc, row_max, row_sum = carry
    acc_ref[pl.ds(row_start, block_rows), :] = acc
    max_ref[pl.ds(row_start, block_rows)] = row_max
    sum_ref[pl.ds(row_start, block_rows)] = row_sum


def _check_prefix_pair(k_prefix, v_prefix):
    if k_prefix.ndim != 4 or k_prefix.shape != v_prefix.shape:
        raise ValueError(f"k_prefix and v_prefix must both be [B,S,K,H]; got {k_prefix.shape=}, {v_prefix.shape=}")


def _check_prefix_lengths(prefix_lengths, b):
    if prefix_lengths.shape != (b,) or not jnp.issubdtype(prefix_lengths.dtype, jnp.integer):
        raise ValueError(
            f"prefix_lengths must be integer [B] with {b=}; got {prefix_lengths.shape=}, {prefix_lengths.dtype=}"
        )


def _check_inputs(q, k_prefix, v_prefix, prefix_lengths, k_self, v_self):
    if q.ndim != 4:
        raise ValueError(f"q must be [B,T,N,H]; got {q.shape=}")
    b, t, n, h = q.shape
    _check_prefix_pair(k_prefix, v_prefix)
    if k_self.ndim != 4 or k_self.shape != v_self.shape:
        raise ValueError(f"k_self and v_self must both be [B,T,K,H]; got {k_self.shape=}, {v_self.shape=}")
    kh = k_prefix.shape[2]
    if k_prefix.shape[0] != b or k_prefix.shape[3] != h:
        raise ValueError(f"k_prefix [B,S,K,H] must match q [B,T,N,H] in B and H; got {q.shape=}, {k_prefix.shape=}")
    if k_self.shape != (b, t, kh, h):
        raise ValueError(f"k_self must be [B,T,K,H] = {(b, t, kh, h)}; got {k_self.shape=}")
    if n % kh:
        raise ValueError(f"q heads must be a multiple of kv heads (GQA); got {q.shape=}, {k_prefix.shape=}")
    if len({q.dtype, k_prefix.dtype, v_prefix.dtype, k_self.dtype, v_self.dtype}) != 1:
        raise ValueError(
            f"q and all K/V must share a dtype; got {q.dtype=}, {k_prefix.dtype=}, {v_prefix.dtype=}, "
            f"{k_self.dtype=}, {v_self.dtype=}"
        )
    _check_prefix_lengths(prefix_lengths, b)


def _check_packed_inputs(qkv, k_prefix, v_prefix, prefix_lengths):
    if qkv.ndim != 5 or qkv.shape[3] < 3:
        raise ValueError(f"qkv must be [B,T,K,G+2,H] (per KV head: G >= 1 query heads, then k, then v); got "
                         f"{qkv.shape=}")
    b, _, kh, _, h = qkv.shape
    _check_prefix_pair(k_prefix, v_prefix)
    if (k_prefix.shape[0], k_prefix.shape[2], k_prefix.shape[3]) != (b, kh, h):
        raise ValueError(f"k_prefix [B,S,K,H] must match qkv [B,T,K,G+2,H] in B, K and H; got {qkv.shape=}, "
                         f"{k_prefix.shape=}")
    if len({qkv.dtype, k_prefix.dtype, v_prefix.dtype}) != 1:
        raise ValueError(f"qkv and the prefix K/V must share a dtype; got {qkv.dtype=}, {k_prefix.dtype=}, "
                         f"{v_prefix.dtype=}")
    _check_prefix_lengths(prefix_lengths, b)


def unpack_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """qkv [B,T,K,G+2,H] -> (q [B,T,K*G,H], k [B,T,K,H], v [B,T,K,H]): the packed layout's three views."""
    b, t, kh, g2, h = qkv.shape
    return qkv[:, :, :, : g2 - 2].reshape(b, t, kh * (g2 - 2), h), qkv[:, :, :, g2 - 2], qkv[:, :, :, g2 - 1]


def _pad_axis1(x, size):
    return x if x.shape[1] >= size else jnp.pad(x, ((0, 0), (0, size - x.shape[1]), (0, 0), (0, 0)))


def gqa_cross_attention_packed(
    qkv: jax.Array,
    k_prefix: jax.Array,
    v_prefix: jax.Array,
    prefix_lengths: jax.Array,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool | None = None,
) -> jax.Array:
    """Softmax attention of each action token's query heads over (valid prefix keys ++ all T action tokens' keys).

    qkv [B,T,K,G+2,H]: per KV head, G query heads (RoPE'd, pre-scaled by H**-0.5), then k (RoPE'd), then v: the
    output layout of the expert's fused QKV GEMM. k_prefix/v_prefix [B,S,K,H] with prefix_lengths int [B] valid
    slots at the front (clamped to [0, S]). Returns [B,T,K*G,H] in qkv.dtype. `interpret=None` runs Pallas
    interpret mode when the default backend is the CPU.
    """
    prefix_lengths = jnp.asarray(prefix_lengths)
    _check_packed_inputs(qkv, k_prefix, v_prefix, prefix_lengths)
    interpret = resolve_interpret(interpret)
    if not interpret and not is_power_of_2(qkv.shape[4]):
        raise ValueError(f"the Triton lowering needs a power-of-2 head dim; got {qkv.shape=}")
    return _gqa_cross_packed(qkv, k_prefix, v_prefix, prefix_lengths.astype(jnp.int32), block_sizes=block_sizes,
                             interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _gqa_cross_packed(qkv, k_prefix, v_prefix, prefix_lengths, *, block_sizes: BlockSizes, interpret: bool):
    b, t, kh, g2, h = qkv.shape
    g = g2 - 2
    s = k_prefix.shape[1]
    block_k = tile_for(s, key_block_for(qkv.dtype, block_sizes.block_k))
    split_k = max(block_sizes.split_k // block_k * block_k, block_k)
    num_prefix_splits = pl.cdiv(s, split_k)
    splits = num_prefix_splits + 1
    # Pads only trigger for inputs smaller than one tile (tests; pi0.5 has T = 50, S >= 64). Padded tokens are never
    # keys (self_len = t) and their rows are dropped.
    qkv = _pad_axis1(qkv.reshape(b, t, kh * g2, h), MIN_TILE).reshape(b, -1, kh, g2, h)
    k_prefix, v_prefix = _pad_axis1(k_prefix, block_k), _pad_axis1(v_prefix, block_k)
    tp = qkv.shape[1]
    block_rows = tile_for(tp, block_sizes.block_rows)
    block_k_self = tile_for(tp, key_block_for(qkv.dtype, block_sizes.block_k))

    kernel = functools.partial(
        _cross_kernel, prefix_len=s, self_len=t, num_prefix_splits=num_prefix_splits, split_k=split_k,
        block_rows=block_rows, block_k=block_k, block_k_self=block_k_self, precision=dot_precision(qkv.dtype),
    )  # fmt: skip
    acc, row_max, row_sum = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((b, kh, splits, tp, g, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, tp, g), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, tp, g), jnp.float32),
        ),
        grid=(b, kh, splits, g, pl.cdiv(tp, block_rows)),
        in_specs=[
            pl.BlockSpec((None,), lambda bi, ki, ji, gi, ri: (bi,)),
            pl.BlockSpec((None, tp, None, None, h), lambda bi, ki, ji, gi, ri: (bi, 0, ki, gi, 0)),  # q of head gi
            pl.BlockSpec((None, k_prefix.shape[1], None, h), lambda bi, ki, ji, gi, ri: (bi, 0, ki, 0)),
            pl.BlockSpec((None, k_prefix.shape[1], None, h), lambda bi, ki, ji, gi, ri: (bi, 0, ki, 0)),
            pl.BlockSpec((None, tp, None, None, h), lambda bi, ki, ji, gi, ri: (bi, 0, ki, g, 0)),  # k_self
            pl.BlockSpec((None, tp, None, None, h), lambda bi, ki, ji, gi, ri: (bi, 0, ki, g + 1, 0)),  # v_self
        ],
        out_specs=(
            pl.BlockSpec((None, None, None, tp, None, h), lambda bi, ki, ji, gi, ri: (bi, ki, ji, 0, gi, 0)),
            pl.BlockSpec((None, None, None, tp, None), lambda bi, ki, ji, gi, ri: (bi, ki, ji, 0, gi)),
            pl.BlockSpec((None, None, None, tp, None), lambda bi, ki, ji, gi, ri: (bi, ki, ji, 0, gi)),
        ),
        compiler_params=plgpu_triton.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="gqa_cross_attention_packed",
    )(prefix_lengths, qkv, k_prefix, v_prefix, qkv, qkv)

    rows = tp * g  # [.., T, G, ..] is the row layout [.., R, ..] with r = t * G + g: a free reshape
    out = combine_splits(acc.reshape(b, kh, splits, rows, h), row_max.reshape(b, kh, splits, rows),
                         row_sum.reshape(b, kh, splits, rows))
    out = out.reshape(b, kh, tp, g, h)[:, :, :t].transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, kh * g, h).astype(qkv.dtype)


def combine_splits(acc, row_max, row_sum):
    """Merge flash-decoding partials over axis 2: acc [B,K,J,R,H], row_max and row_sum [B,K,J,R] -> [B,K,R,H] f32.

    Splits that saw no key carry (acc 0, max = mask value, sum 0) and get weight exp(mask - max) == 0; the self
    split always has keys, so every row's total is positive.
    """
    weight = jnp.exp(row_max - jnp.max(row_max, axis=2, keepdims=True))
    total = jnp.sum(weight * row_sum, axis=2)
    return jnp.sum(weight[..., None] * acc, axis=2) / total[..., None]


def gqa_cross_attention_packed_reference(qkv, k_prefix, v_prefix, prefix_lengths) -> jax.Array:
    """Plain-JAX `gqa_cross_attention_packed`: `gqa_cross_attention_reference` on the unpacked q, k and v."""
    prefix_lengths = jnp.asarray(prefix_lengths)
    _check_packed_inputs(qkv, k_prefix, v_prefix, prefix_lengths)
    q, k, v = unpack_qkv(qkv)
    return gqa_cross_attention_reference(q, k_prefix, v_prefix, prefix_lengths, k, v)


def gqa_cross_attention_reference(
    q: jax.Array,
    k_prefix: jax.Array,
    v_prefix: jax.Array,
    prefix_lengths: jax.Array,
    k_self: jax.Array,
    v_self: jax.Array,
) -> jax.Array:
    """Plain-JAX GQA cross-attention on separate q [B,T,N,H], k_self/v_self [B,T,K,H]: upstream's masked softmax over
    (valid prefix keys ++ all self keys), fp32 logits and probs in q.dtype. Returns [B,T,N,H] in q.dtype."""
    prefix_lengths = jnp.asarray(prefix_lengths)
    _check_inputs(q, k_prefix, v_prefix, prefix_lengths, k_self, v_self)
    b, t, n, h = q.shape
    s, kh = k_prefix.shape[1], k_prefix.shape[2]
    k = jnp.concatenate([k_prefix, k_self], axis=1)
    v = jnp.concatenate([v_prefix, v_self], axis=1)
    valid = jnp.concatenate(
        [jnp.arange(s)[None, :] < prefix_lengths[:, None], jnp.ones((b, t), bool)], axis=1)  # [B,S+T]
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = jnp.where(valid[:, None, None, None, :], logits, REFERENCE_MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)


def main():
    """Micro-benchmark on a GPU (`python -m pallas_kernels.gqa_cross_attention`): the packed kernel at the denoise
    step's shapes (50 action tokens, 8 q heads : 1 KV head, head_dim 256, bf16; a 576-slot prefix holding 572
    valid tokens, and 968 / 968) at the default tiles and the fast path's (128-key blocks, one stage) against the
    plain-JAX reference. 18 layers chained in one jit (each its own qkv and prefix K/V, each q nudged by the
    previous output), median of interleaved calls after warm-up, per layer."""
    import sys
    import time

    import numpy as np

    if jax.default_backend() != "gpu":
        sys.exit("pallas_kernels.gqa_cross_attention main(): a GPU micro-benchmark; JAX sees no GPU")
    layers, tokens, group, head_dim, repeats = 18, 50, 8, 256, 30
    variants = {"XLA reference": gqa_cross_attention_packed_reference,
                "Pallas, default tiles (k128, 1 stage)": functools.partial(gqa_cross_attention_packed,
                                                                           interpret=False),
                "Pallas, k64, 2 stages": functools.partial(gqa_cross_attention_packed, interpret=False,
                                                           block_sizes=BlockSizes(block_k=64, num_stages=2))}

    def chain(op):
        def run(sets, lengths):
            out = None
            for qkv, k, v in sets:
                if out is not None:
                    nudge = 1e-3 * out.reshape(1, tokens, 1, group, head_dim)
                    qkv = qkv.at[:, :, :, :group].add(nudge.astype(qkv.dtype))
                out = op(qkv, k, v, lengths)
            return out
        return jax.jit(run)

    print(f"{jax.devices()[0].device_kind}: packed GQA cross-attention, bf16, {layers} layers chained; us per layer")
    for slots, length in ((576, 572), (968, 968)):
        keys = jax.random.split(jax.random.key(slots + length), 3 * layers)
        sets = [((jax.random.normal(keys[3 * i], (1, tokens, 1, group + 2, head_dim), jnp.float32) * 0.1)
                 .astype(jnp.bfloat16),
                 (jax.random.normal(keys[3 * i + 1], (1, slots, 1, head_dim), jnp.float32) * 2).astype(jnp.bfloat16),
                 jax.random.normal(keys[3 * i + 2], (1, slots, 1, head_dim), jnp.float32).astype(jnp.bfloat16))
                for i in range(layers)]
        lengths = jnp.asarray([length], jnp.int32)
        fns = {name: chain(op) for name, op in variants.items()}
        outs = {name: np.asarray(jax.block_until_ready(fn(sets, lengths)), np.float64) for name, fn in fns.items()}
        times = {name: [] for name in fns}
        for _ in range(3 + repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(sets, lengths))
                times[name].append(time.perf_counter() - t0)
        ref = outs["XLA reference"]
        nbytes = 2 * (2 * (length + tokens) * head_dim + 2 * tokens * group * head_dim)  # K, V, q, out in bf16
        for name in fns:
            per_layer = float(np.median(times[name][3:])) / layers
            err = np.linalg.norm(outs[name] - ref) / np.linalg.norm(ref)
            print(f"  S={slots:4d} L={length:4d}  {name:24s} {per_layer * 1e6:8.1f} us  "
                  f"{nbytes / per_layer / 1e9:6.0f} GB/s  rel err vs reference {err:.1e}")


if __name__ == "__main__":
    main()
