"""Read and write openpi checkpoint directories: the public entry for loading any checkpoint.

Layout (as openpi releases them):
    <dir>/params/                       orbax PyTree item {"params": <nested dict>}
    <dir>/assets/<asset_id>/norm_stats.json
Training checkpoints written by openpi add a trailing "value" key to every leaf; both layouts load.
`load_params` and `read_config` also take a quantized checkpoint (`pi05 quantize` output, recognised by its
manifest) and hand it to `checkpoints.quantized_io`; orbax itself is reached through `checkpoints.orbax_store`.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints import quantized_io
from checkpoints.config_inference import infer_config
from checkpoints.errors import CheckpointError
from checkpoints.layout import flatten, unflatten
from checkpoints.manifest import is_quantized
from checkpoints.orbax_store import params_dir, read_metadata, restore_params, save_params_item
from pi05_jax.config import Pi05Config

__all__ = ["load_params", "params_dir", "read_config", "save_params", "write_norm_stats"]


def read_config(checkpoint_dir: str | pathlib.Path) -> Pi05Config:
    """The config inferred from the checkpoint's shapes; validates the layout and reads no weights.
    Works for `pi05 quantize` output too (it holds a quantization manifest)."""
    if is_quantized(checkpoint_dir):
        return quantized_io.read_config(checkpoint_dir)
    stored = read_metadata(params_dir(checkpoint_dir))
    return infer_config(stored.shapes, where=str(stored.path))


def load_params(
    checkpoint_dir: str | pathlib.Path,
    *,
    dtype=jnp.bfloat16,
    device: jax.Device | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Pi05Config, dict]:
    """Restore params as device arrays, cast to `dtype` by orbax leaf by leaf (no second full copy).

    Returns (config, params) with params the nested dict under "params", keyed exactly as openpi names them.
    A quantized checkpoint gives Fp8Weight / Fp4Weight objects at its quantized keys
    (`quantized_io.load_quantized_params`).
    """
    if is_quantized(checkpoint_dir):
        return quantized_io.load_quantized_params(checkpoint_dir, dtype=dtype, device=device, progress=progress)
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    stored = read_metadata(params_dir(checkpoint_dir))
    config = infer_config(stored.shapes, where=str(stored.path))
    want = jnp.dtype(dtype)
    say(f"loading {stored.path} ({'training' if stored.has_value else 'released'} layout) as {want.name}")
    flat = restore_params(stored, lambda _key: want, device=device)
    for key, leaf in flat.items():
        if leaf.dtype != want:
            raise CheckpointError(f"{str(stored.path)!r}: key {key!r} restored as {leaf.dtype}, expected {want}")
    say(f"loaded {len(flat)} arrays in {time.perf_counter() - t0:.1f} s")
    return config, unflatten(flat)


def save_params(
    checkpoint_dir: str | pathlib.Path,
    params: dict,
    *,
    value_suffix: bool = False,
    norm_stats: dict[str, dict] | None = None,
) -> pathlib.Path:
    """Write params (nested dict) in openpi's layout; `value_suffix=True` writes the training layout."""
    root = pathlib.Path(checkpoint_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    if value_suffix:
        flat = {f"{k}/value": v for k, v in flat.items()}
    save_params_item(root / "params", unflatten(flat))
    for asset_id, stats in (norm_stats or {}).items():
        write_norm_stats(root / "assets" / asset_id / "norm_stats.json", stats)
    return root


def write_norm_stats(path: pathlib.Path, stats: dict[str, dict[str, np.ndarray]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}
    path.write_text(json.dumps({"norm_stats": body}, indent=2))
