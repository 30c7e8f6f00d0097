"""Read only the vision tower's weights (`params["PaliGemma"]["img"]`) from an openpi checkpoint, as float32 numpy.

Exporting SigLIP must not need the 3B-parameter LLM in memory: orbax restores just the `PaliGemma/img` subtree
(partial restore), onto the CPU, whatever the stored dtype (bfloat16 checkpoints are widened exactly).
A quantized checkpoint (`pi05 quantize`, checkpoints.quantized_io) is read too: its config comes from the
quantized reader, and a quantized SigLIP weight (FP8 values + scales, or NVFP4) is dequantized to float32 (values x
scales): the engine then runs the weights the quantized model holds, in the engine's own precision.
"""

from __future__ import annotations

import pathlib

import numpy as np

from checkpoints.errors import CheckpointError
from checkpoints.layout import flatten, unflatten
from pi05_jax.config import Pi05Config

IMG_PREFIX = "PaliGemma/img/"


def load_vision_params(checkpoint_dir: str | pathlib.Path) -> tuple[Pi05Config, dict]:
    """(config inferred from the checkpoint's shapes, nested {img key: float32 ndarray})."""
    import jax
    import orbax.checkpoint as ocp

    from checkpoints import manifest, openpi_io, orbax_store, quantized_io

    path = openpi_io.params_dir(checkpoint_dir)
    quantized = quantized_io.is_quantized(checkpoint_dir)
    if quantized:
        config = quantized_io.read_config(checkpoint_dir)
        weights = {k: e for k, e in quantized_io.read_manifest(checkpoint_dir)["weights"].items()
                   if k.startswith(IMG_PREFIX)}
    else:
        config, weights = openpi_io.read_config(checkpoint_dir), {}
    tree = orbax_store.metadata_tree(path)  # same reader as the full loader, so errors read the same
    flat = flatten(tree["params"])
    wanted = {k: v for k, v in flat.items() if k.startswith(IMG_PREFIX)}
    if not wanted:
        raise CheckpointError(f"{str(path)!r}: no keys under 'PaliGemma/img/' (not a pi0/pi0.5 checkpoint?)")
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    item = {"params": unflatten(wanted)}
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray, sharding=cpu), item)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                        partial_restore=True))
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{str(path)!r}: restoring the vision weights failed "
                              f"({type(e).__name__}: {str(e)[:300]})") from e
    flat = {key.removesuffix("/value"): leaf for key, leaf in flatten(restored["params"]).items()}
    plain, grouped = manifest.split_quantized(flat, weights, str(path))
    out = {key[len(IMG_PREFIX):]: np.asarray(leaf, dtype=np.float32) for key, leaf in plain.items()}
    for key, entry in weights.items():
        out[key[len(IMG_PREFIX):]] = _dequantized(key, entry, grouped[key], where=str(path))
    return config, unflatten(out)


def _dequantized(key: str, entry: dict, arrays: dict, *, where: str) -> np.ndarray:
    """One quantized SigLIP weight (its stored arrays, as `pi05 quantize` wrote them) as float32 in openpi's layout."""
    from pi05_jax.quantized import QuantizationError, fp4_weight
    from pi05_jax.quantized.fp8_weight import Fp8Weight

    try:
        if entry["format"] == "fp8_e4m3":
            w = Fp8Weight.from_stored(arrays["fp8_values"], arrays["fp8_scales"], tuple(entry["contract_axes"]),
                                      lead=int(entry.get("lead_axes", 1)), name=key)
        else:
            w = fp4_weight.Fp4Weight.from_arrays(arrays, where=key)
        dense = np.asarray(w.dequantize(np.float32), np.float32)
    except QuantizationError as e:
        raise CheckpointError(f"{where!r}: {e}") from e
    if dense.shape != tuple(entry["shape"]):
        raise CheckpointError(f"{where!r}: {key} dequantizes to shape {dense.shape}, the manifest says "
                              f"{tuple(entry['shape'])}")
    return dense
