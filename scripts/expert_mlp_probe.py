import functools, statistics, sys, jax, jax.numpy as jnp, numpy as np
from jax.experimental.mosaic.gpu import profiler
from pallas_kernels import expert_mlp_mgpu as em
from pallas_kernels.skinny_matmul import geglu_matmul
d, f, m = 1024, 4096, 50
k = jax.random.split(jax.random.key(0), 3)
g = (jax.random.normal(k[0], (2, d, f)) * d**-0.5).astype(jnp.bfloat16)
w = (jax.random.normal(k[1], (f, d)) * f**-0.5).astype(jnp.bfloat16)
h = jax.random.normal(k[2], (m, d)).astype(jnp.bfloat16)
hp = jnp.pad(h, ((0, 14), (0, 0)))
def today(h, gt, w):
    return jnp.einsum("MF,FD->MD", geglu_matmul(h, gt, interpret=False), w)
def show(name, fn, *args):
    try:
        for _ in range(3): jax.block_until_ready(fn(*args))
        rs = []
        for _ in range(20):
            _, t = profiler.measure(fn, aggregate=False)(*args)
            rs.append(t)
        names = [n for n, _ in rs[0]]
        med = {n: statistics.median([dict(r)[n] for r in rs]) * 1e3 for n in names}
        tot = sum(med.values())
        print(f"{name:40s} total {tot:7.2f} us  " + "  ".join(f"{n[:40]}={v:.2f}" for n, v in med.items()), flush=True)
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:800], flush=True)
gt = jnp.swapaxes(g, 1, 2)
show("today geglu+xla down", jax.jit(today), h, gt, w)
VARIANTS = [em.ExpertMlpTiles(), em.ExpertMlpTiles(weight_slots=20, act_slots=4), em.ExpertMlpTiles(weight_slots=8, act_slots=8)]
for tiles in VARIANTS:
    try:
        tiled = em.tile_weights(g, w, tiles)
    except Exception as e:
        print(tiles, e); continue
    print(tiles, "smem KiB", em.smem_bytes(tiles) / 1024)
    show("  persistent one-fence sync", jax.jit(functools.partial(em._persistent_call, tiles=tiles)), hp, tiled)
    show("  persistent NO sync (racy)", jax.jit(functools.partial(em._persistent_call, tiles=tiles, _sync=False)), hp, tiled)
    show("  phase 1 alone", jax.jit(functools.partial(em.gate_up_phase, tiles=tiles, interpret=False)), hp, tiled)
    act = em.gate_up_phase(hp, tiled, tiles, interpret=False)
    show("  phase 2 alone", jax.jit(functools.partial(em.down_phase, tiles=tiles, interpret=False)), act, tiled)

print("--- 18 layers chained, distinct weights (HBM streaming); device time per layer from profiler.measure", flush=True)
layers = 18
ks = jax.random.split(jax.random.key(1), 2 * layers)
gs = [(jax.random.normal(ks[2 * i], (2, d, f)) * d**-0.5).astype(jnp.bfloat16) for i in range(layers)]
ws = [(jax.random.normal(ks[2 * i + 1], (f, d)) * f**-0.5).astype(jnp.bfloat16) for i in range(layers)]
def chain(op):
    def run(x, weights):
        for wt in weights:
            x = (x.astype(jnp.float32) + 1e-2 * op(x, wt)).astype(x.dtype)
        return x
    return jax.jit(run)
def today2(x, wt):
    return today(x, *wt).astype(jnp.float32)
def ours(tiles, sync):
    def op(x, t):
        xp = jnp.pad(x, ((0, 64 - x.shape[0]), (0, 0)))
        return em._persistent_call(xp, t, tiles, _sync=sync).sum(0)[: x.shape[0]]
    return op
variants = {"today geglu+xla down": (chain(today2), [(jnp.swapaxes(g_, 1, 2), w_) for g_, w_ in zip(gs, ws)])}
for tiles in VARIANTS:
    tl = [em.tile_weights(g_, w_, tiles) for g_, w_ in zip(gs, ws)]
    variants[f"persistent ws={tiles.weight_slots} as={tiles.act_slots}"] = (chain(ours(tiles, True)), tl)
outs = {}
for name, (fn, wt) in variants.items():
    try:
        outs[name] = np.asarray(jax.block_until_ready(fn(h, wt)), np.float64)
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:600], flush=True)
base = outs["today geglu+xla down"]
for rnd in range(2):
    for name, (fn, wt) in variants.items():
        if name not in outs: continue
        ts = []
        for _ in range(15):
            _, t = profiler.measure(fn)(h, wt)
            ts.append(t)
        e = np.linalg.norm(outs[name] - base) / np.linalg.norm(base)
        med = statistics.median(ts) * 1e3 / layers
        print(f"round {rnd} {name:45s} {med:7.2f} us/layer  {3*d*f*2/med/1e3:6.0f} GB/s  rel diff vs today {e:.1e}", flush=True)
