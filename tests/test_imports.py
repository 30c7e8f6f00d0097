"""Every module of the package imports first in a fresh interpreter (no import cycle depends on which module a
program happens to import first: pi05_jax.sampler registers the fast paths when it is imported, and those import
the denoise modules that import the sampler back)."""

from __future__ import annotations

import concurrent.futures
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for pkg in ("pi05_jax", "pallas_kernels", "checkpoints")
    for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py")


def _import_alone(module: str) -> str | None:
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return f"{module}: {lines[-1] if lines else proc.returncode}"


def test_every_module_imports_first():
    """One interpreter per module (the import order is the point), four at a time (each holds JAX in memory)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(_import_alone, MODULES) if f]
    assert not failures, "modules that fail to import first:\n" + "\n".join(failures)


@pytest.mark.parametrize("module", ["pi05_jax.denoise_fused"])
def test_the_cycle_that_broke(module):
    """The one that did fail: denoise_fused imported first (fast_path built its registry from a half-initialized
    denoise_fused). Listed on its own so a regression names it."""
    assert _import_alone(module) is None
