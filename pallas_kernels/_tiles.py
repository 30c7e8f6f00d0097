"""Tile-size helpers shared by the Triton-lowered matmul kernels (skinny_matmul.geglu_matmul, fp4_matmul)."""

from __future__ import annotations


def pow2_at_least(v: int, lo: int) -> int:
    """The smallest power of two >= max(v, lo) (lo a power of two)."""
    p = lo
    while p < v:
        p *= 2
    return p


def check_pow2_fields(tiles, names: tuple[str, ...], minimum: int = 16) -> None:
    """ValueError naming the first of `names` on the dataclass `tiles` that is not a power of two >= minimum."""
    for name in names:
        v = getattr(tiles, name)
        if v < minimum or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= {minimum}, got {name}={v}")


def triton_params(tiles):
    """Triton launch parameters (num_warps, num_stages) of a block-sizes dataclass."""
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
