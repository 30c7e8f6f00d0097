"""Reading a JAX profiler trace: the top kernels by device time, each with its share and its phase.

The trace is the Perfetto JSON that `jax.profiler.start_trace(..., create_perfetto_trace=True)` writes next to
the xplane (`plugins/profile/<run>/perfetto_trace.json.gz`), so no xprof/TensorBoard is needed to read it.

Device mode (GPU): kernel events of the device processes (`/device:GPU:N`, stream threads). Host mode (CPU, which
has no device kernels): the XLA ops the CPU runtime executes, with a control-flow op (`while`, ...) counted for
its own time only (its span minus the ops that ran inside it).

Phases come from the compiled module's HLO text: bench and profile run each phase inside
`jax.named_scope("phase_<name>")`, so every instruction's `op_name` metadata carries it; a fusion without
metadata takes the phase of the instructions it calls. Events name their instruction with the `hlo_op` arg.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import gzip
import json
import pathlib
import re

from pi05_jax.bench.implementations import PHASE_SCOPE
from pi05_jax.bench.roofline import PHASES

UNATTRIBUTED = "unattributed"
_PHASE_RE = re.compile(re.escape(PHASE_SCOPE) + r"(" + "|".join(PHASES) + r")\b")
_INSTR_RE = re.compile(r"^(?:ROOT\s+)?%?([\w.\-]+)\s+=\s")
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
_CALLS_RE = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_REF_RE = re.compile(r"%([\w.\-]+)")
_NON_KERNEL_THREADS = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Source", "TraceMe", "Launch Stats")


class TraceError(RuntimeError):
    pass


def find_perfetto_trace(trace_dir: str | pathlib.Path) -> pathlib.Path:
    found = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise TraceError(f"no perfetto_trace.json.gz under {str(trace_dir)!r}; was the trace captured with "
                         f"create_perfetto_trace=True?")
    return found[-1]


def module_name(hlo_text: str) -> str:
    m = re.match(r"\s*HloModule\s+([\w.\-]+)", hlo_text)
    return m.group(1) if m else ""


def phase_of(op_name: str) -> str | None:
    m = _PHASE_RE.search(op_name)
    return m.group(1) if m else None


@dataclasses.dataclass(frozen=True)
class HloInfo:
    phase: dict  # instruction name -> phase, where the metadata tells
    control: frozenset  # while / conditional / call instructions: their events enclose other ops' events


_CONTROL_OPS = (" while(", " conditional(", " call(")


def parse_hlo(hlo_text: str) -> HloInfo:
    """Phases and control-flow instructions of a compiled module's HLO text.

    An instruction's phase is, in order: its own `op_name` metadata; the phase most of the instructions it calls
    carry (fusions); the phase of the instruction that calls its computation (loop bodies); the phase most of its
    operands and users carry (ops XLA created without metadata)."""
    own: dict[str, str | None] = {}
    calls: dict[str, list[str]] = {}
    refs: dict[str, list[str]] = {}
    comp_of: dict[str, str] = {}
    members: dict[str, list[str]] = collections.defaultdict(list)
    control = set()
    comp = None
    for raw in hlo_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("HloModule"):
            continue
        if line == "}":
            comp = None
            continue
        if line.endswith("{") and " = " not in line:
            comp = line.removeprefix("ENTRY ").split()[0].lstrip("%")
            continue
        m = _INSTR_RE.match(line)
        if not m:
            continue
        name = m.group(1)
        op = _OP_NAME_RE.search(line)
        own[name] = phase_of(op.group(1)) if op else None
        callees = _CALLS_RE.findall(line)
        for group in _BRANCHES_RE.findall(line):
            callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
        calls[name] = callees
        body = line.split(" = ", 1)[1].split(", metadata=")[0]
        refs[name] = [r for r in _REF_RE.findall(body) if r != name and r not in callees]
        if any(c in line for c in _CONTROL_OPS):
            control.add(name)
        if comp:
            members[comp].append(name)
            comp_of[name] = comp
    callers: dict[str, list[str]] = collections.defaultdict(list)
    for name, callees in calls.items():
        for c in callees:
            callers[c].append(name)
    users: dict[str, list[str]] = collections.defaultdict(list)
    for name, operands in refs.items():
        for o in operands:
            users[o].append(name)

    def vote(names, fn) -> str | None:
        votes = collections.Counter(p for n in names if (p := fn(n)))
        return votes.most_common(1)[0][0] if votes else None

    memo: dict[str, str | None] = {}

    def structural(name: str, depth: int = 0) -> str | None:
        """Own metadata, else what the called computations hold, else what calls the enclosing computation."""
        if name in memo:
            return memo[name]
        memo[name] = None  # cycle guard
        phase = own.get(name)
        if phase is None and depth < 12:
            phase = vote([i for c in calls.get(name, ()) for i in members.get(c, ())],
                         lambda n: structural(n, depth + 1))
        if phase is None and depth < 12 and name in comp_of:
            phase = vote(callers.get(comp_of[name], ()), lambda n: structural(n, depth + 1))
        memo[name] = phase
        return phase

    phases = {}
    for name in own:
        phase = structural(name) or vote(refs.get(name, []) + users.get(name, []), structural)
        if phase:
            phases[name] = phase
    return HloInfo(phase=phases, control=frozenset(control))


def load_events(path: pathlib.Path) -> tuple[list[dict], dict, dict]:
    """(complete events, {pid: process name}, {(pid, tid): thread name})."""
    try:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TraceError(f"cannot read the trace {str(path)!r}: {e}") from e
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    return [e for e in events if e.get("ph") == "X"], procs, threads


def _device_kernel_events(events, procs, threads) -> list[dict]:
    device_pids = {pid for pid, name in procs.items() if name.startswith("/device:")}
    chosen = [e for e in events if e["pid"] in device_pids
              and not any(t in threads.get((e["pid"], e.get("tid")), "") for t in _NON_KERNEL_THREADS)]
    streams = [e for e in chosen if "stream" in threads.get((e["pid"], e.get("tid")), "").lower()]
    return streams or chosen


def _is_control(op: str, control: frozenset) -> bool:
    return op in control or (not control and op.split(".")[0] in ("while", "conditional", "call"))


def _exclusive_host_ops(events, modules: set[str], control: frozenset) -> list[dict]:
    """XLA ops run by the CPU runtime. A control-flow op (while, conditional, call) encloses the ops it runs,
    on any thread, so its own time is its span minus theirs; other ops are counted whole."""
    ops = [e for e in events if "hlo_op" in e.get("args", {})
           and (not modules or e["args"].get("hlo_module", "") in modules)]
    leaves = sorted((e for e in ops if not _is_control(e["args"]["hlo_op"], control)), key=lambda e: e["ts"])
    starts = [e["ts"] for e in leaves]
    prefix = [0.0]
    for e in leaves:
        prefix.append(prefix[-1] + float(e.get("dur", 0)))
    out = [dict(e, self_dur=float(e.get("dur", 0))) for e in leaves]
    for e in ops:
        if _is_control(e["args"]["hlo_op"], control):
            lo = bisect.bisect_left(starts, e["ts"])
            hi = bisect.bisect_left(starts, e["ts"] + float(e.get("dur", 0)))
            out.append(dict(e, self_dur=max(0.0, float(e.get("dur", 0)) - (prefix[hi] - prefix[lo]))))
    return out


def _event_phase(e: dict, phase_map: dict) -> str:
    args = e.get("args", {})
    op = args.get("hlo_op")
    if op and op in phase_map:
        return phase_map[op]
    for key in ("tf_op", "long_name", "name", "scope_range_id", "hlo_op"):
        p = phase_of(str(args.get(key, "")))
        if p:
            return p
    return phase_of(e.get("name", "")) or UNATTRIBUTED


# Idle stretches between kernels longer than this are taken as the host's time between traced calls, not a gap
# inside one call.
CALL_BREAK_US = 1000.0


def stream_timeline(kernels: list[dict], calls: int) -> dict:
    """Per call, over each stream's kernels in start order: `busy_us` (the union of their spans), `overlap_us` (the
    kernel time that ran while an earlier kernel of the stream was still running: sum of durations minus busy; with
    Programmatic Dependent Launch a kernel may start before the one before it ends), `early_launches` (kernels that
    started before every earlier one had ended) and `gap_us` (idle time between kernels, stretches over
    CALL_BREAK_US excluded)."""
    busy = overlap = gaps = 0.0
    early = 0
    streams: dict[tuple, list[dict]] = collections.defaultdict(list)
    for e in kernels:
        streams[(e["pid"], e.get("tid"))].append(e)
    for events in streams.values():
        events.sort(key=lambda e: float(e["ts"]))
        end = None
        for e in events:
            start, dur = float(e["ts"]), float(e.get("dur", 0))
            if end is None or start >= end:
                if end is not None and start - end <= CALL_BREAK_US:
                    gaps += start - end
                busy += dur
                end = start + dur
            else:
                early += 1
                overlap += min(end, start + dur) - start
                busy += max(0.0, start + dur - end)
                end = max(end, start + dur)
    return {"busy_us": busy / calls, "overlap_us": overlap / calls, "early_launches": early / calls,
            "gap_us": gaps / calls}


def summarize(path: pathlib.Path, *, hlo: HloInfo, modules: set[str], calls: int, top: int) -> dict:
    phase_map = hlo.phase
    events, procs, threads = load_events(path)
    kernels = _device_kernel_events(events, procs, threads)
    if kernels:
        mode = "device"
        note = "device kernels (GPU stream events)"
        timed = [(e.get("name", "?"), e.get("args", {}).get("hlo_op", ""), float(e.get("dur", 0)),
                  _event_phase(e, phase_map)) for e in kernels]
    else:
        mode = "host"
        note = ("no device kernels in this trace (CPU backend): showing the XLA ops the CPU runtime executed, "
                "by exclusive time")
        timed = [(e["args"]["hlo_op"], e["args"]["hlo_op"], max(e["self_dur"], 0.0), _event_phase(e, phase_map))
                 for e in _exclusive_host_ops(events, modules, hlo.control)]
    if not timed:
        raise TraceError(f"{str(path)!r} holds no kernel or XLA op events to summarize")
    total_us = sum(t for _, _, t, _ in timed)
    groups: dict[tuple[str, str], dict] = {}
    for name, op, dur, phase in timed:
        g = groups.setdefault((name, phase), {"name": name, "hlo_op": op, "phase": phase, "time_us": 0.0,
                                              "count": 0})
        g["time_us"] += dur
        g["count"] += 1
    ranked = sorted(groups.values(), key=lambda g: -g["time_us"])
    for g in ranked:
        g["share"] = g["time_us"] / total_us if total_us else 0.0
        g["time_us_per_call"] = g["time_us"] / calls
    by_phase, launches = collections.Counter(), collections.Counter()
    for _, _, dur, phase in timed:
        by_phase[phase] += dur
        launches[phase] += 1
    return {
        "trace": str(path),
        "mode": mode,
        "note": note,
        "calls": calls,
        "events": len(timed),
        "total_us": total_us,
        "total_us_per_call": total_us / calls,
        # per phase: kernel time, its share, and kernels launched (device mode; XLA ops executed in host mode) per call
        "phases": {p: {"time_us": t, "share": t / total_us if total_us else 0.0,
                       "launches_per_call": launches[p] / calls} for p, t in by_phase.items()},
        "attributed_share": 1.0 - (by_phase.get(UNATTRIBUTED, 0.0) / total_us if total_us else 0.0),
        "top": ranked[:top],
        "distinct_kernels": len(ranked),
        # device mode: the stream timeline per call (busy, overlapped, idle; stream_timeline)
        "timeline": stream_timeline(kernels, calls) if mode == "device" else None,
    }
