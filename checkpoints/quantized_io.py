"""Read a quantized checkpoint written by `pi05 quantize` (`checkpoints.quantize`).

A checkpoint is quantized when its directory holds `pi05_quantization.json` (`checkpoints.manifest`, which also
describes the manifest). `checkpoints.openpi_io.load_params` / `read_config` come here for such a directory, so
`infer`, `demo`, `serve`, `bench` and `profile` load it like any checkpoint. A stored array that is missing, or
whose shape does not give the manifest's shape, is a CheckpointError naming the file, the key and the shapes.

The config is inferred from the unquantized shapes plus the manifest's logical shapes; every quantized array is
restored in its stored dtype, scales in float32, and every other leaf cast to the requested dtype.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from checkpoints.config_inference import infer_config
from checkpoints.errors import CheckpointError
from checkpoints.layout import unflatten
from checkpoints.manifest import MANIFEST, is_quantized, read_manifest, split_quantized, stored_weight_shape
from checkpoints.orbax_store import StoredParams, params_dir, read_metadata, restore_params
from pi05_jax.config import Pi05Config
from pi05_jax.quantized import QuantizationError
from pi05_jax.quantized.fp4_weight import Fp4Weight
from pi05_jax.quantized.fp8_weight import Fp8Weight

__all__ = ["is_quantized", "load_quantized_params", "read_config", "read_manifest"]


def read_config(checkpoint_dir: str | pathlib.Path) -> Pi05Config:
    """The config of a quantized checkpoint (reads metadata only)."""
    return _read(checkpoint_dir)[0]


def _read(checkpoint_dir) -> tuple[Pi05Config, dict, StoredParams]:
    manifest = read_manifest(checkpoint_dir)
    stored = read_metadata(params_dir(checkpoint_dir))
    plain, grouped = split_quantized(stored.flat, manifest["weights"], str(stored.path))
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in plain.items()}
    for key, entry in manifest["weights"].items():
        shapes[key] = tuple(int(s) for s in entry["shape"])
        # the stored arrays must give the manifest's shape, before the config is inferred from it (else a
        # mismatch would surface as some other key's wrong shape)
        array_shapes = {k: tuple(getattr(v, "shape", ())) for k, v in grouped[key].items()}
        array, got = stored_weight_shape(entry, array_shapes)
        if got != shapes[key]:
            gives = "" if got == array_shapes[array] else f" (the weight shape {got})"
            raise CheckpointError(f"{str(stored.path)!r}: quantized key {key!r}: {key}/{array} has shape "
                                  f"{array_shapes[array]}{gives}, but {MANIFEST} says the weight's shape is "
                                  f"{shapes[key]}")
    return infer_config(shapes, where=str(stored.path)), manifest, stored


def weight_from_arrays(key: str, entry: dict, arrays: dict):
    """The Fp8Weight / Fp4Weight of one quantized key from its stored arrays ({subkey: array}) and manifest entry;
    QuantizationError when they do not fit together."""
    if entry["format"] == "fp8_e4m3":
        w = Fp8Weight.from_stored(arrays["fp8_values"], arrays["fp8_scales"], tuple(entry["contract_axes"]),
                                  lead=int(entry.get("lead_axes", 1)), name=key,
                                  act_scale=arrays.get("fp8_act_scale"))
    else:
        w = Fp4Weight.from_arrays(arrays, where=key)
    if tuple(w.shape) != tuple(entry["shape"]):
        raise QuantizationError(f"{key}: stored arrays give shape {tuple(w.shape)}, the manifest says "
                                f"{tuple(entry['shape'])}")
    return w


def load_quantized_params(
    checkpoint_dir: str | pathlib.Path,
    *,
    dtype=jnp.bfloat16,
    device: jax.Device | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Pi05Config, dict]:
    """(config, params) with Fp8Weight / Fp4Weight objects at the quantized keys and every other leaf in `dtype`."""
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    config, manifest, stored = _read(checkpoint_dir)
    weights = manifest["weights"]
    # quantized arrays keep their stored dtype (e4m3 / uint8 / float32 scales); every other leaf becomes `dtype`
    keep = lambda key: key.rpartition("/")[0] in weights
    say(f"loading quantized checkpoint {stored.path} ({manifest['format']}, {len(weights)} quantized weights), "
        f"other weights as {jnp.dtype(dtype).name}")
    flat = restore_params(stored, lambda key: None if keep(key) else dtype, device=device)
    plain, grouped = split_quantized(flat, weights, str(stored.path))
    out = dict(plain)
    try:
        for key, entry in weights.items():
            out[key] = weight_from_arrays(key, entry, grouped[key])
    except QuantizationError as e:
        raise CheckpointError(f"{str(stored.path)!r}: {e}") from e
    say(f"loaded {len(flat)} arrays in {time.perf_counter() - t0:.1f} s")
    return config, unflatten(out)
