"""Load a quantized checkpoint written by `pi05 quantize` (`checkpoints.quantize`).

A checkpoint is quantized when its directory holds `pi05_quantization.json`; `pi05_jax.runtime.Model.load` checks
`is_quantized(dir)` and comes here, so `infer`, `demo`, `serve` and `bench` load it like any checkpoint.

The manifest: {"format": "fp8" | "fp4", "version": 1, "weights": {key: entry}} with, per quantized key,
  entry = {"format": "fp8_e4m3" | "nvfp4", "shape": logical shape in openpi's layout, "lead_axes": 1 (the stacked
           depth axis), "contract_axes": [axes of one layer the model's einsum contracts],
           "arrays": [subkeys stored under <key>/]}.
The config is inferred from the unquantized shapes plus the manifest's logical shapes; every quantized array is
restored in its stored dtype, scales in float32, and every other leaf cast to the requested dtype.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from checkpoints import openpi_io
from checkpoints.config_inference import infer_config
from checkpoints.errors import CheckpointError
from checkpoints.layout import flatten, unflatten
from checkpoints.quantize import FORMAT_VERSION, FORMATS, FP4_ARRAYS, FP8_ARRAYS, MANIFEST
from pi05_jax.config import Pi05Config
from pi05_jax.quantized import QuantizationError

ENTRY_FORMATS = {"fp8_e4m3": FP8_ARRAYS, "nvfp4": FP4_ARRAYS}
REQUIRED = {"fp8_e4m3": ("fp8_values", "fp8_scales"), "nvfp4": FP4_ARRAYS}


def is_quantized(checkpoint_dir: str | pathlib.Path) -> bool:
    return (pathlib.Path(checkpoint_dir).expanduser() / MANIFEST).is_file()


def read_manifest(checkpoint_dir: str | pathlib.Path) -> dict:
    """The validated manifest; CheckpointError naming the file and key for anything this loader cannot read."""
    path = pathlib.Path(checkpoint_dir).expanduser() / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} does not exist (not a quantized checkpoint)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not readable JSON ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("weights"), dict):
        raise CheckpointError(f"{str(path)!r}: expected an object with 'format', 'version' and 'weights'")
    fmt = manifest.get("format")
    if fmt not in FORMATS:
        raise CheckpointError(f"{str(path)!r}: unknown quantization format {fmt!r}; this loader knows {FORMATS}")
    version = manifest.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r}: format version {version!r} is not supported (this loader reads "
                              f"1..{FORMAT_VERSION}; a newer pi05_jax wrote it?)")
    for key, entry in manifest["weights"].items():
        efmt = entry.get("format") if isinstance(entry, dict) else None
        if efmt not in ENTRY_FORMATS:
            raise CheckpointError(f"{str(path)!r}: key {key!r} has unknown weight format {efmt!r}; "
                                  f"this loader knows {sorted(ENTRY_FORMATS)}")
        for field in ("shape", "contract_axes", "arrays"):
            if not isinstance(entry.get(field), list):
                raise CheckpointError(f"{str(path)!r}: key {key!r} has no list {field!r}")
        unknown = [a for a in entry["arrays"] if a not in ENTRY_FORMATS[efmt]]
        missing = [a for a in REQUIRED[efmt] if a not in entry["arrays"]]
        if unknown or missing:
            raise CheckpointError(f"{str(path)!r}: key {key!r} ({efmt}) lists arrays {entry['arrays']}; "
                                  f"unknown {unknown}, missing {missing}")
    return manifest


def _split(flat: dict, manifest: dict, where: str) -> tuple[dict, dict]:
    """(plain leaves, {key: {subkey: leaf}}) from a flat checkpoint dict, checked against the manifest."""
    weights = manifest["weights"]
    grouped: dict[str, dict] = {k: {} for k in weights}
    plain = {}
    for path, leaf in flat.items():
        parent, _, sub = path.rpartition("/")
        if parent in weights:
            if sub not in weights[parent]["arrays"]:
                raise CheckpointError(f"{where}: unexpected array {path!r} (the manifest lists "
                                      f"{weights[parent]['arrays']} for {parent!r})")
            grouped[parent][sub] = leaf
        else:
            plain[path] = leaf
    for key, entry in weights.items():
        missing = [a for a in entry["arrays"] if a not in grouped[key]]
        if missing:
            raise CheckpointError(f"{where}: quantized key {key!r} is missing its array {missing[0]!r} "
                                  f"(expected {key}/{missing[0]})")
    return plain, grouped


def read_config(checkpoint_dir: str | pathlib.Path) -> Pi05Config:
    """The config of a quantized checkpoint (reads metadata only)."""
    return _read(checkpoint_dir)[0]


def _read(checkpoint_dir):
    manifest = read_manifest(checkpoint_dir)
    path = openpi_io.params_dir(checkpoint_dir)
    tree = openpi_io._metadata_tree(path)
    flat, has_value = openpi_io._strip_value_suffix(flatten(tree["params"]))
    plain, _ = _split(flat, manifest, str(path))
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in plain.items()}
    for key, entry in manifest["weights"].items():
        shapes[key] = tuple(int(s) for s in entry["shape"])
    return infer_config(shapes, where=str(path)), manifest, path, tree, has_value


def load_quantized_params(
    checkpoint_dir: str | pathlib.Path,
    *,
    dtype=jnp.bfloat16,
    device: jax.Device | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Pi05Config, dict]:
    """(config, params) with Fp8Weight / Fp4Weight objects at the quantized keys and every other leaf in `dtype`."""
    from pi05_jax.quantized.fp8_weight import Fp8Weight

    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    config, manifest, path, tree, has_value = _read(checkpoint_dir)
    ocp = openpi_io._ocp()
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    weights = manifest["weights"]

    def args_for(flat_path: str):
        key = flat_path[: -len("/value")] if has_value else flat_path
        parent = key.rpartition("/")[0]
        keep = parent in weights  # quantized arrays: their stored dtype (e4m3 / uint8 / float32 scales)
        return ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding,
                                    dtype=None if keep else jnp.dtype(dtype))

    item = {"params": tree["params"]}
    restore_args = {"params": unflatten({p: args_for(p) for p in flatten(tree["params"])})}
    say(f"loading quantized checkpoint {path} ({manifest['format']}, {len(weights)} quantized weights), "
        f"other weights as {jnp.dtype(dtype).name}")
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    except Exception as e:
        raise CheckpointError(f"{str(path)!r}: restoring the weights failed; the checkpoint is corrupted or "
                              f"truncated ({type(e).__name__}: {str(e)[:300]})") from e
    flat, _ = openpi_io._strip_value_suffix(flatten(restored["params"]))
    plain, grouped = _split(flat, manifest, str(path))
    out = dict(plain)
    try:
        for key, entry in weights.items():
            arrays = grouped[key]
            if entry["format"] == "fp8_e4m3":
                w = Fp8Weight.from_stored(arrays["fp8_values"], arrays["fp8_scales"],
                                          tuple(entry["contract_axes"]), lead=int(entry.get("lead_axes", 1)),
                                          name=key, act_scale=arrays.get("fp8_act_scale"))
            else:
                from pi05_jax.quantized import fp4_weight

                w = fp4_weight.Fp4Weight.from_arrays(arrays, where=key)
            if tuple(w.shape) != tuple(entry["shape"]):
                raise QuantizationError(f"{key}: stored arrays give shape {tuple(w.shape)}, the manifest says "
                                        f"{tuple(entry['shape'])}")
            out[key] = w
    except QuantizationError as e:
        raise CheckpointError(f"{str(path)!r}: {e}") from e
    say(f"loaded {len(flat)} arrays in {time.perf_counter() - t0:.1f} s")
    return config, unflatten(out)
