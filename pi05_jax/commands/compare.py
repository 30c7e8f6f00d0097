"""`pi05 compare`: how far apart two action arrays are (ours vs upstream's, one path vs another)."""

from __future__ import annotations

import json

import numpy as np

from pi05_jax.commands.common import UsageError, formatter

EPILOG = """\
Metrics: relative error ||a-b||/||b|| (b is the reference, the second file), cosine similarity, mean squared error,
max abs error, and per action dimension the max abs error and the relative error.

examples:
  pi05 compare out.npz model_cases.npz --ref-key libero_like/out/fp32/actions --max-rel-err 1e-4
  pi05 compare bf16.npz model_cases.npz --ref-key libero_like/out/bf16/actions --min-cosine 0.9999
Exit status: 0 if every threshold given holds, 1 if one fails, 2 on bad input.
"""


def register(sub) -> None:
    p = sub.add_parser("compare", help="error metrics between two outputs", description=__doc__, epilog=EPILOG,
                       formatter_class=formatter())
    p.add_argument("a", metavar="A.npz", help="the output to check")
    p.add_argument("b", metavar="B.npz", help="the reference")
    p.add_argument("--key", default="actions", help="array key in A (default: %(default)s)")
    p.add_argument("--ref-key", default=None, help="array key in B (default: same as --key)")
    p.add_argument("--max-rel-err", type=float, default=None, help="fail if relative error exceeds this")
    p.add_argument("--min-cosine", type=float, default=None, help="fail if cosine similarity is below this")
    p.add_argument("--max-mse", type=float, default=None, help="fail if mean squared error exceeds this")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the metrics as JSON")
    p.set_defaults(run=run)


def _load(path: str, key: str) -> np.ndarray:
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise UsageError(f"{path!r} does not exist") from e
    except Exception as e:
        raise UsageError(f"{path!r} is not a readable .npz ({type(e).__name__}: {e})") from e
    if key not in z.files:
        raise UsageError(f"{path!r} has no key {key!r}; keys: {z.files[:12]}{' ...' if len(z.files) > 12 else ''}")
    return np.asarray(z[key], np.float64)


def metrics(a: np.ndarray, b: np.ndarray) -> dict:
    d = a - b
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    denom = np.linalg.norm(flat_a) * np.linalg.norm(flat_b)
    per_dim_b = np.linalg.norm(b.reshape(-1, b.shape[-1]), axis=0)
    per_dim_d = np.linalg.norm(d.reshape(-1, d.shape[-1]), axis=0)
    return {
        "shape": list(a.shape),
        "rel_err": float(np.linalg.norm(d) / max(np.linalg.norm(flat_b), 1e-30)),
        "cosine": float(flat_a @ flat_b / denom) if denom > 0 else float("nan"),
        "mse": float(np.mean(d**2)),
        "max_abs_err": float(np.max(np.abs(d))),
        "per_dim_max_abs_err": np.max(np.abs(d.reshape(-1, d.shape[-1])), axis=0).tolist(),
        "per_dim_rel_err": (per_dim_d / np.maximum(per_dim_b, 1e-30)).tolist(),
    }


def run(args) -> int:
    ref_key = args.ref_key or args.key
    a, b = _load(args.a, args.key), _load(args.b, ref_key)
    if a.shape != b.shape:
        raise UsageError(f"shapes differ: {args.a}:{args.key} is {a.shape}, {args.b}:{ref_key} is {b.shape}")
    m = metrics(a, b)
    print(f"{args.a}:{args.key}  vs  {args.b}:{ref_key}   shape {tuple(a.shape)}")
    print(f"  relative error {m['rel_err']:.3e}   cosine {m['cosine']:.8f}   MSE {m['mse']:.3e}   "
          f"max abs {m['max_abs_err']:.3e}")
    print("  per dim max abs: " + " ".join(f"{v:.1e}" for v in m["per_dim_max_abs_err"]))
    failures = []
    if args.max_rel_err is not None and not m["rel_err"] <= args.max_rel_err:
        failures.append(f"relative error {m['rel_err']:.3e} > {args.max_rel_err:g}")
    if args.min_cosine is not None and not m["cosine"] >= args.min_cosine:
        failures.append(f"cosine {m['cosine']:.8f} < {args.min_cosine:g}")
    if args.max_mse is not None and not m["mse"] <= args.max_mse:
        failures.append(f"MSE {m['mse']:.3e} > {args.max_mse:g}")
    m["passed"] = not failures
    if args.json:
        with open(args.json, "w") as f:
            json.dump(m, f, indent=2)
    for f in failures:
        print(f"FAIL: {f}")
    print("PASS" if not failures else "FAILED")
    return 1 if failures else 0
