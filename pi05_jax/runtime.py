"""A loaded model ready to sample: config + params + kernel choice, with compile and run timing.

This is what the CLI, the policy server and the benchmark hold. `sample` goes through the one jitted executable
of `pi05_jax.sampler` (one per batch size, num_steps and kernel choice). A model on several local devices
(`Model.load(..., devices=N)` or `model.with_devices(N)`) holds its weights replicated on each and shards every
call's batch over them (`pi05_jax.devices`: data parallel, one executable per batch size).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pi05_jax import devices as device_mesh
from pi05_jax import implementations, sampler
from pi05_jax.config import Pi05Config
from pi05_jax.fast import path as fast_path
from pi05_jax.implementations import Implementation
from pi05_jax.model import reference
from pi05_jax.observation import Observation

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Model:
    """config + params + the implementation that runs them. A model loaded for a fast path holds its params in that
    path's packed layout only (the originals are freed at load), so it runs that implementation."""

    config: Pi05Config
    params: dict
    implementation: Implementation = implementations.REFERENCE
    # num_steps -> params prepared by the implementation (its device constants added): per-call host work is then
    # the plan and the executable's dispatch only
    _prepared: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # the local devices the batch axis is sharded over, params replicated on each (None: one device, the plain path)
    mesh: device_mesh.DeviceMesh | None = None

    @classmethod
    def load(cls, checkpoint_dir, *, dtype: str = "bfloat16", kernels: str | Implementation = "reference",
             progress: Callable[[str], None] | None = None, devices: int | str = 1) -> Model:
        """The checkpoint (openpi's layout, or a `pi05 quantize` output) cast to `dtype`, in the weight layout of
        `kernels` (a fast path's packed per-layer weights are built here once; the stacked originals are freed leaf
        by leaf as they are converted, so peak memory is the weights plus one stacked leaf). `devices` ('all' or a
        count, default 1): see `with_devices`."""
        from checkpoints import quantized_io
        from checkpoints.openpi_io import load_params

        impl = sampler.resolve(kernels)
        count = device_mesh.parse_devices(devices)  # a bad count fails before the weights load
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        # A `pi05 quantize` checkpoint (it holds pi05_quantization.json) loads FP8/FP4 weight objects.
        load = quantized_io.load_quantized_params if quantized_io.is_quantized(checkpoint_dir) else load_params
        config, params = load(checkpoint_dir, dtype=DTYPES[dtype], progress=progress)
        if impl.pack is not None:
            params = impl.pack(params, consume=True)
        model = cls(config=config, params=params, implementation=impl)
        return model if count == 1 else model.with_devices(count)

    def with_devices(self, devices: int | str) -> Model:
        """This model on the first `devices` local devices ('all' or a count): the params replicated on each (once,
        here), every `sample` sharding its batch over them with `jax.shard_map`, each device running the one-device
        program on its rows (a batch that the count does not divide is padded with copies of a real row, dropped
        from the result). 1 is the plain one-device path."""
        mesh = device_mesh.DeviceMesh.local(devices)
        if mesh.count == 1:
            if self.mesh is None:
                return self
            params = jax.device_put(self.params, mesh.devices[0])
            return dataclasses.replace(self, params=params, mesh=None, _prepared={})
        return dataclasses.replace(self, params=mesh.replicate(self.params), mesh=mesh, _prepared={})

    @property
    def devices(self) -> int:
        """How many local devices each call's batch is sharded over (1: the plain path)."""
        return 1 if self.mesh is None else self.mesh.count

    @property
    def kernels(self) -> str:
        return self.implementation.name

    @property
    def dtype(self):
        return reference.params_dtype(self.params)

    def prepared(self, num_steps: int) -> dict:
        """The params the implementation's phases take for num_steps (prepared once per num_steps)."""
        params = self._prepared.get(num_steps)
        if params is None:
            impl = self.implementation
            params = self.params if impl.prepare is None else impl.prepare(self.params, num_steps)
            if self.mesh is not None:  # the device constants prepare adds, replicated too (the weights already are)
                params = self.mesh.replicate(params)
            self._prepared[num_steps] = params
        return params

    def describe(self) -> str:
        """Which implementation runs, in which dtype, and (fast paths) which kernel runs each piece."""
        text = f"{self.kernels} ({jnp.dtype(self.dtype).name})"
        if self.implementation.options is not None:
            text += f": {fast_path.ops(self.prepared(10), self.implementation.options).describe()}"
        return text

    def sample(self, obs: Observation, *, noise=None, rng=None, num_steps: int = 10) -> jax.Array:
        if noise is None:
            if rng is None:
                raise ValueError("Model.sample needs noise= or rng= (deterministic given noise)")
            a = self.params["action_in_proj"]["kernel"].shape[0]
            noise = jax.random.normal(rng, (obs.batch_size, self.config.action_horizon, a), jnp.float32)
        if self.mesh is not None:
            return device_mesh.sample_sharded(self.mesh, self.implementation, self.prepared(num_steps), obs, noise,
                                              num_steps)
        return sampler.sample_prepared(self.implementation, self.prepared(num_steps), obs, noise, num_steps)

    def timed_sample(self, obs: Observation, *, noise, num_steps: int = 10) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        actions = self.sample(obs, noise=noise, num_steps=num_steps)
        actions = np.asarray(jax.block_until_ready(actions))
        return actions, time.perf_counter() - t0
