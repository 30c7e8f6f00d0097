"""The builtin vision engine file: SigLIP's float32 weights in the flat layout `bridges/csrc` reads.

It is the engine the XLA custom call runs where TensorRT cannot be installed (the CPU in CI, the H100 here): the
same handler and engine interface as a TensorRT plan, computing the same tower as `pi05_jax.model.siglip` in float32.

Layout (little-endian):
  8 bytes   magic b"PI05VIS1"
  16 int64  version, views, image_size, patch_size, num_patches, width, depth, num_heads, mlp_dim, out_width,
            precision (0 = fp32), num_floats, 0, 0, 0, 0
  float32   [num_floats]: embedding kernel [C, D] (C = p*p*3 in (py, px, channel) order), embedding bias [D],
            pos_embedding [P, D]; per layer: LayerNorm_0 scale, bias [D]; qkv kernel [D, 3D] (query | key | value,
            heads-major), qkv bias [3D]; out kernel [D, D], out bias [D]; LayerNorm_1 scale, bias [D]; Dense_0
            kernel [D, F], bias [F]; Dense_1 kernel [F, D], bias [D]; then encoder_norm scale, bias [D], head
            kernel [D, O], head bias [O].
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping

import numpy as np

from bridges import siglip_params
from bridges.engine_manifest import EngineManifest, write_manifest

MAGIC = b"PI05VIS1"
VERSION = 1
HEADER_INTS = 16


def _tensors(img_params: Mapping, spec: siglip_params.VisionGraphSpec) -> Iterator[np.ndarray]:
    leaf = siglip_params.leaf
    p, d = spec.patch_size, spec.width
    yield leaf(img_params, "embedding/kernel", 4).reshape(p * p * 3, d)
    yield leaf(img_params, "embedding/bias", 1)
    yield leaf(img_params, "pos_embedding", 3).reshape(spec.num_patches, d)
    for layer in range(spec.depth):
        lp = siglip_params.block_params(img_params, spec, layer)
        mha = "MultiHeadDotProductAttention_0"
        yield lp["LayerNorm_0/scale"]
        yield lp["LayerNorm_0/bias"]
        yield np.concatenate([lp[f"{mha}/{k}/kernel"].reshape(d, d) for k in ("query", "key", "value")], axis=1)
        yield np.concatenate([lp[f"{mha}/{k}/bias"].reshape(d) for k in ("query", "key", "value")])
        yield lp[f"{mha}/out/kernel"].reshape(d, d)
        yield lp[f"{mha}/out/bias"]
        yield lp["LayerNorm_1/scale"]
        yield lp["LayerNorm_1/bias"]
        yield lp["MlpBlock_0/Dense_0/kernel"]
        yield lp["MlpBlock_0/Dense_0/bias"]
        yield lp["MlpBlock_0/Dense_1/kernel"]
        yield lp["MlpBlock_0/Dense_1/bias"]
    yield leaf(img_params, "Transformer/encoder_norm/scale", 1)
    yield leaf(img_params, "Transformer/encoder_norm/bias", 1)
    yield leaf(img_params, "head/kernel", 2)
    yield leaf(img_params, "head/bias", 1)


def write_builtin_engine(img_params: Mapping, path: str | pathlib.Path, *, views: int,
                         checkpoint: str = "") -> EngineManifest:
    """Write the engine file and its manifest (`<path>.json`); returns the manifest."""
    spec = siglip_params.spec_from_params(img_params, views=views, precision="fp32")
    if spec.width != spec.num_heads * spec.head_dim:
        raise siglip_params.ExportError(f"width {spec.width} is not num_heads x head_dim")
    num_floats = sum(int(np.prod(t.shape)) for t in _tensors(img_params, spec))
    header = np.array([VERSION, spec.views, spec.image_size, spec.patch_size, spec.num_patches, spec.width,
                       spec.depth, spec.num_heads, spec.mlp_dim, spec.out_width, 0, num_floats, 0, 0, 0, 0], "<i8")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # tensor by tensor: the full tower is 1.7 GB, never held twice
        f.write(MAGIC)
        f.write(header.tobytes())
        for t in _tensors(img_params, spec):
            f.write(np.ascontiguousarray(t, "<f4").tobytes())
    manifest = manifest_for(spec, kind="builtin", checkpoint=checkpoint, builder="pi05_jax builtin")
    write_manifest(path, manifest)
    return manifest


def manifest_for(spec: siglip_params.VisionGraphSpec, *, kind: str, checkpoint: str = "", builder: str = "",
                 precision: str | None = None) -> EngineManifest:
    precision = precision or spec.precision
    return EngineManifest(
        kind=kind, precision=precision, views=spec.views,
        input_name=siglip_params.INPUT_NAME, input_shape=spec.input_shape, input_dtype="float32",
        output_name=siglip_params.OUTPUT_NAME, output_shape=spec.output_shape,
        output_dtype=np.dtype(siglip_params.GRAPH_DTYPES[precision]).name,
        width=spec.width, depth=spec.depth, num_heads=spec.num_heads, mlp_dim=spec.mlp_dim,
        checkpoint=checkpoint, builder=builder,
    )
