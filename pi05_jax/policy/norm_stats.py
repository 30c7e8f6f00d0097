"""openpi's norm stats (`<checkpoint>/assets/<asset_id>/norm_stats.json`) and quantile (un)normalization.

Quantile normalization, as openpi's `transforms.Normalize(use_quantiles=True)`:
    normalize:    (x - q01) / (q99 - q01 + 1e-6) * 2 - 1          (stats sliced to x's last dim)
    unnormalize:  (x + 1) / 2 * (q99 - q01 + 1e-6) + q01          (dims past the stats pass through)
Stats are float64, as openpi loads them; numpy promotes exactly as upstream (a float32 `x + 1` stays float32).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from pi05_jax.policy.errors import PolicyInputError

EPS = 1e-6
STAT_NAMES = ("mean", "std", "q01", "q99")


class NormStatsError(ValueError):
    """A missing or malformed norm_stats.json; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class NormStats:
    """One entry of norm_stats.json (e.g. "state" or "actions"); every field float64 [dim]."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.q01.shape[-1])


def asset_ids(checkpoint_dir: str | pathlib.Path) -> list[str]:
    """Asset ids under <checkpoint>/assets that hold a norm_stats.json (ids may contain '/', like
    'physical-intelligence/libero')."""
    root = pathlib.Path(checkpoint_dir).expanduser() / "assets"
    if not root.is_dir():
        return []
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob("norm_stats.json"))


def resolve_norm_stats_path(checkpoint_dir: str | pathlib.Path, asset_id: str | None) -> pathlib.Path:
    """The norm_stats.json of `asset_id`; with no id, the checkpoint's only one (an error if there are several)."""
    root = pathlib.Path(checkpoint_dir).expanduser()
    found = asset_ids(root)
    if asset_id is None:
        if len(found) == 1:
            return root / "assets" / found[0] / "norm_stats.json"
        if not found:
            raise NormStatsError(f"checkpoint {str(root)!r} has no assets/<asset_id>/norm_stats.json")
        raise NormStatsError(f"checkpoint {str(root)!r} has several norm stats assets {found}; "
                             f"choose one with --norm-stats ASSET_ID")
    path = root / "assets" / asset_id / "norm_stats.json"
    if not path.is_file():
        raise NormStatsError(f"norm stats asset {asset_id!r} not found: no file {str(path)!r} "
                             f"(assets in this checkpoint: {found or 'none'})")
    return path


def _vector(value, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise NormStatsError(f"{where} is not a list of numbers ({e})") from e
    if arr.ndim != 1 or arr.size == 0:
        raise NormStatsError(f"{where} has shape {arr.shape}, expected a non-empty 1-D list")
    if not np.all(np.isfinite(arr)):
        raise NormStatsError(f"{where} holds NaN or Inf")
    return arr


def load_norm_stats(path: str | pathlib.Path) -> dict[str, NormStats]:
    """{"state": NormStats, "actions": NormStats, ...} from an openpi norm_stats.json."""
    path = pathlib.Path(path)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise NormStatsError(f"norm stats file {str(path)!r} does not exist") from e
    except (OSError, json.JSONDecodeError) as e:
        raise NormStatsError(f"norm stats file {str(path)!r} is not readable JSON ({e})") from e
    table = body.get("norm_stats") if isinstance(body, dict) else None
    if not isinstance(table, dict):
        raise NormStatsError(f"{str(path)!r}: expected a top-level object {{'norm_stats': {{...}}}}")
    out = {}
    for key, entry in table.items():
        if not isinstance(entry, dict):
            raise NormStatsError(f"{str(path)!r}: norm_stats[{key!r}] is not an object")
        fields = {}
        for name in STAT_NAMES:
            if entry.get(name) is None:
                raise NormStatsError(f"{str(path)!r}: norm_stats[{key!r}] has no {name!r} "
                                     f"(pi0.5 uses quantile normalization: q01 and q99 are required)")
            fields[name] = _vector(entry[name], f"{str(path)!r}: norm_stats[{key!r}][{name!r}]")
        dims = {n: v.shape[0] for n, v in fields.items()}
        if len(set(dims.values())) != 1:
            raise NormStatsError(f"{str(path)!r}: norm_stats[{key!r}] fields differ in length {dims}")
        out[key] = NormStats(**fields)
    for required in ("state", "actions"):
        if required not in out:
            raise NormStatsError(f"{str(path)!r}: norm_stats has no {required!r} entry (found {sorted(out)})")
    return out


def normalize_quantile(x: np.ndarray, stats: NormStats, *, key: str = "state") -> np.ndarray:
    """(x - q01) / (q99 - q01 + eps) * 2 - 1 over x's last dim; stats longer than x are cut to x's length."""
    x = np.asarray(x)
    d = x.shape[-1]
    if d > stats.dim:
        raise PolicyInputError(f"key {key!r} has {d} dims but its norm stats have {stats.dim}")
    q01, q99 = stats.q01[:d], stats.q99[:d]
    return (x - q01) / (q99 - q01 + EPS) * 2.0 - 1.0


def unnormalize_quantile(x: np.ndarray, stats: NormStats) -> np.ndarray:
    """Inverse of `normalize_quantile` on the first `stats.dim` dims of x; later dims are returned unchanged."""
    x = np.asarray(x)
    d = stats.dim
    if d > x.shape[-1]:
        raise ValueError(f"cannot unnormalize {x.shape[-1]} dims with {d}-dim norm stats")
    head = (x[..., :d] + 1.0) / 2.0 * (stats.q99 - stats.q01 + EPS) + stats.q01
    return np.concatenate([head, x[..., d:]], axis=-1)
