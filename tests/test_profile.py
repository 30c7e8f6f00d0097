"""`pi05 profile` on the CPU (tiny preset), and the trace reader on traces whose answer is known.

On the CPU there are no device kernels, so the real run exercises the host-op fallback; the device (GPU) path is
checked on a small Perfetto trace written here with the layout the GPU profiler produces (device process, stream
threads, an `XLA Ops` line that must not be double counted).
"""

from __future__ import annotations

import gzip
import itertools
import json

import jax
import jax.numpy as jnp
import pytest

from pi05_jax.bench import trace
from tests.conftest import run_cli

PHASES = ("vision", "prefill", "denoise")
HAS_GPU = any(d.platform == "gpu" for d in jax.devices())


@pytest.fixture(scope="module")
def profile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profile")
    code, out, err = run_cli(["profile", "--preset", "tiny", "--runs", "2", "--steps", "2", "--top", "7",
                              "--trace-dir", str(tmp / "traces"), "--json", str(tmp / "p.json")])
    assert code == 0, err[-2000:]
    return json.loads((tmp / "p.json").read_text()), out, tmp


def test_profile_writes_loadable_traces(profile_run):
    doc, _, tmp = profile_run
    (s,) = doc["implementations"]
    run_dir = tmp / "traces" / "reference"
    assert list(run_dir.rglob("*.xplane.pb")), "no xplane file (TensorBoard/xprof input)"
    perfetto = list(run_dir.rglob("perfetto_trace.json.gz"))
    assert perfetto and str(perfetto[0]) == s["trace"]
    with gzip.open(perfetto[0], "rt") as f:
        assert "traceEvents" in json.load(f)


def test_profile_top_kernels_have_shares_and_phases(profile_run):
    doc, out, _ = profile_run
    (s,) = doc["implementations"]
    assert s["mode"] == ("device" if HAS_GPU else "host")
    if not HAS_GPU:
        assert "no device kernels" in s["note"] and "no device kernels" in out
    top = s["top"]
    assert 0 < len(top) <= 7
    assert all(a["time_us"] >= b["time_us"] for a, b in itertools.pairwise(top))
    for k in top:
        assert k["time_us"] > 0 and 0 < k["share"] <= 1 and k["count"] >= 1
        assert k["share"] == pytest.approx(k["time_us"] / s["total_us"])
        assert k["phase"] in (*PHASES, trace.UNATTRIBUTED)
    assert sum(v["share"] for v in s["phases"].values()) == pytest.approx(1.0)
    for ph in PHASES:  # every phase ran and was recognised
        assert s["phases"][ph]["time_us"] > 0, ph
    assert s["attributed_share"] > 0.5
    assert s["calls"] == 2 and s["total_us_per_call"] == pytest.approx(s["total_us"] / 2)
    for needle in ("share", "phase", "by phase:"):
        assert needle in out


def test_profile_bad_arguments_give_one_line(tmp_path):
    for args, needle in ((["--kernels", "nope"], "available: "), (["--views", "9"], "--views must be in 1..3"),
                         (["--prompt-len", "999"], "--prompt-len must be in 1..200"), (["--top", "0"], "--top")):
        code, out, err = run_cli(["profile", "--preset", "tiny", "--trace-dir", str(tmp_path), *args])
        assert code == 2 and needle in err and err.count("\n") == 1, (args, err)
        assert out == ""


def test_hlo_phases_follow_the_named_scopes():
    def f(x, w):
        with jax.named_scope("phase_vision"):
            y = jnp.tanh(x @ w)
        with jax.named_scope("phase_prefill"):
            def body(c, _):
                return jnp.sin(c @ w), None
            y, _ = jax.lax.scan(body, y, None, length=3)
        with jax.named_scope("phase_denoise"):
            return (y @ w).sum()

    x = jnp.ones((64, 64))
    text = jax.jit(f).lower(x, x).compile().as_text()
    info = trace.parse_hlo(text)
    phases = set(info.phase.values())
    assert phases == set(PHASES)
    # The scan became a while loop whose body ops carry the prefill scope.
    assert any(name.startswith("while") for name in info.control)
    assert {info.phase[n] for n in info.control} == {"prefill"}


def _write_trace(path, events, processes, threads):
    meta = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}} for pid, name in processes.items()]
    meta += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}
             for (pid, tid), name in threads.items()]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def _x(pid, tid, ts, dur, name, **args):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}


def test_device_trace_summary(tmp_path):
    hlo = trace.HloInfo(phase={"fusion.1": "vision", "gemm.2": "prefill", "fusion.3": "denoise"},
                        control=frozenset())
    events = [
        _x(7, 1, 0, 30, "sgemm_kernel", hlo_op="gemm.2", hlo_module="jit_f"),
        _x(7, 1, 40, 10, "loop_fusion", hlo_op="fusion.1", hlo_module="jit_f"),
        _x(7, 1, 60, 20, "loop_fusion", hlo_op="fusion.3", hlo_module="jit_f"),
        _x(7, 1, 90, 30, "sgemm_kernel", hlo_op="gemm.2", hlo_module="jit_f"),
        _x(7, 1, 130, 10, "memcpy", hlo_op="copy.9", hlo_module="jit_f"),  # not in the phase map
        _x(7, 2, 0, 140, "gemm.2", hlo_op="gemm.2"),  # "XLA Ops" line: derived, must not be counted
        _x(1, 5, 0, 500, "PjitFunction(f)"),  # host
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    _write_trace(path, events, {7: "/device:GPU:0", 1: "/host:CPU"},
                 {(7, 1): "Stream #13(Compute)", (7, 2): "XLA Ops", (1, 5): "python"})
    s = trace.summarize(path, hlo=hlo, modules={"jit_f"}, calls=2, top=10)
    assert s["mode"] == "device" and s["total_us"] == 100 and s["events"] == 5
    top = s["top"]
    assert (top[0]["name"], top[0]["phase"], top[0]["time_us"], top[0]["count"]) == ("sgemm_kernel", "prefill", 60, 2)
    assert top[0]["share"] == pytest.approx(0.6) and top[0]["time_us_per_call"] == 30
    # The same kernel name in two phases is listed once per phase.
    assert {(k["name"], k["phase"]) for k in top} >= {("loop_fusion", "vision"), ("loop_fusion", "denoise")}
    assert s["phases"]["unattributed"]["share"] == pytest.approx(0.1)
    assert s["attributed_share"] == pytest.approx(0.9)
    # launches per call: 2 calls traced; prefill launched 2 kernels in all, the others 1
    assert {ph: v["launches_per_call"] for ph, v in s["phases"].items()} == {
        "prefill": 1.0, "vision": 0.5, "denoise": 0.5, "unattributed": 0.5}
    # back to back with 10 us between kernels: no overlap; per call (2 traced) 100 / 2 busy, 40 / 2 idle
    assert s["timeline"] == {"busy_us": 50.0, "overlap_us": 0.0, "early_launches": 0.0, "gap_us": 20.0}


def test_stream_timeline_counts_overlap_from_early_launches():
    """A kernel that starts before the one before it ends (Programmatic Dependent Launch) is overlap, not more busy
    time; an idle stretch over CALL_BREAK_US is the host between calls, not a gap inside one."""
    events = [
        _x(7, 1, 0, 30, "a"),
        _x(7, 1, 20, 30, "b"),  # starts 10 us before a ends: 10 us overlap, busy to 50
        _x(7, 1, 45, 5, "c"),  # inside b: 5 us overlap, no new busy time
        _x(7, 1, 60, 10, "d"),  # 10 us idle after b
        _x(7, 1, 60 + 10 + trace.CALL_BREAK_US + 1, 10, "e"),  # the next call: not a gap
        _x(7, 3, 0, 10, "f"),  # another stream: its own timeline
    ]
    t = trace.stream_timeline(events, calls=1)
    assert t == {"busy_us": 50 + 10 + 10 + 10, "overlap_us": 15.0, "early_launches": 2.0, "gap_us": 10.0}
    assert t["busy_us"] + t["overlap_us"] == sum(e["dur"] for e in events)


def test_timeline_is_printed():
    from pi05_jax.commands.profile import text

    summary = {"name": "pallas", "note": "device kernels", "calls": 1, "wall_s_per_call": 0.02,
               "total_us_per_call": 15e3, "distinct_kernels": 3, "attributed_share": 1.0, "mode": "device",
               "trace": "t", "top": [],
               "phases": {"denoise": {"time_us": 9.0, "share": 1.0, "launches_per_call": 10.0}},
               "timeline": {"busy_us": 14e3, "overlap_us": 1e3, "early_launches": 120.0, "gap_us": 500.0}}
    assert ("stream timeline per call: busy 14 ms (the kernels' spans), 1 ms overlapped by a next kernel (120 "
            "launched before the one before them ended: PDL), 0.5 ms idle between kernels") in text(summary)


def test_launch_counts_are_printed_per_phase_and_per_euler_step():
    from pi05_jax.commands.profile import launches_line

    summary = {"mode": "device", "phases": {
        "denoise": {"time_us": 9.0, "share": 0.6, "launches_per_call": 2700.0},
        "prefill": {"time_us": 5.0, "share": 0.3, "launches_per_call": 400.0},
        "vision": {"time_us": 1.0, "share": 0.1, "launches_per_call": 300.0}}}
    line = launches_line(summary, steps=10)
    assert line == ("  kernels launched per call: denoise 2700 (270 per Euler step), prefill 400, vision 300")
    assert "per Euler step" not in launches_line(summary, steps=None)
    assert launches_line({**summary, "mode": "host"}, 10).startswith("  XLA ops executed per call")


def test_host_trace_counts_loops_by_their_own_time(tmp_path):
    hlo = trace.HloInfo(phase={"while.1": "denoise", "fusion.2": "denoise", "fusion.3": "denoise",
                               "fusion.4": "vision"}, control=frozenset({"while.1"}))
    events = [
        _x(1, 1, 0, 10, "fusion.4", hlo_op="fusion.4", hlo_module="jit_f"),
        _x(1, 1, 20, 100, "while.1", hlo_op="while.1", hlo_module="jit_f"),
        _x(1, 1, 25, 40, "fusion.2", hlo_op="fusion.2", hlo_module="jit_f"),
        _x(1, 2, 70, 45, "fusion.3", hlo_op="fusion.3", hlo_module="jit_f"),  # another thread, inside the loop
        _x(1, 1, 200, 5, "fusion.9", hlo_op="fusion.9", hlo_module="jit_other"),  # another module: ignored
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    _write_trace(path, events, {1: "/host:CPU"}, {(1, 1): "tf_XLAEigen", (1, 2): "tf_XLAEigen"})
    s = trace.summarize(path, hlo=hlo, modules={"jit_f"}, calls=1, top=10)
    assert s["mode"] == "host"
    times = {k["name"]: k["time_us"] for k in s["top"]}
    assert times == {"fusion.4": 10, "while.1": 15, "fusion.2": 40, "fusion.3": 45}
    assert s["total_us"] == 110
    assert s["phases"]["denoise"]["time_us"] == 100 and s["phases"]["vision"]["time_us"] == 10


def test_missing_trace_is_a_clear_error(tmp_path):
    with pytest.raises(trace.TraceError, match="no perfetto_trace.json.gz"):
        trace.find_perfetto_trace(tmp_path)
