"""Data parallelism over this process's local devices, with JAX's own sharding (no dispatcher of our own).

A `DeviceMesh` is a 1-D `jax.sharding.Mesh` over N local devices, its one axis named `batch`. The weights are
replicated on it once (`DeviceMesh.replicate`: `NamedSharding(mesh, P())`, what `runtime.Model.with_devices`
holds); each call's observation and noise are sharded on their batch axis (`NamedSharding(mesh, P("batch"))`) and
the whole sample runs under `jax.shard_map`: every device runs exactly the one-device program (the same
implementation, specialized to the same host-side plan) on its B/N rows, and the actions come back sharded on
their batch axis. shard_map rather than XLA's SPMD partitioner because the Pallas kernels are opaque custom calls
the partitioner cannot split; the per-device body needs no collective at all.

One executable per (batch size, num_steps, implementation, plan, mesh), as for one device. A batch that N does not
divide is padded up to the next multiple of N with copies of its first row (so the plan, the max over rows of
valid views and prefix length, is unchanged) and the padding rows are dropped before the actions are returned.
Rows are independent in every implementation, so a row's actions are the ones it gets on one device.

Across hosts this stops at the process: see docs/ROBOTS.md ("Several GPUs, several hosts").
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pi05_jax.observation import Observation

AXIS = "batch"  # the mesh's one axis: the batch axis of every per-call input and of the actions


class DevicesError(ValueError):
    """A device count this process cannot use ('all' or 1..jax.local_device_count())."""


def _available() -> str:
    devices = jax.local_devices()
    kinds = sorted({d.device_kind for d in devices})
    text = f"{len(devices)} local {devices[0].platform} device{'s' if len(devices) != 1 else ''} ({', '.join(kinds)})"
    if devices[0].platform == "cpu":
        text += ("; on the CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts makes N "
                 "host devices")
    return text


def parse_devices(spec) -> int:
    """'all' (every local device) or a count, as an int or its text; checked against jax.local_device_count()."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return jax.local_device_count()
        try:
            count = int(text)
        except ValueError:
            raise DevicesError(f"devices must be 'all' or a device count, got {spec!r}") from None
    elif isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        count = int(spec)
    else:
        raise DevicesError(f"devices must be 'all' or a device count, got {spec!r} ({type(spec).__name__})")
    if count < 1:
        raise DevicesError(f"devices must be >= 1 (or 'all'), got {count}")
    if count > jax.local_device_count():
        raise DevicesError(f"devices={count} is more than this process has: {_available()}")
    return count


@dataclasses.dataclass(frozen=True)
class DeviceMesh:
    """A 1-D mesh over the first `count` local devices (axis `batch`); hashable, so jit can key on it."""

    mesh: Mesh

    @classmethod
    def local(cls, devices="all") -> DeviceMesh:
        count = parse_devices(devices)
        return cls(Mesh(np.asarray(jax.local_devices()[:count]), (AXIS,)))

    @property
    def count(self) -> int:
        return int(self.mesh.devices.size)

    @property
    def devices(self) -> list:
        return list(self.mesh.devices.flat)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(AXIS))

    def padded(self, rows: int) -> int:
        """The batch a call of `rows` rows runs at: the next multiple of the device count."""
        if rows < 1:
            raise ValueError(f"a batch needs at least one row, got {rows}")
        return -(-rows // self.count) * self.count

    def replicate(self, params):
        """The pytree with every array leaf on every device of the mesh (one copy each). Leaves already replicated
        on this mesh are not copied again."""
        return jax.device_put(params, self.replicated)

    def describe(self) -> str:
        d = self.devices
        return f"{self.count} {d[0].platform} device{'s' if self.count != 1 else ''} ({d[0].device_kind})"


def pad_rows(obs: Observation, noise, rows: int) -> tuple[Observation, np.ndarray]:
    """obs and noise (host arrays) with copies of their first row appended up to `rows` rows."""
    b = obs.batch_size
    if rows < b:
        raise ValueError(f"cannot pad a batch of {b} rows down to {rows}")

    def pad(a):
        a = np.asarray(a)
        return np.concatenate([a, np.repeat(a[:1], rows - b, axis=0)], axis=0)

    return jax.tree.map(pad, obs), pad(noise)


@functools.partial(jax.jit, static_argnames=("num_steps", "impl", "plan", "mesh"))
def _sharded_jit(params, obs, noise, num_steps, impl, plan, mesh):
    local = impl.specialize(plan) if plan is not None else impl

    def one_device(params, obs, noise):
        return local.sample(params, obs, noise, num_steps)

    # check_vma=False: the body is the one-device program with no collective, and the Pallas calls in it carry no
    # varying-manual-axes rule to check.
    return jax.shard_map(one_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(AXIS),
                         check_vma=False)(params, obs, noise)


def sample_sharded(mesh: DeviceMesh, impl, params, obs: Observation, noise, num_steps: int) -> jax.Array:
    """Actions [B, horizon, action_dim] float32, the batch split over the mesh's devices.

    `params` must be prepared by `impl.prepare` (as `runtime.Model.prepared`) and replicated on this mesh
    (`DeviceMesh.replicate`); obs and noise may be host arrays (each device receives only its rows) or arrays
    already sharded by `mesh.batch_sharding`. When B is a multiple of the device count the result is sharded on its
    batch axis (each device holds its B/N rows); otherwise the padded call's real rows are returned."""
    rows = obs.batch_size
    noise_rows = int(np.shape(noise)[0]) if np.ndim(noise) else 0
    if noise_rows != rows:
        raise ValueError(f"noise has shape {tuple(np.shape(noise))}; the observation has {rows} rows, so noise "
                         f"needs [{rows}, horizon, action_dim]")
    size = mesh.padded(rows)
    if size != rows:
        obs, noise = pad_rows(obs, noise, size)
    plan = impl.plan(params, obs) if impl.plan is not None else None  # host side, from the (padded) masks
    obs = jax.device_put(obs, mesh.batch_sharding)
    noise = jax.device_put(jnp.asarray(noise, jnp.float32) if isinstance(noise, jax.Array) else
                           np.asarray(noise, np.float32), mesh.batch_sharding)
    actions = _sharded_jit(params, obs, noise, num_steps, impl, plan, mesh.mesh)
    return actions if size == rows else actions[:rows]
