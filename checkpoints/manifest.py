"""The quantization manifest `pi05_quantization.json` that `pi05 quantize` writes next to `params/`.

A checkpoint is quantized when its directory holds this file. Its layout:
  {"format": "fp8" | "fp4", "version": 1, "weights": {key: entry}} with, per quantized key,
  entry = {"format": "fp8_e4m3" | "nvfp4", "shape": logical shape in openpi's layout, "lead_axes": 1 (the stacked
           depth axis), "contract_axes": [axes of one layer the model's einsum contracts],
           "arrays": [subkeys stored under <key>/]}.
The writer (`checkpoints.quantize`) and the readers (`checkpoints.quantized_io`, `bridges.vision_weights`) share
the names and checks here; this module reads no weights and imports no other reader or writer.
"""

from __future__ import annotations

import json
import pathlib

from checkpoints.errors import CheckpointError

MANIFEST = "pi05_quantization.json"
FORMAT_VERSION = 1
FORMATS = ("fp8", "fp4")
FP8_ARRAYS = ("fp8_values", "fp8_scales", "fp8_act_scale")
FP4_ARRAYS = ("fp4_packed", "fp4_block_scales", "fp4_tensor_scale")
ENTRY_FORMATS = {"fp8_e4m3": FP8_ARRAYS, "nvfp4": FP4_ARRAYS}
REQUIRED = {"fp8_e4m3": ("fp8_values", "fp8_scales"), "nvfp4": FP4_ARRAYS}


def manifest_path(checkpoint_dir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(checkpoint_dir).expanduser() / MANIFEST


def is_quantized(checkpoint_dir: str | pathlib.Path) -> bool:
    return manifest_path(checkpoint_dir).is_file()


def read_manifest(checkpoint_dir: str | pathlib.Path) -> dict:
    """The validated manifest; CheckpointError naming the file and key for anything this loader cannot read."""
    path = manifest_path(checkpoint_dir)
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


def write_manifest(checkpoint_dir: str | pathlib.Path, manifest: dict) -> pathlib.Path:
    path = manifest_path(checkpoint_dir)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def split_quantized(flat: dict, weights: dict, where: str) -> tuple[dict, dict]:
    """(plain leaves, {key: {subkey: leaf}}) from a flat checkpoint dict, checked against the manifest's
    `weights` ({quantized key: entry}); `where` names the checkpoint in errors."""
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
            what = (f"all of its arrays {missing}" if len(missing) == len(entry["arrays"]) and len(missing) > 1
                    else f"its array {missing[0]!r}" + (f" (and {missing[1:]})" if len(missing) > 1 else ""))
            raise CheckpointError(f"{where}: quantized key {key!r} is missing {what} (expected {key}/{missing[0]}; "
                                  f"{MANIFEST} lists it as {entry['format']} of shape {tuple(entry['shape'])})")
    return plain, grouped


def stored_weight_shape(entry: dict, arrays: dict[str, tuple[int, ...]]) -> tuple[str, tuple[int, ...]]:
    """(the array that carries the weight's shape, the logical shape it gives) from the stored shapes of one
    quantized key's arrays: fp8_values is stored in openpi's layout; fp4_packed halves the contracted axis (second
    to last, `checkpoints.fp4_format`)."""
    if entry["format"] == "fp8_e4m3":
        return "fp8_values", tuple(arrays["fp8_values"])
    packed = tuple(arrays["fp4_packed"])
    return "fp4_packed", (*packed[:-2], 2 * packed[-2], packed[-1]) if len(packed) >= 2 else packed
