"""Arguments and helpers shared by the `pi05` subcommands."""

from __future__ import annotations

import argparse
import sys
import time


class UsageError(ValueError):
    """A bad command-line argument or input file; printed as one line, exit status 2."""


class Progress:
    """Progress lines on stderr with the elapsed time, so long loads and compiles are never silent."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)


# The implementations (pi05_jax.implementations.IMPLEMENTATIONS; a test keeps this list in step with it), for --help
# without importing JAX.
KERNELS_HELP = ("'reference' (plain JAX, upstream-exact), 'compact' (valid views, compacted prefix, packed weights, "
                "XLA attention), 'pallas' (compact + the Pallas attention and GeGLU kernels: the GPU fast path), "
                "'megakernel' (pallas + the action expert's Euler step as one persistent Mosaic GPU kernel; bf16 only)")


# --help text for the platform defaults (pi05_jax.implementations.default_kernels picks the implementation,
# default_dtype below the dtype); the CPU measurement behind them is in docs/PERF.md ("CPU defaults").
DEFAULTS_HELP = {
    "kernels": "default: the fastest implementation tested for parity on this platform: 'pallas' on a GPU; on the "
               "CPU 'compact' (2.5-3x faster than reference there; pallas's kernels run in interpret mode on CPUs)",
    "dtype": "default: bfloat16 on a GPU (what openpi serves with), float32 on the CPU (CPUs emulate bfloat16: no "
             "faster there, 1.3-1.5x slower to compile, and float32 matches upstream's float32 outputs)",
}


def default_kernels(platform: str) -> str:
    """The implementation `serve`, `infer` and `demo` run when --kernels is not given, for a JAX platform name."""
    from pi05_jax.implementations import default_kernels as listed

    return listed(platform)


def default_dtype(platform: str) -> str:
    """The dtype when --dtype is not given: bfloat16 on accelerators, float32 on the CPU (no native bfloat16)."""
    return "float32" if platform == "cpu" else "bfloat16"


def add_implementation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help=f"weights and compute dtype ({DEFAULTS_HELP['dtype']})")
    p.add_argument("--kernels", default=None, metavar="NAME",
                   help=f"implementation: {KERNELS_HELP} ({DEFAULTS_HELP['kernels']})")


def resolve_implementation(args) -> str:
    """Fill in args.kernels and args.dtype left at None with this platform's defaults; returns the line that says
    what runs and why (printed at startup)."""
    import jax

    platform = jax.default_backend()
    parts = []
    if args.kernels is None:
        args.kernels = default_kernels(platform)
        parts.append(f"implementation {args.kernels} (default on {platform}; --kernels reference for plain JAX)")
    else:
        parts.append(f"implementation {args.kernels} (--kernels)")
    if args.dtype is None:
        args.dtype = default_dtype(platform)
        why = ("CPUs emulate bfloat16: no faster, slower to compile" if platform == "cpu"
               else "what openpi serves with")
        parts.append(f"dtype {args.dtype} (default on {platform}: {why})")
    else:
        parts.append(f"dtype {args.dtype} (--dtype)")
    return ", ".join(parts)


def add_model_args(p: argparse.ArgumentParser, *, checkpoint_required: bool = True) -> None:
    p.add_argument("--checkpoint", required=checkpoint_required, metavar="DIR",
                   help="openpi checkpoint directory (holds params/ and assets/), e.g. a downloaded pi05_libero")
    add_implementation_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def formatter():
    return argparse.RawDescriptionHelpFormatter
