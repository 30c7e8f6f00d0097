// A TensorRT plan behind the VisionEngine interface (TensorRT 10 API: named I/O tensors, enqueueV3).
// Compiled only into the CUDA library built with --tensorrt-root (PI05_WITH_TENSORRT).
//
// NOT YET COMPILED OR RUN against a real TensorRT: the machines this was written on have no TensorRT headers
// or builder. It follows NvInferRuntime.h of TensorRT 10; bridges/README.md says what remains to be checked.
#include <cuda_runtime.h>

#include <NvInferRuntime.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "vision_engine.h"

namespace pi05 {
namespace {

constexpr char kInput[] = "images";
constexpr char kOutput[] = "image_tokens";

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
  }
};

Logger& GlobalLogger() {
  static Logger logger;
  return logger;
}

std::string DimsText(const nvinfer1::Dims& d) {
  std::string s = "[";
  for (int i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
  return s + "]";
}

class TensorRTEngine final : public VisionEngine {
 public:
  static std::unique_ptr<VisionEngine> Open(const std::string& path, std::string* error) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
      *error = "cannot open TensorRT plan '" + path + "'";
      return nullptr;
    }
    std::vector<char> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    auto e = std::unique_ptr<TensorRTEngine>(new TensorRTEngine());
    e->runtime_.reset(nvinfer1::createInferRuntime(GlobalLogger()));
    if (!e->runtime_) {
      *error = "TensorRT: createInferRuntime failed";
      return nullptr;
    }
    e->engine_.reset(e->runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!e->engine_) {
      *error = "TensorRT could not deserialize '" + path + "' (not a plan, or built by another TensorRT " +
               "version / for another GPU)";
      return nullptr;
    }
    if (!e->CheckIO(path, error)) return nullptr;
    e->context_.reset(e->engine_->createExecutionContext());
    if (!e->context_) {
      *error = "TensorRT: createExecutionContext failed for '" + path + "'";
      return nullptr;
    }
    if (!e->WarmUp(error)) return nullptr;
    return e;
  }

  const EngineShape& shape() const override { return shape_; }
  const char* kind() const override { return "tensorrt"; }

  std::string Run(const float* images, void* tokens, void* stream) override {
    if (!context_->setTensorAddress(kInput, const_cast<float*>(images)) ||
        !context_->setTensorAddress(kOutput, tokens)) {
      return "TensorRT: setTensorAddress failed";
    }
    if (!context_->enqueueV3(static_cast<cudaStream_t>(stream))) return "TensorRT: enqueueV3 failed";
    return "";
  }

 private:
  bool CheckIO(const std::string& path, std::string* error) {
    const auto& eng = *engine_;
    if (eng.getNbIOTensors() != 2 || eng.getTensorIOMode(kInput) != nvinfer1::TensorIOMode::kINPUT ||
        eng.getTensorIOMode(kOutput) != nvinfer1::TensorIOMode::kOUTPUT) {
      *error = "'" + path + "' does not have exactly the input 'images' and the output 'image_tokens' of a "
               "plan built from bridges.onnx_export";
      return false;
    }
    const nvinfer1::Dims in = eng.getTensorShape(kInput), out = eng.getTensorShape(kOutput);
    if (in.nbDims != 4 || in.d[1] != in.d[2] || in.d[3] != 3 || out.nbDims != 3 || out.d[0] != in.d[0] ||
        eng.getTensorDataType(kInput) != nvinfer1::DataType::kFLOAT) {
      *error = "'" + path + "': I/O shapes " + DimsText(in) + " -> " + DimsText(out) +
               " are not float32 [V,S,S,3] -> [V,P,O] (a dynamic-shape plan is not supported)";
      return false;
    }
    const nvinfer1::DataType t = eng.getTensorDataType(kOutput);
    if (t != nvinfer1::DataType::kFLOAT && t != nvinfer1::DataType::kHALF) {
      *error = "'" + path + "': image_tokens must be float32 or float16";
      return false;
    }
    shape_ = EngineShape{in.d[0], in.d[1], out.d[1], out.d[2],
                         t == nvinfer1::DataType::kFLOAT ? TokenType::kFloat32 : TokenType::kFloat16};
    return true;
  }

  // TensorRT initializes lazily on its first enqueue, which must not happen inside XLA's CUDA-graph capture:
  // run once here on a private stream with scratch buffers (instantiate time, outside any capture).
  bool WarmUp(std::string* error) {
    const size_t in_bytes = sizeof(float) * shape_.views * shape_.image_size * shape_.image_size * 3;
    const size_t out_bytes = (shape_.tokens == TokenType::kFloat32 ? 4 : 2) * shape_.views *
                             shape_.num_patches * shape_.out_width;
    void* in = nullptr;
    void* out = nullptr;
    cudaStream_t stream = nullptr;
    cudaError_t st = cudaMalloc(&in, in_bytes);
    if (st == cudaSuccess) st = cudaMalloc(&out, out_bytes);
    if (st == cudaSuccess) st = cudaMemset(in, 0, in_bytes);
    if (st == cudaSuccess) st = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    std::string run_error = st == cudaSuccess ? Run(static_cast<float*>(in), out, stream) : "";
    if (st == cudaSuccess) st = cudaStreamSynchronize(stream);
    if (stream) cudaStreamDestroy(stream);
    cudaFree(in);
    cudaFree(out);
    if (st != cudaSuccess || !run_error.empty()) {
      *error = "TensorRT warm-up failed: " + (run_error.empty() ? std::string(cudaGetErrorString(st)) : run_error);
      return false;
    }
    return true;
  }

  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  EngineShape shape_;
};

}  // namespace

std::unique_ptr<VisionEngine> OpenTensorRTEngine(const std::string& path, std::string* error) {
  return TensorRTEngine::Open(path, error);
}

}  // namespace pi05
