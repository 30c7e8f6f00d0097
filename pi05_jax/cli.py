"""`pi05`: the command-line entry point. Each subcommand lives in `pi05_jax/commands/<name>.py` and exposes
`register(subparsers)`; its `run(args)` returns an exit status."""

from __future__ import annotations

import argparse
import importlib
import sys

# In --help order. A module that is not installed in this build is left out, never half-registered.
COMMANDS = ("demo", "infer", "compare", "serve", "loadtest", "bench", "profile", "quantize", "build_vision_engine")

DESCRIPTION = """\
pi05_jax: fast, faithful pi0.5 (openpi) inference in JAX.

Start here:
  pi05 demo                                     random-weight model, synthetic observation, actions + timing
  pi05 infer --checkpoint DIR --inputs F.npz --case NAME --output OUT.npz
  pi05 compare OUT.npz UPSTREAM.npz --ref-key CASE/out/fp32/actions
Run `pi05 COMMAND --help` for the arguments and examples of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pi05", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"pi05_jax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"pi05_jax.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from checkpoints.errors import CheckpointError
    from pi05_jax.commands.common import UsageError
    from pi05_jax.observation import ObservationError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CheckpointError, ObservationError, UsageError, ValueError, FileNotFoundError) as e:
        print(f"pi05 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pi05 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
