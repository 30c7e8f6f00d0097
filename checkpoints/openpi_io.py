"""Read and write openpi checkpoint directories.

Layout (as openpi releases them):
    <dir>/params/                       orbax PyTree item {"params": <nested dict>}
    <dir>/assets/<asset_id>/norm_stats.json
Training checkpoints written by openpi add a trailing "value" key to every leaf; both layouts load.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.config_inference import infer_config
from checkpoints.errors import CheckpointError
from checkpoints.layout import flatten, unflatten
from pi05_jax.config import Pi05Config

_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: it pulls in a lot

    return ocp


def params_dir(checkpoint_dir: str | pathlib.Path) -> pathlib.Path:
    root = pathlib.Path(checkpoint_dir).expanduser().resolve()
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint path {str(root)!r} is a file, expected a directory holding params/")
    path = root / "params"
    if not path.is_dir():
        if any((root / m).exists() for m in _ORBAX_MARKERS):
            path = root  # pointed straight at the params item
        else:
            raise CheckpointError(
                f"{str(root)!r} is not an openpi checkpoint: no 'params/' directory "
                f"(expected <dir>/params/ written by orbax, and <dir>/assets/<asset_id>/norm_stats.json)"
            )
    if not any((path / m).exists() for m in _ORBAX_MARKERS):
        raise CheckpointError(f"{str(path)!r} is not an orbax checkpoint (no _METADATA or manifest.ocdbt)")
    return path


def _metadata_tree(path: pathlib.Path) -> dict:
    """The checkpoint's tree of array metadata; works with orbax 0.11 (a tree) and 0.12 (StepMetadata)."""
    ocp = _ocp()
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            md = ckptr.metadata(path)
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{str(path)!r}: cannot read orbax metadata ({type(e).__name__}: {e})") from e
    tree = getattr(md, "item_metadata", md)  # orbax >= 0.12: StepMetadata.item_metadata
    tree = getattr(tree, "tree", tree)  # orbax >= 0.12: TreeMetadata.tree
    if not isinstance(tree, dict) or "params" not in tree:
        keys = list(tree.keys()) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointError(f"{str(path)!r}: expected an item {{'params': ...}} (openpi's layout), found {keys}")
    return tree


def _strip_value_suffix(flat: dict[str, object]) -> tuple[dict[str, object], bool]:
    if flat and all(k.endswith("/value") for k in flat):
        return {k[: -len("/value")]: v for k, v in flat.items()}, True
    return flat, False


def _read(path: pathlib.Path) -> tuple[Pi05Config, dict, bool]:
    tree = _metadata_tree(path)
    flat, has_value = _strip_value_suffix(flatten(tree["params"]))
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in flat.items()}
    return infer_config(shapes, where=str(path)), tree, has_value


def read_config(checkpoint_dir: str | pathlib.Path) -> Pi05Config:
    """The config inferred from the checkpoint's shapes; validates the layout and reads no weights.
    Works for `pi05 quantize` output too (it holds a quantization manifest)."""
    from checkpoints import quantized_io  # lazy: quantized_io builds on this module

    if quantized_io.is_quantized(checkpoint_dir):
        return quantized_io.read_config(checkpoint_dir)
    return _read(params_dir(checkpoint_dir))[0]


def load_params(
    checkpoint_dir: str | pathlib.Path,
    *,
    dtype=jnp.bfloat16,
    device: jax.Device | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Pi05Config, dict]:
    """Restore params as device arrays, cast to `dtype` by orbax leaf by leaf (no second full copy).

    Returns (config, params) with params the nested dict under "params", keyed exactly as openpi names them.
    """
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    path = params_dir(checkpoint_dir)
    config, tree, has_value = _read(path)
    ocp = _ocp()
    device = device or jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    item = {"params": tree["params"]}
    restore_args = jax.tree.map(
        lambda _: ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding, dtype=jnp.dtype(dtype)), item
    )
    say(f"loading {path} ({'training' if has_value else 'released'} layout) as {jnp.dtype(dtype).name}")
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    except Exception as e:
        raise CheckpointError(
            f"{str(path)!r}: restoring the weights failed; the checkpoint is corrupted or truncated "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from e
    flat, _ = _strip_value_suffix(flatten(restored["params"]))
    for key, leaf in flat.items():
        if leaf.dtype != jnp.dtype(dtype):
            raise CheckpointError(f"{str(path)!r}: key {key!r} restored as {leaf.dtype}, expected {jnp.dtype(dtype)}")
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
    ocp = _ocp()
    root = pathlib.Path(checkpoint_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    if value_suffix:
        flat = {f"{k}/value": v for k, v in flat.items()}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(root / "params", {"params": unflatten(flat)}, force=True)
    for asset_id, stats in (norm_stats or {}).items():
        write_norm_stats(root / "assets" / asset_id / "norm_stats.json", stats)
    return root


def write_norm_stats(path: pathlib.Path, stats: dict[str, dict[str, np.ndarray]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}
    path.write_text(json.dumps({"norm_stats": body}, indent=2))
