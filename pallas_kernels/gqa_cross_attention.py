"""GQA cross-attention for the action tokens: queries over (valid prefix KV ++ their own KV), flash-decoding style.

Axis legend: B batch, T action (query) tokens, S prefix slots, N q heads, K kv heads, G group (N // K), H head dim,
R query rows of one KV head (T * G; row r is token r // G, head r % G), P prefix splits, J splits (P + 1).

pi0.5's denoise step has 50 action tokens x 8 query heads sharing one KV head (head_dim 256): per KV head that is
one [400, 256] query matrix against the prefix cache (lengths[b] valid slots at the front) plus the 50 tokens'
own K/V. With batch 1 a kernel that loops over all keys in one program per row block leaves most SMs idle, so the
key axis is split over the grid (flash decoding): grid (B, K, J, row blocks), split j < P covers prefix keys
[j*split_k, (j+1)*split_k) clipped to the row's length (splits past it load nothing), split P covers the self keys.
Each program writes its fp32 partial (accumulator, max, sum); a small plain-JAX step combines the J partials.

`BlockSizes(single_pass=True)` selects the other schedule: grid (B, K, row blocks) only; each program sweeps the
row's valid prefix keys and then the self keys with one fp32 online softmax and writes the normalized output
directly (no partials, no combine step). Small row blocks (16 or 32 of the 400 rows) keep 13-25 programs busy.

`gqa_cross_attention_packed` (the `pallas` fast path's default) takes q, k and v as one array in the fused QKV
GEMM's layout [B,T,K,G+2,H] and reads each head's [T, H] view in place (grid (B, K, J, G, token blocks), the same
kernel body); XLA then needs one elementwise fusion before it (RoPE, q scale) instead of three slicing ones.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels._tiles import pow2_at_least
from pallas_kernels.ragged_prefill_attention import (
    MIN_TILE,
    REFERENCE_MASK_VALUE,
    _is_power_of_2,
    attend_key_range,
    dot_precision,
    init_carry,
    key_block_for,
    normalize,
    tile_for,
)

COMBINES = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the GQA cross-attention kernel.

    block_rows: query rows per program, counted as (token, head) pairs of one KV head (power of 2, >= 16).
    block_k: keys per inner step (power of 2, >= 16; capped at 16 for float32 inputs).
    split_k: prefix keys per program, the flash-decoding split (a multiple of block_k); unused when single_pass.
    single_pass: one program per row block sweeps all keys and writes the final output (no split, no combine).
    num_warps / num_stages: Triton launch parameters.
    """

    block_rows: int = 64
    block_k: int = 64
    split_k: int = 128
    num_warps: int = 8  # at head_dim 256, 4 warps spill the [64, 256] fp32 accumulator (ptxas, sm_90a)
    num_stages: int = 2
    single_pass: bool = False
    # how the split partials are merged: "pallas" (`_combine_kernel`: one kernel writing the output in q's dtype) or
    # "xla" (`combine_splits` in plain JAX; XLA makes it ~3 elementwise/reduction kernels)
    combine: str = "xla"
    combine_rows: int = 16  # query rows per program of the Pallas combine
    # with a `prefetch` array (gqa_cross_attention_packed): extra split slots whose programs stream that array into
    # L2 while the attention programs run (prefetch_splits * G * token blocks * B * K programs), the rows of each of
    # their loads, and how many leading elements of each row (the last axis) they stream (0: all). A leading part of
    # every row, not all of some rows: a matmul streaming its K axis front to back then finds the first steps of
    # every program in L2 (whole rows for some programs would leave the others, and so the kernel, as slow).
    prefetch_splits: int = 4
    prefetch_rows: int = 16
    prefetch_cols: int = 0

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"BlockSizes.combine must be one of {COMBINES}; got {self.combine=}")
        if (self.prefetch_splits < 1 or not _is_power_of_2(self.prefetch_rows)
                or (self.prefetch_cols and not _is_power_of_2(self.prefetch_cols))):
            raise ValueError(f"BlockSizes needs prefetch_splits >= 1, a power-of-2 prefetch_rows and prefetch_cols 0 "
                             f"or a power of 2; got {self.prefetch_splits=}, {self.prefetch_rows=}, "
                             f"{self.prefetch_cols=}")
        for name in ("block_rows", "block_k", "combine_rows"):
            value = getattr(self, name)
            if not (_is_power_of_2(value) and value >= MIN_TILE):
                raise ValueError(f"BlockSizes.{name} must be a power of 2 >= {MIN_TILE}; got {value=}")
        if not self.single_pass and (self.split_k < self.block_k or self.split_k % self.block_k):
            raise ValueError(f"BlockSizes.split_k must be a multiple of block_k; got {self.split_k=}, {self.block_k=}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"BlockSizes needs num_warps, num_stages >= 1; got {self.num_warps=}, {self.num_stages=}")


def _cross_kernel(
    len_ref, q_ref, kp_ref, vp_ref, ks_ref, vs_ref, acc_ref, max_ref, sum_ref,
    *, prefix_len, self_len, num_prefix_splits, split_k, block_rows, block_k, block_k_self, precision,
    split_axis=2, row_axis=3, ids=None,
):  # fmt: skip
    """One (split, row block) of the flash-decoding grid; the grid axes holding them are split_axis / row_axis, or
    `ids` = (split, row block) read by the caller (program_id cannot be read inside a pl.when in interpret mode)."""
    rows_total, head_dim = q_ref.shape
    split, row_block = ids if ids is not None else (pl.program_id(split_axis), pl.program_id(row_axis))
    row_start = jnp.minimum(row_block * block_rows, rows_total - block_rows)
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


def _prefetch_into_l2(w_ref, sink_ref, program, *, rows_per_program, tile, cols, n_cols):
    """Stream columns [0, n_cols) of rows [program * rows_per_program, +rows_per_program) of w [rows, cols] through
    L2 (cached there, evicted last) and write their float32 sum to sink[program]: the sum keeps the loads alive, and
    tests check it. `cols` is n_cols rounded up to a power of 2 (the load's width)."""
    n_rows = w_ref.shape[0]
    col_ok = (jnp.arange(cols) < n_cols)[None, :]
    start = program * rows_per_program

    def step(i, acc):
        r0 = start + i * tile
        mask = ((r0 + jnp.arange(tile)) < n_rows)[:, None] & col_ok
        # (jax 0.11.2's Triton lowering cannot take a cache modifier: it checks ".cg" and then looks up "cg")
        w = plgpu_triton.load(w_ref.at[pl.ds(r0, tile), pl.ds(0, cols)], mask=mask, other=0.0,
                              eviction_policy="evict_last")
        return acc + w.astype(jnp.float32)

    acc = jax.lax.fori_loop(0, rows_per_program // tile, step, jnp.zeros((tile, cols), jnp.float32))
    plgpu_triton.store(sink_ref.at[pl.ds(program, 1)], jnp.sum(acc).reshape(1))


def _packed_kernel(len_ref, q_ref, kp_ref, vp_ref, ks_ref, vs_ref, *refs, splits, prefetch, **attention):
    """The packed grid's program: attention for split slots < splits, else (with a prefetch array) an L2 prefetch
    program; prefetch = None or (its grid shape: slots, G, token blocks; rows per program, tile, padded columns,
    columns)."""
    if prefetch is None:
        _cross_kernel(len_ref, q_ref, kp_ref, vp_ref, ks_ref, vs_ref, *refs, **attention)
        return
    w_ref, acc_ref, max_ref, sum_ref, sink_ref = refs
    (extra, g, blocks), rows_per_program, tile, cols, n_cols = prefetch
    split, row_block = pl.program_id(2), pl.program_id(4)
    bk = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)
    program = ((bk * extra + split - splits) * g + pl.program_id(3)) * blocks + row_block

    @pl.when(split < splits)
    def _():
        _cross_kernel(len_ref, q_ref, kp_ref, vp_ref, ks_ref, vs_ref, acc_ref, max_ref, sum_ref,
                      ids=(split, row_block), **attention)

    @pl.when(split >= splits)
    def _():
        _prefetch_into_l2(w_ref, sink_ref, program, rows_per_program=rows_per_program, tile=tile, cols=cols,
                          n_cols=n_cols)


def _single_pass_kernel(
    len_ref, q_ref, kp_ref, vp_ref, ks_ref, vs_ref, o_ref,
    *, prefix_len, self_len, block_rows, block_k, block_k_self, precision,
):  # fmt: skip
    rows_total, head_dim = q_ref.shape
    row_start = jnp.minimum(pl.program_id(2) * block_rows, rows_total - block_rows)  # the last block may overlap
    length = jnp.clip(len_ref[()], 0, prefix_len)
    q = q_ref[pl.ds(row_start, block_rows), :]
    carry = init_carry(block_rows, head_dim)
    carry = attend_key_range(q, kp_ref, vp_ref, carry, begin=0, end=length, block_k=block_k, precision=precision)
    carry = attend_key_range(
        q, ks_ref, vs_ref, carry, begin=0, end=jnp.int32(self_len), block_k=block_k_self, precision=precision
    )  # every row sees all self keys, so its total is positive
    acc, _, total = carry
    o_ref[pl.ds(row_start, block_rows), :] = normalize(acc, total).astype(o_ref.dtype)


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


def gqa_cross_attention(
    q: jax.Array,
    k_prefix: jax.Array,
    v_prefix: jax.Array,
    prefix_lengths: jax.Array,
    k_self: jax.Array,
    v_self: jax.Array,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    self_length: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Softmax attention of q over (valid prefix keys ++ valid self keys).

    q [B,T,N,H] (RoPE'd, pre-scaled by H**-0.5), k_prefix/v_prefix [B,S,K,H] with prefix_lengths int [B] valid slots
    at the front (clamped to [0, S]), k_self/v_self [B,T,K,H] of which the first `self_length` (None: all T) are
    valid keys (the rest: padding tokens, whose outputs the caller drops). Returns [B,T,N,H] in q.dtype.
    `interpret=None` runs Pallas interpret mode when the default backend is the CPU.
    """
    prefix_lengths = jnp.asarray(prefix_lengths)
    _check_inputs(q, k_prefix, v_prefix, prefix_lengths, k_self, v_self)
    self_length = _check_self_length(self_length, q.shape[1])
    interpret = resolve_interpret(interpret)
    if not interpret and not _is_power_of_2(q.shape[3]):
        raise ValueError(f"the Triton lowering needs a power-of-2 head dim; got {q.shape=}")
    return _gqa_cross(
        q, k_prefix, v_prefix, prefix_lengths.astype(jnp.int32), k_self, v_self,
        block_sizes=block_sizes, self_length=self_length, interpret=interpret,
    )  # fmt: skip


def _check_self_length(self_length: int | None, t: int) -> int:
    """self_length as an int in [1, T] (None: T)."""
    if self_length is None:
        return t
    if not 1 <= int(self_length) <= t:
        raise ValueError(f"self_length must be in [1, T={t}] (valid self keys); got {self_length=}")
    return int(self_length)


def _pad_axis1(x, size):
    return x if x.shape[1] >= size else jnp.pad(x, ((0, 0), (0, size - x.shape[1]), (0, 0), (0, 0)))


@functools.partial(jax.jit, static_argnames=("block_sizes", "self_length", "interpret"))
def _gqa_cross(q, k_prefix, v_prefix, prefix_lengths, k_self, v_self, *, block_sizes: BlockSizes, self_length: int,
               interpret: bool):
    b, t, n, h = q.shape
    s, kh = k_prefix.shape[1], k_prefix.shape[2]
    g = n // kh
    rows = t * g
    block_rows = tile_for(rows, block_sizes.block_rows)
    block_k = tile_for(s, key_block_for(q.dtype, block_sizes.block_k))
    split_k = max(block_sizes.split_k // block_k * block_k, block_k)
    block_k_self = tile_for(t, key_block_for(q.dtype, block_sizes.block_k))
    num_prefix_splits = pl.cdiv(s, split_k)

    # [B,T,K,G,H] -> [B,K,T*G,H]; a bitcast when K == 1. Pads below only trigger for inputs smaller than one tile.
    qr = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    if rows < block_rows:
        qr = jnp.pad(qr, ((0, 0), (0, 0), (0, block_rows - rows), (0, 0)))
    k_prefix, v_prefix = _pad_axis1(k_prefix, block_k), _pad_axis1(v_prefix, block_k)
    k_self, v_self = _pad_axis1(k_self, block_k_self), _pad_axis1(v_self, block_k_self)
    rows_padded = qr.shape[2]
    if block_sizes.single_pass:
        out = _single_pass_call(
            prefix_lengths, qr, k_prefix, v_prefix, k_self, v_self, prefix_len=s, self_len=self_length,
            block_rows=block_rows,
            block_k=block_k, block_k_self=block_k_self, block_sizes=block_sizes, interpret=interpret,
        )[:, :, :rows]  # fmt: skip
        return out.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
    splits = num_prefix_splits + 1

    kernel = functools.partial(
        _cross_kernel,
        prefix_len=s,
        self_len=self_length,
        num_prefix_splits=num_prefix_splits,
        split_k=split_k,
        block_rows=block_rows,
        block_k=block_k,
        block_k_self=block_k_self,
        precision=dot_precision(q.dtype),
    )
    grid = (b, kh, splits, pl.cdiv(rows_padded, block_rows))
    acc, row_max, row_sum = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((b, kh, splits, rows_padded, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, rows_padded), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, rows_padded), jnp.float32),
        ),
        grid=grid,
        in_specs=[
            pl.BlockSpec((None,), lambda bi, ki, ji, ri: (bi,)),
            pl.BlockSpec((None, None, rows_padded, h), lambda bi, ki, ji, ri: (bi, ki, 0, 0)),
            pl.BlockSpec((None, k_prefix.shape[1], None, h), lambda bi, ki, ji, ri: (bi, 0, ki, 0)),
            pl.BlockSpec((None, k_prefix.shape[1], None, h), lambda bi, ki, ji, ri: (bi, 0, ki, 0)),
            pl.BlockSpec((None, k_self.shape[1], None, h), lambda bi, ki, ji, ri: (bi, 0, ki, 0)),
            pl.BlockSpec((None, k_self.shape[1], None, h), lambda bi, ki, ji, ri: (bi, 0, ki, 0)),
        ],
        out_specs=(
            pl.BlockSpec((None, None, None, rows_padded, h), lambda bi, ki, ji, ri: (bi, ki, ji, 0, 0)),
            pl.BlockSpec((None, None, None, rows_padded), lambda bi, ki, ji, ri: (bi, ki, ji, 0)),
            pl.BlockSpec((None, None, None, rows_padded), lambda bi, ki, ji, ri: (bi, ki, ji, 0)),
        ),
        compiler_params=plgpu_triton.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="gqa_cross_attention",
    )(prefix_lengths, qr, k_prefix, v_prefix, k_self, v_self)

    if block_sizes.combine == "pallas":
        out = _combine_call(acc, row_max, row_sum, q.dtype, block_sizes.combine_rows, interpret)[:, :, :rows]
    else:
        out = combine_splits(acc, row_max, row_sum)[:, :, :rows]  # [B,K,R,H] float32
    return out.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(q.dtype)


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


def gqa_cross_attention_packed(
    qkv: jax.Array,
    k_prefix: jax.Array,
    v_prefix: jax.Array,
    prefix_lengths: jax.Array,
    *,
    prefetch: jax.Array | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    self_length: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """`gqa_cross_attention` with the action tokens' q, k and v in one packed array, read in place (self_length:
    the valid self keys, as there).

    qkv [B,T,K,G+2,H]: per KV head, G query heads (RoPE'd, pre-scaled by H**-0.5), then k (RoPE'd), then v: the
    output layout of the expert's fused QKV GEMM, so the XLA op before the kernel is one elementwise fusion (RoPE and
    the q scale) instead of three (q, k and v sliced out separately). The grid is (B, K, J, G, token blocks): one
    program per (split, query head, block of tokens), q read as a strided [tokens, H] view of its head; the splits
    are combined as in `gqa_cross_attention` (block_sizes.combine). block_rows counts tokens of one head here.
    Returns [B,T,K*G,H] in qkv.dtype. `interpret=None` runs Pallas interpret mode when the backend is the CPU.

    `prefetch` (any array, e.g. the weight the layer reads next): block_sizes.prefetch_splits more split slots of
    the grid stream it (or the first prefetch_cols of each row along its last axis) through L2 while the attention
    programs run (the attention uses few of the SMs and little bandwidth), so the next kernel finds it in L2 instead
    of HBM. It does not change the result.
    """
    prefix_lengths = jnp.asarray(prefix_lengths)
    _check_packed_inputs(qkv, k_prefix, v_prefix, prefix_lengths)
    if prefetch is not None and prefetch.ndim < 1:
        raise ValueError(f"prefetch must be an array with at least one axis; got {prefetch.shape=}")
    if block_sizes.single_pass:
        raise ValueError("gqa_cross_attention_packed runs the flash-decoding split only; got "
                         f"{block_sizes.single_pass=}")
    interpret = resolve_interpret(interpret)
    if not interpret and not _is_power_of_2(qkv.shape[4]):
        raise ValueError(f"the Triton lowering needs a power-of-2 head dim; got {qkv.shape=}")
    return _gqa_cross_packed(qkv, k_prefix, v_prefix, prefix_lengths.astype(jnp.int32), prefetch,
                             block_sizes=block_sizes, self_length=_check_self_length(self_length, qkv.shape[1]),
                             interpret=interpret)[0]


@functools.partial(jax.jit, static_argnames=("block_sizes", "self_length", "interpret"))
def _gqa_cross_packed(qkv, k_prefix, v_prefix, prefix_lengths, prefetch=None, *, block_sizes: BlockSizes,
                      self_length: int | None = None, interpret: bool):
    """(the attention output, the prefetch programs' sums [programs] or None)."""
    b, t, kh, g2, h = qkv.shape
    g = g2 - 2
    s = k_prefix.shape[1]
    block_k = tile_for(s, key_block_for(qkv.dtype, block_sizes.block_k))
    split_k = max(block_sizes.split_k // block_k * block_k, block_k)
    num_prefix_splits = pl.cdiv(s, split_k)
    splits = num_prefix_splits + 1
    # Pads only trigger for inputs smaller than one tile (tests; pi0.5 has T = 50, S >= 64).
    qkv = _pad_axis1(qkv.reshape(b, t, kh * g2, h), MIN_TILE).reshape(b, -1, kh, g2, h)
    k_prefix, v_prefix = _pad_axis1(k_prefix, block_k), _pad_axis1(v_prefix, block_k)
    tp = qkv.shape[1]
    block_rows = tile_for(tp, block_sizes.block_rows)
    block_k_self = tile_for(tp, key_block_for(qkv.dtype, block_sizes.block_k))

    blocks = pl.cdiv(tp, block_rows)
    extra, prefetch_spec, operands = 0, None, []
    in_specs = [
        pl.BlockSpec((None,), lambda bi, ki, ji, gi, ri: (bi,)),
        pl.BlockSpec((None, tp, None, None, h), lambda bi, ki, ji, gi, ri: (bi, 0, ki, gi, 0)),  # q of head gi
        pl.BlockSpec((None, k_prefix.shape[1], None, h), lambda bi, ki, ji, gi, ri: (bi, 0, ki, 0)),
        pl.BlockSpec((None, k_prefix.shape[1], None, h), lambda bi, ki, ji, gi, ri: (bi, 0, ki, 0)),
        pl.BlockSpec((None, tp, None, None, h), lambda bi, ki, ji, gi, ri: (bi, 0, ki, g, 0)),  # k_self
        pl.BlockSpec((None, tp, None, None, h), lambda bi, ki, ji, gi, ri: (bi, 0, ki, g + 1, 0)),  # v_self
    ]
    if prefetch is not None:
        extra = block_sizes.prefetch_splits
        w = prefetch.reshape(-1, prefetch.shape[-1])
        programs = b * kh * extra * g * blocks
        tile = min(block_sizes.prefetch_rows, pow2_at_least(pl.cdiv(w.shape[0], programs), 1))
        rows_per_program = pl.cdiv(pl.cdiv(w.shape[0], programs), tile) * tile
        n_cols = min(block_sizes.prefetch_cols or w.shape[1], w.shape[1])
        prefetch_spec = ((extra, g, blocks), rows_per_program, tile, pow2_at_least(n_cols, 16), n_cols)
        operands = [w]
        in_specs.append(pl.BlockSpec(w.shape, lambda bi, ki, ji, gi, ri: (0, 0)))
    kernel = functools.partial(
        _packed_kernel, splits=splits, prefetch=prefetch_spec, prefix_len=s, self_len=self_length or t,
        num_prefix_splits=num_prefix_splits, split_k=split_k, block_rows=block_rows, block_k=block_k,
        block_k_self=block_k_self, precision=dot_precision(qkv.dtype), split_axis=2, row_axis=4,
    )  # fmt: skip
    last = splits - 1  # prefetch slots (ji >= splits) map to the last split's blocks and write none of them
    out_shape = [
        jax.ShapeDtypeStruct((b, kh, splits, tp, g, h), jnp.float32),
        jax.ShapeDtypeStruct((b, kh, splits, tp, g), jnp.float32),
        jax.ShapeDtypeStruct((b, kh, splits, tp, g), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, tp, None, h),
                     lambda bi, ki, ji, gi, ri: (bi, ki, jnp.minimum(ji, last), 0, gi, 0)),
        pl.BlockSpec((None, None, None, tp, None), lambda bi, ki, ji, gi, ri: (bi, ki, jnp.minimum(ji, last), 0, gi)),
        pl.BlockSpec((None, None, None, tp, None), lambda bi, ki, ji, gi, ri: (bi, ki, jnp.minimum(ji, last), 0, gi)),
    ]
    if prefetch is not None:
        out_shape.append(jax.ShapeDtypeStruct((programs,), jnp.float32))
        out_specs.append(pl.BlockSpec((programs,), lambda bi, ki, ji, gi, ri: (0,)))
    acc, row_max, row_sum, *sink = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(b, kh, splits + extra, g, blocks),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        compiler_params=plgpu_triton.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="gqa_cross_attention_packed",
    )(prefix_lengths, qkv, k_prefix, v_prefix, qkv, qkv, *operands)

    rows = tp * g  # [.., T, G, ..] is the row layout [.., R, ..] with r = t * G + g: a free reshape
    acc, row_max, row_sum = acc.reshape(b, kh, splits, rows, h), *(a.reshape(b, kh, splits, rows)
                                                                   for a in (row_max, row_sum))
    if block_sizes.combine == "pallas":
        out = _combine_call(acc, row_max, row_sum, qkv.dtype, block_sizes.combine_rows, interpret)
    else:
        out = combine_splits(acc, row_max, row_sum)
    out = out.reshape(b, kh, tp, g, h)[:, :, :t].transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, kh * g, h).astype(qkv.dtype), (sink[0] if sink else None)


def gqa_cross_attention_packed_reference(qkv, k_prefix, v_prefix, prefix_lengths,
                                         self_length: int | None = None) -> jax.Array:
    """Plain-JAX `gqa_cross_attention_packed`: `gqa_cross_attention_reference` on the unpacked q, k and v."""
    prefix_lengths = jnp.asarray(prefix_lengths)
    _check_packed_inputs(qkv, k_prefix, v_prefix, prefix_lengths)
    q, k, v = unpack_qkv(qkv)
    return gqa_cross_attention_reference(q, k_prefix, v_prefix, prefix_lengths, k, v, self_length=self_length)


def _combine_kernel(acc_ref, max_ref, sum_ref, o_ref, *, splits, block):
    """`combine_splits` for one block of rows: the J partials merged with their softmax weights, in one pass."""
    rows_total = o_ref.shape[0]
    row_start = jnp.minimum(pl.program_id(2) * block, rows_total - block)  # the last block ends at the edge
    rows = pl.ds(row_start, block)
    maxes = [max_ref[j, rows] for j in range(splits)]
    top = maxes[0]
    for m in maxes[1:]:
        top = jnp.maximum(top, m)
    total = jnp.zeros_like(top)
    out = jnp.zeros((block, o_ref.shape[1]), jnp.float32)
    for j in range(splits):
        weight = jnp.exp(maxes[j] - top)
        total += weight * sum_ref[j, rows]
        out += weight[:, None] * acc_ref[j, rows, :]
    o_ref[rows, :] = (out / total[:, None]).astype(o_ref.dtype)


def _combine_call(acc, row_max, row_sum, dtype, combine_rows, interpret):
    """acc [B,K,J,R,H], row_max / row_sum [B,K,J,R] float32 -> [B,K,R,H] in `dtype` (`combine_splits`, one kernel)."""
    b, kh, splits, rows, h = acc.shape
    block = tile_for(rows, combine_rows)
    kernel = functools.partial(_combine_kernel, splits=splits, block=block)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, kh, rows, h), dtype),
        grid=(b, kh, pl.cdiv(rows, block)),
        in_specs=[
            pl.BlockSpec((None, None, splits, rows, h), lambda bi, ki, ri: (bi, ki, 0, 0, 0)),
            pl.BlockSpec((None, None, splits, rows), lambda bi, ki, ri: (bi, ki, 0, 0)),
            pl.BlockSpec((None, None, splits, rows), lambda bi, ki, ri: (bi, ki, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, rows, h), lambda bi, ki, ri: (bi, ki, 0, 0)),
        compiler_params=plgpu_triton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="gqa_cross_attention_combine",
    )(acc, row_max, row_sum)


def _single_pass_call(
    prefix_lengths, qr, k_prefix, v_prefix, k_self, v_self,
    *, prefix_len, self_len, block_rows, block_k, block_k_self, block_sizes: BlockSizes, interpret: bool,
):  # fmt: skip
    """The single-pass pallas_call on the row layout: qr [B,K,R,H] -> [B,K,R,H] in qr.dtype."""
    b, kh, rows_padded, h = qr.shape
    kernel = functools.partial(
        _single_pass_kernel,
        prefix_len=prefix_len,
        self_len=self_len,
        block_rows=block_rows,
        block_k=block_k,
        block_k_self=block_k_self,
        precision=dot_precision(qr.dtype),
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, kh, rows_padded, h), qr.dtype),
        grid=(b, kh, pl.cdiv(rows_padded, block_rows)),
        in_specs=[
            pl.BlockSpec((None,), lambda bi, ki, ri: (bi,)),
            pl.BlockSpec((None, None, rows_padded, h), lambda bi, ki, ri: (bi, ki, 0, 0)),
            pl.BlockSpec((None, k_prefix.shape[1], None, h), lambda bi, ki, ri: (bi, 0, ki, 0)),
            pl.BlockSpec((None, k_prefix.shape[1], None, h), lambda bi, ki, ri: (bi, 0, ki, 0)),
            pl.BlockSpec((None, k_self.shape[1], None, h), lambda bi, ki, ri: (bi, 0, ki, 0)),
            pl.BlockSpec((None, k_self.shape[1], None, h), lambda bi, ki, ri: (bi, 0, ki, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, rows_padded, h), lambda bi, ki, ri: (bi, ki, 0, 0)),
        compiler_params=plgpu_triton.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="gqa_cross_attention_single_pass",
    )(prefix_lengths, qr, k_prefix, v_prefix, k_self, v_self)


def combine_splits(acc, row_max, row_sum):
    """Merge flash-decoding partials over axis 2: acc [B,K,J,R,H], row_max and row_sum [B,K,J,R] -> [B,K,R,H] f32.

    Splits that saw no key carry (acc 0, max = mask value, sum 0) and get weight exp(mask - max) == 0; the self
    split always has keys, so every row's total is positive.
    """
    weight = jnp.exp(row_max - jnp.max(row_max, axis=2, keepdims=True))
    total = jnp.sum(weight * row_sum, axis=2)
    return jnp.sum(weight[..., None] * acc, axis=2) / total[..., None]


def gqa_cross_attention_reference(
    q: jax.Array,
    k_prefix: jax.Array,
    v_prefix: jax.Array,
    prefix_lengths: jax.Array,
    k_self: jax.Array,
    v_self: jax.Array,
    self_length: int | None = None,
) -> jax.Array:
    """Plain-JAX GQA cross-attention: upstream's masked softmax over (prefix ++ self) keys, fp32 logits and probs
    in q.dtype. Same arguments and result as `gqa_cross_attention`."""
    prefix_lengths = jnp.asarray(prefix_lengths)
    _check_inputs(q, k_prefix, v_prefix, prefix_lengths, k_self, v_self)
    b, t, n, h = q.shape
    s, kh = k_prefix.shape[1], k_prefix.shape[2]
    self_length = _check_self_length(self_length, t)
    k = jnp.concatenate([k_prefix, k_self], axis=1)
    v = jnp.concatenate([v_prefix, v_self], axis=1)
    valid = jnp.concatenate(
        [jnp.arange(s)[None, :] < prefix_lengths[:, None], jnp.broadcast_to(jnp.arange(t) < self_length, (b, t))],
        axis=1)  # [B,S+T]
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = jnp.where(valid[:, None, None, None, :], logits, REFERENCE_MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
