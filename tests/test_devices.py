"""Data parallelism over local devices (`pi05_jax.devices`, `Model.with_devices`, `pi05 serve --devices`).

The multi-device checks run with 4 forced host devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`),
which must be set before JAX starts: so they run in subprocesses (a helper below that prints JSON, and the real
server), while this process keeps its one CPU device for the argument checks. Every comparison is against the
one-device answer computed in the same subprocess (float32, relative error <= 1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request

import jax
import numpy as np
import pytest

from pi05_jax import devices as device_mesh
from pi05_jax.serving import batching
from tests.conftest import REFERENCE_DIR, ROOT, rel_err, run_cli

FP32_REL_TOL = 1e-5
FORCED_DEVICES = 4
FORCED_ENV = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={FORCED_DEVICES}",
              "JAX_PLATFORMS": "cpu"}

# Runs with 4 host devices; prints one JSON line. Rows: the three shared model cases concatenated (4 rows whose
# valid views and prompt lengths differ), their recorded noise, 2 Euler steps.
HELPER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import NamedSharding
    from pi05_jax import devices as device_mesh
    from pi05_jax.compile_cache import count_compilations
    from pi05_jax.observation import concat_observations, observation_from_arrays
    from pi05_jax.runtime import Model
    from tests.conftest import MODEL_CASES, REFERENCE_DIR, case_inputs, rel_err

    STEPS = 2
    ckpt = REFERENCE_DIR / "checkpoint"
    cases = np.load(REFERENCE_DIR / "model_cases.npz")
    ins = [case_inputs(cases, name) for name in MODEL_CASES]
    out = {"device_count": jax.local_device_count()}

    def sharding_of(actions, solo):
        s = actions.sharding
        shards = []
        for shard in actions.addressable_shards:  # before any host copy of the whole array
            rows = shard.index[0]
            shards.append({"device": shard.device.id, "start": rows.start, "stop": rows.stop,
                           "rel_err": rel_err(np.asarray(shard.data), solo[rows])})
        return {"named": isinstance(s, NamedSharding), "spec": [str(p) for p in s.spec],
                "mesh": dict(s.mesh.shape) if isinstance(s, NamedSharding) else None, "shards": shards}

    for kernels in ("compact", "pallas"):
        model = Model.load(ckpt, dtype="float32", kernels=kernels)
        obs = concat_observations(observation_from_arrays(i, model.config) for i in ins)
        noise = np.concatenate([i["noise"] for i in ins])
        solo = np.asarray(model.sample(obs, noise=noise, num_steps=STEPS))
        sharded = model.with_devices(4)
        actions = sharded.sample(obs, noise=noise, num_steps=STEPS)
        r = {"devices": sharded.devices, "shape": list(actions.shape), "sharding": sharding_of(actions, solo),
             "rel_err": rel_err(np.asarray(actions), solo)}
        with count_compilations() as c:  # the same batch size again: the executable is reused
            np.asarray(sharded.sample(obs, noise=noise, num_steps=STEPS))
        r["recompiles"] = c.count
        back = sharded.with_devices(1)
        r["back_to_one"] = {"devices": back.devices, "mesh": back.mesh is not None,
                            "rel_err": rel_err(np.asarray(back.sample(obs, noise=noise, num_steps=STEPS)), solo)}
        if kernels == "compact":  # 3 rows over 2 devices: padded to 4, only the 3 real rows come back
            obs3 = concat_observations(observation_from_arrays(i, model.config) for i in ins[:2])
            solo3 = np.asarray(model.sample(obs3, noise=noise[:3], num_steps=STEPS))
            a3 = model.with_devices(2).sample(obs3, noise=noise[:3], num_steps=STEPS)
            r["padded"] = {"shape": list(a3.shape), "rel_err": rel_err(np.asarray(a3), solo3)}
            errors = {}
            for name, call in (("with_devices(5)", lambda: model.with_devices(5)),
                               ("load(devices=5)", lambda: Model.load(ckpt, kernels=kernels, devices=5)),
                               ("with_devices(0)", lambda: model.with_devices(0))):
                try:
                    call()
                    errors[name] = None
                except device_mesh.DevicesError as e:
                    errors[name] = str(e)
            r["errors"] = errors
        out[kernels] = r
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def forced():
    """The helper's results, run once with 4 host devices."""
    proc = subprocess.run([sys.executable, "-c", HELPER], cwd=ROOT, env=FORCED_ENV, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"helper failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["device_count"] == FORCED_DEVICES, out
    return out


@pytest.mark.parametrize("kernels", ["compact", "pallas"])
def test_sharded_sample_equals_one_device(forced, kernels):
    r = forced[kernels]
    assert r["devices"] == FORCED_DEVICES and r["shape"][0] == FORCED_DEVICES
    assert r["rel_err"] <= FP32_REL_TOL, r
    assert r["recompiles"] == 0, r
    back = r["back_to_one"]
    assert back["devices"] == 1 and not back["mesh"] and back["rel_err"] <= FP32_REL_TOL, back


@pytest.mark.parametrize("kernels", ["compact", "pallas"])
def test_each_device_holds_its_rows(forced, kernels):
    s = forced[kernels]["sharding"]
    assert s["named"] and s["spec"] == [device_mesh.AXIS] and s["mesh"] == {device_mesh.AXIS: FORCED_DEVICES}
    per_device = forced[kernels]["shape"][0] // FORCED_DEVICES
    shards = sorted(s["shards"], key=lambda x: x["device"])
    assert [x["device"] for x in shards] == list(range(FORCED_DEVICES))
    for i, shard in enumerate(shards):
        assert (shard["start"], shard["stop"]) == (i * per_device, (i + 1) * per_device), shard
        assert shard["rel_err"] <= FP32_REL_TOL, shard


def test_a_batch_the_devices_do_not_divide_is_padded_and_cut(forced):
    r = forced["compact"]["padded"]
    assert r["shape"][0] == 3
    assert r["rel_err"] <= FP32_REL_TOL, r


def test_device_counts_past_the_local_devices_fail_clearly(forced):
    errors = forced["compact"]["errors"]
    for name in ("with_devices(5)", "load(devices=5)"):
        assert errors[name] is not None and "devices=5 is more than this process has" in errors[name], errors
        assert f"{FORCED_DEVICES} local cpu devices" in errors[name], errors
    assert errors["with_devices(0)"] is not None and "must be >= 1" in errors["with_devices(0)"], errors


def test_parse_devices_in_this_process():
    n = jax.local_device_count()
    assert device_mesh.parse_devices("all") == n
    assert device_mesh.parse_devices(" ALL ") == n
    assert device_mesh.parse_devices(str(n)) == n and device_mesh.parse_devices(n) == n
    for bad, words in ((0, "must be >= 1"), ("-2", "must be >= 1"), (n + 1, "more than this process has"),
                       ("two", "'all' or a device count"), (1.5, "'all' or a device count"),
                       (True, "'all' or a device count"), (None, "'all' or a device count")):
        with pytest.raises(device_mesh.DevicesError, match=words):
            device_mesh.parse_devices(bad)
    mesh = device_mesh.DeviceMesh.local(1)
    assert [mesh.padded(r) for r in (1, 2, 3)] == [1, 2, 3]
    with pytest.raises(ValueError, match="at least one row"):
        mesh.padded(0)


def test_server_batch_sizes_are_multiples_of_the_device_count():
    for max_batch, devices in ((4, 4), (32, 4), (10, 4), (1, 4), (6, 1), (8, 2)):
        sizes = batching.batch_sizes(max_batch, devices)
        per_device = batching.batch_sizes(-(-max_batch // devices))
        assert sizes == tuple(devices * s for s in per_device), (max_batch, devices, sizes)
        assert all(s % devices == 0 for s in sizes) and sizes[-1] >= max_batch
    assert batching.batch_sizes(6) == batching.batch_sizes(6, 1)
    with pytest.raises(ValueError, match="devices must be >= 1"):
        batching.batch_sizes(4, 0)


@pytest.mark.parametrize("value, words", [("0", "'all' or a device count >= 1"), ("x", "'all' or a device count"),
                                          ("many", "'all' or a device count"), (None, "more than this process has")])
def test_serve_and_bench_refuse_bad_device_counts(value, words):
    value = value or str(jax.local_device_count() + 1)
    code, _, err = run_cli(["serve", "--checkpoint", str(REFERENCE_DIR / "checkpoint"), "--adapter", "libero",
                            "--devices", value])
    assert code == 2 and "--devices" in err and words in err, err
    if value.isdigit() and int(value) > 0:
        code, _, err = run_cli(["bench", "--preset", "tiny", "--devices", value])
        assert code == 2 and "--devices" in err and words in err, err


def test_server_with_four_devices_answers_as_one(monkeypatch, reference_dir):
    """The real `pi05 serve --max-batch 4 --devices 4` (4 host devices) and the real openpi client: the reply is
    the request's solo answer (the policy case's recorded actions, with its noise)."""
    from tests.test_server import ServerProcess, client

    monkeypatch.setenv("XLA_FLAGS", FORCED_ENV["XLA_FLAGS"])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    cases = np.load(reference_dir / "policy_cases.npz")
    prefix = "libero/in/"
    obs = {k[len(prefix):]: cases[k] for k in cases.files if k.startswith(prefix)}
    obs["prompt"] = str(obs["prompt"])
    srv = ServerProcess(reference_dir, "--max-batch", "4", "--devices", str(FORCED_DEVICES), "--warm", "example")
    try:
        startup = next(line for line in srv.lines if line.startswith("pi05 serve: implementation"))
        assert f"{FORCED_DEVICES} cpu devices" in startup and "per-device batch [1] of compiled batch [4]" in startup
        policy = client(srv.port, key=None)
        assert policy.get_server_metadata()["devices"] == FORCED_DEVICES
        out = policy.infer(obs)
        assert rel_err(out["actions"], cases["libero/out/fp32/actions"]) <= FP32_REL_TOL
        timing = out["server_timing"]
        assert timing["batch_size"] == 1 and timing["executable_batch"] == FORCED_DEVICES
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/stats", timeout=10) as r:
            assert json.loads(r.read())["devices"] == FORCED_DEVICES
    finally:
        assert srv.stop() == 0, "".join(srv.lines[-20:])


def test_bench_devices_compares_one_device_with_the_sharded_call(tmp_path):
    """`pi05 bench --devices 2` (2 of the 4 host devices): both calls timed, the sharded call's first rows equal
    the one-device call's, and the ratios are the ones its timings give."""
    out_json = tmp_path / "devices.json"
    proc = subprocess.run([sys.executable, "-m", "pi05_jax.cli", "bench", "--preset", "tiny", "--kernels", "compact",
                           "--dtype", "float32", "--batch", "1", "--devices", "2", "--views", "1", "--prompt-len",
                           "10", "--steps", "2", "--runs", "2", "--quiet", "--json", str(out_json)],
                          cwd=ROOT, env=FORCED_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads(out_json.read_text())
    assert doc["devices"] == 2 and doc["per_device_batch"] == 1 and "--devices 2" in doc["command"]
    (r,) = doc["implementations"]
    assert r["one_device"]["batch"] == 1 and r["devices"]["batch"] == 2 and r["actions_finite"]
    assert r["actions_rel_err_vs_one_device"] <= FP32_REL_TOL
    one, two = r["one_device"], r["devices"]
    assert one["rows_per_s"] == pytest.approx(1 / one["median_s"]) and two["rows_per_s"] == pytest.approx(
        2 / two["median_s"])
    assert r["throughput_vs_n_x_one"] == pytest.approx(two["rows_per_s"] / (2 * one["rows_per_s"]))
    assert r["latency_vs_one"] == pytest.approx(two["median_s"] / one["median_s"])
    assert "data parallel: 2 cpu devices" in proc.stdout and "target:" in proc.stdout
