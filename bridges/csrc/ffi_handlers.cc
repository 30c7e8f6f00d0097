// The XLA FFI custom call "pi05_vision_engine": a stateful handler (instantiate opens the engine once per
// executable, execute runs it on XLA's buffers and, on the GPU, XLA's CUDA stream). Declared command-buffer
// compatible: execute only enqueues kernels on the given stream (no allocation, host copy or sync), so XLA may
// record it into the CUDA graph of the surrounding jitted computation.
//
// Built twice from this one file: for the CPU (PI05_PLATFORM_CUDA undefined) and for CUDA.
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "vision_engine.h"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

#ifdef PI05_PLATFORM_CUDA
#include <cuda_runtime_api.h>
#endif

namespace ffi = xla::ffi;

namespace pi05 {

struct EngineState {
  static ffi::TypeId id;
  std::unique_ptr<VisionEngine> engine;
};
ffi::TypeId EngineState::id = {};

namespace {

// Observability for tests and scripts/gpu_vision_bridge.py: how often execute ran, and how often XLA was
// capturing the stream into a CUDA graph when it did. A captured call is replayed by XLA without calling the
// handler again, so "executes stays flat while the jitted function keeps running" shows the graph replay.
std::atomic<int64_t> g_executes{0};
std::atomic<int64_t> g_captured{0};
std::atomic<int64_t> g_instantiates{0};

std::string Dims(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::ErrorOr<std::unique_ptr<EngineState>> Open(std::string_view engine_path, int64_t views) {
  std::string error;
  auto engine = OpenEngine(std::string(engine_path), &error);
  if (!engine) return ffi::Error::InvalidArgument("pi05_vision_engine: " + error);
  if (engine->shape().views != views) {
    return ffi::Error::InvalidArgument("pi05_vision_engine: '" + std::string(engine_path) + "' takes " +
                                       std::to_string(engine->shape().views) + " images per call, the call has " +
                                       std::to_string(views));
  }
  auto state = std::make_unique<EngineState>();
  state->engine = std::move(engine);
  g_instantiates.fetch_add(1);
  return state;
}

ffi::Error CheckBuffers(const VisionEngine& e, ffi::AnyBuffer images, const ffi::Result<ffi::AnyBuffer>& tokens) {
  const EngineShape& s = e.shape();
  auto in = images.dimensions();
  if (images.element_type() != ffi::DataType::F32 || in.size() != 4 || in[0] != s.views ||
      in[1] != s.image_size || in[2] != s.image_size || in[3] != 3) {
    return ffi::Error::InvalidArgument("pi05_vision_engine: images must be float32 [" + std::to_string(s.views) +
                                       ", " + std::to_string(s.image_size) + ", " + std::to_string(s.image_size) +
                                       ", 3], got " + Dims(in));
  }
  const ffi::DataType want = s.tokens == TokenType::kFloat32 ? ffi::DataType::F32 : ffi::DataType::F16;
  auto out = tokens->dimensions();
  if (tokens->element_type() != want || out.size() != 3 || out[0] != s.views || out[1] != s.num_patches ||
      out[2] != s.out_width) {
    return ffi::Error::InvalidArgument(
        std::string("pi05_vision_engine: tokens must be ") + (want == ffi::DataType::F32 ? "float32" : "float16") +
        " [" + std::to_string(s.views) + ", " + std::to_string(s.num_patches) + ", " + std::to_string(s.out_width) +
        "], got " + Dims(out));
  }
  return ffi::Error::Success();
}

#ifdef PI05_PLATFORM_CUDA
ffi::ErrorOr<std::unique_ptr<EngineState>> Instantiate(int32_t device, std::string_view engine_path,
                                                        int64_t views) {
  // XLA instantiates when it builds the executable's thunks (at compile time). Weights and scratch go to the
  // executable's device when XLA says which one; otherwise to the current device.
  int previous = 0;
  cudaGetDevice(&previous);
  if (device >= 0) cudaSetDevice(device);
  auto state = Open(engine_path, views);
  if (device >= 0) cudaSetDevice(previous);
  return state;
}

ffi::Error Execute(cudaStream_t stream, EngineState* state, ffi::AnyBuffer images,
                   ffi::Result<ffi::AnyBuffer> tokens, std::string_view /*engine_path*/, int64_t /*views*/) {
  if (ffi::Error e = CheckBuffers(*state->engine, images, tokens); e.failure()) return e;
  g_executes.fetch_add(1);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) == cudaSuccess && capture == cudaStreamCaptureStatusActive) {
    g_captured.fetch_add(1);
  }
  std::string error = state->engine->Run(static_cast<const float*>(images.untyped_data()), tokens->untyped_data(),
                                         stream);
  if (!error.empty()) return ffi::Error::Internal("pi05_vision_engine: " + error);
  return ffi::Error::Success();
}
#else
ffi::ErrorOr<std::unique_ptr<EngineState>> Instantiate(std::string_view engine_path, int64_t views) {
  return Open(engine_path, views);
}

ffi::Error Execute(EngineState* state, ffi::AnyBuffer images, ffi::Result<ffi::AnyBuffer> tokens,
                   std::string_view /*engine_path*/, int64_t /*views*/) {
  if (ffi::Error e = CheckBuffers(*state->engine, images, tokens); e.failure()) return e;
  g_executes.fetch_add(1);
  std::string error = state->engine->Run(static_cast<const float*>(images.untyped_data()), tokens->untyped_data(),
                                         nullptr);
  if (!error.empty()) return ffi::Error::Internal("pi05_vision_engine: " + error);
  return ffi::Error::Success();
}
#endif

}  // namespace
}  // namespace pi05

#ifdef PI05_PLATFORM_CUDA
XLA_FFI_DEFINE_HANDLER_SYMBOL(pi05_vision_instantiate, pi05::Instantiate,
                              ffi::Ffi::BindInstantiate()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<std::string_view>("engine_path")
                                  .Attr<int64_t>("views"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(pi05_vision_execute, pi05::Execute,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<pi05::EngineState>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<std::string_view>("engine_path")
                                  .Attr<int64_t>("views"),
                              {ffi::Traits::kCmdBufferCompatible});
#else
XLA_FFI_DEFINE_HANDLER_SYMBOL(pi05_vision_instantiate, pi05::Instantiate,
                              ffi::Ffi::BindInstantiate()
                                  .Attr<std::string_view>("engine_path")
                                  .Attr<int64_t>("views"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(pi05_vision_execute, pi05::Execute,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::State<pi05::EngineState>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<std::string_view>("engine_path")
                                  .Attr<int64_t>("views"),
                              {ffi::Traits::kCmdBufferCompatible});
#endif

// Counters: out[0] instantiates, out[1] executes, out[2] executes while the stream was being captured.
extern "C" void pi05_vision_stats(int64_t* out) {
  out[0] = pi05::g_instantiates.load();
  out[1] = pi05::g_executes.load();
  out[2] = pi05::g_captured.load();
}

// The state's type id and type info, for jax.ffi.register_ffi_type.
extern "C" void* pi05_vision_state_type_id() { return &pi05::EngineState::id; }
extern "C" const void* pi05_vision_state_type_info() {
  static const XLA_FFI_TypeInfo info = ffi::MakeTypeInfo<pi05::EngineState>();
  return &info;
}
