// A direct 2-D convolution of a channels-last (NHWC) float32 tensor, for small networks at small
// batches (cifar10's 5x5 convolutions on 32x32 images), where a call into oneDNN through torch
// cost more than its kernel: 45 us of overhead beside 26-53 us of kernel time per convolution at
// batch 1. Register tiles of kPixels output pixels by kBlock output channels: each broadcast
// input value feeds kBlock / kLanes vector FMAs, each weight vector kPixels of them. The input is
// first copied into a zero-padded buffer so the tile loop has no bounds checks; weights come
// packed as [OC / kBlock][KH][KW][C][kBlock] (zero rows past OC), made once at load by
// lrnserve.server.models.chain. Sums are float32 in a different order than oneDNN's.

#include <cstdint>
#include <cstring>

#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using lrnserve::kLanes;
using lrnserve::load;
using lrnserve::Vec;

constexpr int kVectors = 2;  // output-channel vectors per tile
constexpr int kBlock = kVectors * kLanes;
#if defined(__AVX512F__)
constexpr int kPixels = 8;  // 8 x 2 accumulators + 2 weights + a broadcast: 19 of 32 registers
#else
constexpr int kPixels = 6;  // 6 x 2 accumulators + 2 weights + a broadcast: 15 of 16 registers
#endif

struct Geometry {
  int64_t C, HP, WP, OC, OH, OW;
  int KH, KW, SH, SW;
  bool relu;
};

// P output pixels (one row, from xp, a padded-input pointer at the first pixel's window) by one
// block of output channels starting at oc0; y points at the first pixel's channel oc0.
template <int P>
inline void tile(const float* __restrict xp, const float* __restrict w, const float* __restrict bias,
                 float* __restrict y, const Geometry& g, int64_t oc0) {
  Vec acc[P][kVectors];
  for (int v = 0; v < kVectors; ++v) {
    const Vec b = load(bias + v * kLanes);
    for (int p = 0; p < P; ++p) acc[p][v] = b;
  }
  const int64_t C = g.C;
  const int64_t step = g.SW * C;  // from one output pixel's window to the next one's
  for (int kh = 0; kh < g.KH; ++kh) {
    for (int kw = 0; kw < g.KW; ++kw) {
      const float* xk = xp + (kh * g.WP + kw) * C;
      const float* wk = w + (static_cast<int64_t>(kh) * g.KW + kw) * C * kBlock;
      for (int64_t c = 0; c < C; ++c) {
        Vec wv[kVectors];
        for (int v = 0; v < kVectors; ++v) wv[v] = load(wk + c * kBlock + v * kLanes);
        for (int p = 0; p < P; ++p) {
          const float s = xk[p * step + c];
          for (int v = 0; v < kVectors; ++v) acc[p][v] += s * wv[v];
        }
      }
    }
  }
  const int64_t valid = g.OC - oc0 < kBlock ? g.OC - oc0 : kBlock;
  for (int p = 0; p < P; ++p) {
    float* out = y + p * g.OC;
    for (int v = 0; v < kVectors; ++v) {
      Vec a = acc[p][v];
      if (g.relu) a = (a > 0.0f || a != a) ? a : Vec{};  // NaN stays, as torch's relu
      if ((v + 1) * kLanes <= valid) {
        std::memcpy(out + v * kLanes, &a, sizeof a);
      } else {
        for (int64_t i = v * kLanes; i < valid; ++i) out[i] = a[i - v * kLanes];
      }
    }
  }
}

template <int P>
inline void row_tail(const float* xp, const float* w, const float* b, float* y, const Geometry& g, int64_t oc0,
                     int64_t left) {
  if constexpr (P > 1) {
    if (left == P - 1) return tile<P - 1>(xp, w, b, y, g, oc0);
    return row_tail<P - 1>(xp, w, b, y, g, oc0, left);
  }
}

}  // namespace

extern "C" {

int lrnserve_conv_block() { return kBlock; }

// x [N, H, W, C] -> y [N, OH, OW, OC], contiguous NHWC float32; w packed as described above, b
// [OB * kBlock] (zeros past OC, never null); padded [N, H + 2 PH, W + 2 PW, C] is scratch. The
// caller computes OH and OW. Returns 0, or -1 for arguments the Python side should never have
// passed.
int lrnserve_conv_nhwc(const float* x, const float* w, const float* b, float* y, float* padded, int64_t N,
                       int64_t C, int64_t H, int64_t W, int64_t OC, int64_t OH, int64_t OW, int KH, int KW, int SH,
                       int SW, int PH, int PW, int relu, int threads) {
  if (N < 0 || C < 1 || H < 1 || W < 1 || OC < 1 || OH < 0 || OW < 0 || KH < 1 || KW < 1 || SH < 1 || SW < 1 ||
      PH < 0 || PW < 0 || (OH - 1) * SH + KH > H + 2 * PH || (OW - 1) * SW + KW > W + 2 * PW)
    return -1;
  if (N == 0 || OH == 0 || OW == 0) return 0;
  if (threads < 1) threads = 1;
  const Geometry g{C, H + 2 * PH, W + 2 * PW, OC, OH, OW, KH, KW, SH, SW, relu != 0};
  const int64_t blocks = (OC + kBlock - 1) / kBlock;
  const int64_t items = N * OH * blocks;
  const bool parallel = threads > 1 && items > 1 && items * OW * C * KH * KW * kBlock >= (int64_t{1} << 16);
#pragma omp parallel num_threads(threads) if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t row = 0; row < N * g.HP; ++row) {  // zero-padded copy of the input
      const int64_t n = row / g.HP, h = row % g.HP - PH;
      float* out = padded + row * g.WP * C;
      if (h < 0 || h >= H) {
        std::memset(out, 0, sizeof(float) * g.WP * C);
        continue;
      }
      std::memset(out, 0, sizeof(float) * PW * C);
      std::memcpy(out + PW * C, x + (n * H + h) * W * C, sizeof(float) * W * C);
      std::memset(out + (PW + W) * C, 0, sizeof(float) * PW * C);
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t block = item % blocks, row = item / blocks;
      const int64_t n = row / OH, oh = row % OH;
      const float* xrow = padded + (n * g.HP + oh * SH) * g.WP * C;
      const float* wb = w + block * KH * KW * C * kBlock;
      const float* bb = b + block * kBlock;
      float* yrow = y + row * OW * OC + block * kBlock;
      int64_t ow = 0;
      for (; ow + kPixels <= OW; ow += kPixels) tile<kPixels>(xrow + ow * SW * C, wb, bb, yrow + ow * OC, g, block * kBlock);
      if (ow < OW) row_tail<kPixels>(xrow + ow * SW * C, wb, bb, yrow + ow * OC, g, block * kBlock, OW - ow);
    }
  }
  return 0;
}

}  // extern "C"
