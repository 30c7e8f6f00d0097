"""FP4 (NVFP4-style, weight-only) stand-ins for the MLP weights: `Fp4Weight` and the params rewriter.

Axis legend: B batch, T tokens, D width, F mlp dim, C the gate/up pair of the GeGLU, L layers, K contracted,
N output columns.

`Fp4Weight` holds a weight in `checkpoints.fp4_format`'s layout with the contracted axis second to last, which
is where both MLP weights keep it: `gating_einsum` [L, C=2, D, F] (contracted D) and `linear` [L, F, D]
(contracted F). Its leaves keep the stacked depth axis first, so `lax.scan` slices them per layer:

    packed        uint8   [L, ..., K/2, N]   two e2m1 codes per byte (low nibble = even K index)
    block_scales  uint8   [L, ..., K/16, N]  e4m3 bytes, one per 16 consecutive K elements
    tensor_scale  float32 [L]                one per layer

`einsum(eqn, x)` serves the MLP equations "BTD,CDF->CBTF" and "BTF,FD->BTD" (and any "<x>K,KN-><x>N" /
"<x>K,CKN->C<x>N" form): on a GPU through `pallas_kernels.fp4_matmul` (bytes read: a quarter of bf16's), elsewhere
by dequantizing to x's dtype and calling `jnp.einsum` (`backend` overrides the choice). Other equations fall back
to dequantize + einsum. `block_sizes` (static) picks the kernel's tiles and dequant variant; None uses
`pallas_kernels.fp4_matmul.default_block_sizes` for the call's shape (`with_options` sets them tree-wide).

`quantize_params_fp4(params, scope)` swaps the action expert's MLP weights (scope "expert") or also the prefix
LLM's ("expert+prefill") for `Fp4Weight`s; `params_to_arrays` / `params_from_arrays` turn those leaves into plain
dicts of arrays and back, for orbax. Never cast a params tree holding `Fp4Weight`s with a blanket
`tree.map(astype)`: the packed bytes are integers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints import fp4_format
from pallas_kernels.fp4_matmul import Fp4MatmulBlockSizes, dequantize_reference, fp4_matmul
from pi05_jax.quantized import QuantizationError

BACKENDS = ("auto", "pallas", "dequant")
SCOPES = ("expert", "expert+prefill")
ARRAY_KEYS = ("fp4_packed", "fp4_block_scales", "fp4_tensor_scale")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp4Weight:
    packed: jax.Array  # uint8 [..., K/2, N]
    block_scales: jax.Array  # uint8 (e4m3 bytes) [..., K/16, N]
    tensor_scale: jax.Array  # float32 [...] (the stacked axes; [] for one layer)
    # "auto": the Pallas kernel on a GPU backend, dequantize + einsum elsewhere; "pallas": always the kernel
    # (interpret mode on the CPU); "dequant": always dequantize + einsum.
    backend: str = dataclasses.field(default="auto", metadata=dict(static=True))
    block_sizes: Fp4MatmulBlockSizes | None = dataclasses.field(default=None, metadata=dict(static=True))

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"Fp4Weight backend must be one of {BACKENDS}, got {self.backend!r}")

    # --- shape ---------------------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantized weight's shape."""
        *lead, half_k, n = self.packed.shape
        return (*lead, 2 * half_k, n)

    @property
    def ndim(self) -> int:
        return len(self.packed.shape)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.packed, self.block_scales, self.tensor_scale))

    # --- math ----------------------------------------------------------------------------------------------------

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        ts = self.tensor_scale.reshape(self.tensor_scale.shape + (1,) * (self.ndim - self.tensor_scale.ndim))
        w = dequantize_reference(self.packed, self.block_scales, 1.0, jnp.float32)
        return (w * ts).astype(dtype)

    def _use_kernel(self) -> bool:
        if self.backend == "auto":
            return jax.default_backend() == "gpu"
        return self.backend == "pallas"

    def einsum(self, eqn: str, x: jax.Array) -> jax.Array:
        """einsum(eqn, x, w) with this weight as the right operand; result in x's dtype."""
        operands = eqn.replace(" ", "").split("->")[0].split(",")
        if len(operands) != 2 or ("..." not in operands[1] and len(operands[1]) != self.ndim):
            stacked = " (still stacked over depth: slice it per layer, as lax.scan does)" if self.tensor_scale.ndim \
                else ""
            raise ValueError(f"Fp4Weight.einsum({eqn!r}): the weight operand does not match the weight's shape "
                             f"{self.shape}{stacked}")
        plan = _matmul_plan(eqn, self.ndim)
        if plan is None or not self._use_kernel():
            return jnp.einsum(eqn, x, self.dequantize(x.dtype))
        if self.tensor_scale.ndim:
            raise ValueError(f"Fp4Weight.einsum({eqn!r}): weight of shape {self.shape} has a per-layer tensor "
                             f"scale {self.tensor_scale.shape} but no layer axis in the equation")
        k = x.shape[-1]
        if k != self.shape[-2]:
            raise ValueError(f"Fp4Weight.einsum({eqn!r}): x's last axis {x.shape=} does not match the "
                             f"weight's contracted axis {self.shape=}")
        y = fp4_matmul(x.reshape(-1, k), self.packed, self.block_scales, self.tensor_scale,
                       block_sizes=self.block_sizes, out_dtype=x.dtype)
        lead = x.shape[:-1]
        if plan == "grouped":  # [C, M, N] -> [C, *lead, N]
            return y.reshape(y.shape[0], *lead, y.shape[-1])
        return y.reshape(*lead, y.shape[-1])

    # --- (de)serialization ---------------------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for a checkpoint: {fp4_packed, fp4_block_scales (e4m3 bytes), fp4_tensor_scale}."""
        return {"fp4_packed": np.asarray(self.packed), "fp4_block_scales": np.asarray(self.block_scales),
                "fp4_tensor_scale": np.asarray(self.tensor_scale, np.float32)}

    @classmethod
    def from_arrays(cls, arrays: dict, *, where: str = "fp4 weight", **options) -> Fp4Weight:
        """Inverse of `to_arrays` (block scales may be uint8 bytes or float8_e4m3fn); checks shapes and dtypes."""
        missing = [k for k in ARRAY_KEYS if k not in arrays]
        if missing:
            raise QuantizationError(f"{where}: missing {missing} (have {sorted(arrays)})")
        packed = np.asarray(arrays["fp4_packed"])
        if packed.dtype != np.uint8 or packed.ndim < 2:
            raise QuantizationError(f"{where}: fp4_packed must be uint8 [..., K/2, N], got {packed.dtype} "
                                    f"{packed.shape}")
        try:
            scales = fp4_format.scale_bytes(arrays["fp4_block_scales"])
        except ValueError as e:
            raise QuantizationError(f"{where}: {e}") from None
        if np.any(scales & 0x80):
            raise QuantizationError(f"{where}: fp4_block_scales holds negative e4m3 scales (sign bit set)")
        ts = np.asarray(arrays["fp4_tensor_scale"], np.float32)
        *lead, half_k, n = packed.shape
        want = (*lead, 2 * half_k // fp4_format.BLOCK, n)
        if half_k % (fp4_format.BLOCK // 2) or scales.shape != want:
            raise QuantizationError(f"{where}: fp4_block_scales shape {scales.shape} does not match fp4_packed "
                                    f"{packed.shape} (expected {want})")
        if ts.shape != tuple(lead[: ts.ndim]):
            raise QuantizationError(f"{where}: fp4_tensor_scale shape {ts.shape} must prefix {packed.shape}")
        if not np.all(np.isfinite(ts)) or np.any(ts <= 0):
            raise QuantizationError(f"{where}: fp4_tensor_scale must be finite and > 0")
        return cls(jnp.asarray(packed), jnp.asarray(scales), jnp.asarray(ts), **options)


def _matmul_plan(eqn: str, w_ndim: int) -> str | None:
    """'plain' for "<x>K,KN-><x>N", 'grouped' for "<x>K,CKN->C<x>N", None for anything else."""
    eqn = eqn.replace(" ", "")
    try:
        lhs, out = eqn.split("->")
        xs, ws = lhs.split(",")
    except ValueError:
        return None
    if len(ws) != w_ndim or not xs or xs[-1] != ws[-2]:
        return None
    rest = xs[:-1]
    if w_ndim == 2 and out == rest + ws[-1]:
        return "plain"
    if w_ndim == 3 and out == ws[0] + rest + ws[-1]:
        return "grouped"
    return None


def quantize_weight(w, *, stacked: bool, where: str = "weight", **options) -> Fp4Weight:
    """Quantize one float weight [L?, ..., K, N] (contracted axis second to last) to an `Fp4Weight`."""
    if isinstance(w, Fp4Weight):
        raise QuantizationError(f"{where}: already quantized to FP4")
    w = np.asarray(w)
    if w.dtype == np.uint8 or not (np.issubdtype(w.dtype, np.floating) or w.dtype == jnp.bfloat16):
        raise QuantizationError(f"{where}: expected a float weight, got {w.dtype} (already quantized?)")
    try:
        q = fp4_format.quantize_fp4(w, -2, per_tensor_axes=1 if stacked else 0)
    except ValueError as e:
        raise QuantizationError(f"{where}: {e}") from None
    return Fp4Weight(jnp.asarray(q.packed), jnp.asarray(fp4_format.scale_bytes(q.block_scales)),
                     jnp.asarray(q.tensor_scale), **options)


def _mlp_names(scope: str) -> tuple[str, ...]:
    if scope not in SCOPES:
        raise ValueError(f"unknown FP4 scope {scope!r}; choose one of {SCOPES}")
    return ("mlp_1",) if scope == "expert" else ("mlp_1", "mlp")


def quantize_params_fp4(params: dict, scope: str = "expert", **options) -> dict:
    """A copy of `params` whose MLP weights (gating_einsum, linear) of the action expert (`mlp_1`), and for
    scope "expert+prefill" also of the prefix LLM (`mlp`), are `Fp4Weight`s; every other leaf is shared.
    `options` (backend=, block_sizes=) go to each `Fp4Weight`."""
    names = _mlp_names(scope)
    try:
        layers = params["PaliGemma"]["llm"]["layers"]
    except (KeyError, TypeError):
        raise QuantizationError("params have no PaliGemma/llm/layers (not a pi0.5 params tree)") from None
    new_layers = dict(layers)
    for name in names:
        if name not in layers:
            raise QuantizationError(f"params have no PaliGemma/llm/layers/{name}")
        mlp = dict(layers[name])
        for leaf in ("gating_einsum", "linear"):
            key = f"PaliGemma/llm/layers/{name}/{leaf}"
            if leaf not in mlp:
                raise QuantizationError(f"params have no {key}")
            mlp[leaf] = quantize_weight(mlp[leaf], stacked=True, where=key, **options)
        new_layers[name] = mlp
    llm = {**params["PaliGemma"]["llm"], "layers": new_layers}
    return {**params, "PaliGemma": {**params["PaliGemma"], "llm": llm}}


def params_to_arrays(tree):
    """Replace every `Fp4Weight` in a nested dict by its `to_arrays()` dict (for orbax)."""
    if isinstance(tree, Fp4Weight):
        return tree.to_arrays()
    if isinstance(tree, dict):
        return {k: params_to_arrays(v) for k, v in tree.items()}
    return tree


def is_fp4_arrays(node) -> bool:
    return isinstance(node, dict) and set(node) == set(ARRAY_KEYS)


def params_from_arrays(tree, *, path: str = "", **options):
    """Inverse of `params_to_arrays`: dicts holding exactly the fp4_* keys become `Fp4Weight`s."""
    if is_fp4_arrays(tree):
        return Fp4Weight.from_arrays(tree, where=path or "fp4 weight", **options)
    if isinstance(tree, dict):
        return {k: params_from_arrays(v, path=f"{path}/{k}" if path else k, **options) for k, v in tree.items()}
    return tree


def with_options(tree, **options):
    """Set backend= / block_sizes= on every `Fp4Weight` of a params tree (e.g. to force the kernel path)."""
    if isinstance(tree, Fp4Weight):
        return dataclasses.replace(tree, **options)
    if isinstance(tree, dict):
        return {k: with_options(v, **options) for k, v in tree.items()}
    return tree


def fp4_bytes(tree) -> int:
    """Bytes held by the `Fp4Weight` leaves of a params tree (packed codes + block scales + tensor scales)."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, Fp4Weight))
    return sum(leaf.nbytes for leaf in leaves if isinstance(leaf, Fp4Weight))

