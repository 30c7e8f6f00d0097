// The vision engine interface the XLA custom call runs, whatever implements it: a TensorRT plan
// (tensorrt_engine.cc), or this package's builtin SigLIP (cuda_engine.cu on the GPU, cpu_engine.cc on the CPU).
//
// Contract: images float32 [V, S, S, 3] in [-1, 1] -> image tokens [V, P, O] (float32, or float16 for an fp16/fp8
// TensorRT plan), both device buffers owned by XLA. Run() only enqueues work on `stream` (cudaStream_t on the GPU,
// nullptr on the CPU, where it runs before returning): it allocates nothing, copies nothing to or from the host and
// never synchronizes, so XLA can capture it into a CUDA graph (command buffer). Everything it needs (weights,
// scratch, the TensorRT execution context) is made when the engine is opened, at XLA's instantiate stage.
#ifndef PI05_BRIDGES_VISION_ENGINE_H_
#define PI05_BRIDGES_VISION_ENGINE_H_

#include <cstdint>
#include <memory>
#include <string>

namespace pi05 {

enum class TokenType { kFloat32, kFloat16 };

struct EngineShape {
  int64_t views = 0;        // V
  int64_t image_size = 0;   // S
  int64_t num_patches = 0;  // P
  int64_t out_width = 0;    // O
  TokenType tokens = TokenType::kFloat32;
};

class VisionEngine {
 public:
  virtual ~VisionEngine() = default;
  virtual const EngineShape& shape() const = 0;
  virtual const char* kind() const = 0;
  // Enqueue the tower. Returns "" on success, else an error message.
  virtual std::string Run(const float* images, void* tokens, void* stream) = 0;
};

// Opens the engine file at `path` for this library's platform; nullptr and `*error` set on failure.
// A file starting with the builtin magic is the builtin SigLIP; anything else is taken as a TensorRT plan
// (in a library built with TensorRT; otherwise a clear error).
std::unique_ptr<VisionEngine> OpenEngine(const std::string& path, std::string* error);

}  // namespace pi05

#endif  // PI05_BRIDGES_VISION_ENGINE_H_
