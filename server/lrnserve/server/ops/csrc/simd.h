// The SIMD vector the small CPU kernels share (linear.cpp, pool.cpp, conv.cpp), and torch's ReLU
// on one value (chain.cpp, linear.cpp): GCC's vector extension,
// 16 floats where the build targets AVX-512, else 8 (the compiler lowers it to what the target
// has). Part of the library's cache key (native.py), like the sources.

#pragma once

#include <cstring>

namespace lrnserve {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}

// torch.relu: negatives to 0, NaN stays.
inline float relu(float v) { return (v > 0.0f || v != v) ? v : 0.0f; }

}  // namespace lrnserve
