"""SigLIP's weights as the vision engines read them: every size from the shapes of `params["PaliGemma"]["img"]`,
one layer's slice of the stacked `Transformer/encoderblock` leaves, and the static spec (image count, sizes,
precision) an exported graph or engine file is built for. numpy only: engine files can be written without onnx.

Axis legend: V images, P patches, D width, N heads, H head dim, F mlp dim, O LLM width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

INPUT_NAME = "images"
OUTPUT_NAME = "image_tokens"
# Graph precision -> the dtype of the transformer body and of the output.
GRAPH_DTYPES: dict[str, np.dtype] = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16),
                                     "fp8": np.dtype(np.float16)}


class ExportError(ValueError):
    """The params do not describe a SigLIP tower this exporter understands (the message names the key)."""


@dataclasses.dataclass(frozen=True)
class VisionGraphSpec:
    """Everything about one exported graph that a consumer (an engine, the bridge) must agree on."""

    views: int
    precision: str  # "fp32" | "fp16" | "fp8"
    image_size: int
    patch_size: int
    num_patches: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    out_width: int

    def __post_init__(self):
        if self.precision not in GRAPH_DTYPES:
            raise ExportError(f"precision must be one of {sorted(GRAPH_DTYPES)}, got {self.precision=}")
        if self.views < 1:
            raise ExportError(f"views must be >= 1, got {self.views=}")
        grid = self.image_size // self.patch_size
        if grid * grid != self.num_patches or grid * self.patch_size != self.image_size:
            raise ExportError(f"{self.image_size=} with {self.patch_size=} does not give {self.num_patches=} patches")
        if self.width % self.num_heads:
            raise ExportError(f"width must be a multiple of num_heads: {self.width=} {self.num_heads=}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.views, self.image_size, self.image_size, 3)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.views, self.num_patches, self.out_width)

    @property
    def output_dtype(self) -> np.dtype:
        return GRAPH_DTYPES[self.precision]


def leaf(img_params: Mapping, path: str, rank: int) -> np.ndarray:
    """`params["PaliGemma"]["img"][path]` as float32, rank-checked; ExportError names a missing key."""
    node = img_params
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise ExportError(f"vision params have no key 'PaliGemma/img/{path}' (missing {part!r})")
        node = node[part]
    arr = np.asarray(node, dtype=np.float32)
    if arr.ndim != rank:
        raise ExportError(f"'PaliGemma/img/{path}' has shape {arr.shape}, expected rank {rank}")
    return arr


def spec_from_params(img_params: Mapping, *, views: int, precision: str = "fp32",
                     image_size: int = 224) -> VisionGraphSpec:
    """Read every size from the weights' shapes (nothing hard-coded: the tiny and the full tower both work)."""
    p, p2, c, width = leaf(img_params, "embedding/kernel", 4).shape
    if p != p2 or c != 3:
        raise ExportError(f"'PaliGemma/img/embedding/kernel' has shape {(p, p2, c, width)}, expected [p, p, 3, D]")
    _, num_patches, _ = leaf(img_params, "pos_embedding", 3).shape
    block = "Transformer/encoderblock"
    depth, _, num_heads, _ = leaf(img_params, f"{block}/MultiHeadDotProductAttention_0/query/kernel", 4).shape
    _, _, mlp_dim = leaf(img_params, f"{block}/MlpBlock_0/Dense_0/kernel", 3).shape
    _, out_width = leaf(img_params, "head/kernel", 2).shape
    return VisionGraphSpec(views=views, precision=precision, image_size=image_size, patch_size=p,
                           num_patches=num_patches, width=width, depth=depth, num_heads=num_heads,
                           mlp_dim=mlp_dim, out_width=out_width)


def block_params(img_params: Mapping, spec: VisionGraphSpec, layer: int) -> dict[str, np.ndarray]:
    """One layer's slice of the stacked `Transformer/encoderblock` leaves, keyed by their path below it."""
    block = "Transformer/encoderblock"
    ranks = {"LayerNorm_0/scale": 2, "LayerNorm_0/bias": 2, "LayerNorm_1/scale": 2, "LayerNorm_1/bias": 2,
             "MlpBlock_0/Dense_0/kernel": 3, "MlpBlock_0/Dense_0/bias": 2,
             "MlpBlock_0/Dense_1/kernel": 3, "MlpBlock_0/Dense_1/bias": 2}
    for name in ("query", "key", "value"):
        ranks[f"MultiHeadDotProductAttention_0/{name}/kernel"] = 4
        ranks[f"MultiHeadDotProductAttention_0/{name}/bias"] = 3
    ranks["MultiHeadDotProductAttention_0/out/kernel"] = 4
    ranks["MultiHeadDotProductAttention_0/out/bias"] = 2
    out = {}
    for key, rank in ranks.items():
        arr = leaf(img_params, f"{block}/{key}", rank)
        if arr.shape[0] != spec.depth:
            raise ExportError(f"'PaliGemma/img/{block}/{key}' stacks {arr.shape[0]} layers, expected {spec.depth}")
        out[key] = arr[layer]
    return out
