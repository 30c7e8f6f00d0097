"""A loaded model ready to sample: config + params + kernel choice, with compile and run timing.

This is what the CLI, the policy server and the benchmark hold. `sample` goes through the one jitted executable
of `pi05_jax.sampler` (one per batch size, num_steps and kernel choice).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pi05_jax import sampler
from pi05_jax.config import Pi05Config
from pi05_jax.observation import Observation

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Model:
    config: Pi05Config
    params: dict
    kernels: str = "reference"

    @classmethod
    def load(cls, checkpoint_dir, *, dtype: str = "bfloat16", kernels: str = "reference",
             progress: Callable[[str], None] | None = None, unstack_layers: bool | None = None) -> Model:
        """`unstack_layers`: hold the layer weights as per-layer buffers (pi05_jax.layer_stack), converted once
        here so the fast path does not keep a second copy; None: when `kernels` is a fast path that runs on them.
        With them, the weights are also packed for that fast path (fast_path.pack_for), so the model runs that
        implementation (or another with the same packing); the reference implementation needs a model loaded for
        it (the default) or with unstack_layers=False."""
        from checkpoints import quantized_io
        from checkpoints.openpi_io import load_params

        check_kernels(kernels)
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        # A `pi05 quantize` checkpoint (it holds pi05_quantization.json) loads FP8/FP4 weight objects.
        load = quantized_io.load_quantized_params if quantized_io.is_quantized(checkpoint_dir) else load_params
        config, params = load(checkpoint_dir, dtype=DTYPES[dtype], progress=progress)
        if unstack_layers is None:
            from pi05_jax import fast_path

            unstack_layers = fast_path.wants_unstacked_layers(kernels)
        if unstack_layers:
            from pi05_jax import fast_path, layer_stack

            # freed leaf by leaf as they are converted: peak memory is the weights plus one stacked leaf
            params = layer_stack.unstack_layers(params, consume=True)
            # the fast path's packed weights (fused QKV, padded SigLIP MLP, transposed gating), built here once: the
            # model holds them instead of the originals, which are freed (prepare then finds nothing to pack)
            params = fast_path.pack_for(kernels, params)
        return cls(config=config, params=params, kernels=kernels)

    @property
    def dtype(self):
        return sampler.params_dtype(self.params)

    def sample(self, obs: Observation, *, noise=None, rng=None, num_steps: int = 10) -> jax.Array:
        return sampler.sample_actions(self.params, obs, noise=noise, rng=rng, num_steps=num_steps,
                                      kernels=self.kernels, action_horizon=self.config.action_horizon)

    def timed_sample(self, obs: Observation, *, noise, num_steps: int = 10) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        actions = self.sample(obs, noise=noise, num_steps=num_steps)
        actions = np.asarray(jax.block_until_ready(actions))
        return actions, time.perf_counter() - t0


def check_kernels(kernels: str) -> None:
    if kernels not in sampler.IMPLEMENTATIONS:
        raise ValueError(f"unknown --kernels {kernels!r}; available: {', '.join(sorted(sampler.IMPLEMENTATIONS))}")
