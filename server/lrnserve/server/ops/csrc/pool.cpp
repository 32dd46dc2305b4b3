// Max pooling of a channels-last (NHWC) float32 tensor, the layout oneDNN's convolutions and the
// LRN kernel hand to the pools after them. Each output pixel is the elementwise max of the input
// pixels in its window, a vector over the contiguous channels; rows of output pixels are split
// among the threads; each vector of channels stays in a register across its window. torch's
// NHWC max pool kernel took 1.1-2.4x as long at CaffeNet's and cifar10_full's 3x3 stride 2
// pools and 2.5-4x at GoogLeNet's 3x3 stride 1 ones (2 threads, 2-core machine). NaN wins, as in torch (a NaN anywhere in a window gives NaN); windows
// are clipped to the input, so padding never wins.

#include <cstdint>
#include <cstring>
#include <limits>

#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using lrnserve::kLanes;
using lrnserve::load;
using lrnserve::Vec;

}  // namespace

extern "C" {

// x [N, H, W, C] -> y [N, OH, OW, C], both contiguous NHWC float32; window kh x kw, strides sh,
// sw, padding ph, pw (the caller computes OH and OW as torch does). Returns 0, or -1 for
// arguments the Python side should never have passed.
int lrnserve_max_pool_nhwc(const float* x, float* y, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                           int64_t OW, int kh, int kw, int sh, int sw, int ph, int pw, int threads) {
  if (N < 0 || C < 0 || H < 0 || W < 0 || OH < 0 || OW < 0 || kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 ||
      pw < 0)
    return -1;
  if (N == 0 || C == 0 || OH == 0 || OW == 0) return 0;
  if (threads < 1) threads = 1;
  const int64_t rows = N * OH;
  const bool parallel = threads > 1 && rows > 1 && rows * OW * C * kh * kw >= (int64_t{1} << 15);
  constexpr float kLowest = -std::numeric_limits<float>::infinity();
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t n = row / OH, oh = row % OH;
    int64_t h0 = oh * sh - ph;
    const int64_t h1 = h0 + kh < H ? h0 + kh : H;
    h0 = h0 > 0 ? h0 : 0;
    for (int64_t ow = 0; ow < OW; ++ow) {
      int64_t w0 = ow * sw - pw;
      const int64_t w1 = w0 + kw < W ? w0 + kw : W;
      w0 = w0 > 0 ? w0 : 0;
      float* __restrict out = y + (row * OW + ow) * C;
      int64_t c = 0;
      for (; c + kLanes <= C; c += kLanes) {  // a vector of channels kept in a register
        Vec m = Vec{} + kLowest;
        for (int64_t ih = h0; ih < h1; ++ih)
          for (int64_t iw = w0; iw < w1; ++iw) {
            const Vec v = load(x + ((n * H + ih) * W + iw) * C + c);
            m = (v > m || v != v) ? v : m;
          }
        std::memcpy(out + c, &m, sizeof m);
      }
      for (; c < C; ++c) {
        float m = kLowest;
        for (int64_t ih = h0; ih < h1; ++ih)
          for (int64_t iw = w0; iw < w1; ++iw) {
            const float v = x[((n * H + ih) * W + iw) * C + c];
            m = (v > m || v != v) ? v : m;
          }
        out[c] = m;
      }
    }
  }
  return 0;
}

}  // extern "C"
