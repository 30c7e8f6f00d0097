#include "builtin_weights.h"

#include <cstring>
#include <fstream>

namespace pi05 {

SiglipLayout LayoutOf(const SiglipDims& d) {
  SiglipLayout l{};
  size_t at = 0;
  auto take = [&at](int64_t n) {
    size_t here = at;
    at += static_cast<size_t>(n);
    return here;
  };
  const int64_t D = d.width, F = d.mlp;
  l.embed_kernel = take(d.patch_dim() * D);
  l.embed_bias = take(D);
  l.pos = take(d.num_patches * D);
  for (int64_t i = 0; i < d.depth; ++i) {
    LayerOffsets o{};
    o.ln0_scale = take(D);
    o.ln0_bias = take(D);
    o.qkv_kernel = take(D * 3 * D);
    o.qkv_bias = take(3 * D);
    o.out_kernel = take(D * D);
    o.out_bias = take(D);
    o.ln1_scale = take(D);
    o.ln1_bias = take(D);
    o.fc1_kernel = take(D * F);
    o.fc1_bias = take(F);
    o.fc2_kernel = take(F * D);
    o.fc2_bias = take(D);
    l.layers.push_back(o);
  }
  l.norm_scale = take(D);
  l.norm_bias = take(D);
  l.head_kernel = take(D * d.out_width);
  l.head_bias = take(d.out_width);
  l.total = at;
  return l;
}

bool IsBuiltinEngineFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char magic[8] = {};
  return f.read(magic, 8) && std::memcmp(magic, kBuiltinMagic, 8) == 0;
}

bool ReadBuiltinEngine(const std::string& path, SiglipDims* dims, std::vector<float>* weights,
                       std::string* error) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    *error = "cannot open vision engine file '" + path + "'";
    return false;
  }
  char magic[8] = {};
  int64_t h[16] = {};
  if (!f.read(magic, 8) || std::memcmp(magic, kBuiltinMagic, 8) != 0) {
    *error = "'" + path + "' is not a builtin vision engine file (bad magic)";
    return false;
  }
  if (!f.read(reinterpret_cast<char*>(h), sizeof(h))) {
    *error = "'" + path + "': truncated header";
    return false;
  }
  if (h[0] != 1) {
    *error = "'" + path + "': unsupported version " + std::to_string(h[0]) + " (expected 1)";
    return false;
  }
  *dims = SiglipDims{h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]};
  const SiglipDims& d = *dims;
  if (d.views < 1 || d.patch < 1 || d.heads < 1 || d.width % d.heads != 0 ||
      (d.image_size / d.patch) * (d.image_size / d.patch) != d.num_patches || h[10] != 0) {
    *error = "'" + path + "': inconsistent header (views, sizes or precision)";
    return false;
  }
  const SiglipLayout l = LayoutOf(d);
  if (static_cast<size_t>(h[11]) != l.total) {
    *error = "'" + path + "': header says " + std::to_string(h[11]) + " floats, the sizes need " +
             std::to_string(l.total);
    return false;
  }
  weights->resize(l.total);
  if (!f.read(reinterpret_cast<char*>(weights->data()), static_cast<std::streamsize>(l.total * sizeof(float)))) {
    *error = "'" + path + "': truncated weights (expected " + std::to_string(l.total) + " floats)";
    return false;
  }
  return true;
}

}  // namespace pi05
