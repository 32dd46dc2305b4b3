// A fully connected layer for a batch of up to a few dozen rows, float32 on the CPU:
// y[m, o] = act(b[o] + sum_k w[o, k] * x[m, k]) with w row-major [O, K].
//
// At small batches a classifier layer (AlexNet's fc6: 151 MB of weights) is bound by reading its
// weights from memory. This streams each block of weight rows from memory once and computes
// every sample's dot products against it while it is in cache, on all threads: register tiles of
// kTileRows weight rows by kTileSamples samples, so each load of w serves several samples and
// each load of x several weight rows. oneDNN's and MKL's kernels reached 19-25 GB/s on fc6 at one
// row on the 2-core machine where a plain read reaches 37. Sums are float32 SIMD reductions (a
// different order than oneDNN's: float32 rounding).

#include <cstdint>

#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using lrnserve::kLanes;
using lrnserve::load;
using lrnserve::Vec;

#if defined(__AVX512F__)
constexpr int kTileRows = 6;
constexpr int kTileSamples = 4;  // 6 x 4 accumulators + 6 weight vectors + x: 31 of 32 registers
#else
constexpr int kTileRows = 4;
constexpr int kTileSamples = 2;  // 4 x 2 accumulators + 4 weight vectors + x: 13 of 16 registers
#endif

inline float horizontal_sum(Vec v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// sums[r * S + s] = dot(w row r, x row s) for R weight rows and S sample rows, both of length K
// with row stride K.
template <int R, int S>
inline void tile(const float* __restrict w, const float* __restrict x, int64_t K, float* sums) {
  Vec acc[R][S];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) acc[r][s] = Vec{};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load(w + r * K + k);
    for (int s = 0; s < S; ++s) {
      const Vec xv = load(x + s * K + k);
      for (int r = 0; r < R; ++r) acc[r][s] += wv[r] * xv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) {
      float total = horizontal_sum(acc[r][s]);
      for (int64_t t = k; t < K; ++t) total += w[r * K + t] * x[s * K + t];
      sums[r * S + s] = total;
    }
}

inline float activate(float v, bool relu) { return relu ? lrnserve::relu(v) : v; }

// R weight rows starting at output o0 against every sample: y[m, o0 + r].
template <int R>
void rows_block(const float* w, const float* x, const float* b, float* y, int64_t M, int64_t K, int64_t O,
                int64_t o0, bool relu) {
  float sums[R * kTileSamples];
  for (int64_t m = 0; m < M;) {
    const int64_t left = M - m;
    int samples = kTileSamples;
    if (left >= kTileSamples) {
      tile<R, kTileSamples>(w, x + m * K, K, sums);
    } else if (kTileSamples > 2 && left == 3) {
      tile<R, 3>(w, x + m * K, K, sums), samples = 3;
    } else if (kTileSamples > 2 && left == 2) {
      tile<R, 2>(w, x + m * K, K, sums), samples = 2;
    } else {
      tile<R, 1>(w, x + m * K, K, sums), samples = 1;
    }
    for (int s = 0; s < samples; ++s)
      for (int r = 0; r < R; ++r)
        y[(m + s) * O + o0 + r] = activate(sums[r * samples + s] + (b ? b[o0 + r] : 0.0f), relu);
    m += samples;
  }
}

}  // namespace

extern "C" {

// x [M, K], w [O, K], b [O] or null, y [M, O]: contiguous float32. relu: 0 or 1. Returns 0, or
// -1 for arguments the Python side should never have passed.
int lrnserve_linear_forward(const float* x, const float* w, const float* b, float* y, int64_t M,
                            int64_t K, int64_t O, int relu, int threads) {
  if (M < 0 || K < 0 || O < 0) return -1;
  if (M == 0 || O == 0) return 0;
  if (threads < 1) threads = 1;
  const int64_t blocks = (O + kTileRows - 1) / kTileRows;
  const bool parallel = threads > 1 && blocks > 1 && O * K >= (int64_t{1} << 16);
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t o0 = block * kTileRows;
    if (O - o0 >= kTileRows) {
      rows_block<kTileRows>(w + o0 * K, x, b, y, M, K, O, o0, relu != 0);
    } else {
      for (int64_t o = o0; o < O; ++o) rows_block<1>(w + o * K, x, b, y, M, K, O, o, relu != 0);
    }
  }
  return 0;
}

}  // extern "C"
