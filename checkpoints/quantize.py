"""Quantize a pi0.5 params tree (in memory) or an openpi checkpoint directory (`pi05 quantize`) to FP8 or FP4.

What is quantized (FP8 = e4m3 values + a float32 scale per output channel, `pi05_jax.quantized.fp8_weight`):
  siglip  PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/{query,key,value,out}/kernel,
          .../MlpBlock_0/Dense_{0,1}/kernel
  prefix  PaliGemma/llm/layers/attn/{q_einsum,kv_einsum,attn_vec_einsum}/w, .../mlp/{gating_einsum,linear}
  expert  the same with the suffix _1
Everything else stays in its float dtype: the embedding table, norms, adaRMS Dense, the SigLIP patch embedding and
head, action in/out projections and the time MLP.
Format "fp4": the MLP gating/linear of the expert (`fp4_scope="expert"`) or of the expert and the prefix LLM
("expert+prefill") in NVFP4 (`pi05_jax.quantized.fp4_weight`, `checkpoints.fp4_format`); the rest as for "fp8".

Checkpoint written (openpi's layout; every quantized key becomes a small subtree of arrays):
    <out>/params/                 orbax item {"params": ...}; unquantized leaves keep the source's stored dtype;
                                  FP8 key -> <key>/fp8_values (float8_e4m3fn, openpi's layout of the weight),
                                             <key>/fp8_scales (float32 [L, *output axes]),
                                             <key>/fp8_act_scale (float32 [L], only with --calibration)
                                  FP4 key -> <key>/fp4_packed, <key>/fp4_block_scales, <key>/fp4_tensor_scale
    <out>/assets/                 copied from the source (norm stats)
    <out>/tokenizer.model         copied from the source when it has one (the demo checkpoint does)
    <out>/pi05_quantization.json  manifest: format, version, and per quantized key its format, arrays, logical
                                  shape and contracted axes (see `checkpoints.manifest`)
Orbax 0.12 stores float8_e4m3fn natively (checked); the loader also accepts the values as their uint8 bytes.

Calibration (static activation scales): `calibrate` runs the float model (plain-JAX reference) on model-level cases
(`<case>/in/...`, the layout of model_cases.npz and `pi05 infer --inputs`) and records, per quantized weight and
layer, the largest |activation| fed to it; act_scale = amax / 448. A layer the reference never runs with a weight
(the prefix LLM's last layer needs only K and V) gets the largest scale of that weight's other layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints import openpi_io
from checkpoints.layout import flatten, unflatten
from checkpoints.manifest import FORMAT_VERSION, FORMATS, MANIFEST, is_quantized, manifest_path, write_manifest
from checkpoints.orbax_store import params_dir, read_metadata
from pi05_jax import sampler
from pi05_jax.observation import check_noise, observation_from_arrays
from pi05_jax.policy.prompt_tokenizer import CHECKPOINT_TOKENIZER
from pi05_jax.quantized import QuantizationError, fp4_weight
from pi05_jax.quantized.fp8_weight import E4M3_MAX, Fp8Weight

PARTS = ("siglip", "prefix", "expert")
FP4_SCOPES = ("expert", "expert+prefill")

_MHA = "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0"
_MLP = "PaliGemma/img/Transformer/encoderblock/MlpBlock_0"
_LLM = "PaliGemma/llm/layers"


def _gemma_targets(sfx: str) -> dict[str, tuple[int, ...]]:
    # Contracted axes of one layer's weight, as the einsums of pi05_jax/gemma.py use them.
    return {
        f"{_LLM}/attn/q_einsum{sfx}/w": (1,),  # BTD,NDH->BTNH
        f"{_LLM}/attn/kv_einsum{sfx}/w": (2,),  # BSD,CKDH->CBSKH
        f"{_LLM}/attn/attn_vec_einsum{sfx}/w": (0, 1),  # BTNH,NHD->BTD
        f"{_LLM}/mlp{sfx}/gating_einsum": (1,),  # BTD,CDF->CBTF
        f"{_LLM}/mlp{sfx}/linear": (0,),  # BTF,FD->BTD
    }


# part -> {key: contracted axes of one layer}; every target is stacked over depth on axis 0.
FP8_TARGETS: dict[str, dict[str, tuple[int, ...]]] = {
    "siglip": {
        f"{_MHA}/query/kernel": (0,),  # BPD,DNH->BPNH
        f"{_MHA}/key/kernel": (0,),
        f"{_MHA}/value/kernel": (0,),
        f"{_MHA}/out/kernel": (0, 1),  # BTNH,NHD->BTD
        f"{_MLP}/Dense_0/kernel": (0,),  # ...i,io->...o
        f"{_MLP}/Dense_1/kernel": (0,),
    },
    "prefix": _gemma_targets(""),
    "expert": _gemma_targets("_1"),
}


def fp4_keys(scope: str) -> tuple[str, ...]:
    """The MLP weights that --format fp4 stores in NVFP4 for a scope."""
    if scope not in FP4_SCOPES:
        raise QuantizationError(f"unknown --fp4-scope {scope!r}; choose one of {FP4_SCOPES}")
    mlps = ("mlp_1",) if scope == "expert" else ("mlp_1", "mlp")
    return tuple(f"{_LLM}/{m}/{leaf}" for m in mlps for leaf in ("gating_einsum", "linear"))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which key gets which format."""

    fmt: str = "fp8"
    parts: tuple[str, ...] = PARTS
    fp4_scope: str = "expert"

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise QuantizationError(f"unknown quantization format {self.fmt!r}; choose one of {FORMATS}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise QuantizationError(f"unknown parts {unknown or list(self.parts)}; choose from {PARTS}")
        if self.fmt == "fp4":
            fp4_keys(self.fp4_scope)  # validates the scope

    def targets(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{key: (format "fp8_e4m3" | "nvfp4", contracted axes of one layer)}."""
        out = {}
        for part in self.parts:
            for key, contract in FP8_TARGETS[part].items():
                out[key] = ("fp8_e4m3", contract)
        if self.fmt == "fp4":
            for key in fp4_keys(self.fp4_scope):
                contract = out.get(key, (None, _gemma_contract(key)))[1]
                out[key] = ("nvfp4", contract)
        return out


def _gemma_contract(key: str) -> tuple[int, ...]:
    return {**_gemma_targets(""), **_gemma_targets("_1")}[key]


# --- in memory ---------------------------------------------------------------------------------------------------


def _is_quantized(leaf) -> bool:
    return hasattr(leaf, "einsum") or (hasattr(leaf, "dtype") and jnp.dtype(leaf.dtype) in (
        jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2), jnp.dtype(jnp.uint8)))


def quantize_params(params: dict, plan: Plan = Plan(), *, act_amax: dict[str, np.ndarray] | None = None,
                    progress: Callable[[str], None] | None = None) -> dict:
    """A copy of `params` (nested dict, openpi's keys; numpy or jax leaves) with every target of `plan` replaced
    by an Fp8Weight / Fp4Weight. `act_amax` ({key: [L] max |activation|}, from `calibrate`) adds static
    activation scales. Leaves that are not targets are shared, not copied."""
    say = progress or (lambda _m: None)
    flat = flatten(params)
    targets = plan.targets()
    missing = [k for k in targets if k not in flat]
    if missing:
        raise QuantizationError(f"params have no key {missing[0]!r} (not a pi0.5 params tree?)")
    for key, leaf in flat.items():
        if _is_quantized(leaf):
            raise QuantizationError(f"key {key!r} is already quantized ({type(leaf).__name__} "
                                    f"{getattr(leaf, 'dtype', '')}); quantize the original float checkpoint")
    out = dict(flat)
    for i, (key, (fmt, contract)) in enumerate(targets.items()):
        say(f"quantizing [{i + 1}/{len(targets)}] {key} {tuple(flat[key].shape)} -> {fmt}")
        if fmt == "nvfp4":
            out[key] = fp4_weight.quantize_weight(np.asarray(flat[key]), stacked=True, where=key)
            continue
        act_scale = None
        if act_amax is not None:
            if key not in act_amax:
                raise QuantizationError(f"calibration recorded no activations for {key!r}")
            act_scale = np.asarray(act_amax[key], np.float32) / np.float32(E4M3_MAX)
        out[key] = Fp8Weight.quantize(flat[key], contract, lead=1, name=key, act_scale=act_scale)
    return unflatten(out)


# --- calibration -------------------------------------------------------------------------------------------------


class _AmaxRecorder:
    """Host-side max |activation| per (key, layer), fed by jax.debug.callback from inside the jitted sampler."""

    def __init__(self, depths: dict[str, int]):
        self.amax = {k: np.zeros(d, np.float32) for k, d in depths.items()}
        self.seen = {k: np.zeros(d, bool) for k, d in depths.items()}

    def record(self, key: str, layer, amax) -> None:
        layer = int(np.asarray(layer))
        self.amax[key][layer] = max(self.amax[key][layer], float(np.asarray(amax)))
        self.seen[key][layer] = True


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _RecordingWeight:
    """A float weight that reports max |x| of every activation multiplied with it (one layer at a time)."""

    w: jax.Array
    layer: jax.Array  # int32 [L]; lax.scan hands each layer its index
    recorder: _AmaxRecorder = dataclasses.field(metadata=dict(static=True))
    name: str = dataclasses.field(metadata=dict(static=True))

    def einsum(self, eqn, x):
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
        jax.debug.callback(functools.partial(self.recorder.record, self.name), self.layer, amax)
        return jnp.einsum(eqn, x, self.w.astype(x.dtype))


def calibrate(params: dict, cases: list[dict], plan: Plan = Plan(), *,
              progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """{key: float32 [L] max |activation|} over `cases`, each {"obs": Observation, "noise": [B,T,A],
    "num_steps": int}, run through the float reference sampler."""
    say = progress or (lambda _m: None)
    flat = flatten(params)
    fp8_keys = [k for k, (fmt, _) in plan.targets().items() if fmt == "fp8_e4m3"]
    recorder = _AmaxRecorder({k: int(flat[k].shape[0]) for k in fp8_keys})
    rec = dict(flat)
    for k in fp8_keys:
        rec[k] = _RecordingWeight(jnp.asarray(flat[k]), jnp.arange(flat[k].shape[0], dtype=jnp.int32), recorder, k)
    rec_params = unflatten(rec)
    for i, case in enumerate(cases):
        say(f"calibrating on case {i + 1}/{len(cases)} ({case.get('name', '')})")
        actions = sampler.sample_actions(rec_params, case["obs"], noise=case["noise"], num_steps=case["num_steps"],
                                         kernels="reference")
        jax.block_until_ready(actions)
        jax.effects_barrier()
    out = {}
    for k in fp8_keys:
        seen, amax = recorder.seen[k], recorder.amax[k]
        if not seen.any() or not np.all(amax[seen] > 0):
            raise QuantizationError(f"calibration: no non-zero activation reached {k!r}")
        out[k] = np.where(seen, amax, amax[seen].max()).astype(np.float32)
    return out


def load_calibration_cases(path: str | pathlib.Path, config) -> list[dict]:
    """Model-level cases (`<case>/in/...`, as model_cases.npz / `pi05 infer --inputs`) for `calibrate`."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise QuantizationError(f"calibration file {str(file)!r} does not exist")
    try:
        z = np.load(file, allow_pickle=False)
    except Exception as e:
        raise QuantizationError(f"calibration file {str(file)!r} is not a readable .npz ({e})") from e
    names = sorted({k.split("/in/")[0] for k in z.files if "/in/" in k})
    if not names:
        raise QuantizationError(f"calibration file {str(file)!r} has no '<case>/in/...' keys "
                                f"(model-level inputs, the layout of model_cases.npz)")
    cases = []
    rng = np.random.default_rng(0)
    for name in names:
        prefix = f"{name}/in/"
        arrays = {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}
        obs = observation_from_arrays(arrays, config, where=f"{file}:{prefix}")
        shape = (obs.batch_size, config.action_horizon, config.action_dim)
        noise = (check_noise(arrays["noise"], obs.batch_size, config, key=f"{prefix}noise") if "noise" in arrays
                 else rng.standard_normal(shape).astype(np.float32))
        cases.append({"name": name, "obs": obs, "noise": noise, "num_steps": int(arrays.get("num_steps", 10))})
    return cases


# --- checkpoints ---------------------------------------------------------------------------------------------------


def _stored_arrays(key: str, leaf) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays a quantized leaf is written as ({subkey: array}) and its manifest entry."""
    if isinstance(leaf, Fp8Weight):
        values, scales = leaf.stored()
        arrays = {"fp8_values": values, "fp8_scales": np.asarray(scales, np.float32)}
        if leaf.act_scale is not None:
            arrays["fp8_act_scale"] = np.asarray(leaf.act_scale, np.float32)
        entry = {"format": "fp8_e4m3", "shape": list(leaf.shape), "lead_axes": leaf.lead,
                 "contract_axes": list(leaf.layout.contract), "arrays": sorted(arrays),
                 "values_dtype": "float8_e4m3fn"}
        return arrays, entry
    arrays = leaf.to_arrays()
    # Fp4Weight keeps the contracted axis second to last: axis ndim - 3 of one layer (after the depth axis).
    entry = {"format": "nvfp4", "shape": list(leaf.shape), "lead_axes": 1, "contract_axes": [len(leaf.shape) - 3],
             "arrays": sorted(arrays)}
    return arrays, entry


def quantize_checkpoint(src: str | pathlib.Path, dst: str | pathlib.Path, *, plan: Plan = Plan(),
                        calibration: str | pathlib.Path | None = None, overwrite: bool = False,
                        progress: Callable[[str], None] | None = None) -> dict:
    """Read an openpi checkpoint, quantize it by `plan`, write it to `dst` (layout in the module docstring).
    Returns the manifest."""
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    src_root = pathlib.Path(src).expanduser().resolve()
    dst_root = pathlib.Path(dst).expanduser().resolve()
    if is_quantized(src_root):
        fmt = json.loads(manifest_path(src_root).read_text()).get("format", "?")
        raise QuantizationError(f"{str(src_root)!r} is already quantized (format {fmt!r}, {MANIFEST}); "
                                f"quantize the original float checkpoint")
    if dst_root == src_root or src_root in dst_root.parents:
        raise QuantizationError(f"--output {str(dst_root)!r} must not be the source checkpoint or inside it")
    if dst_root.exists() and any(dst_root.iterdir()) and not overwrite:
        raise QuantizationError(f"--output {str(dst_root)!r} exists and is not empty (use --overwrite)")
    stored_dtypes = read_metadata(params_dir(src_root)).dtypes()
    for key, dtype in stored_dtypes.items():
        if dtype in ("float8_e4m3fn", "float8_e5m2", "uint8"):
            raise QuantizationError(f"key {key!r} is stored as {dtype}: the checkpoint is already quantized")
    config, params = openpi_io.load_params(src_root, dtype=jnp.float32, progress=say)
    act_amax = None
    if calibration is not None:
        cases = load_calibration_cases(calibration, config)
        act_amax = calibrate(params, cases, plan, progress=say)
    qparams = quantize_params(params, plan, act_amax=act_amax, progress=say)
    del params

    flat_out, entries = {}, {}
    for key, leaf in flatten(qparams).items():
        if hasattr(leaf, "einsum"):
            arrays, entry = _stored_arrays(key, leaf)
            entries[key] = entry
            for sub, a in arrays.items():
                flat_out[f"{key}/{sub}"] = a
        else:
            want = stored_dtypes.get(key)
            flat_out[key] = np.asarray(leaf).astype(want) if want else np.asarray(leaf)
    manifest = {
        "format": plan.fmt,
        "version": FORMAT_VERSION,
        "created_by": "pi05 quantize",
        "source": str(src_root),
        "parts": list(plan.parts),
        "fp4_scope": plan.fp4_scope if plan.fmt == "fp4" else None,
        "activation_scaling": "static" if act_amax is not None else "dynamic",
        "calibration": None if calibration is None else str(pathlib.Path(calibration).resolve()),
        "weights": entries,
    }
    tmp = dst_root.with_name(dst_root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    say(f"writing {len(flat_out)} arrays to {tmp}")
    openpi_io.save_params(tmp, unflatten(flat_out))
    if (src_root / "assets").is_dir():
        shutil.copytree(src_root / "assets", tmp / "assets")
    if (src_root / CHECKPOINT_TOKENIZER).is_file():
        shutil.copy2(src_root / CHECKPOINT_TOKENIZER, tmp / CHECKPOINT_TOKENIZER)
    write_manifest(tmp, manifest)
    if dst_root.exists():
        shutil.rmtree(dst_root)
    tmp.rename(dst_root)
    say(f"wrote {dst_root} ({len(entries)} quantized weights, {plan.fmt}) in {time.perf_counter() - t0:.1f} s")
    return manifest

