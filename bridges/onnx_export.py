"""Export our SigLIP vision tower (pi05_jax.model.siglip semantics) to ONNX, the format TensorRT's parser reads.

The graph is built node by node with `onnx.helper` from `params["PaliGemma"]["img"]` (openpi's key names); no torch.
It computes exactly what `pi05_jax.model.siglip.encode_images` computes, op for op:
  patch embedding (conv patch x patch / stride patch as a matmul over flattened patches, float32) + learned pos-emb,
  `depth` pre-LN blocks (flax LayerNorm: float32 statistics with the fast variance E[x^2] - E[x]^2 clamped at 0;
  multi-head attention with biases, q / sqrt(H), softmax over keys; tanh-GELU MLP), the encoder norm, and the head
  projecting to the LLM width.
Shapes are static per image count V (one engine per valid-view count): input `images` float32 [V, 224, 224, 3] in
[-1, 1] -> output `image_tokens` [V, 256, width_llm] in the graph's dtype (float32 for "fp32", float16 otherwise).
In "fp16" the patch embedding and the LayerNorm statistics stay float32, as in our JAX code with dtype=float16.
"fp8" is the fp16 graph with explicit FP8 (e4m3) quantization of the four matmuls of every block (q/k/v, out,
MLP in, MLP out): weights stored as e4m3 with a per-output-channel scale, activations quantized per tensor with a
static scale from calibration images (amax / 448), as QuantizeLinear/DequantizeLinear pairs (opset 19) - the
explicit-quantization form TensorRT builds FP8 GEMMs from. The patch embedding, attention and head stay fp16/fp32.

Axis legend: V images, P patches, C flattened patch (p*p*3), D width, N heads, H head dim, F mlp dim, O LLM width.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bridges.siglip_params import (  # re-exported: the export's public names
    GRAPH_DTYPES,
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    VisionGraphSpec,
    block_params,
    leaf,
    spec_from_params,
)

__all__ = ["GRAPH_DTYPES", "INPUT_NAME", "OUTPUT_NAME", "ExportError", "VisionGraphSpec", "activation_amax",
           "export_siglip", "save_onnx", "spec_from_params", "spec_of_model"]

OPSETS = {"fp32": 17, "fp16": 17, "fp8": 19}  # float8 QuantizeLinear/DequantizeLinear need opset 19
LN_EPS = 1e-6  # pi05_jax.model.siglip.LN_EPS (flax LayerNorm's epsilon as big_vision sets it)
GELU_C = math.sqrt(2.0 / math.pi)
FP8_MAX = 448.0  # largest finite float8 e4m3fn
_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
# Above this many bytes of weights the tensors go to a side file (protobuf's 2 GiB message limit).
EXTERNAL_DATA_BYTES = 1 << 30


class _Graph:
    """A tiny node builder: unique value names, initializers, and one helper per op we use."""

    def __init__(self, *, opset: int, fp8_amax: Mapping[str, float] | None = None, tap: bool = False):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self.fp8_amax = fp8_amax  # activation amax per quantized matmul (by its prefix), for "fp8"
        self.tap = tap  # record every quantizable matmul input (for calibration)
        self.taps: dict[str, tuple[str, tuple[int, ...]]] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}:{self._count}"

    def const(self, name: str, value, dtype) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name=name))
        return name

    def op(self, op_type: str, *inputs: str, hint: str = "", **attrs) -> str:
        out = self._name(hint or op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def shape(self, name: str, dims) -> str:
        return self.const(name, np.asarray(dims, np.int64), np.int64)

    def mean_last(self, x: str, hint: str) -> str:
        """ReduceMean over the last axis, keepdims (axes became an input in opset 18)."""
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.shape(f"{hint}/axes", [-1]), keepdims=1, hint=hint)
        return self.op("ReduceMean", x, axes=[-1], keepdims=1, hint=hint)


def _layer_norm(g: _Graph, x: str, scale: np.ndarray, bias: np.ndarray, prefix: str, body: np.dtype) -> str:
    """flax LayerNorm: statistics in float32 with var = max(0, E[x^2] - E[x]^2), output cast to the body dtype."""
    xf = g.op("Cast", x, to=TensorProto.FLOAT, hint=f"{prefix}/x32") if body != np.float32 else x
    mean = g.mean_last(xf, f"{prefix}/mean")
    mean_sq = g.mean_last(g.op("Mul", xf, xf), f"{prefix}/mean_sq")
    var = g.op("Sub", mean_sq, g.op("Mul", mean, mean))
    var = g.op("Max", var, g.const(f"{prefix}/zero", 0.0, np.float32), hint=f"{prefix}/var")
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(f"{prefix}/eps", LN_EPS, np.float32))))
    mul = g.op("Mul", inv, g.const(f"{prefix}/scale", scale, np.float32))
    y = g.op("Add", g.op("Mul", g.op("Sub", xf, mean), mul), g.const(f"{prefix}/bias", bias, np.float32),
             hint=f"{prefix}/y")
    return g.op("Cast", y, to=_ONNX_TYPES[body]) if body != np.float32 else y


def _dense(g: _Graph, x: str, kernel: np.ndarray, bias: np.ndarray, prefix: str, body: np.dtype,
           x_shape: tuple[int, ...] | None = None) -> str:
    """x @ kernel + bias. With `x_shape` the matmul is quantizable: tapped for calibration, or FP8 Q/DQ'd."""
    if x_shape is not None and g.tap:
        g.taps[prefix] = (x, x_shape)
    if x_shape is not None and g.fp8_amax is not None:
        w = _fp8_weight(g, kernel, prefix, body)
        scale = g.const(f"{prefix}/x_scale", max(g.fp8_amax[prefix], 1e-4) / FP8_MAX, body)
        zero = g.const(f"{prefix}/x_zero", np.zeros((), ml_dtypes.float8_e4m3fn), ml_dtypes.float8_e4m3fn)
        x = g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero, hint=f"{prefix}/x_q"), scale,
                 hint=f"{prefix}/x_dq")
    else:
        w = g.const(f"{prefix}/kernel", kernel, body)
    y = g.op("MatMul", x, w, hint=f"{prefix}/matmul")
    return g.op("Add", y, g.const(f"{prefix}/bias", bias, body), hint=f"{prefix}/out")


def _fp8_weight(g: _Graph, kernel: np.ndarray, prefix: str, body: np.dtype) -> str:
    """kernel [K, N] stored as e4m3 with a per-output-channel scale (amax / 448), dequantized to the body dtype."""
    amax = np.max(np.abs(kernel), axis=0)
    scale = (np.maximum(amax, 1e-12) / FP8_MAX).astype(body)
    q = np.clip(kernel / scale.astype(np.float32), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return g.op("DequantizeLinear", g.const(f"{prefix}/kernel_fp8", q, ml_dtypes.float8_e4m3fn),
                g.const(f"{prefix}/kernel_scale", scale, body), axis=1, hint=f"{prefix}/kernel_dq")


def _gelu_tanh(g: _Graph, x: str, prefix: str, body: np.dtype) -> str:
    """x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), jax.nn.gelu(approximate=True)."""
    cube = g.op("Mul", g.op("Mul", x, x), x)
    inner = g.op("Add", x, g.op("Mul", cube, g.const(f"{prefix}/c3", 0.044715, body)))
    t = g.op("Tanh", g.op("Mul", inner, g.const(f"{prefix}/c", GELU_C, body)))
    cdf = g.op("Mul", g.op("Add", t, g.const(f"{prefix}/one", 1.0, body)), g.const(f"{prefix}/half", 0.5, body))
    return g.op("Mul", x, cdf, hint=f"{prefix}/gelu")


def _attention(g: _Graph, y: str, mha: Mapping[str, np.ndarray], spec: VisionGraphSpec, prefix: str,
               body: np.dtype) -> str:
    """Multi-head self-attention with biases; q, k, v projected by one fused [D, 3*N*H] matmul."""
    v_, p, d, n, h = spec.views, spec.num_patches, spec.width, spec.num_heads, spec.head_dim
    kernel = np.concatenate([mha[k + "/kernel"].reshape(d, n * h) for k in ("query", "key", "value")], axis=1)
    bias = np.concatenate([mha[k + "/bias"].reshape(n * h) for k in ("query", "key", "value")])
    qkv = _dense(g, y, kernel, bias, f"{prefix}/qkv", body, (v_, p, d))  # [V,P,3NH]
    qkv = g.op("Reshape", qkv, g.shape(f"{prefix}/qkv_shape", [v_, p, 3, n, h]))
    qkv = g.op("Transpose", qkv, perm=[2, 0, 3, 1, 4])  # [3,V,N,P,H]
    q, k, v = (g.op("Gather", qkv, g.const(f"{prefix}/idx{i}", i, np.int64), axis=0, hint=f"{prefix}/{nm}")
               for i, nm in enumerate("qkv"))
    q = g.op("Div", q, g.const(f"{prefix}/sqrt_h", np.sqrt(h), body), hint=f"{prefix}/q_scaled")
    logits = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]), hint=f"{prefix}/logits")  # [V,N,P,P]
    probs = g.op("Softmax", logits, axis=-1, hint=f"{prefix}/probs")
    o = g.op("MatMul", probs, v)  # [V,N,P,H]
    o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.shape(f"{prefix}/o_shape", [v_, p, n * h]))
    return _dense(g, o, mha["out/kernel"].reshape(n * h, d), mha["out/bias"], f"{prefix}/out", body, (v_, p, n * h))


def _build_graph(g: _Graph, img_params: Mapping, spec: VisionGraphSpec) -> str:
    """Append the whole tower to `g`; returns the name of the output tokens."""
    body = GRAPH_DTYPES[spec.precision]
    v_, s, p, d = spec.views, spec.image_size, spec.patch_size, spec.width
    grid = s // p

    # Patch embedding in float32: [V,S,S,3] -> [V,g,p,g,p,3] -> [V,g,g,p,p,3] -> [V,P,C] @ [C,D] + b + pos.
    x = g.op("Reshape", INPUT_NAME, g.shape("img/patches/split", [v_, grid, p, grid, p, 3]))
    x = g.op("Transpose", x, perm=[0, 1, 3, 2, 4, 5])
    x = g.op("Reshape", x, g.shape("img/patches/flat", [v_, spec.num_patches, p * p * 3]))
    kernel = leaf(img_params, "embedding/kernel", 4).reshape(p * p * 3, d)
    x = _dense(g, x, kernel, leaf(img_params, "embedding/bias", 1), "img/embedding", np.dtype(np.float32))
    x = g.op("Add", x, g.const("img/pos_embedding", leaf(img_params, "pos_embedding", 3), np.float32))
    if body != np.float32:
        x = g.op("Cast", x, to=_ONNX_TYPES[body], hint="img/embedding/cast")

    tokens = (v_, spec.num_patches)
    for layer in range(spec.depth):
        lp = block_params(img_params, spec, layer)
        pre = f"img/Transformer/encoderblock_{layer}"
        y = _layer_norm(g, x, lp["LayerNorm_0/scale"], lp["LayerNorm_0/bias"], f"{pre}/LayerNorm_0", body)
        mha = {k.split("/", 1)[1]: w for k, w in lp.items() if k.startswith("MultiHeadDotProductAttention_0/")}
        x = g.op("Add", x, _attention(g, y, mha, spec, f"{pre}/MultiHeadDotProductAttention_0", body),
                 hint=f"{pre}/residual_0")
        y = _layer_norm(g, x, lp["LayerNorm_1/scale"], lp["LayerNorm_1/bias"], f"{pre}/LayerNorm_1", body)
        mlp = f"{pre}/MlpBlock_0"
        y = _dense(g, y, lp["MlpBlock_0/Dense_0/kernel"], lp["MlpBlock_0/Dense_0/bias"], f"{mlp}/Dense_0", body,
                   (*tokens, d))
        y = _gelu_tanh(g, y, f"{mlp}/gelu", body)
        y = _dense(g, y, lp["MlpBlock_0/Dense_1/kernel"], lp["MlpBlock_0/Dense_1/bias"], f"{mlp}/Dense_1", body,
                   (*tokens, spec.mlp_dim))
        x = g.op("Add", x, y, hint=f"{pre}/residual_1")

    x = _layer_norm(g, x, leaf(img_params, "Transformer/encoder_norm/scale", 1),
                    leaf(img_params, "Transformer/encoder_norm/bias", 1), "img/Transformer/encoder_norm", body)
    return _dense(g, x, leaf(img_params, "head/kernel", 2), leaf(img_params, "head/bias", 1), "img/head", body)


def _model(g: _Graph, out: str, spec: VisionGraphSpec, extra_outputs=()) -> onnx.ModelProto:
    body = GRAPH_DTYPES[spec.precision]
    g.nodes.append(helper.make_node("Identity", [out], [OUTPUT_NAME], name=OUTPUT_NAME))
    graph = helper.make_graph(
        g.nodes, f"pi05_siglip_{spec.precision}_v{spec.views}",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, list(spec.input_shape))],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, _ONNX_TYPES[body], list(spec.output_shape)),
                 *extra_outputs],
        initializer=g.initializers,
    )
    opset = OPSETS[spec.precision]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pi05_jax")
    model.ir_version = 8 if opset < 19 else 9  # the oldest IR each opset allows: TensorRT 8.6+/10, onnxruntime
    helper.set_model_props(model, {f"pi05.{key}": str(value) for key, value in dataclasses.asdict(spec).items()})
    if _weight_bytes(model) < EXTERNAL_DATA_BYTES:
        onnx.checker.check_model(model)
    return model


def activation_amax(img_params: Mapping, images: np.ndarray) -> dict[str, float]:
    """max |x| of the input of every FP8-quantizable matmul over calibration images [V,224,224,3] (float32 graph
    run in onnxruntime), keyed by the matmul's name prefix."""
    import onnxruntime as ort

    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ExportError(f"calibration images must be [V, H, W, 3], got shape {images.shape}")
    spec = spec_from_params(img_params, views=images.shape[0], precision="fp32", image_size=images.shape[1])
    g = _Graph(opset=OPSETS["fp32"], tap=True)
    out = _build_graph(g, img_params, spec)
    taps = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)) for name, shape in g.taps.values()]
    model = _model(g, out, spec, taps)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run([name for name, _ in g.taps.values()], {INPUT_NAME: images})
    return {prefix: float(np.max(np.abs(v))) for prefix, v in zip(g.taps, values, strict=True)}


def export_siglip(img_params: Mapping, *, views: int, precision: str = "fp32", image_size: int = 224,
                  calibration_images: np.ndarray | None = None) -> onnx.ModelProto:
    """The SigLIP tower of `params["PaliGemma"]["img"]` as a checked ONNX model for `views` images.
    "fp8" needs `calibration_images` [n, 224, 224, 3] float32 in [-1, 1] (real camera frames, for the scales)."""
    spec = spec_from_params(img_params, views=views, precision=precision, image_size=image_size)
    amax = None
    if precision == "fp8":
        if calibration_images is None:
            raise ExportError("precision fp8 needs calibration images (real frames [n,224,224,3] in [-1,1]) to "
                              "set the static activation scales")
        amax = activation_amax(img_params, calibration_images)
    g = _Graph(opset=OPSETS[precision], fp8_amax=amax)
    return _model(g, _build_graph(g, img_params, spec), spec)


def spec_of_model(model: onnx.ModelProto) -> VisionGraphSpec:
    """The spec recorded in an exported model's metadata (raises ExportError for a graph we did not write)."""
    props = {p.key[len("pi05."):]: p.value for p in model.metadata_props if p.key.startswith("pi05.")}
    fields = {f.name: f.type for f in dataclasses.fields(VisionGraphSpec)}
    missing = sorted(set(fields) - set(props))
    if missing:
        raise ExportError(f"ONNX model has no pi05 metadata for {missing}: not written by bridges.onnx_export")
    return VisionGraphSpec(**{k: (v if fields[k] == "str" else int(v)) for k, v in props.items() if k in fields})


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def save_onnx(model: onnx.ModelProto, path: str | pathlib.Path) -> list[pathlib.Path]:
    """Write the model; weights past 1 GiB go to `<path>.data` beside it (TensorRT's parser and onnxruntime read
    it from there). Returns the files written."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _weight_bytes(model) < EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    model = _copy(model)  # save_model moves tensors out of the proto it is given; leave the caller's intact
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    onnx.checker.check_model(str(path))
    return [path, data]
