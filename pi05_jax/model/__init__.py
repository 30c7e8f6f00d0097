"""The upstream-exact model: openpi's pi0.5 computation as plain functions over the params pytree.

`gemma` (prefix LLM and action expert), `siglip` (vision tower), `reference` (upstream's sampling: every view slot,
the padded prefix, masked attention), and what they share: `linear` (dense layers, GeLU), `weights` (matmuls that
take plain or quantized stored weights) and `layer_stack` (stacked or per-layer weight layouts). Nothing here imports
the fast path (`pi05_jax.fast`).
"""
