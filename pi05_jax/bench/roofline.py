"""Hand-counted work per phase (matmul FLOPs, bytes moved) and the floor it implies on a card.

The counts come from the config and the workload only (views, prompt length, steps, batch, dtype), never from a
compiled program, so they can be checked against one (tests compare them with XLA's cost analysis and with the
matmuls in the traced program).

What is counted:
  FLOPs  every matmul (2 per multiply-add): projections, MLPs, attention scores and attention-weighted values,
         patch embedding, heads. Elementwise work (norms, softmax, RoPE, GELU) is left out: it is a few percent
         and never the bound on a GPU.
  bytes  what must cross DRAM at least once per call: every weight the phase uses (once per call, or once per
         Euler step for the expert), its inputs and outputs (images, image tokens, the KV cache written by prefill
         and read by every denoise step). Intermediate activations are assumed to stay on chip (ideal fusion).

Two accountings:
  FLOOR    valid tokens only (valid views x 256 + valid prompt tokens) and adaRMS modulations precomputed once
           per num_steps (they depend only on the step's time), i.e. the least work an exact engine must do.
  PADDED   upstream's computation: every camera slot through SigLIP, all padded prefix slots through the LLM,
           adaRMS recomputed every step. This is what the `reference` implementation executes.

Quantization hook: byte counts take `weight_bytes`, a {param path: stored bytes} map. `weight_bytes_from_params`
builds it from the params actually on the device (a quantized leaf is any pytree; its leaves' bytes are summed),
`dense_weight_bytes` from the config and a dtype. Matmul rates are per compute dtype (`Ceilings.matmul`), so an
FP8 path plugs in its own rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from pi05_jax.config import IMAGE_RESOLUTION, Pi05Config

PHASES = ("vision", "prefill", "denoise")
IMAGE_CHANNELS = 3
IMAGE_INPUT_BYTES = 4  # images enter as float32

_LLM = "PaliGemma/llm"
_LAYERS = f"{_LLM}/layers"
EMBEDDING = f"{_LLM}/embedder/input_embedding"
VISION_PREFIX = "PaliGemma/img/"
# Prefix stream weights per layer; the last layer needs only K/V, i.e. kv_einsum and pre_attention_norm.
PREFILL_KV_PATHS = (f"{_LAYERS}/attn/kv_einsum/w", f"{_LAYERS}/pre_attention_norm/scale")
PREFILL_REST_PATHS = (f"{_LAYERS}/attn/q_einsum/w", f"{_LAYERS}/attn/attn_vec_einsum/w",
                      f"{_LAYERS}/mlp/gating_einsum", f"{_LAYERS}/mlp/linear", f"{_LAYERS}/pre_ffw_norm/scale")
# Read once per Euler step by the action expert.
EXPERT_STEP_PREFIXES = (f"{_LAYERS}/attn/q_einsum_1/", f"{_LAYERS}/attn/kv_einsum_1/",
                        f"{_LAYERS}/attn/attn_vec_einsum_1/", f"{_LAYERS}/mlp_1/", "action_in_proj/",
                        "action_out_proj/")
# Time conditioning -> adaRMS (scale, shift, gate): depends only on the step's time.
ADARMS_PREFIXES = (f"{_LAYERS}/pre_attention_norm_1/", f"{_LAYERS}/pre_ffw_norm_1/", f"{_LLM}/final_norm_1/",
                   "time_mlp_in/", "time_mlp_out/")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One call: `batch` rows, each with `views` valid camera views and `prompt_len` valid prompt tokens."""

    batch: int
    views: int
    prompt_len: int
    num_steps: int

    @property
    def euler_steps(self) -> int:
        from pi05_jax.model.reference import euler_times

        return len(euler_times(self.num_steps))


@dataclasses.dataclass(frozen=True)
class Accounting:
    name: str
    padded_tokens: bool  # every view slot and all padded prefix slots (upstream) vs valid ones only
    adarms_per_step: bool  # time conditioning + adaRMS modulations recomputed every step (upstream)
    description: str


FLOOR = Accounting("valid", False, False,
                   "valid tokens only (valid views x patches + valid prompt tokens); adaRMS modulations "
                   "precomputed once per num_steps")
PADDED = Accounting("padded", True, True,
                    "every view slot through SigLIP and every padded prefix slot through the LLM; adaRMS "
                    "recomputed every step (upstream openpi, the `reference` implementation)")


@dataclasses.dataclass(frozen=True)
class PhaseCost:
    flops: int
    bytes: int
    flops_detail: dict
    bytes_detail: dict


def prefix_tokens(config: Pi05Config, work: Workload, accounting: Accounting) -> int:
    if accounting.padded_tokens:
        return config.padded_prefix_len
    return work.views * config.tokens_per_image + work.prompt_len


def images_computed(config: Pi05Config, work: Workload, accounting: Accounting) -> int:
    return work.batch * (len(config.image_keys) if accounting.padded_tokens else work.views)


# --- FLOPs ----------------------------------------------------------------------------------------------------------


def vision_flops(config: Pi05Config, work: Workload, accounting: Accounting) -> dict:
    v, out_width = config.siglip, config.llm.width
    p = v.num_patches
    inner = v.num_heads * v.head_dim
    per_image = {
        "patch_embed": 2 * p * (v.patch_size**2 * IMAGE_CHANNELS) * v.width,
        "qkv_out_proj": v.depth * 2 * p * v.width * inner * 4,
        "attention": v.depth * 2 * (2 * p * p * inner),
        "mlp": v.depth * 2 * (2 * p * v.width * v.mlp_dim),
        "head": 2 * p * v.width * out_width,
    }
    n = images_computed(config, work, accounting)
    return {k: n * f for k, f in per_image.items()}


def prefill_flops(config: Pi05Config, work: Workload, accounting: Accounting) -> dict:
    g = config.llm
    s = prefix_tokens(config, work, accounting)
    q_width, kv_width = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    full = g.depth - 1  # the last layer computes only K and V
    per_row = {
        "q_out_proj": full * 2 * (2 * s * g.width * q_width),
        "kv_proj": g.depth * 2 * (2 * s * g.width * kv_width),
        "attention": full * 2 * (2 * s * s * q_width),
        "mlp": full * 2 * (3 * s * g.width * g.mlp_dim),
    }
    return {k: work.batch * f for k, f in per_row.items()}


def adarms_flops_per_row(config: Pi05Config) -> int:
    """Time conditioning (sincos outer product, two Linear) and every adaRMS modulation, for one row and one t."""
    w, depth = config.expert.width, config.expert.depth
    sincos = 2 * (w // 2)
    time_mlp = 2 * (2 * w * w)
    modulations = (2 * depth + 1) * 2 * w * (3 * w)
    return sincos + time_mlp + modulations


def denoise_flops(config: Pi05Config, work: Workload, accounting: Accounting) -> dict:
    e = config.expert
    t, a = config.action_horizon, config.action_dim
    s = prefix_tokens(config, work, accounting)
    q_width, kv_width = e.num_heads * e.head_dim, e.num_kv_heads * e.head_dim
    per_step_row = {
        "action_proj": 2 * (2 * t * a * e.width),
        "q_out_proj": e.depth * 2 * (2 * t * e.width * q_width),
        "kv_proj": e.depth * 2 * (2 * t * e.width * kv_width),
        "attention": e.depth * 2 * (2 * t * (s + t) * q_width),
        "mlp": e.depth * 2 * (3 * t * e.width * e.mlp_dim),
    }
    if accounting.adarms_per_step:
        per_step_row["adarms"] = adarms_flops_per_row(config)
    n = work.batch * work.euler_steps
    return {k: n * f for k, f in per_step_row.items()}


# --- bytes ----------------------------------------------------------------------------------------------------------


def weight_bytes_from_params(params) -> dict[str, int]:
    """{param path: bytes stored on the device}; a quantized leaf (any pytree) counts all of its arrays."""
    import jax

    from checkpoints.layout import flatten

    def nbytes(leaf) -> int:
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(leaf))

    return {path: nbytes(leaf) for path, leaf in flatten(params).items()}


def dense_weight_bytes(config: Pi05Config, itemsize: int) -> dict[str, int]:
    from checkpoints.layout import param_shapes

    return {path: int(np.prod(shape)) * itemsize for path, shape in param_shapes(config).items()}


def _sum(weight_bytes: Mapping[str, int], *, prefixes=(), paths=()) -> int:
    return int(sum(b for k, b in weight_bytes.items() if k in paths or k.startswith(tuple(prefixes))))


def vision_bytes(config, work, accounting, weight_bytes, act_bytes) -> dict:
    n = images_computed(config, work, accounting)
    r = IMAGE_RESOLUTION
    return {
        "weights": _sum(weight_bytes, prefixes=(VISION_PREFIX,)),
        "images_in": n * r * r * IMAGE_CHANNELS * IMAGE_INPUT_BYTES,
        "tokens_out": n * config.tokens_per_image * config.llm.width * act_bytes,
    }


def kv_cache_bytes(config: Pi05Config, work: Workload, accounting: Accounting, act_bytes: int) -> int:
    g = config.llm
    s = prefix_tokens(config, work, accounting)
    return g.depth * 2 * work.batch * s * g.num_kv_heads * g.head_dim * act_bytes


def prefill_bytes(config, work, accounting, weight_bytes, act_bytes) -> dict:
    g = config.llm
    kv_w = _sum(weight_bytes, paths=PREFILL_KV_PATHS)
    rest_w = _sum(weight_bytes, paths=PREFILL_REST_PATHS)
    emb = weight_bytes.get(EMBEDDING, 0)
    prompt_rows = work.batch * (config.max_token_len if accounting.padded_tokens else work.prompt_len)
    n_img = images_computed(config, work, accounting)
    return {
        "weights": kv_w + rest_w * (g.depth - 1) // g.depth,
        "embedding_rows": emb * prompt_rows // config.vocab_size,
        "image_tokens_in": n_img * config.tokens_per_image * g.width * act_bytes,
        "kv_cache_out": kv_cache_bytes(config, work, accounting, act_bytes),
    }


def denoise_bytes(config, work, accounting, weight_bytes, act_bytes) -> dict:
    e = config.expert
    steps = work.euler_steps
    out = {
        "weights_per_step_x_steps": steps * _sum(weight_bytes, prefixes=EXPERT_STEP_PREFIXES),
        "kv_cache_reads": steps * kv_cache_bytes(config, work, accounting, act_bytes),
        "noise_in_actions_out": 2 * work.batch * config.action_horizon * config.action_dim * 4,
    }
    if accounting.adarms_per_step:
        out["adarms_weights_x_steps"] = steps * _sum(weight_bytes, prefixes=ADARMS_PREFIXES)
    else:
        out["modulations_x_steps"] = steps * work.batch * (2 * e.depth + 1) * 3 * e.width * act_bytes
    return out


def phase_costs(config: Pi05Config, work: Workload, accounting: Accounting, *, weight_bytes: Mapping[str, int],
                act_bytes: int) -> dict[str, PhaseCost]:
    """{phase: PhaseCost} for one call."""
    flops = {"vision": vision_flops(config, work, accounting), "prefill": prefill_flops(config, work, accounting),
             "denoise": denoise_flops(config, work, accounting)}
    nbytes = {"vision": vision_bytes(config, work, accounting, weight_bytes, act_bytes),
              "prefill": prefill_bytes(config, work, accounting, weight_bytes, act_bytes),
              "denoise": denoise_bytes(config, work, accounting, weight_bytes, act_bytes)}
    return {p: PhaseCost(flops=int(sum(flops[p].values())), bytes=int(sum(nbytes[p].values())),
                         flops_detail=flops[p], bytes_detail=nbytes[p]) for p in PHASES}


# --- the floor ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rates:
    """What a card can do: matmul FLOP/s in the compute dtype and DRAM bytes/s."""

    matmul_flops_per_s: float
    bytes_per_s: float


def floor(costs: Mapping[str, PhaseCost], rates: Rates) -> dict:
    """Per phase: time if compute bound, time if memory bound, the floor (the larger) and which bound it is."""
    out = {}
    for phase, c in costs.items():
        compute_s = c.flops / rates.matmul_flops_per_s
        memory_s = c.bytes / rates.bytes_per_s
        out[phase] = {"compute_s": compute_s, "memory_s": memory_s, "floor_s": max(compute_s, memory_s),
                      "bound": "compute" if compute_s >= memory_s else "memory"}
    out["total"] = {"floor_s": sum(v["floor_s"] for v in out.values())}
    return out
