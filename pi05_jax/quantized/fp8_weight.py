"""FP8 (e4m3) weights with a float32 scale per output channel, and their matmul backends.

Axis legend (one layer): N output channels = every weight axis the einsum does not contract, flattened in the
weight's axis order; K = the contracted weight axes, flattened in the weight's order; M = every activation axis that
is not contracted, flattened (tokens). The stacked depth axis, when there is one, comes first ("lead").

    w[n, k] ~= values[n, k] * scales[n]        values e4m3 [*lead, N_pad, K_pad], scales float32 [*lead, N_pad]

`values` is stored "K-major" ([N, K], as FP8 wgmma and cuBLASLt's FP8 GEMM want the right-hand operand), whatever
openpi's layout of the weight (q_einsum [N, D, H] contracts its middle axis, for one). N and K are padded with zeros
once, at quantization or load time, to multiples of 32 (below 128) or 128 (SigLIP's MLP 4304 -> 4352), so every
backend gets whole tiles; activations are padded along K (cheap) and outputs sliced, per call.

Activations are quantized per call: `dynamic` = one scale per token (row) = amax(|x_row|) / 448; `static` = one
calibrated per-tensor scale per layer (`act_scale`, written by `pi05 quantize --calibration`), values beyond it
clipped. Then y[m, n] = (x_q @ values^T)[m, n] * x_scale[m] * scales[n] with fp32 accumulation.
Dynamic is the default: on the shared reference cases (CPU) both pass the gates with the same cosine to 1e-5, and
static scales calibrated on one case are slightly worse on held-out cases (MSE +10-15%), need calibration data,
and clip what the calibration did not see; their speed difference (one row max) is not measured yet.

Options (`Fp8Options`, set module-wide with `set_options(...)` / `with options(...)`, or per weight with
`with_options(params, ...)`):
  backend      "auto" (default): "xla" when the default JAX backend is the GPU, "emulate" elsewhere
               "emulate": quantize the activations, dequantize both operands, matmul in float32 (the CPU path; its
                          numbers are what the GPU computes up to accumulation order)
               "xla":     lax.dot_general on e4m3 operands (cuBLASLt FP8 GEMM on Hopper), scales fused after
               "pallas":  pallas_kernels.fp8_matmul, Mosaic GPU wgmma;  "pallas_triton": its Triton lowering
  activations  "auto" (default): static when the weight carries a calibrated act_scale, else dynamic per token
               "dynamic" / "static" force one ("static" without a calibrated scale is an error)
Options are read when a function is traced: a jitted sampler compiled before `set_options` keeps its old choice.
To switch after compiling, pass params from `with_options(params, backend=...)`: the choice is then static
metadata of each weight's pytree node, so the new params compile their own executable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pi05_jax.quantized import QuantizationError

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
BACKENDS = ("auto", "emulate", "xla", "pallas", "pallas_triton")
ACTIVATIONS = ("auto", "dynamic", "static")


@dataclasses.dataclass(frozen=True)
class Fp8Options:
    backend: str = "auto"
    activations: str = "auto"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown FP8 backend {self.backend!r}; choose one of {BACKENDS}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"unknown FP8 activation scaling {self.activations!r}; choose one of {ACTIVATIONS}")


_OPTIONS = Fp8Options()


def get_options() -> Fp8Options:
    return _OPTIONS


def set_options(**changes) -> Fp8Options:
    """Change the module-wide defaults (read at trace time); returns the previous options."""
    global _OPTIONS
    previous = _OPTIONS
    _OPTIONS = dataclasses.replace(_OPTIONS, **changes)
    return previous


@contextlib.contextmanager
def options(**changes):
    previous = set_options(**changes)
    try:
        yield _OPTIONS
    finally:
        set_options(**dataclasses.asdict(previous))


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "xla" if jax.default_backend() == "gpu" else "emulate"
    return backend


def padded_dim(d: int) -> int:
    """The size N or K is stored at: a multiple of 32 below 128, of 128 from there (whole kernel tiles)."""
    align = 32 if d < 128 else 128
    return -(-d // align) * align


@dataclasses.dataclass(frozen=True)
class Fp8Layout:
    """How one layer's weight in openpi's layout maps to the [N, K] values: `shape` is that layer's shape, e.g.
    (N, D, H) for q_einsum, and `contract` the axes the model's einsum sums over, e.g. (1,)."""

    shape: tuple[int, ...]
    contract: tuple[int, ...]

    def __post_init__(self):
        if not self.contract or sorted(set(self.contract)) != list(self.contract):
            raise ValueError(f"contract axes must be sorted, unique and non-empty, got {self.contract}")
        if self.contract[-1] >= len(self.shape) or len(self.contract) == len(self.shape):
            raise ValueError(f"contract axes {self.contract} do not fit a weight of shape {self.shape}")

    @property
    def out_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.shape)) if a not in self.contract)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.out_axes)

    @property
    def n(self) -> int:
        return math.prod(self.out_shape)

    @property
    def k(self) -> int:
        return math.prod(self.shape[a] for a in self.contract)

    @property
    def n_pad(self) -> int:
        return padded_dim(self.n)

    @property
    def k_pad(self) -> int:
        return padded_dim(self.k)

    def to_matrix(self, w, lead: int):
        """[*lead, *shape] -> [*lead, N, K] (no padding)."""
        perm = tuple(range(lead)) + tuple(lead + a for a in self.out_axes + self.contract)
        w = jnp.transpose(w, perm)
        return w.reshape(*w.shape[:lead], self.n, self.k)

    def from_matrix(self, w2, lead: int):
        """[*lead, N, K] -> [*lead, *shape]."""
        order = self.out_axes + self.contract
        w = w2.reshape(*w2.shape[:lead], *(self.shape[a] for a in order))
        inverse = tuple(range(lead)) + tuple(lead + order.index(a) for a in range(len(self.shape)))
        return jnp.transpose(w, inverse)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """An e4m3 weight with per-output-channel scales that `weight_einsum` multiplies through `einsum`."""

    values: jax.Array  # float8_e4m3fn [*lead, N_pad, K_pad]
    scales: jax.Array  # float32 [*lead, N_pad] (padding channels hold 1)
    layout: Fp8Layout = dataclasses.field(default=None, metadata=dict(static=True))
    act_scale: jax.Array | None = None  # float32 [*lead]: calibrated static activation scale, or None
    # None: the module-wide options at trace time
    options: Fp8Options | None = dataclasses.field(default=None, metadata=dict(static=True))
    name: str = dataclasses.field(default="", metadata=dict(static=True))  # the parameter key, for messages

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def quantize(cls, w, contract: tuple[int, ...], *, lead: int = 0, name: str = "weight",
                 act_scale=None) -> Fp8Weight:
        """Quantize a float weight in openpi's layout ([*lead, *one layer's shape]) with `contract` axes (of one
        layer) summed by the model's einsum. Raises QuantizationError naming `name` for NaN/Inf or a zero channel."""
        w = jnp.asarray(w)
        if not jnp.issubdtype(w.dtype, jnp.floating) or w.dtype in (E4M3, jnp.float8_e5m2):
            raise QuantizationError(f"{name}: expected a float weight (bfloat16/float32), got {w.dtype}; "
                                    f"is the checkpoint already quantized?")
        layout = Fp8Layout(tuple(int(s) for s in w.shape[lead:]), tuple(contract))
        values, scales, finite, amax = _quantize_matrix(w, layout, lead)
        finite, amax = np.asarray(finite), np.asarray(amax)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise QuantizationError(f"{name}: weight holds NaN or Inf (first at {_where(bad, lead, layout)})")
        if not np.all(amax > 0):
            bad = np.argwhere(~(amax > 0))[0]
            raise QuantizationError(f"{name}: output channel {_where(bad, lead, layout)} is all zeros, so its "
                                    f"FP8 scale would be zero; keep this weight unquantized")
        return cls._padded(values, scales, layout, act_scale, name)

    @classmethod
    def from_stored(cls, values, scales, contract: tuple[int, ...], *, lead: int = 0, name: str = "weight",
                    act_scale=None) -> Fp8Weight:
        """From a checkpoint: e4m3 values in openpi's layout and scales [*lead, *output axes] (see `stored`)."""
        values = jnp.asarray(values)
        if values.dtype == jnp.uint8:  # raw bytes, for stores without float8 support
            values = jax.lax.bitcast_convert_type(values, E4M3)
        if values.dtype != E4M3:
            raise QuantizationError(f"{name}: FP8 values must be float8_e4m3fn (or its uint8 bytes), "
                                    f"got {values.dtype}")
        layout = Fp8Layout(tuple(int(s) for s in values.shape[lead:]), tuple(contract))
        scales = jnp.asarray(scales, jnp.float32)
        want = values.shape[:lead] + layout.out_shape
        if scales.shape != want:
            raise QuantizationError(f"{name}: scales have shape {scales.shape}, expected {want} for values of "
                                    f"shape {values.shape} contracting axes {contract}")
        s = np.asarray(scales)
        if not np.all(np.isfinite(s)) or not np.all(s > 0):
            bad = np.argwhere(~(np.isfinite(s) & (s > 0)))[0]
            raise QuantizationError(f"{name}: scale at {tuple(int(i) for i in bad)} is {s[tuple(bad)]}; FP8 "
                                    f"scales must be finite and > 0 (damaged or hand-edited checkpoint)")
        if act_scale is not None:
            a = np.asarray(act_scale, np.float32)
            if a.shape != values.shape[:lead] or not np.all(np.isfinite(a)) or not np.all(a > 0):
                raise QuantizationError(f"{name}: activation scales must be finite, > 0 and of shape "
                                        f"{values.shape[:lead]}, got shape {a.shape} min {a.min() if a.size else None}")
        values2, scales2 = _stored_to_matrix(values, scales, layout, lead)
        return cls._padded(values2, scales2, layout, act_scale, name)

    @classmethod
    def _padded(cls, values2, scales2, layout: Fp8Layout, act_scale, name: str) -> Fp8Weight:
        if act_scale is not None:
            act_scale = jnp.asarray(act_scale, jnp.float32)
        return cls(values=values2, scales=scales2, layout=layout, act_scale=act_scale, name=name)

    @classmethod
    def from_matrix(cls, values2, scales2, layout: Fp8Layout, *, act_scale=None, options: Fp8Options | None = None,
                    name: str = "weight") -> Fp8Weight:
        """From unpadded e4m3 values [*lead, N, K] and scales [*lead, N] (the rows in `layout`'s output order, see
        `matrix`): what a weight restructured along its output channels (pi05_jax.fast.packing) is built from."""
        lead = values2.ndim - 2
        if values2.dtype != E4M3 or values2.shape[lead:] != (layout.n, layout.k) or scales2.shape != values2.shape[:-1]:
            raise QuantizationError(f"{name}: values {values2.dtype} {values2.shape} and scales {scales2.shape} do not "
                                    f"fit [*lead, N={layout.n}, K={layout.k}] e4m3 and [*lead, N] for {layout}")
        values2, scales2 = _pad_matrix(values2, scales2, layout, lead)
        weight = cls._padded(values2, scales2, layout, act_scale, name)
        return weight if options is None else dataclasses.replace(weight, options=options)

    # --- views ----------------------------------------------------------------------------------------------------

    @property
    def lead(self) -> int:
        return self.values.ndim - 2

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape in openpi's layout (with the stacked depth axis when there is one)."""
        return tuple(self.values.shape[: self.lead]) + self.layout.shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def matrix(self) -> tuple[jax.Array, jax.Array]:
        """(values e4m3 [*lead, N, K], scales float32 [*lead, N]) without the padding: row n is output channel n
        in the layout's output order (`Fp8Layout.out_shape` flattened), the inverse of `from_matrix`."""
        lay = self.layout
        return self.values[..., : lay.n, : lay.k], self.scales[..., : lay.n]

    def stored(self) -> tuple[jax.Array, jax.Array]:
        """(values e4m3 in openpi's layout, scales float32 [*lead, *output axes]): what a checkpoint holds."""
        lay, lead = self.layout, self.lead
        values = lay.from_matrix(self.values[..., : lay.n, : lay.k], lead)
        scales = self.scales[..., : lay.n].reshape(*self.scales.shape[:lead], *lay.out_shape)
        return values, scales

    def dequantize(self, dtype=jnp.float32):
        """The float weight in openpi's layout: values * scales."""
        lay = self.layout
        w2 = self.values[..., : lay.n, : lay.k].astype(jnp.float32) * self.scales[..., : lay.n, None]
        return lay.from_matrix(w2, self.lead).astype(dtype)

    def astype(self, dtype):
        """Plain-array compatibility (`w.astype(x.dtype)`): the dequantized weight."""
        return self.dequantize(dtype)

    # --- the matmul ------------------------------------------------------------------------------------------------

    def einsum(self, eqn: str, x):
        """einsum(eqn, x, w) in x.dtype, for the equations the model uses with stored weights
        ("BTD,NDH->BTNH", "BSD,CKDH->CBSKH", "BTNH,NHD->BTD", "BTD,CDF->CBTF", "BTF,FD->BTD", "BPD,DNH->BPNH",
        "...i,io->...o", ...): any equation whose contracted weight axes are this weight's `contract` axes."""
        if self.lead:
            raise ValueError(f"{self.name}: einsum on a weight stacked over {self.values.shape[0]} layers; "
                             f"slice one layer first (lax.scan does)")
        x_tok, w_tok, out_tok = _parse(eqn, x.ndim)
        lay = self.layout
        if len(w_tok) != len(lay.shape):
            raise ValueError(f"{self.name}: equation {eqn!r} names {len(w_tok)} weight axes, the weight has shape "
                             f"{lay.shape}")
        contracted = [w_tok[a] for a in lay.contract]
        shared = [t for t in w_tok if t in x_tok]
        if sorted(shared) != sorted(contracted) or any(t in out_tok for t in contracted):
            # Another contraction than the one the values were laid out for: exact, but dequantizes the weight.
            return jnp.einsum(eqn, x, self.dequantize(x.dtype))
        batch = [t for t in x_tok if t not in contracted]
        perm = [x_tok.index(t) for t in batch + contracted]
        xt = x if perm == sorted(perm) else jnp.transpose(x, perm)
        got = tuple(xt.shape[len(batch):])
        want = tuple(lay.shape[a] for a in lay.contract)
        if got != want:
            raise ValueError(f"{self.name}: {eqn!r} contracts activation axes of sizes {got}, the weight's are "
                             f"{want} (x shape {x.shape}, weight shape {lay.shape})")
        bshape = xt.shape[: len(batch)]
        y2 = self.matmul(xt.reshape(math.prod(bshape), lay.k))
        y = y2.reshape(*bshape, *lay.out_shape)
        current = batch + [w_tok[a] for a in lay.out_axes]
        if sorted(current) != sorted(out_tok):
            raise ValueError(f"{self.name}: {eqn!r}: output axes {out_tok} are not the activation's batch axes "
                             f"plus the weight's output axes {current}")
        order = [current.index(t) for t in out_tok]
        return y if order == sorted(order) else jnp.transpose(y, order)

    def matmul(self, x2):
        """x2 [M, K] (unpadded) -> [M, N] in x2.dtype through the selected backend."""
        from pallas_kernels import fp8_matmul as kernels

        opts = self.options or _OPTIONS
        backend = resolve_backend(opts.backend)
        lay = self.layout
        if lay.k_pad != lay.k:
            x2 = jnp.pad(x2, ((0, 0), (0, lay.k_pad - lay.k)))
        static = opts.activations == "static" or (opts.activations == "auto" and self.act_scale is not None)
        if static and self.act_scale is None:
            raise QuantizationError(f"{self.name}: static activation scaling requested but the checkpoint has no "
                                    f"calibrated activation scale (quantize with --calibration)")
        x_q, x_scale = quantize_activations(x2, self.act_scale if static else None)
        out_dtype = x2.dtype
        if backend == "emulate":
            y = kernels.fp8_matmul_reference(x_q, x_scale, self.values, self.scales, out_dtype=out_dtype)
        elif backend == "xla":
            y = kernels.fp8_matmul_xla(x_q, x_scale, self.values, self.scales, out_dtype=out_dtype)
        else:
            y = kernels.fp8_matmul(x_q, x_scale, self.values, self.scales, out_dtype=out_dtype,
                                   backend="mosaic" if backend == "pallas" else "triton")
        return y if lay.n_pad == lay.n else y[:, : lay.n]


def _pad_matrix(values2, scales2, layout: Fp8Layout, lead: int):
    dn, dk = layout.n_pad - layout.n, layout.k_pad - layout.k
    if dn or dk:
        values2 = jnp.pad(values2, [(0, 0)] * lead + [(0, dn), (0, dk)])
        scales2 = jnp.pad(scales2, [(0, 0)] * lead + [(0, dn)], constant_values=1.0)
    return values2, scales2.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("layout", "lead"))
def _quantize_matrix(w, layout: Fp8Layout, lead: int):
    """float weight [*lead, *shape] -> (padded values, padded scales, finite [*lead, N], amax [*lead, N])."""
    w2 = layout.to_matrix(w.astype(jnp.float32), lead)
    finite = jnp.all(jnp.isfinite(w2), axis=-1)
    amax = jnp.max(jnp.abs(w2), axis=-1)
    scales = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    values = jnp.clip(w2 / scales[..., None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return (*_pad_matrix(values, scales, layout, lead), finite, amax)


@functools.partial(jax.jit, static_argnames=("layout", "lead"))
def _stored_to_matrix(values, scales, layout: Fp8Layout, lead: int):
    values2 = layout.to_matrix(values, lead)
    scales2 = scales.reshape(*scales.shape[:lead], layout.n)
    return _pad_matrix(values2, scales2, layout, lead)


def quantize_activations(x2, act_scale=None):
    """x2 [M, K] -> (e4m3 [M, K], float32 scales [M]): per token (dynamic) or with a static per-tensor scale."""
    xf = x2.astype(jnp.float32)
    if act_scale is None:
        amax = jnp.max(jnp.abs(xf), axis=-1)
        scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    else:
        scale = jnp.broadcast_to(jnp.asarray(act_scale, jnp.float32), xf.shape[:1])
    x_q = jnp.clip(xf / scale[:, None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return x_q, scale


def with_options(params, **changes):
    """params with every Fp8Weight's options replaced (static metadata: the result compiles its own executable)."""
    def update(leaf):
        if isinstance(leaf, Fp8Weight):
            return dataclasses.replace(leaf, options=dataclasses.replace(leaf.options or _OPTIONS, **changes))
        return leaf

    return jax.tree.map(update, params, is_leaf=lambda x: isinstance(x, Fp8Weight))


def _where(index, lead: int, layout: Fp8Layout) -> str:
    """Readable position of an [*lead, N] index: layer and output channel (in openpi's output axes)."""
    index = [int(i) for i in index]
    layer = f"layer {index[0]}, " if lead else ""
    channel = tuple(int(c) for c in np.unravel_index(index[lead], layout.out_shape))
    return f"{layer}channel {channel}"


def _parse(eqn: str, x_ndim: int) -> tuple[list[str], list[str], list[str]]:
    """Tokens of 'x,w->out'; an ellipsis in x and out becomes one token per axis it covers."""
    try:
        lhs, out = eqn.replace(" ", "").split("->")
        xs, ws = lhs.split(",")
    except ValueError:
        raise ValueError(f"weight einsum equation must look like 'x,w->out', got {eqn!r}") from None
    if "..." in ws:
        raise ValueError(f"weight einsum equation {eqn!r}: an ellipsis on the weight is not supported")

    def tokens(spec: str, ellipsis_len: int) -> list[str]:
        if "..." not in spec:
            return list(spec)
        head, tail = spec.split("...")
        return list(head) + [f"...{i}" for i in range(ellipsis_len)] + list(tail)

    n_ell = x_ndim - (len(xs) - 3) if "..." in xs else 0
    x_tok = tokens(xs, n_ell)
    if len(x_tok) != x_ndim:
        raise ValueError(f"weight einsum equation {eqn!r} does not fit an activation of rank {x_ndim}")
    return x_tok, list(ws), tokens(out, n_ell)
