"""Which pieces of the fused expert layer (pi05_jax.denoise_fused) run as Pallas kernels, and their tiles.

A module of its own, importing no model code, so `pi05_jax.fast_path` can build its registered implementations at
import time whichever pi05_jax module a program imports first (denoise_fused imports the sampler, whose import
registers the fast paths).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.ada_norm_matmul import AdaNormMatmulBlockSizes
from pallas_kernels.matmul_gated_residual import GatedResidualBlockSizes

PIECES = ("pallas", "xla")


@dataclasses.dataclass(frozen=True)
class FusedExpertOptions:
    """Which pieces of the expert layer run as the fused Pallas kernels ("pallas") or as XLA ops ("xla": the same
    ops denoise_fast runs, on the float32 residual stream), and the kernels' tiles.

    qkv: adaRMS norm + QKV GEMM + RoPE (ada_norm_matmul_rope); mlp_in: adaRMS norm + gate/up GEMM + GeGLU
    (ada_norm_matmul_geglu); residual: the out and down projections with their gated residual adds
    (matmul_gated_residual)."""

    qkv: str = "pallas"
    mlp_in: str = "pallas"
    residual: str = "pallas"
    # tiles: the best of scripts/gpu_fused_expert.py's micro-benchmark (H200, docs/PERF.md)
    qkv_blocks: AdaNormMatmulBlockSizes = dataclasses.field(
        default_factory=lambda: AdaNormMatmulBlockSizes(block_n=32))
    mlp_in_blocks: AdaNormMatmulBlockSizes = dataclasses.field(
        default_factory=lambda: AdaNormMatmulBlockSizes(block_n=32, block_k=64))
    out_blocks: GatedResidualBlockSizes = dataclasses.field(
        default_factory=lambda: GatedResidualBlockSizes(block_n=32, k_splits=8))
    down_blocks: GatedResidualBlockSizes = dataclasses.field(
        default_factory=lambda: GatedResidualBlockSizes(block_n=32, k_splits=4))

    def __post_init__(self):
        for name in ("qkv", "mlp_in", "residual"):
            if getattr(self, name) not in PIECES:
                raise ValueError(f"{name} must be one of {PIECES}, got {name}={getattr(self, name)!r}")

