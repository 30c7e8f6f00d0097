// The builtin SigLIP forward pass, written once over an `Ops` backend (host loops or CUDA kernels), op for op
// as pi05_jax/siglip.py computes it in float32:
//   x = patches @ We + be + pos;  per block: x += Attn(LN0(x)); x += Dense1(gelu(Dense0(LN1(x))));
//   tokens = LN(x) @ Wh + bh.
// Ops must provide (all pointers into its memory space; sizes in elements):
//   Patches(images, patches)                          [V,S,S,3] -> [V*P, p*p*3], (py, px, channel) order
//   Gemm(a, b, bias, c, M, N, K, Epilogue, extra)     c = epilogue(a[M,K] @ b[K,N] + bias[N])
//   LayerNorm(x, scale, bias, y, rows, width)         flax LayerNorm, fast variance, eps 1e-6
//   Attention(qkv, o)                                 softmax(q k^T / sqrt(H)) v per image and head
#ifndef PI05_BRIDGES_SIGLIP_FORWARD_H_
#define PI05_BRIDGES_SIGLIP_FORWARD_H_

#include "builtin_weights.h"

namespace pi05 {

enum class Epilogue {
  kNone,      // c = ab + bias
  kGelu,      // c = gelu_tanh(ab + bias)
  kResidual,  // c = c + (ab + bias)
  kPosEmbed,  // c = (ab + bias) + pos[row % P]   (extra = pos [P, N])
};

inline constexpr float kLayerNormEps = 1e-6f;

struct SiglipScratch {  // per-engine buffers, sized for dims.views images
  float* patches;       // [T, p*p*3]
  float* x;             // [T, D]   residual stream
  float* y;             // [T, D]   LayerNorm output
  float* qkv;           // [T, 3D]
  float* attn;          // [T, D]
  float* hidden;        // [T, F]
};

inline size_t ScratchFloats(const SiglipDims& d) {
  const size_t t = static_cast<size_t>(d.tokens());
  return t * (d.patch_dim() + 2 * d.width + 3 * d.width + d.width + d.mlp);
}

inline SiglipScratch CarveScratch(const SiglipDims& d, float* base) {
  const size_t t = static_cast<size_t>(d.tokens());
  SiglipScratch s{};
  s.patches = base;
  s.x = s.patches + t * d.patch_dim();
  s.y = s.x + t * d.width;
  s.qkv = s.y + t * d.width;
  s.attn = s.qkv + t * 3 * d.width;
  s.hidden = s.attn + t * d.width;
  return s;
}

template <class Ops>
void SiglipForward(Ops& ops, const SiglipDims& d, const SiglipLayout& l, const float* w, const SiglipScratch& s,
                   const float* images, float* tokens) {
  const int64_t T = d.tokens(), D = d.width, F = d.mlp;
  ops.Patches(images, s.patches);
  ops.Gemm(s.patches, w + l.embed_kernel, w + l.embed_bias, s.x, T, D, d.patch_dim(), Epilogue::kPosEmbed,
           w + l.pos);
  for (const LayerOffsets& o : l.layers) {
    ops.LayerNorm(s.x, w + o.ln0_scale, w + o.ln0_bias, s.y, T, D);
    ops.Gemm(s.y, w + o.qkv_kernel, w + o.qkv_bias, s.qkv, T, 3 * D, D, Epilogue::kNone, nullptr);
    ops.Attention(s.qkv, s.attn);
    ops.Gemm(s.attn, w + o.out_kernel, w + o.out_bias, s.x, T, D, D, Epilogue::kResidual, nullptr);
    ops.LayerNorm(s.x, w + o.ln1_scale, w + o.ln1_bias, s.y, T, D);
    ops.Gemm(s.y, w + o.fc1_kernel, w + o.fc1_bias, s.hidden, T, F, D, Epilogue::kGelu, nullptr);
    ops.Gemm(s.hidden, w + o.fc2_kernel, w + o.fc2_bias, s.x, T, D, F, Epilogue::kResidual, nullptr);
  }
  ops.LayerNorm(s.x, w + l.norm_scale, w + l.norm_bias, s.y, T, D);
  ops.Gemm(s.y, w + l.head_kernel, w + l.head_bias, tokens, T, d.out_width, D, Epilogue::kNone, nullptr);
}

}  // namespace pi05

#endif  // PI05_BRIDGES_SIGLIP_FORWARD_H_
