"""Shared fixtures: the upstream reference data (tests/reference/tiny_pi05, read-only) and loaded models."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# vendored (its README.md says how upstream produced it); PI05_REFERENCE points at a refreshed copy
REFERENCE_DIR = pathlib.Path(os.environ.get("PI05_REFERENCE", ROOT / "tests" / "reference" / "tiny_pi05"))
MODEL_CASES = ("libero_like", "batch2_mixed", "three_steps")


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (marker `gpu`)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    if not (REFERENCE_DIR / "model_cases.npz").exists():
        pytest.fail(f"reference data not found at {REFERENCE_DIR} (vendored in tests/reference/tiny_pi05; "
                    f"PI05_REFERENCE overrides)")
    return REFERENCE_DIR


@functools.cache
def _load(dtype: str):
    from pi05_jax.runtime import Model

    return Model.load(REFERENCE_DIR / "checkpoint", dtype=dtype)


@pytest.fixture(scope="session")
def tiny_fp32(reference_dir):
    """The shared tiny reference model, float32 (pi05_jax.runtime.Model)."""
    return _load("float32")


@pytest.fixture(scope="session")
def tiny_bf16(reference_dir):
    return _load("bfloat16")


@pytest.fixture(scope="session")
def model_cases(reference_dir):
    return np.load(reference_dir / "model_cases.npz")


def case_inputs(cases, name: str) -> dict[str, np.ndarray]:
    prefix = f"{name}/in/"
    return {k[len(prefix):]: cases[k] for k in cases.files if k.startswith(prefix)}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_cli(argv) -> tuple[int, str, str]:
    """Run `pi05 ARGV` in this process: (exit status, stdout, stderr without the one-time warnings about fast-path
    modules that failed to import)."""
    from pi05_jax.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    lines = [ln for ln in err.getvalue().splitlines(keepends=True) if not ln.startswith("warning: skipping ")]
    return code, out.getvalue(), "".join(lines)


def matmul_operands(m: int, k: int, w_shape, dtype, seed: int = 0):
    """Random x [m, k] and a weight of w_shape scaled by k**-0.5 (products of order one), in dtype; never zeros."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal(w_shape) * k**-0.5, dtype)
    return x, w


def as_f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


KERNEL_F32_REL_ERR = 1e-5  # a kernel vs its plain-JAX reference in float32: rounding only
KERNEL_BF16_COSINE = 0.99999


def assert_kernel_matches(got, want, dtype, *, bf16_tol: dict):
    """A kernel's output against its reference: float32 relative (Frobenius) error <= KERNEL_F32_REL_ERR; bfloat16
    cosine >= KERNEL_BF16_COSINE and every element within `bf16_tol` (numpy's rtol / atol)."""
    got, want = as_f32(got), as_f32(want)
    if dtype == jnp.float32:
        err = rel_err(got, want)
        assert err <= KERNEL_F32_REL_ERR, f"float32 relative error {err:.3g} > {KERNEL_F32_REL_ERR}"
    else:
        cos = cosine(got, want)
        assert cos >= KERNEL_BF16_COSINE, f"bfloat16 cosine {cos:.7f} < {KERNEL_BF16_COSINE}"
        np.testing.assert_allclose(got, want, **bf16_tol)


@pytest.fixture
def hopper(monkeypatch):
    """Make the Pallas Triton registration see an sm_90 GPU (only the capability query is replaced), so kernels
    lower for CUDA on a machine without one (tests/test_triton_lowering.py, tests/test_full_size_lowering.py)."""
    import types

    from jax._src.pallas.triton import pallas_call_registration as registration

    assert hasattr(registration, "gpu_info_lib"), "jax's Pallas Triton registration changed: update this fixture"
    monkeypatch.setattr(registration.gpu_info_lib, "get_gpu_info",
                        lambda: types.SimpleNamespace(compute_capability=90))
