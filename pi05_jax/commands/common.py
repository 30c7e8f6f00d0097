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


# The registered implementations (pi05_jax.sampler.IMPLEMENTATIONS; a test keeps this list in step with it), for
# --help without importing JAX.
KERNELS_HELP = ("'reference' (plain JAX, upstream-exact), 'compact' (valid views, compacted prefix, XLA attention), "
                "'pallas' (compact + the Pallas attention and GeGLU kernels: the fast path), "
                "'fused' (experimental: pallas + fused expert GEMMs, slower today), "
                "'pallas-pdl' (experimental: pallas + the expert's GEMMs as Mosaic GPU kernels with Programmatic "
                "Dependent Launch, not yet measured)")


def add_model_args(p: argparse.ArgumentParser, *, checkpoint_required: bool = True) -> None:
    p.add_argument("--checkpoint", required=checkpoint_required, metavar="DIR",
                   help="openpi checkpoint directory (holds params/ and assets/), e.g. a downloaded pi05_libero")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="weights and compute dtype; bfloat16 is what openpi serves with (default: %(default)s)")
    p.add_argument("--kernels", default="reference", metavar="NAME",
                   help=f"implementation: {KERNELS_HELP} (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def formatter():
    return argparse.RawDescriptionHelpFormatter
