"""Where a persistent kernel's time goes, per phase and per barrier wait, from Mosaic GPU's on-device profiler.

`plgpu.CompilerParams(profile_space=..., profile_dir=...)` makes every block record the SM clock when it enters and
leaves each `jax.named_scope` of the kernel body, and the first call writes them to `<profile_dir>/*-trace.json`
(Chrome trace format: per block one thread of "B"/"E" events; a timestamp is the block's global start time in ns
plus its SM clock cycles since its first event, both over 1e3). Within one block the differences are clock cycles;
`summarize` turns them into microseconds with the cycles per microsecond that make the median block's span equal
the kernel's measured device time (the blocks of a persistent kernel start and end together), so no clock rate
is assumed.

For a kernel whose body is phases separated by grid barriers (scopes "<phase>" and "<phase> | wait" in turn, as
`expert_megakernel.expert_stack` names them), the summary reads:
- a phase's `slowest` (median over layers of the slowest block's time) is what the grid waits for: the chain of
  phases' `slowest` plus the barriers' own latency is the layer's time;
- a wait's `fastest` (median over layers of the shortest wait of any block: the last block to arrive) is the
  barrier's own latency, and its `median` minus that is how long blocks idle for a straggler.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import statistics

import numpy as np


@dataclasses.dataclass(frozen=True)
class ScopeStats:
    """One scope name, in microseconds: per layer (the n-th occurrence in a block) the slowest and the fastest block
    and the median block, each then the median over layers; `count` occurrences per block."""

    name: str
    count: int
    slowest: float
    median: float
    fastest: float


def latest_trace(profile_dir) -> pathlib.Path:
    """The newest `*-trace.json` in profile_dir (a FileNotFoundError naming the directory if there is none)."""
    traces = sorted(pathlib.Path(profile_dir).glob("*-trace.json"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no *-trace.json in {profile_dir} (was the kernel compiled with profile_dir and "
                                f"called?)")
    return traces[-1]


def block_ranges(trace: dict) -> dict[int, list[tuple[str, float, float]]]:
    """Per block (trace thread) its outermost scopes in order as (name, begin, end) in the trace's units (cycles / 1e3
    since that block's start). Nested scopes are folded into their outermost one."""
    per: dict[int, list] = collections.defaultdict(list)
    for ev in trace["traceEvents"]:
        per[ev["tid"]].append(ev)
    out = {}
    for tid, events in per.items():
        stack, ranges = [], []
        for ev in events:
            if ev["ph"] == "B":
                stack.append(ev)
            elif ev["ph"] == "E":
                if not stack or stack[-1]["name"] != ev["name"]:
                    raise ValueError(f"block {tid}: end of {ev['name']!r} without its begin (a truncated trace?)")
                begin = stack.pop()
                if not stack:
                    ranges.append((ev["name"], begin["ts"], ev["ts"]))
        out[tid] = ranges
    return out


def summarize(trace: dict, kernel_us: float) -> tuple[list[ScopeStats], float]:
    """Per scope name (in the order of their first occurrence) its `ScopeStats`, and the cycles per microsecond
    used (the median block's span, first begin to last end, over kernel_us)."""
    if kernel_us <= 0:
        raise ValueError(f"kernel_us must be positive, got {kernel_us=}")
    blocks = block_ranges(trace)
    if not blocks:
        raise ValueError("the trace holds no events")
    spans = [r[-1][2] - r[0][1] for r in blocks.values() if r]
    per_us = statistics.median(spans) * 1e3 / kernel_us  # trace units are cycles / 1e3
    durations: dict[str, dict[int, list[float]]] = {}  # name -> block -> per occurrence, us
    for tid, ranges in blocks.items():
        for name, begin, end in ranges:
            durations.setdefault(name, {}).setdefault(tid, []).append((end - begin) * 1e3 / per_us)
    stats = []
    for name, by_block in durations.items():
        counts = {len(v) for v in by_block.values()}
        if len(counts) != 1:
            raise ValueError(f"scope {name!r} occurs {sorted(counts)} times in different blocks (a truncated trace?)")
        grid = np.array(list(by_block.values()))  # [blocks, occurrences]
        stats.append(ScopeStats(name, grid.shape[1], float(np.median(grid.max(0))), float(np.median(grid)),
                                float(np.median(grid.min(0)))))
    return stats, per_us


def format_table(stats: list[ScopeStats], per_us: float, *, layers: int) -> str:
    """The summary as text: one line per scope, then per layer the sum of the phases' `slowest` and of the waits'
    `fastest` (the chain if the barriers cost only their latency) and of the median block's scopes."""
    lines = [f"  (SM clock {per_us / 1e3:.3f} GHz from the median block's span; us; per layer the median over "
             f"layers)", f"  {'scope':28s} {'count':>5s} {'slowest':>8s} {'median':>8s} {'fastest':>8s}"]
    chain_phase = chain_wait = median_sum = 0.0
    for s in stats:
        lines.append(f"  {s.name:28s} {s.count:5d} {s.slowest:8.2f} {s.median:8.2f} {s.fastest:8.2f}")
        if s.count in (layers, layers - 1):  # the layer body's scopes (the last wait is skipped after the last layer)
            median_sum += s.median
            if s.name.endswith("| wait"):
                chain_wait += s.fastest
            else:
                chain_phase += s.slowest
    lines.append(f"  per layer: phases' slowest {chain_phase:.2f} + waits' fastest {chain_wait:.2f} = "
                 f"{chain_phase + chain_wait:.2f} us; the median block's scopes add up to {median_sum:.2f} us")
    return "\n".join(lines)


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)
