// The builtin SigLIP on the host: plain loops, float32. It is what CI runs through the custom call.
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "builtin_weights.h"
#include "siglip_forward.h"
#include "vision_engine.h"

namespace pi05 {
namespace {

class HostOps {
 public:
  explicit HostOps(const SiglipDims& d) : d_(d) {}

  void Patches(const float* images, float* patches) const {
    const int64_t s = d_.image_size, p = d_.patch, g = s / p, c = d_.patch_dim();
    for (int64_t v = 0; v < d_.views; ++v)
      for (int64_t gy = 0; gy < g; ++gy)
        for (int64_t gx = 0; gx < g; ++gx) {
          float* row = patches + ((v * g + gy) * g + gx) * c;
          for (int64_t py = 0; py < p; ++py)
            for (int64_t px = 0; px < p; ++px)
              for (int64_t ch = 0; ch < 3; ++ch)
                row[(py * p + px) * 3 + ch] = images[((v * s + gy * p + py) * s + gx * p + px) * 3 + ch];
        }
  }

  void Gemm(const float* a, const float* b, const float* bias, float* c, int64_t m, int64_t n, int64_t k,
            Epilogue epi, const float* extra) const {
    std::vector<float> acc(static_cast<size_t>(n));
    for (int64_t i = 0; i < m; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t kk = 0; kk < k; ++kk) {
        const float av = a[i * k + kk];
        const float* brow = b + kk * n;
        for (int64_t j = 0; j < n; ++j) acc[j] = std::fma(av, brow[j], acc[j]);
      }
      for (int64_t j = 0; j < n; ++j) {
        const float v = acc[j] + bias[j];
        float& out = c[i * n + j];
        switch (epi) {
          case Epilogue::kNone: out = v; break;
          case Epilogue::kGelu: out = GeluTanh(v); break;
          case Epilogue::kResidual: out = out + v; break;
          case Epilogue::kPosEmbed: out = v + extra[(i % d_.num_patches) * n + j]; break;
        }
      }
    }
  }

  void LayerNorm(const float* x, const float* scale, const float* bias, float* y, int64_t rows,
                 int64_t width) const {
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * width;
      float sum = 0.0f, sum_sq = 0.0f;
      for (int64_t j = 0; j < width; ++j) {
        sum += xr[j];
        sum_sq += xr[j] * xr[j];
      }
      const float mean = sum / static_cast<float>(width);
      const float var = std::max(0.0f, sum_sq / static_cast<float>(width) - mean * mean);
      const float inv = 1.0f / std::sqrt(var + kLayerNormEps);
      for (int64_t j = 0; j < width; ++j) y[r * width + j] = (xr[j] - mean) * (inv * scale[j]) + bias[j];
    }
  }

  void Attention(const float* qkv, float* o) const {
    const int64_t P = d_.num_patches, D = d_.width, H = d_.head_dim();
    const float root = std::sqrt(static_cast<float>(H));
    std::vector<float> q(static_cast<size_t>(H)), s(static_cast<size_t>(P));
    for (int64_t v = 0; v < d_.views; ++v)
      for (int64_t n = 0; n < d_.heads; ++n)
        for (int64_t i = 0; i < P; ++i) {
          const float* qrow = qkv + (v * P + i) * 3 * D + n * H;
          for (int64_t h = 0; h < H; ++h) q[h] = qrow[h] / root;
          float mx = -INFINITY;
          for (int64_t j = 0; j < P; ++j) {
            const float* krow = qkv + (v * P + j) * 3 * D + D + n * H;
            float dot = 0.0f;
            for (int64_t h = 0; h < H; ++h) dot = std::fma(q[h], krow[h], dot);
            s[j] = dot;
            mx = std::max(mx, dot);
          }
          float total = 0.0f;
          for (int64_t j = 0; j < P; ++j) {
            s[j] = std::exp(s[j] - mx);
            total += s[j];
          }
          float* orow = o + (v * P + i) * D + n * H;
          for (int64_t h = 0; h < H; ++h) orow[h] = 0.0f;
          for (int64_t j = 0; j < P; ++j) {
            const float pj = s[j] / total;
            const float* vrow = qkv + (v * P + j) * 3 * D + 2 * D + n * H;
            for (int64_t h = 0; h < H; ++h) orow[h] = std::fma(pj, vrow[h], orow[h]);
          }
        }
  }

  static float GeluTanh(float x) {
    const float c = 0.7978845608028654f;  // sqrt(2/pi)
    return x * (0.5f * (1.0f + std::tanh(c * (x + 0.044715f * (x * x * x)))));
  }

 private:
  SiglipDims d_;
};

class HostSiglipEngine final : public VisionEngine {
 public:
  HostSiglipEngine(const SiglipDims& d, std::vector<float> weights)
      : dims_(d), layout_(LayoutOf(d)), weights_(std::move(weights)), scratch_(ScratchFloats(d)) {
    shape_ = EngineShape{d.views, d.image_size, d.num_patches, d.out_width, TokenType::kFloat32};
  }
  const EngineShape& shape() const override { return shape_; }
  const char* kind() const override { return "builtin (cpu)"; }
  std::string Run(const float* images, void* tokens, void* /*stream*/) override {
    HostOps ops(dims_);
    SiglipForward(ops, dims_, layout_, weights_.data(), CarveScratch(dims_, scratch_.data()), images,
                  static_cast<float*>(tokens));
    return "";
  }

 private:
  SiglipDims dims_;
  SiglipLayout layout_;
  std::vector<float> weights_;
  std::vector<float> scratch_;
  EngineShape shape_;
};

}  // namespace

std::unique_ptr<VisionEngine> OpenEngine(const std::string& path, std::string* error) {
  if (!IsBuiltinEngineFile(path)) {
    *error = "'" + path + "' is not a builtin vision engine file; the CPU library runs only builtin engines "
             "(TensorRT plans need the CUDA library built with TensorRT)";
    return nullptr;
  }
  SiglipDims dims{};
  std::vector<float> weights;
  if (!ReadBuiltinEngine(path, &dims, &weights, error)) return nullptr;
  return std::make_unique<HostSiglipEngine>(dims, std::move(weights));
}

}  // namespace pi05
