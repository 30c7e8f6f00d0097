"""The persistent expert megakernel's copy / wait schedule, replayed per block in plain Python (no GPU, no Pallas).

`expert_stack`'s kernel body runs once per block with Pallas, lax and jnp swapped for recorders (`_mocked`): every
TMA copy (its barrier, its shared-memory slot, the global rows or columns it reads), every barrier wait, every wgmma
(the slots it reads), wgmma_wait and semaphore wait comes out as one event list per block, over the whole call (all
layers, the weight ring never restarted). `check` then plays the events against mbarrier semantics:

- the lowering tracks one phase bit per barrier and flips it at each wait, so the k-th wait on a barrier waits with
  parity k % 2: it completes only once that barrier's (k + 1)-th copy has landed, and it never completes (a hang) if
  no (k + 1)-th copy was issued before it, or if a (k + 2)-th copy completed first (two copies in flight on one
  barrier: a barrier of arrival count 1 gets a second arrive in one phase). So: one copy in flight per barrier index
  at a time, and every wait has its copy;
- every wgmma reads ring slots waited since their last copy, holding the right tiles: weight tile t = the block's
  t-th wgmma of the call (its rows t R of the block's stream), the A tile of the phase the geometry says (h / o / act
  columns, from the split), and no copy lands in a slot that a wgmma not yet retired (`wgmma_wait`) reads;
- each block consumes exactly its stream (L per_q or L per_o tiles), leaves no copy un-waited at the end, and every
  block waits the same grid-barrier rounds;
- with fused_rope, each QKV block b (head slot n = b // 4, j = b % 4) loads per layer the cos / sin of frequencies
  [32 j, +32) and stores its two halves to qkv columns [n H + 32 j, +32) and [n H + H / 2 + 32 j, +32) (the columns
  `pack_weights` puts in its Wqkv tile: tests/test_expert_megakernel.py checks that side), and no other block
  writes qkv.

The interpret-mode phases (`expert_stack_phases`) restart the weight ring at every launch, so they cannot see a
parity or slot error that needs the stream to cross a phase or layer boundary; this does.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import types

import jax
import jax.numpy as jnp

from pallas_kernels import expert_megakernel as em


class _Fake:
    """Any array value or scratch ref of the block programs' arithmetic: absorbs every operation."""

    shape = (em.ROWS, em.COLS)
    ndim = 2

    def __getattr__(self, name):
        return _Fake()

    def __call__(self, *a, **k):
        return _Fake()

    def __getitem__(self, k):
        return _Fake()

    def __setitem__(self, k, v):
        pass

    def _op(self, *a):
        return _Fake()

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _op
    __floordiv__ = __rfloordiv__ = __pow__ = __neg__ = __lt__ = __le__ = __gt__ = __ge__ = _op


def _idx(k):
    return k if isinstance(k, tuple) else (k,)


class _GRef:
    """A global ref: .at[...] keeps the indices (pl.ds -> ("ds", start, size))."""

    def __init__(self, name, idx=()):
        self.name, self.idx = name, idx

    @property
    def at(self):
        return _At(lambda k: _GRef(self.name, self.idx + _idx(k)))

    def __getitem__(self, k):
        return _Fake()

    def __setitem__(self, k, v):
        pass


class _At:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, k):
        return self.fn(k)


class _Scratch:
    """A ring or a barrier array: .at[i] -> (name, i), bounds-checked."""

    def __init__(self, name, n):
        self.name, self.n = name, n

    @property
    def at(self):
        def get(i):
            i = int(i)
            if not 0 <= i < self.n:
                raise IndexError(f"{self.name}[{i}] out of {self.n}")
            return (self.name, i)
        return _At(get)


class _Recorder:
    def __init__(self, b):
        self.b = b
        self.events = []
        self.sems = 0


def _concrete(v):
    if isinstance(v, _Fake):
        raise AssertionError("the schedule depends on data (a pl.when on an array value)")
    return v


def _mocks(rec: _Recorder):
    def fori_loop(lo, hi, f, carry):
        for i in range(int(lo), int(hi)):
            carry = f(i, carry)
        return carry

    lax = types.SimpleNamespace(
        rem=lambda a, b: int(a) % int(b), div=lambda a, b: int(a) // int(b), fori_loop=fori_loop,
        broadcast_in_dim=lambda *a, **k: _Fake(), axis_index=lambda name: rec.b)

    class Jnp:
        float32, bfloat16, int32 = jnp.float32, jnp.bfloat16, jnp.int32

        @staticmethod
        def where(c, a, b):
            if any(isinstance(v, _Fake) for v in (c, a, b)):
                return _Fake()
            return a if c else b

        @staticmethod
        def asarray(v, dtype=None):
            return v

        def __getattr__(self, name):
            return lambda *a, **k: _Fake()

    def when(cond):
        def deco(f):
            if _concrete(cond):
                f()
        return deco

    def get_global(kind):
        rec.sems += 1
        return _GRef(f"sem{rec.sems - 1}")

    pl = types.SimpleNamespace(when=when, run_scoped=lambda f, *ts, **k: f(*[_Fake() for _ in ts]),
                               ds=lambda start, size: ("ds", int(start), size), get_global=get_global)

    class Plgpu:
        SemaphoreType = types.SimpleNamespace(REGULAR="regular")

        def __getattr__(self, name):
            return lambda *a, **k: _Fake()

        @staticmethod
        def copy_gmem_to_smem(src, dst, barrier):
            rec.events.append(("copy", barrier, dst, (src.name, src.idx)))

        @staticmethod
        def barrier_wait(barrier):
            rec.events.append(("wait", barrier))

        @staticmethod
        def wgmma(acc, a, b):
            rec.events.append(("wgmma", a if isinstance(a, tuple) else None, b if isinstance(b, tuple) else None))

        @staticmethod
        def copy_smem_to_gmem(src, dst, *a, **k):
            rec.events.append(("store", dst.name, dst.idx))

        @staticmethod
        def wgmma_wait(n):
            rec.events.append(("wgmma_wait", n))

        @staticmethod
        def semaphore_wait(sem, value, decrement=True, **k):
            rec.events.append(("semaphore_wait", sem.name, int(value), decrement))

        @staticmethod
        def inline_mgpu(*a, **k):
            return lambda f: (lambda *aa, **kk: None)

    return {"lax": lax, "jnp": Jnp(), "pl": pl, "plgpu": Plgpu()}


@contextlib.contextmanager
def _mocked(rec):
    """The kernel modules' lax, jnp, pl and plgpu swapped for the recorders (expert_megakernel's, and
    expert_loop's whose body calls into it)."""
    from pallas_kernels import expert_loop as el

    mocks = _mocks(rec)
    saved = {(m, k): getattr(m, k) for m in (em, el) for k in mocks}
    for m, k in saved:
        setattr(m, k, mocks[k])
    try:
        yield
    finally:
        for (m, k), v in saved.items():
            setattr(m, k, v)


def _captured(fn, args):
    """fn's kernel body, geometry and ref names: fn traced abstractly with em._launch capturing instead of
    building (nothing is built or run)."""
    got = {}

    def launch(body, g_, tiles_, ins, outs, **_):
        got.update(body=body, g=g_, names=[*ins, *outs])
        return {k: jnp.zeros(v.shape, v.dtype) for k, v in outs.items()}

    real, em._launch = em._launch, launch
    try:
        jax.eval_shape(fn, *args)
    finally:
        em._launch = real
    return got["body"], got["g"], got["names"]


def kernel_body(tiles, d=em.FULL_D, heads=em.FULL_HEADS, s=em.FULL_S, layers=em.FULL_LAYERS, tokens=em.TOKENS):
    """expert_stack's kernel body and geometry at these sizes."""
    g = em._geometry(d, heads, s, layers, tiles, tokens)
    sds = jax.ShapeDtypeStruct
    args = (sds((em.ROWS, d), jnp.float32), sds((tiles.blocks, layers * g.per_q * g.r, em.COLS), jnp.bfloat16),
            sds((layers, s, em.HEAD), jnp.bfloat16), sds((layers, s, em.HEAD), jnp.bfloat16),
            sds((layers, 6, d), jnp.bfloat16), sds((2, d), jnp.bfloat16), sds((), jnp.int32))
    return _captured(functools.partial(em.expert_stack, tiles=tiles, tokens=tokens), args)


def loop_kernel_body(tiles, steps=2, d=em.FULL_D, heads=em.FULL_HEADS, s=em.FULL_S, layers=2, tokens=em.TOKENS):
    """pallas_kernels.expert_loop's kernel body and geometry at these sizes."""
    from pallas_kernels import expert_loop as el

    g = em._geometry(d, heads, s, layers, tiles, tokens)
    sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    args = (sds((em.ROWS, el.ACTION), jnp.float32), sds((tiles.blocks, layers * g.per_q * g.r, em.COLS), bf),
            sds((layers, s, em.HEAD), bf), sds((layers, s, em.HEAD), bf), sds((steps, layers, 6, d), bf),
            sds((steps, 2, d), bf), sds((el.ACTION, d), bf), sds((d,), bf), sds((el.ACTION,), bf),
            sds((), jnp.int32))
    return _captured(functools.partial(el.expert_loop, tiles=tiles, tokens=tokens, dt=-1.0 / steps), args)


def block_events(body, g, names, tiles, b):
    rec = _Recorder(b)
    refs = {n: _GRef(n) for n in names}
    scratch = (_Scratch("w_ring", tiles.slots), _Scratch("w_bar", tiles.slots), _Scratch("a_ring", tiles.act_slots),
               _Scratch("a_bar", tiles.act_slots), _Scratch("bars", em.NUM_BARS), _Fake())
    with _mocked(rec):
        body(em._ctx(g, tiles, refs, scratch))
    return rec.events


def expected_tiles(g, b, steps=None, out_block=None):
    """Per weight tile of block b's stream (whole call): (its stream rows, (A source, A column start)). With steps
    (expert_loop): each step's stream again (the same rows), the out block's D / R out-tiles (A = h) after its
    layers'."""
    split_q = b // g.q_tiles
    split = b // g.n_cols
    phases = [("h", split_q * g.kq, g.t1)] if b < g.nq else []
    phases += [("o", split * g.ko, g.t2), ("h", 0, g.tm1), ("act", split * g.kd, g.tm2)]
    out = []
    for _ in range(g.layers):
        for src, col0, n in phases:
            out += [(src, col0 + j * g.r) for j in range(n)]
    if b == out_block:
        out += [("h", j * g.r) for j in range(g.d // g.r)]
    per_step = [(("ds", t * g.r, g.r), a) for t, a in enumerate(out)]
    return per_step * (steps or 1)


def check_block(events, g, b, want=None, steps=1):
    """The problems (strings) of one block's events; [] if every wait completes and every wgmma reads what it
    should (module docstring); want: `expected_tiles` (the stack's by default)."""
    issued, waited = collections.Counter(), collections.Counter()
    in_flight = {}  # barrier -> slot its un-waited copy fills
    landed, ready = {}, {}  # slot -> source of its last copy; slot -> source, once that copy was waited
    running = []  # slots read by wgmmas not yet retired, oldest first
    want = expected_tiles(g, b) if want is None else want
    n_wgmma = 0
    problems = []
    for i, ev in enumerate(events):
        kind = ev[0]
        if kind == "copy":
            _, bar, dst, src = ev
            if issued[bar] > waited[bar]:
                problems.append(f"event {i}: copy on {bar} while its copy into {in_flight[bar]} is not waited: two "
                                "in flight on one barrier")
            if isinstance(dst, tuple):
                if any(dst in r for r in running):
                    problems.append(f"event {i}: copy into {dst} while a wgmma reading it may still run")
                ready.pop(dst, None)
                landed[dst] = src
            issued[bar] += 1
            in_flight[bar] = dst
        elif kind == "wait":
            bar = ev[1]
            if issued[bar] <= waited[bar]:
                problems.append(f"event {i}: wait #{waited[bar]} on {bar} after only {issued[bar]} copies on it: "
                                "never completes")
            waited[bar] += 1
            if isinstance(in_flight.get(bar), tuple):
                ready[in_flight[bar]] = landed[in_flight[bar]]
        elif kind == "wgmma":
            _, a, w = ev
            ring = [x for x in (a, w) if x is not None]
            for slot in ring:
                if slot not in ready:
                    problems.append(f"event {i}: wgmma reads {slot}, not waited since its last copy")
            if w is not None:
                rows, (src, col) = want[n_wgmma] if n_wgmma < len(want) else (None, (None, None))
                w_src, a_src = ready.get(w), ready.get(a)
                if w_src is None or w_src[0] != "w" or w_src[1][:2] != (b, rows):
                    problems.append(f"event {i}: weight wgmma #{n_wgmma} reads {w_src}, want rows {rows}")
                if a_src is None or a_src[0] != src or a_src[1][1] != ("ds", col, g.r):
                    problems.append(f"event {i}: weight wgmma #{n_wgmma} reads A {a_src}, want {src} columns "
                                    f"{col}:+{g.r}")
                n_wgmma += 1
            running.append(set(ring))
        elif kind == "wgmma_wait":
            running = running[len(running) - ev[1]:] if ev[1] else []
        if len(problems) >= 5:
            break
    if g.fused:
        problems += _fused_rope_problems(events, g, b, steps)[:5 - len(problems)]
    if n_wgmma != len(want) and len(problems) < 5:
        problems.append(f"{n_wgmma} weight wgmmas, the stream has {len(want)} tiles")
    left = {k: issued[k] - waited[k] for k in issued if issued[k] != waited[k]}
    if left and len(problems) < 5:
        problems.append(f"copies never waited at the end: {left}")
    return problems


def _fused_rope_problems(events, g, b, steps=1):
    """fused_rope: block b's qkv stores and cos / sin loads over the call against the module docstring's columns."""
    slot, j = divmod(b, em.HEAD // 2 // em.HALF)  # not em.ROPE_TILES: the docstring's columns, whatever the kernel uses
    lo = slot * em.HEAD + j * em.HALF
    per_layer = [(slice(None), ("ds", lo, em.HALF)), (slice(None), ("ds", lo + em.HEAD // 2, em.HALF))]
    want_stores = per_layer * g.layers * steps if b < g.nq else []
    stores = [ev[2] for ev in events if ev[0] == "store" and ev[1] == "qkv"]
    cs = [ev[3][1] for ev in events if ev[0] == "copy" and ev[3][0] == "cs"]
    want_cs = [(k, slice(None), ("ds", j * em.HALF, em.HALF)) for k in range(2)] * g.layers * steps \
        if b < g.nq else []
    problems = []
    if stores != want_stores:
        problems.append(f"fused_rope: qkv stores {stores[:2]} (of {len(stores)}), want {want_stores[:2]} (of "
                        f"{len(want_stores)})")
    if cs != want_cs:
        problems.append(f"fused_rope: cos / sin loads {cs[:2]} (of {len(cs)}), want {want_cs[:2]} (of {len(want_cs)})")
    return problems


def check(tiles, **sizes):
    """{block: its problems} over every block of the grid (empty: the schedule is sound), and the grid-barrier
    rounds (every block must wait the same ones)."""
    body, g, names = kernel_body(tiles, **sizes)
    out, rounds = {}, set()
    for b in range(tiles.blocks):
        events = block_events(body, g, names, tiles, b)
        problems = check_block(events, g, b)
        rounds.add(tuple(ev[2] for ev in events if ev[0] == "semaphore_wait" and ev[1] == "sem0"))
        if problems:
            out[b] = problems
    return out, rounds, g


STATIC_SOURCES = ("kp", "vp", "valid", "mods", "norms", "cs")  # kernel inputs no block writes


def late_static_loads(tiles, **sizes):
    """{block: [(event index, source)]} of every copy of a static input (`STATIC_SOURCES`) that the block waits on
    before it has passed a grid barrier since issuing it: a small phase's static loads must be in flight across the
    barrier before the phase (`_prefetched`), not issued after it. The fused QKV epilogue's cos / sin (issued before
    its GEMM, waited after it) and the prologue are exempt: nothing precedes them to overlap."""
    body, g, names = kernel_body(tiles, **sizes)
    out = {}
    for b in range(tiles.blocks):
        events = block_events(body, g, names, tiles, b)
        first = next(i for i, ev in enumerate(events) if ev[0] == "semaphore_wait")
        pending, late = {}, []  # barrier -> (event index, source) of a static copy not yet across a grid barrier
        for i, ev in enumerate(events):
            if ev[0] == "copy" and ev[3][0] in STATIC_SOURCES and i > first:
                pending[ev[1]] = (i, ev[3][0])
            elif ev[0] == "semaphore_wait":
                pending.clear()
            elif ev[0] == "wait" and ev[1] in pending:
                at, src = pending.pop(ev[1])
                if not (tiles.fused_rope and src == "cs"):
                    late.append((at, src))
        if late:
            out[b] = late
    return out


def check_loop(tiles, steps=2, **sizes):
    """`check` for pallas_kernels.expert_loop: every block's stream over `steps` steps (the ring never restarts:
    the step boundary is a stream boundary like a layer's), and the grid-barrier rounds."""
    from pallas_kernels import expert_loop as el

    body, g, names = loop_kernel_body(tiles, steps, **sizes)
    out, rounds = {}, set()
    for b in range(tiles.blocks):
        events = block_events(body, g, names, tiles, b)
        problems = check_block(events, g, b, expected_tiles(g, b, steps, el.out_block(tiles)), steps)
        rounds.add(tuple(ev[2] for ev in events if ev[0] == "semaphore_wait" and ev[1] == "sem0"))
        if problems:
            out[b] = problems
    return out, rounds, g
