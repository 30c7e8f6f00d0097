"""`pi05 bench` on the CPU (tiny preset) and the roofline's FLOP/byte counts against independent counts.

Independent counts used here (none of them reads `pi05_jax.bench.roofline`):
  - the matmuls the reference implementation really executes, read from its jaxpr (`jaxpr_flops`), for padded
    tokens on the tiny model and, for valid tokens, on a model whose camera slots and prompt length are cut to
    exactly the valid ones (so upstream's padded computation IS the valid computation);
  - XLA's own cost analysis of each compiled phase for a depth-1, one-step model (XLA counts a loop body once,
    so depth 1 and one step make its count complete);
  - byte sizes of the real params pytree, the images, and the phase outputs (vision tokens, KV cache).

The run's own figures are checked against what must hold of a measurement (the floor below every measured time,
phases that sum to about the one-jit total, a ceiling that really copied its buffer), never against a recomputation
of the JSON's derived fields from the JSON itself.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pi05_jax import implementations
from pi05_jax.bench import hardware
from pi05_jax.bench import roofline as rf
from pi05_jax.bench.jaxpr_flops import matmul_flops
from pi05_jax.config import preset
from pi05_jax.synthetic import synthetic_noise, synthetic_observation
from tests.conftest import run_cli

PHASES = ("vision", "prefill", "denoise")
SECOND = "compact"  # a second implementation: the run has a ratio to report, host prep, and valid-token work
# XLA's FLOP count includes elementwise work the matmul count leaves out (norms, softmax, RoPE, GELU, residuals);
# at the tiny widths (32-128) that is a few percent of the matmuls, far below 15%, while any missing matmul term
# (an MLP, the attention, a projection) is 15% or more of its phase.
XLA_ELEMENTWISE_MARGIN = 0.15
# Bounds on a shared 2-core CPU, wide enough for its noise, narrow enough to catch a timing that is wrong in kind
# (a phase timed with its compile, a call not waited for, the wrong executable timed): the phases' medians sum to
# within 2x of the one-jit total, and the copy ceiling is within 20x of numpy copying the same buffer.
PHASE_SUM_BOUNDS = (0.5, 2.0)
COPY_VS_NUMPY = 20.0
BF16_REL_ERR = 2e-2  # a fast path against reference, both in bfloat16 (rounding, not a different computation)
# On a card in hardware.DATASHEET a plain copy reaches most of the datasheet bandwidth (the old y = x + 1
# measurement read about half of it on an H200) and never more than it.
MIN_COPY_SHARE_OF_DATASHEET = 0.7


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, reference_dir):
    """One run over the shared tiny checkpoint (so checkpoint loading is timed too), two implementations."""
    tmp = tmp_path_factory.mktemp("bench")
    code, out, err = run_cli(["bench", "--checkpoint", str(reference_dir / "checkpoint"), "--kernels",
                              f"reference,{SECOND}", "--runs", "3", "--steps", "2", "--views", "2", "--prompt-len",
                              "60", "--startup", "--json", str(tmp / "b.json"), "--plot", str(tmp / "b.png")])
    assert code == 0, err[-2000:]
    return json.loads((tmp / "b.json").read_text()), out, tmp


def test_bench_json_has_every_figure(bench_run):
    doc, _, _ = bench_run
    assert [r["name"] for r in doc["implementations"]] == ["reference", SECOND]
    for key in ("date", "commit", "command", "device", "selection", "ceilings", "load", "roofline",
                "implementations", "projection", "startup"):
        assert key in doc, key
    assert doc["ceilings"]["bandwidth"]["bytes_per_s"] > 0 and doc["ceilings"]["matmul"]["flops_per_s"] > 0
    assert doc["load"]["weights_source"] == "checkpoint load" and doc["load"]["weights_s"] > 0
    assert doc["selection"]["architecture"] == json.loads(json.dumps(dataclasses.asdict(preset("tiny"))))
    assert "--checkpoint" in doc["command"] and f"--kernels reference,{SECOND}" in doc["command"]
    for r in doc["implementations"]:
        assert r["compile_s"] > 0 and r["first_call_s"] > 0 and r["hz"] > 0
        t = r["total"]
        assert t["n"] == 3 and 0 < t["p10_s"] <= t["median_s"] <= t["p90_s"]
        for ph in PHASES:
            assert r["phases"][ph]["median_s"] > 0
        assert r["actions_finite"]
        mem = r["memory"]
        assert mem["device_peak_bytes"] is None or mem["device_peak_bytes"] > 0
        if mem["device_peak_bytes"] is None:
            assert mem["device_peak_note"]  # a reason, never a silent null
        assert mem["executable"]["available"] is False or mem["executable"]["total_bytes"] > 0
    first, second = doc["implementations"]
    assert first["actions_rel_err_vs_first"] == 0.0
    assert 0 < second["actions_rel_err_vs_first"] <= BF16_REL_ERR  # other code, the same inputs and answer
    assert first["host_prepare"] is None and first["host_prepare_served"] is None  # reference plans nothing
    assert second["host_prepare"]["n"] == 3 and second["host_prepare"]["median_s"] > 0
    # the same plan from the masks as host arrays (as a served request brings them)
    assert second["host_prepare_served"]["n"] == 3 and second["host_prepare_served"]["median_s"] > 0


def test_phases_sum_to_about_the_measured_total(bench_run):
    """Each phase is its own executable fed with the previous phase's output; together they do the one-jit
    sample's work, so their medians sum to about its median (a phase timed with its compile, or not waited for,
    breaks this)."""
    doc, _, _ = bench_run
    for r in doc["implementations"]:
        phase_sum = sum(r["phases"][ph]["median_s"] for ph in PHASES)
        lo, hi = PHASE_SUM_BOUNDS
        assert lo * r["total"]["median_s"] <= phase_sum <= hi * r["total"]["median_s"], (r["name"], r["phases"])


def test_floor_uses_the_measured_ceilings_and_is_below_every_measurement(bench_run):
    doc, out, _ = bench_run
    rl = doc["roofline"]
    assert rl["rates"]["matmul_flops_per_s"] == doc["ceilings"]["matmul"]["flops_per_s"]
    assert rl["rates"]["bytes_per_s"] == doc["ceilings"]["bandwidth"]["bytes_per_s"]
    # this CPU is in no datasheet: the table says so instead of borrowing another card's figures
    assert rl["datasheet"]["card"] == "unknown" and rl["datasheet_total_floor_s"] is None
    assert "datasheet (unknown)" in out
    for ph in PHASES:
        f = rl["phases"][ph]
        assert f["flops"] > 0 and f["bytes"] > 0
        assert f["flops"] <= f["padded_flops"]  # the floor never counts more than upstream's padded work
        for r in doc["implementations"]:
            assert f["floor_s"] <= r["phases"][ph]["median_s"]
    for r in doc["implementations"]:
        assert rl["total_floor_s"] <= r["total"]["median_s"]
    # what each executes, counted from its jaxpr: reference upstream's padded work, compact the floor's valid work
    first, second = doc["implementations"]
    assert first["token_accounting"] == {ph: "padded (exactly upstream's padded work)" for ph in PHASES}
    assert second["token_accounting"] == {ph: "valid (within 5% of the floor's count)" for ph in PHASES}


def test_copy_ceiling_moved_its_buffer(bench_run):
    """The copy ceiling copied the whole buffer bench sized for this platform: XLA's own count of the compiled
    copy's bytes covers a read and a write of it, and its rate is of the order of numpy copying the same buffer."""
    doc, _, _ = bench_run
    bw = doc["ceilings"]["bandwidth"]
    assert bw["buffer_bytes"] == hardware.copy_size(hardware.CPU_SIZES, doc["device"]["memory_limit_bytes"])
    assert bw["xla_bytes_accessed_per_copy"] >= 2 * bw["buffer_bytes"]

    src = np.ones(bw["buffer_bytes"] // 4, np.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copy(src)
        best = min(best, time.perf_counter() - t0)
    numpy_rate = 2 * src.nbytes / best
    assert numpy_rate / COPY_VS_NUMPY <= bw["bytes_per_s"] <= numpy_rate * COPY_VS_NUMPY, (bw, numpy_rate)


@pytest.mark.parametrize("fake", [jax.jit(lambda x: x, donate_argnums=0), jax.jit(lambda x: x[:16])],
                         ids=["hands-back-its-input", "reads-a-slice"])
def test_copy_ceiling_refuses_what_is_not_a_copy(monkeypatch, fake):
    monkeypatch.setattr(hardware, "compiled_copy", lambda x: fake.lower(x).compile())
    with pytest.raises(hardware.CeilingError):
        hardware.measure_bandwidth(1 << 20, repeats=1, copies_per_call=1)


def test_floor_table_shows_the_datasheet_beside_the_measured_rates(bench_run):
    """On a card in the datasheet table the rates and the floor at the datasheet's figures sit beside the
    measured ones (here the CPU run's document, as if it had run on an H200)."""
    from pi05_jax.bench import report, suite
    from pi05_jax.bench.selection import Selection

    doc, _, _ = bench_run
    sheet = hardware.datasheet_rates("NVIDIA H200", jnp.bfloat16)
    assert sheet["card"] == "H200" and sheet["memory"] == "HBM3e"

    class Args:
        checkpoint, preset, views, prompt_len, steps, batch = None, "tiny", 2, 40, 2, 1
        kernels, dtype, runs, device, seed = "reference", "bfloat16", 1, "auto", 0

    from checkpoints.random_init import random_params

    sel = Selection.from_args(Args)
    params = jax.tree.map(jnp.asarray, random_params(sel.config))
    section, _ = suite.roofline_section(sel, params, doc["ceilings"], sheet)
    assert section["rates"]["bytes_per_s"] == doc["ceilings"]["bandwidth"]["bytes_per_s"]
    for ph in PHASES:  # the datasheet's rates are far above this CPU's: its floor is lower
        assert section["phases"][ph]["datasheet_floor_s"] < section["phases"][ph]["floor_s"]
    text = report.text({**doc, "roofline": {**section, "workload": doc["roofline"]["workload"]}})
    for needle in ("datasheet (H200)", "HBM3e", "floor ms at datasheet", "measured (the floor's)"):
        assert needle in text, needle



def test_dtype_defaults_to_the_platforms():
    """Without --dtype the CPU runs float32 (it emulates bfloat16 slowly), as serve / infer / demo do; a given
    --dtype is kept."""
    from pi05_jax.bench.selection import Selection
    from pi05_jax.commands.common import default_dtype

    class Args:
        checkpoint, preset, views, prompt_len, steps, batch = None, "tiny", 2, 40, 2, 1
        kernels, dtype, runs, device, seed = "reference", None, 1, "cpu", 0

    assert Selection.from_args(Args).dtype == default_dtype("cpu") == "float32"
    Args.dtype = "bfloat16"
    assert Selection.from_args(Args).dtype == "bfloat16"

@pytest.mark.gpu
def test_copy_ceiling_on_the_card_is_near_its_datasheet():
    kind = jax.devices()[0].device_kind
    sheet = hardware.datasheet_rates(kind, jnp.bfloat16)
    if sheet["bytes_per_s"] is None:
        pytest.skip(f"{kind!r} is not in the datasheet table")
    measured = hardware.measure_ceilings(jnp.bfloat16)["bandwidth"]["bytes_per_s"]
    assert MIN_COPY_SHARE_OF_DATASHEET * sheet["bytes_per_s"] <= measured <= sheet["bytes_per_s"], measured


def test_projection_is_labelled_and_covers_the_named_cards(bench_run):
    doc, out, _ = bench_run
    pr = doc["projection"]
    assert "PROJECTION" in pr["label"] and "not a measurement" in pr["label"]
    cards = [e["card"] for e in pr["entries"]]
    for name in ("H100 SXM", "H200", "RTX 4090", "RTX 5090", "Jetson AGX Thor", "Jetson AGX Orin"):
        assert name in cards
    h100, h200 = pr["entries"][cards.index("H100 SXM")], pr["entries"][cards.index("H200")]
    assert 0 < h200["total_floor_s"] <= h100["total_floor_s"]  # same FLOP rate, more bandwidth
    assert "PROJECTION" in out


def test_startup_cold_then_warm(bench_run):
    doc, out, _ = bench_run
    st = doc["startup"]
    for label in ("cold", "warm"):
        r = st[label]
        assert "error" not in r, r.get("error")
        assert r["compile_s"] > 0 and r["first_call_s"] > 0 and r["weights_s"] > 0
        assert r["weights_source"] == "checkpoint load"
        assert r["spawn_to_first_action_s"] >= r["time_to_first_action_s"]  # the process's wall covers its parts
        assert r["actions_finite"]
    assert st["cold"]["cache_entries_before"] == 0 and st["cold"]["cache_entries_after"] > 0
    assert st["warm_cache_hit"] is True
    assert st["warm"]["compile_s"] < st["cold"]["compile_s"]  # the cache was used, not just found
    assert st["gates"]["applies_to_this_run"] is False  # tiny model on a CPU
    assert "start-up" in out


def test_stdout_table_and_plot(bench_run):
    _, out, tmp = bench_run
    for needle in ("latency over 3 warm runs", "roofline", "reference", SECOND, "speedup vs first", "floor ms",
                   "host prep"):
        assert needle in out
    png = (tmp / "b.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# --- FLOPs and bytes against independent counts --------------------------------------------------------------------


def _phase_outputs(impl, params, obs):
    """Shapes and dtypes of the vision output and the prefix (nothing is computed)."""
    vision_out = jax.eval_shape(impl.vision, params, obs)
    return vision_out, jax.eval_shape(impl.prefill, params, obs, vision_out)


def _executed(impl, params, obs, noise, steps) -> dict:
    vision_out, prefix = _phase_outputs(impl, params, obs)
    return {"vision": matmul_flops(impl.vision, params, obs).flops,
            "prefill": matmul_flops(impl.prefill, params, obs, vision_out).flops,
            "denoise": matmul_flops(lambda p, pr, n: impl.denoise(p, pr, n, steps), params, prefix, noise).flops}


@pytest.mark.parametrize(("views", "prompt_len", "steps", "batch"), [(2, 40, 2, 1), (1, 7, 3, 2), (3, 200, 1, 1)])
def test_padded_flops_match_the_reference_program(views, prompt_len, steps, batch):
    from checkpoints.random_init import random_params

    config = preset("tiny")
    params = jax.tree.map(jnp.asarray, random_params(config))
    obs = synthetic_observation(config, views=views, prompt_len=prompt_len, batch=batch)
    noise = jnp.asarray(synthetic_noise(config, batch=batch))
    executed = _executed(implementations.REFERENCE, params, obs, noise, steps)
    work = rf.Workload(batch=batch, views=views, prompt_len=prompt_len, num_steps=steps)
    costs = rf.phase_costs(config, work, rf.PADDED, weight_bytes=rf.weight_bytes_from_params(params), act_bytes=4)
    assert {ph: costs[ph].flops for ph in PHASES} == executed


def _cut_to_valid(config, views, prompt_len):
    """A config whose camera slots and prompt length are exactly the valid ones: no padding left to skip."""
    return dataclasses.replace(config, image_keys=config.image_keys[:views], max_token_len=prompt_len)


@pytest.mark.parametrize(("views", "prompt_len", "steps", "batch"), [(2, 40, 2, 1), (1, 7, 3, 2)])
def test_valid_flops_match_the_reference_on_unpadded_inputs(views, prompt_len, steps, batch):
    from checkpoints.random_init import random_params

    config = preset("tiny")
    cut = _cut_to_valid(config, views, prompt_len)
    params = jax.tree.map(jnp.asarray, random_params(config))
    obs = synthetic_observation(cut, views=views, prompt_len=prompt_len, batch=batch)
    noise = jnp.asarray(synthetic_noise(cut, batch=batch))
    executed = _executed(implementations.REFERENCE, params, obs, noise, steps)
    work = rf.Workload(batch=batch, views=views, prompt_len=prompt_len, num_steps=steps)
    # The reference recomputes adaRMS every step; the floor precomputes it. Count valid tokens with per-step adaRMS.
    valid_per_step = rf.Accounting("valid, adaRMS per step", False, True, "")
    costs = rf.phase_costs(config, work, valid_per_step, weight_bytes=rf.weight_bytes_from_params(params),
                           act_bytes=4)
    assert {ph: costs[ph].flops for ph in PHASES} == executed
    floor = rf.phase_costs(config, work, rf.FLOOR, weight_bytes=rf.weight_bytes_from_params(params), act_bytes=4)
    assert floor["denoise"].flops < executed["denoise"]  # adaRMS work is all the difference
    assert floor["vision"].flops == executed["vision"] and floor["prefill"].flops == executed["prefill"]


def _depth1(config):
    one = {"depth": 1}
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, **one),
                               expert=dataclasses.replace(config.expert, **one),
                               siglip=dataclasses.replace(config.siglip, **one))


@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_counts_against_xla_cost_analysis(dtype):
    from checkpoints.random_init import random_params

    config = _depth1(preset("tiny"))
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), random_params(config))
    obs = synthetic_observation(config, views=2, prompt_len=40)
    noise = jnp.asarray(synthetic_noise(config))
    impl = implementations.REFERENCE
    vision_out, prefix = _phase_outputs(impl, params, obs)  # shapes are all that lowering needs
    calls = {"vision": (impl.vision, (params, obs)), "prefill": (impl.prefill, (params, obs, vision_out)),
             "denoise": (lambda p, pr, n: impl.denoise(p, pr, n, 1), (params, prefix, noise))}
    work = rf.Workload(batch=1, views=2, prompt_len=40, num_steps=1)
    costs = rf.phase_costs(config, work, rf.PADDED, weight_bytes=rf.weight_bytes_from_params(params),
                           act_bytes=jnp.dtype(dtype).itemsize)
    for ph, (fn, args) in calls.items():
        xla = jax.jit(fn).lower(*args).compile().cost_analysis()
        xla = xla[0] if isinstance(xla, list) else xla
        assert costs[ph].flops <= xla["flops"] <= (1 + XLA_ELEMENTWISE_MARGIN) * costs[ph].flops, ph
        # Every weight, input and output is touched at least once: XLA's byte count bounds ours from above.
        assert costs[ph].bytes <= xla["bytes accessed"], ph


def _tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bytes_against_the_real_arrays(dtype):
    from checkpoints.random_init import random_params

    config = preset("tiny")
    views, prompt_len, steps = 2, 40, 3
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), random_params(config))
    cut = _cut_to_valid(config, views, prompt_len)
    obs = synthetic_observation(cut, views=views, prompt_len=prompt_len)
    impl = implementations.REFERENCE
    vision_out, prefix = _phase_outputs(impl, params, obs)
    act = jnp.dtype(dtype).itemsize
    costs = rf.phase_costs(config, rf.Workload(1, views, prompt_len, steps), rf.FLOOR,
                           weight_bytes=rf.weight_bytes_from_params(params), act_bytes=act)

    llm = params["PaliGemma"]["llm"]
    img_weights = _tree_bytes(params["PaliGemma"]["img"])
    assert costs["vision"].bytes_detail["weights"] == img_weights
    assert costs["vision"].bytes_detail["images_in"] == _tree_bytes(obs.images)
    assert costs["vision"].bytes_detail["tokens_out"] == _tree_bytes(vision_out)

    depth = config.llm.depth
    layers = llm["layers"]
    kv_only = {"attn/kv_einsum": layers["attn"]["kv_einsum"], "pre_attention_norm": layers["pre_attention_norm"]}
    full_only = {"attn/q_einsum": layers["attn"]["q_einsum"], "attn/attn_vec_einsum": layers["attn"]["attn_vec_einsum"],
                 "mlp": layers["mlp"], "pre_ffw_norm": layers["pre_ffw_norm"]}
    prefill_weights = _tree_bytes(kv_only) + _tree_bytes(jax.tree.map(lambda a: a[: depth - 1], full_only))
    assert costs["prefill"].bytes_detail["weights"] == prefill_weights
    assert costs["prefill"].bytes_detail["kv_cache_out"] == _tree_bytes(prefix.kv)
    table = llm["embedder"]["input_embedding"]
    assert costs["prefill"].bytes_detail["embedding_rows"] == prompt_len * table.shape[1] * table.dtype.itemsize

    expert = {"attn": {k: layers["attn"][k] for k in ("q_einsum_1", "kv_einsum_1", "attn_vec_einsum_1")},
              "mlp_1": layers["mlp_1"], "in": params["action_in_proj"], "out": params["action_out_proj"]}
    assert costs["denoise"].bytes_detail["weights_per_step_x_steps"] == steps * _tree_bytes(expert)
    assert costs["denoise"].bytes_detail["kv_cache_reads"] == steps * _tree_bytes(prefix.kv)


# --- bad arguments: one clear line, non-zero exit ------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["--kernels", "nope"], "available: "),
    (["--kernels", "reference,nope"], "unknown --kernels 'nope'"),
    (["--kernels", "reference,reference"], "more than once"),
    (["--views", "0"], "--views must be in 1..3"),
    (["--views", "4"], "--views must be in 1..3"),
    (["--prompt-len", "201"], "--prompt-len must be in 1..200"),
    (["--prompt-len", "0"], "--prompt-len must be in 1..200"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_bad_arguments_give_one_line(args, needle):
    code, out, err = run_cli(["bench", "--preset", "tiny", *args])
    assert code == 2
    assert needle in err and err.count("\n") == 1, err
    assert out == ""


def test_unknown_kernel_lists_the_available_ones():
    _, _, err = run_cli(["bench", "--kernels", "nope"])
    for name in implementations.IMPLEMENTATIONS:
        assert name in err


@pytest.mark.skipif(any(d.platform == "gpu" for d in jax.devices()), reason="checks the no-GPU error")
def test_gpu_only_paths_without_a_gpu():
    code, _, err = run_cli(["bench", "--preset", "tiny", "--device", "gpu"])
    assert code == 2 and "JAX sees no GPU" in err and err.count("\n") == 1


def test_weights_are_never_zero():
    from checkpoints.layout import param_shapes
    from pi05_jax.bench.selection import device_random_params, random_weights

    config = preset("tiny")
    shapes = param_shapes(config)
    for params in (random_weights(config, seed=0, dtype="bfloat16"),  # the CPU path (host numpy)
                   device_random_params(config, seed=0, dtype="float32")):  # the accelerator path
        flat = dict(zip(sorted(shapes), (x for _, x in sorted(
            (jax.tree_util.keystr(k, simple=True, separator="/"), v)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0])), strict=True))
        for path, leaf in flat.items():
            a = np.asarray(leaf, np.float32)
            assert a.shape == shapes[path], path
            assert np.all(np.isfinite(a)) and np.count_nonzero(a) > 0.9 * a.size, path
            assert a.std() > 0, path
