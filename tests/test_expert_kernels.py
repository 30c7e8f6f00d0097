"""pi05_jax.expert_kernels: which kernel each expert matmul runs. The PDL kernels read their weight before waiting
for the kernels before them, so they may only take weights stored as they are (bfloat16 parameters), never a cast
made inside the jit; elsewhere the Triton kernels run, with the same results."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import pdl_matmul
from pallas_kernels.skinny_matmul import geglu_matmul_reference
from pi05_jax import expert_kernels

# bfloat16 kernels vs a float32 product of the same bf16-rounded operands: the hidden activations and the output are
# rounded to bfloat16 (2**-8 relative each), and the GeGLU's products before it.
TOL = {jnp.bfloat16: dict(rtol=2e-2, atol=2e-2), jnp.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.fixture
def pdl_calls(monkeypatch):
    calls = []

    def counting(name):
        kernel = getattr(pdl_matmul, name)

        def counted(*args, **kwargs):
            calls.append(name)
            return kernel(*args, **kwargs)
        return counted

    for name in ("pdl_matmul", "pdl_geglu_matmul"):
        monkeypatch.setattr(pdl_matmul, name, counting(name))
    return calls


def _layer(weight_dtype, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((1, 50, 64)), jnp.bfloat16)
    mlp = {"gating_einsum_t": jnp.asarray(rng.standard_normal((2, 128, 64)) / 8, weight_dtype),
           "linear_t": jnp.asarray(rng.standard_normal((64, 128)) / 11, weight_dtype)}
    return h, mlp


@pytest.mark.parametrize("weight_dtype,expect_pdl", [(jnp.bfloat16, True), (jnp.float32, False)],
                         ids=["bf16_weights", "f32_weights_cast_in_jit"])
def test_pdl_kernels_take_only_stored_bf16_weights(pdl_calls, weight_dtype, expect_pdl):
    h, mlp = _layer(weight_dtype)
    y = expert_kernels.pallas_expert_mlp(h, mlp, mosaic_geglu=True, mosaic_down=True)
    assert sorted(pdl_calls) == (["pdl_geglu_matmul", "pdl_matmul"] if expect_pdl else [])
    hidden = geglu_matmul_reference(h[0], mlp["gating_einsum_t"].astype(jnp.bfloat16))
    want = jnp.einsum("TF,DF->TD", hidden.astype(jnp.float32), mlp["linear_t"].astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y[0], np.float32), np.asarray(want), **TOL[jnp.bfloat16])


def test_projections_fall_back_to_triton_in_float32(pdl_calls):
    rng = np.random.default_rng(1)
    o = jnp.asarray(rng.standard_normal((1, 50, 8, 16)), jnp.float32)
    attn = {"attn_vec_einsum_1_t": {"w": jnp.asarray(rng.standard_normal((32, 128)) / 11, jnp.float32)}}
    y = expert_kernels.pallas_attn_out(o, attn, mosaic=True)
    assert pdl_calls == []
    want = jnp.einsum("TK,DK->TD", o[0].reshape(50, 128), attn["attn_vec_einsum_1_t"]["w"], precision="highest")
    np.testing.assert_allclose(np.asarray(y[0]), np.asarray(want), **TOL[jnp.float32])
    y16 = expert_kernels.pallas_attn_out(o.astype(jnp.bfloat16),
                                         {"attn_vec_einsum_1_t": {"w": attn["attn_vec_einsum_1_t"]["w"].astype(
                                             jnp.bfloat16)}}, mosaic=True)
    assert pdl_calls == ["pdl_matmul"]
    np.testing.assert_allclose(np.asarray(y16[0], np.float32), np.asarray(want), **TOL[jnp.bfloat16])


@pytest.mark.parametrize("backend,capability,runs", [("cpu", None, True), ("gpu", "9.0", True),
                                                      ("gpu", "11.0", False), ("gpu", "8.9", False)],
                         ids=["cpu_interpret", "hopper", "blackwell_thor", "ada"])
def test_pdl_kernels_run_on_hopper_or_the_cpu(monkeypatch, backend, capability, runs):
    import types

    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(compute_capability=capability)])
    assert pdl_matmul.runs_here() is runs


def test_elsewhere_the_triton_kernels_run(pdl_calls, monkeypatch):
    monkeypatch.setattr(pdl_matmul, "runs_here", lambda: False)
    h, mlp = _layer(jnp.bfloat16)
    y = expert_kernels.pallas_expert_mlp(h, mlp, mosaic_geglu=True, mosaic_down=True)
    assert pdl_calls == []
    hidden = geglu_matmul_reference(h[0], mlp["gating_einsum_t"])
    want = jnp.einsum("TF,DF->TD", hidden.astype(jnp.float32), mlp["linear_t"].astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y[0], np.float32), np.asarray(want), **TOL[jnp.bfloat16])
