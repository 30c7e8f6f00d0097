// The builtin SigLIP as CUDA kernels (float32, FMA accumulation; no cuBLAS, no TF32), and OpenEngine for the
// CUDA library: builtin engine files run here, anything else is handed to TensorRT (tensorrt_engine.cc).
// Weights and scratch are allocated when the engine is opened; Run() only launches kernels on the given stream.
#include <cuda_runtime.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "builtin_weights.h"
#include "siglip_forward.h"
#include "vision_engine.h"

namespace pi05 {

#ifndef PI05_WITH_TENSORRT
std::unique_ptr<VisionEngine> OpenTensorRTEngine(const std::string& path, std::string* error) {
  *error = "'" + path + "' is not a builtin engine file, and this library was built without TensorRT: rebuild "
           "with `python -m bridges.build_ffi --platform cuda --tensorrt-root DIR` to run TensorRT plans";
  return nullptr;
}
#else
std::unique_ptr<VisionEngine> OpenTensorRTEngine(const std::string& path, std::string* error);
#endif

namespace {

constexpr int kTile = 64;   // GEMM block tile (rows and columns)
constexpr int kTileK = 16;  // GEMM k step
constexpr int kQueriesPerBlock = 8;  // attention: one warp per query row

__global__ void PatchesKernel(const float* __restrict__ images, float* __restrict__ patches, int views, int size,
                              int patch) {
  const int grid = size / patch, c = patch * patch * 3;
  const long total = static_cast<long>(views) * grid * grid * c;
  for (long idx = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<long>(gridDim.x) * blockDim.x) {
    const int e = idx % c;
    const long row = idx / c;  // (v, gy, gx)
    const int gx = row % grid, gy = (row / grid) % grid;
    const long v = row / (grid * grid);
    const int ch = e % 3, px = (e / 3) % patch, py = e / (3 * patch);
    patches[idx] = images[((v * size + gy * patch + py) * size + gx * patch + px) * 3 + ch];
  }
}

__device__ __forceinline__ float GeluTanh(float x) {
  const float c = 0.7978845608028654f;  // sqrt(2/pi)
  return x * (0.5f * (1.0f + tanhf(c * (x + 0.044715f * (x * x * x)))));
}

// c[M,N] = epilogue(a[M,K] @ b[K,N] + bias); 256 threads, a 64x64 tile per block, 4x4 outputs per thread.
template <Epilogue kEpi>
__global__ void GemmKernel(const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ bias,
                           float* c, int m, int n, int k, const float* __restrict__ extra, int patches) {
  __shared__ float as[kTileK][kTile + 4];
  __shared__ float bs[kTileK][kTile + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int row0 = blockIdx.y * kTile, col0 = blockIdx.x * kTile;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < k; k0 += kTileK) {
    for (int i = threadIdx.x; i < kTile * kTileK; i += blockDim.x) {
      const int ar = i / kTileK, ac = i % kTileK;
      const int gr = row0 + ar, gc = k0 + ac;
      as[ac][ar] = (gr < m && gc < k) ? a[static_cast<long>(gr) * k + gc] : 0.0f;
      const int br = i / kTile, bc = i % kTile;
      const int gbr = k0 + br, gbc = col0 + bc;
      bs[br][bc] = (gbr < k && gbc < n) ? b[static_cast<long>(gbr) * n + gbc] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = row0 + ty + 16 * i;
    if (r >= m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = col0 + tx + 16 * j;
      if (col >= n) continue;
      const float v = acc[i][j] + bias[col];
      float* out = c + static_cast<long>(r) * n + col;
      if constexpr (kEpi == Epilogue::kNone) *out = v;
      if constexpr (kEpi == Epilogue::kGelu) *out = GeluTanh(v);
      if constexpr (kEpi == Epilogue::kResidual) *out = *out + v;
      if constexpr (kEpi == Epilogue::kPosEmbed) *out = v + extra[static_cast<long>(r % patches) * n + col];
    }
  }
}

__device__ __forceinline__ float BlockSum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += shared[w];
  return total;
}

// One block per row: flax LayerNorm with float32 statistics and var = max(0, E[x^2] - E[x]^2).
__global__ void LayerNormKernel(const float* __restrict__ x, const float* __restrict__ scale,
                                const float* __restrict__ bias, float* __restrict__ y, int width) {
  __shared__ float shared[32];
  const float* xr = x + static_cast<long>(blockIdx.x) * width;
  float s = 0.0f, sq = 0.0f;
  for (int j = threadIdx.x; j < width; j += blockDim.x) {
    s += xr[j];
    sq += xr[j] * xr[j];
  }
  const float mean = BlockSum(s, shared) / width;
  const float mean_sq = BlockSum(sq, shared) / width;
  const float var = fmaxf(0.0f, mean_sq - mean * mean);
  const float inv = 1.0f / sqrtf(var + kLayerNormEps);
  for (int j = threadIdx.x; j < width; j += blockDim.x)
    y[static_cast<long>(blockIdx.x) * width + j] = (xr[j] - mean) * (inv * scale[j]) + bias[j];
}

// grid (P / kQueriesPerBlock, heads, views); one warp per query row; scores in dynamic shared memory.
__global__ void AttentionKernel(const float* __restrict__ qkv, float* __restrict__ o, int patches, int width,
                                int head_dim) {
  extern __shared__ float smem[];  // [kQueriesPerBlock][head_dim] q, then [kQueriesPerBlock][patches] scores
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int i = blockIdx.x * kQueriesPerBlock + warp, n = blockIdx.y, v = blockIdx.z;
  if (i >= patches) return;
  float* q = smem + warp * head_dim;
  float* s = smem + kQueriesPerBlock * head_dim + warp * patches;
  const long stride = 3L * width;
  const float* base = qkv + static_cast<long>(v) * patches * stride + n * head_dim;
  const float root = sqrtf(static_cast<float>(head_dim));
  for (int h = lane; h < head_dim; h += 32) q[h] = base[i * stride + h] / root;
  __syncwarp();
  float mx = -INFINITY;
  for (int j = lane; j < patches; j += 32) {
    const float* kr = base + j * stride + width;
    float dot = 0.0f;
    for (int h = 0; h < head_dim; ++h) dot = fmaf(q[h], kr[h], dot);
    s[j] = dot;
    mx = fmaxf(mx, dot);
  }
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float total = 0.0f;
  for (int j = lane; j < patches; j += 32) {
    s[j] = expf(s[j] - mx);
    total += s[j];
  }
  for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
  __syncwarp();
  float* out = o + (static_cast<long>(v) * patches + i) * width + n * head_dim;
  for (int h = lane; h < head_dim; h += 32) {
    float acc = 0.0f;
    for (int j = 0; j < patches; ++j) acc = fmaf(s[j] / total, base[j * stride + 2L * width + h], acc);
    out[h] = acc;
  }
}

class DeviceOps {
 public:
  DeviceOps(const SiglipDims& d, cudaStream_t stream) : d_(d), stream_(stream) {}

  void Patches(const float* images, float* patches) {
    const long total = d_.tokens() * d_.patch_dim();
    const int blocks = static_cast<int>(std::min<long>((total + 255) / 256, 65535));
    PatchesKernel<<<blocks, 256, 0, stream_>>>(images, patches, d_.views, d_.image_size, d_.patch);
  }

  void Gemm(const float* a, const float* b, const float* bias, float* c, int64_t m, int64_t n, int64_t k,
            Epilogue epi, const float* extra) {
    const dim3 grid((n + kTile - 1) / kTile, (m + kTile - 1) / kTile);
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int p = static_cast<int>(d_.num_patches);
    switch (epi) {
      case Epilogue::kNone: GemmKernel<Epilogue::kNone><<<grid, 256, 0, stream_>>>(a, b, bias, c, mi, ni, ki, extra, p); break;
      case Epilogue::kGelu: GemmKernel<Epilogue::kGelu><<<grid, 256, 0, stream_>>>(a, b, bias, c, mi, ni, ki, extra, p); break;
      case Epilogue::kResidual: GemmKernel<Epilogue::kResidual><<<grid, 256, 0, stream_>>>(a, b, bias, c, mi, ni, ki, extra, p); break;
      case Epilogue::kPosEmbed: GemmKernel<Epilogue::kPosEmbed><<<grid, 256, 0, stream_>>>(a, b, bias, c, mi, ni, ki, extra, p); break;
    }
  }

  void LayerNorm(const float* x, const float* scale, const float* bias, float* y, int64_t rows, int64_t width) {
    LayerNormKernel<<<static_cast<unsigned>(rows), 256, 0, stream_>>>(x, scale, bias, y, static_cast<int>(width));
  }

  void Attention(const float* qkv, float* o) {
    const dim3 grid((d_.num_patches + kQueriesPerBlock - 1) / kQueriesPerBlock, d_.heads, d_.views);
    AttentionKernel<<<grid, 32 * kQueriesPerBlock, AttentionSharedBytes(d_), stream_>>>(
        qkv, o, d_.num_patches, d_.width, d_.head_dim());
  }

  static size_t AttentionSharedBytes(const SiglipDims& d) {
    return sizeof(float) * kQueriesPerBlock * (d.head_dim() + d.num_patches);
  }

 private:
  SiglipDims d_;
  cudaStream_t stream_;
};

std::string CudaError(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorString(e);
}

class DeviceSiglipEngine final : public VisionEngine {
 public:
  static std::unique_ptr<VisionEngine> Create(const SiglipDims& d, const std::vector<float>& weights,
                                              std::string* error) {
    auto e = std::unique_ptr<DeviceSiglipEngine>(new DeviceSiglipEngine(d));
    const size_t shared = DeviceOps::AttentionSharedBytes(d);
    cudaError_t st = cudaFuncSetAttribute(AttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared));
    // Load every kernel now (CUDA loads modules lazily, at first launch): the first launch may be inside
    // XLA's stream capture, where loading a module is not allowed.
    const void* kernels[] = {
        reinterpret_cast<const void*>(PatchesKernel),
        reinterpret_cast<const void*>(GemmKernel<Epilogue::kNone>),
        reinterpret_cast<const void*>(GemmKernel<Epilogue::kGelu>),
        reinterpret_cast<const void*>(GemmKernel<Epilogue::kResidual>),
        reinterpret_cast<const void*>(GemmKernel<Epilogue::kPosEmbed>),
        reinterpret_cast<const void*>(LayerNormKernel),
        reinterpret_cast<const void*>(AttentionKernel),
    };
    for (const void* kernel : kernels) {
      cudaFuncAttributes attributes;
      if (st == cudaSuccess) st = cudaFuncGetAttributes(&attributes, kernel);
    }
    if (st == cudaSuccess) st = cudaMalloc(&e->weights_, weights.size() * sizeof(float));
    if (st == cudaSuccess) st = cudaMalloc(&e->scratch_, ScratchFloats(d) * sizeof(float));
    if (st == cudaSuccess)
      st = cudaMemcpy(e->weights_, weights.data(), weights.size() * sizeof(float), cudaMemcpyHostToDevice);
    if (st != cudaSuccess) {
      *error = CudaError("allocating the builtin engine", st);
      return nullptr;
    }
    return e;
  }
  ~DeviceSiglipEngine() override {
    cudaFree(weights_);
    cudaFree(scratch_);
  }
  const EngineShape& shape() const override { return shape_; }
  const char* kind() const override { return "builtin (cuda)"; }
  std::string Run(const float* images, void* tokens, void* stream) override {
    DeviceOps ops(dims_, static_cast<cudaStream_t>(stream));
    SiglipForward(ops, dims_, layout_, weights_, CarveScratch(dims_, scratch_), images, static_cast<float*>(tokens));
    const cudaError_t st = cudaPeekAtLastError();  // launch errors only: never synchronizes
    return st == cudaSuccess ? "" : CudaError("launching the builtin engine", st);
  }

 private:
  explicit DeviceSiglipEngine(const SiglipDims& d) : dims_(d), layout_(LayoutOf(d)) {
    shape_ = EngineShape{d.views, d.image_size, d.num_patches, d.out_width, TokenType::kFloat32};
  }
  SiglipDims dims_;
  SiglipLayout layout_;
  EngineShape shape_;
  float* weights_ = nullptr;
  float* scratch_ = nullptr;
};

}  // namespace

std::unique_ptr<VisionEngine> OpenEngine(const std::string& path, std::string* error) {
  if (!IsBuiltinEngineFile(path)) return OpenTensorRTEngine(path, error);
  SiglipDims dims{};
  std::vector<float> weights;
  if (!ReadBuiltinEngine(path, &dims, &weights, error)) return nullptr;
  return DeviceSiglipEngine::Create(dims, weights, error);
}

}  // namespace pi05
