"""SigLIP's attention through jax.nn.dot_product_attention (FastPathOptions.fused_attention, pallas' default): the
same function as upstream's einsum-softmax-einsum at the real shape (2 images x 256 patches, 16 heads of 72), the
backend chosen per platform and dtype, and the ops saying which kernel runs. On the CPU the XLA implementation runs;
cuDNN's kernel is checked on the card (tests/test_kernels_on_gpu.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gqa_cross_attention, ragged_prefill_attention
from pallas_kernels.skinny_matmul import SkinnyBlockSizes
from pi05_jax.fast import ops as fast_ops
from tests.conftest import KERNEL_F32_REL_ERR, rel_err


def normal(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def test_vision_attention_matches_upstreams():
    rng = np.random.default_rng(0)
    q, k, v = normal(rng, (2, 256, 16, 72), 72**-0.5), normal(rng, (2, 256, 16, 72)), normal(rng, (2, 256, 16, 72))
    with jax.default_matmul_precision("highest"):
        got = fast_ops.vision_attend_fused(q, k, v, jnp.float32, implementation="xla")
        want = fast_ops.vision_attend_xla(q, k, v, jnp.float32)
    assert got.shape == want.shape == (2, 256, 16, 72)
    assert rel_err(got, want) <= KERNEL_F32_REL_ERR


def test_backend_is_cudnn_only_where_cudnn_runs():
    assert fast_ops.fused_attention_backend("gpu", jnp.bfloat16) == "cudnn"
    assert fast_ops.fused_attention_backend("gpu", jnp.float16) == "cudnn"
    assert fast_ops.fused_attention_backend("gpu", jnp.float32) == "xla"  # cuDNN has no float32 attention
    assert fast_ops.fused_attention_backend("cpu", jnp.bfloat16) == "xla"


def _ops(fused, backend):
    layout = fast_ops.Layout(gemma_qkv="fused", expert_qkv="fused", expert_gating="transposed", siglip_qkv="fused")
    return fast_ops.ops_for("pallas", layout, ragged_prefill_attention.BlockSizes(), gqa_cross_attention.BlockSizes(),
                            SkinnyBlockSizes(), fused_attention=fused, fused_backend=backend)


def test_ops_say_which_attention_runs():
    names = dict(_ops("vision", "cudnn").names)
    assert names["vision attention"] == "jax.nn.dot_product_attention (cuDNN)"
    assert names["prefix attention"] == "Pallas ragged_prefill_attention"
    assert "XLA" in dict(_ops("vision", "xla").names)["vision attention"]
    assert dict(_ops("none", "cudnn").names)["vision attention"] == "XLA einsum-softmax-einsum"
    with pytest.raises(ValueError, match="fused_attention must be one of"):
        _ops("vision+prefix", "cudnn")
    with pytest.raises(ValueError, match="fused_backend"):
        _ops("vision", "triton")
