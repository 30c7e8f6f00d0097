// The builtin engine file (written by bridges/builtin_engine.py): header + float32 SigLIP weights, and the
// offsets of every tensor in the flat weight array.
#ifndef PI05_BRIDGES_BUILTIN_WEIGHTS_H_
#define PI05_BRIDGES_BUILTIN_WEIGHTS_H_

#include <cstdint>
#include <string>
#include <vector>

namespace pi05 {

inline constexpr char kBuiltinMagic[8] = {'P', 'I', '0', '5', 'V', 'I', 'S', '1'};

struct SiglipDims {
  int64_t views, image_size, patch, num_patches, width, depth, heads, mlp, out_width;
  int64_t head_dim() const { return width / heads; }
  int64_t patch_dim() const { return patch * patch * 3; }
  int64_t tokens() const { return views * num_patches; }
};

struct LayerOffsets {
  size_t ln0_scale, ln0_bias, qkv_kernel, qkv_bias, out_kernel, out_bias, ln1_scale, ln1_bias;
  size_t fc1_kernel, fc1_bias, fc2_kernel, fc2_bias;
};

struct SiglipLayout {
  size_t embed_kernel, embed_bias, pos;
  std::vector<LayerOffsets> layers;
  size_t norm_scale, norm_bias, head_kernel, head_bias;
  size_t total;  // floats
};

SiglipLayout LayoutOf(const SiglipDims& d);

// True if the file starts with the builtin magic (false on any read error).
bool IsBuiltinEngineFile(const std::string& path);

// Reads and validates the whole file; on failure returns false with `*error` naming the file and the field.
bool ReadBuiltinEngine(const std::string& path, SiglipDims* dims, std::vector<float>* weights,
                       std::string* error);

}  // namespace pi05

#endif  // PI05_BRIDGES_BUILTIN_WEIGHTS_H_
