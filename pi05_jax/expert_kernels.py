"""The action expert's matmuls on our kernels: what `fast_path.expert_matmuls` plugs into denoise_fast's layer.

Axis legend: B batch, T action tokens, D width, F mlp dim, N q heads, K kv heads, C q/k/v slots (G+2), H head dim,
S K splits.

Both read the transposed copies that `pi05_jax.weight_packing` makes once per checkpoint (`gating_einsum_t`, and
the `*_t` projection weights); a layer without them (quantized weights, packing off) runs XLA's einsums.
- Pallas Triton (`pallas_kernels.skinny_matmul`): the GeGLU matmul and split-K projections.
- Mosaic GPU with Programmatic Dependent Launch (`pallas_kernels.pdl_matmul`), where selected: each kernel loads its
  weight slab into shared memory before waiting for the kernel that produces its input. bfloat16 only: in float32,
  or where no tiles fit, the Triton kernel runs instead.
A projection's product is either reduced here (XLA fuses the split sum into its consumer) or handed on unreduced as
`SplitPartials` to the fused residual + norm kernel (`pallas_residual_norm`).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from pallas_kernels import pdl_matmul
from pallas_kernels.residual_norm import ResidualNormBlockSizes, gated_residual_norm
from pallas_kernels.skinny_matmul import SkinnyBlockSizes, geglu_matmul, skinny_matmul
from pi05_jax import gemma
from pi05_jax.weights import weight_einsum

DEFAULT_GEGLU_TILES = SkinnyBlockSizes()


def _xla_ops():
    """pi05_jax.denoise_fast, whose XLA ops are the fallbacks here. Imported when first needed: denoise_fast imports
    the sampler, whose registry imports fast_path, which imports this module (tests/test_imports.py)."""
    from pi05_jax import denoise_fast

    return denoise_fast


@dataclasses.dataclass(frozen=True)
class ProjectionSplits:
    """(K splits, block_n) of each expert projection's split-K matmul. The defaults are the fastest of
    scripts/gpu_skinny_matmul.py at M = 50 on the H200 (the Triton skinny_matmul, each projection alone)."""

    qkv: tuple[int, int] = (4, 64)
    attn_out: tuple[int, int] = (2, 32)
    down: tuple[int, int] = (8, 64)

    def __post_init__(self):
        for name in ("qkv", "attn_out", "down"):
            splits, block_n = getattr(self, name)
            if splits < 1 or block_n < 16 or block_n & (block_n - 1):
                raise ValueError(f"ProjectionSplits.{name} must be (splits >= 1, block_n a power of two >= 16); "
                                 f"got {name}={getattr(self, name)}")


DEFAULT_PROJECTION_SPLITS = ProjectionSplits()
# The PDL kernels hold each program's whole weight slab in shared memory, about one wave of programs at the full
# expert's shapes: QKV 40 x 4 programs (32 KiB slabs), attention out 16 x 8 (32 KiB), down 32 x 8 (32 KiB). The down
# projection's programs are sized to start early beside the GeGLU's (each of those takes ~148 KiB of an SM's 228):
# 72 KiB (slab, 4 x tiles in flight, output tile) fits next to one, a 64-column tile (112 KiB) would not. Not yet
# measured on a card (docs/PERF.md).
PDL_PROJECTION_SPLITS = ProjectionSplits(qkv=(4, 64), attn_out=(8, 64), down=(8, 32))
PDL_GEGLU_BLOCK_N = 32  # 128 programs of 128 KiB for gate/up 1024 x 2 x 4096


@dataclasses.dataclass(frozen=True)
class SplitPartials:
    """A projection's product left unreduced: float32 split-K partial sums [S, B*T, N] of a [B, T, N] product in
    `dtype`. Only `pallas_residual_norm` reads it (it sums the splits inside its kernel)."""

    parts: jnp.ndarray
    shape: tuple[int, ...]
    dtype: jnp.dtype


def _finish(parts, shape, dtype, reduce: bool):
    """Split-K partials -> the product in `dtype` (XLA fuses the sum and rounding into the consumer), or left as
    SplitPartials for the fused residual + norm kernel."""
    if not reduce:
        return SplitPartials(parts, shape, dtype)
    return parts.sum(0).astype(dtype).reshape(shape)


def _skinny(x, w_t, split: tuple[int, int], *, reduce: bool = True):
    """x [..., K] @ w_t [N, K]^T in x's dtype through the Triton skinny_matmul (K split)."""
    (splits, block_n), lead, k = split, x.shape[:-1], x.shape[-1]
    while splits > 1 and (k % splits or k // splits < 16):  # small models (the tiny config): fewer splits
        splits //= 2
    parts = skinny_matmul(x.reshape(-1, k), w_t.reshape(-1, k).astype(x.dtype), k_splits=splits,
                          block_sizes=SkinnyBlockSizes(block_n=block_n))
    return _finish(parts, (*lead, *w_t.shape[:-1]), x.dtype, reduce)


def _pdl_ready(x, w) -> bool:
    """Whether the wgmma kernels can take these operands here: bfloat16 activations and a stored bfloat16 weight
    array, on a backend they run on (pdl_matmul.runs_here: Hopper, or the CPU in interpret mode). Stored, not
    converted here: a PDL kernel reads its weight before waiting for the kernels before it, which is safe only for
    buffers nothing in the executable writes (its parameters), not for a cast made inside the jit."""
    return (x.dtype == jnp.bfloat16 and getattr(w, "dtype", None) == jnp.bfloat16 and pdl_matmul.runs_here())


def _pdl_project(x, w_t, split: tuple[int, int], lead: tuple[int, ...], *, pdl: bool, reduce: bool = True):
    """x [R, K] @ w_t [N..., K]^T through the Mosaic GPU pdl_matmul, for a product of shape (*lead, N...): R may
    exceed prod(lead) by zero padding rows (a PDL GeGLU's output), sliced off here. None where the kernel cannot run
    (float32, or no tiles fit)."""
    if not _pdl_ready(x, w_t):
        return None
    k = x.shape[-1]
    w2 = w_t.reshape(-1, k)
    bs = pdl_matmul.fit_block_sizes(k, w2.shape[0], k_splits=split[0], block_n=split[1], pdl=pdl)
    if bs is None:
        return None
    parts = pdl_matmul.pdl_matmul(x, w2, k_splits=bs.k_splits, block_sizes=bs)
    return _finish(parts[:, :math.prod(lead)], (*lead, *w_t.shape[:-1]), x.dtype, reduce)


def _project(x, w_t, split, pdl_split, *, reduce: bool, mosaic: bool, pdl: bool):
    """x [..., K] @ w_t [N..., K]^T: the Mosaic GPU PDL kernel if asked and it can run, else the Triton one."""
    lead = x.shape[:-1]
    y = _pdl_project(x.reshape(-1, x.shape[-1]), w_t, pdl_split, lead, pdl=pdl, reduce=reduce) if mosaic else None
    return _skinny(x, w_t, split, reduce=reduce) if y is None else y


def _geglu(h, w_t, geglu_tiles: SkinnyBlockSizes, *, mosaic: bool, pdl: bool):
    """gelu(h W_gate) * (h W_up) on the transposed gating weight [2, F, D], as [R, F] with R >= B*T rows:
    pdl_geglu_matmul if asked and it can run (its 64-row padding kept: the rows past B*T are zero), else the
    Triton geglu_matmul (R = B*T)."""
    b, t, d = h.shape
    if mosaic and _pdl_ready(h, w_t):
        bs = pdl_matmul.fit_block_sizes(d, w_t.shape[1], k_splits=1, block_n=PDL_GEGLU_BLOCK_N, groups=2, pdl=pdl)
        if bs is not None:
            return pdl_matmul.pdl_geglu_matmul(h.reshape(b * t, d), w_t, block_sizes=bs, padded_rows=True)
    return geglu_matmul(h.reshape(b * t, d), w_t.astype(h.dtype), block_sizes=geglu_tiles)


def pallas_expert_mlp(h, mlp, geglu_tiles: SkinnyBlockSizes = DEFAULT_GEGLU_TILES, *, reduce: bool = True,
                      splits: ProjectionSplits = DEFAULT_PROJECTION_SPLITS, mosaic_geglu: bool = False,
                      mosaic_down: bool = False, pdl_splits: ProjectionSplits = PDL_PROJECTION_SPLITS,
                      pdl: bool = True):
    """gemma.feed_forward on our kernels where the layer holds transposed weights (weight_packing): the gate/up +
    GeGLU on `gating_einsum_t` and the down projection on `linear_t` (reduce=False: its SplitPartials), each through
    the Mosaic GPU PDL kernel when asked (mosaic_geglu / mosaic_down; the GeGLU's padded rows go straight into the
    down kernel) and the Triton kernel otherwise; XLA's einsums for whatever is not transposed (e.g. quantized)."""
    b, t, _ = h.shape
    w_t = mlp.get("gating_einsum_t")
    if w_t is None:
        if "linear_t" not in mlp:
            return gemma.feed_forward(h, mlp)
        gate, up = weight_einsum("BTD,CDF->CBTF", h, mlp["gating_einsum"])
        hidden = (gemma.gelu_tanh(gate) * up).reshape(b * t, -1)
    else:
        hidden = _geglu(h, w_t, geglu_tiles, mosaic=mosaic_geglu, pdl=pdl)  # [R >= B*T, F]
    if "linear_t" in mlp:
        w_down = mlp["linear_t"]
        y = _pdl_project(hidden, w_down, pdl_splits.down, (b, t), pdl=pdl, reduce=reduce) if mosaic_down else None
        if y is not None:
            return y
        return _skinny(hidden[:b * t].reshape(b, t, -1), w_down, splits.down, reduce=reduce)
    return weight_einsum("BTF,FD->BTD", hidden[:b * t].reshape(b, t, -1), mlp["linear"])


def pallas_qkv_rotated(h, attn, positions, *, splits: ProjectionSplits = DEFAULT_PROJECTION_SPLITS,
                       mosaic: bool = False, pdl_splits: ProjectionSplits = PDL_PROJECTION_SPLITS, pdl: bool = True):
    """The fused QKV projection on `qkv_einsum_1_t` [K, C, H, D] (Mosaic GPU PDL kernel if `mosaic`, else Triton),
    RoPE and the q scale applied ([B,T,K,C,H]); XLA's GEMM where the weight is not transposed."""
    w_t = attn.get("qkv_einsum_1_t")
    if w_t is None:
        return _xla_ops().xla_qkv_rotated(h, attn, positions)
    y = _project(h, w_t["w"], splits.qkv, pdl_splits.qkv, reduce=True, mosaic=mosaic, pdl=pdl)
    return gemma.rotate_packed_qkv(y, positions)


def pallas_attn_out(o, attn, *, reduce: bool = True, splits: ProjectionSplits = DEFAULT_PROJECTION_SPLITS,
                    mosaic: bool = False, pdl_splits: ProjectionSplits = PDL_PROJECTION_SPLITS, pdl: bool = True):
    """o [B,T,N,H] @ the attention-out weight stored transposed, `attn_vec_einsum_1_t` [D, N*H] (Mosaic GPU PDL
    kernel if `mosaic`, else Triton); XLA's einsum where the weight is not transposed."""
    w_t = attn.get("attn_vec_einsum_1_t")
    if w_t is None:
        return _xla_ops().xla_attn_out(o, attn)
    b, t = o.shape[:2]
    return _project(o.reshape(b, t, -1), w_t["w"], splits.attn_out, pdl_splits.attn_out, reduce=reduce,
                    mosaic=mosaic, pdl=pdl)


def pallas_residual_norm(x, y, gate, scale, shift, tiles: ResidualNormBlockSizes | None = None):
    """_xla_ops().xla_residual_norm as one kernel (pallas_kernels.residual_norm.gated_residual_norm): y is a
    projection's SplitPartials (summed in the kernel) or its [B,T,D] product (one split). Modulations that are not
    one row per width (per-batch tables) take XLA's ops."""
    b, t, d = x.shape
    if gate.size != d or scale.size != d or shift.size != d:
        y = y.parts.sum(0).astype(y.dtype).reshape(y.shape) if isinstance(y, SplitPartials) else y
        return _xla_ops().xla_residual_norm(x, y, gate, scale, shift)
    parts = y.parts if isinstance(y, SplitPartials) else y.astype(jnp.float32).reshape(1, b * t, d)
    x_new, h = gated_residual_norm(parts, x.reshape(b * t, d), gate, scale, shift, block_sizes=tiles)
    return x_new.reshape(b, t, d), h.reshape(b, t, d)
