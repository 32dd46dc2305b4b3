// A fully connected layer for a few rows at a time, float32 on the CPU:
// y[m, o] = act(b[o] + sum_k w[o, k] * x[m, k]) with w row-major [O, K].
//
// With a batch of one to a few samples, a classifier layer (AlexNet's fc6: 151 MB of weights) is
// bound by reading its weights from memory once. This streams each block of weight rows once,
// computing every sample's dot products while the block is in cache, on all threads; oneDNN's
// and MKL's kernels reached 19-25 GB/s there on the 2-core machine where a plain read reaches
// 37. Sums are float32 SIMD reductions (a different order than oneDNN's: float32 rounding).

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kRows = 4;  // weight rows per block: four dot products share each load of x

// Four dot products of w rows against one sample's x.
inline void dot4(const float* __restrict w0, const float* __restrict w1, const float* __restrict w2,
                 const float* __restrict w3, const float* __restrict x, int64_t K, float* out) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t k = 0; k < K; ++k) {
    const float v = x[k];
    s0 += w0[k] * v;
    s1 += w1[k] * v;
    s2 += w2[k] * v;
    s3 += w3[k] * v;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

inline float dot1(const float* __restrict w, const float* __restrict x, int64_t K) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += w[k] * x[k];
  return s;
}

inline float activate(float v, bool relu) { return relu && !(v > 0.0f) ? (v != v ? v : 0.0f) : v; }

}  // namespace

extern "C" {

// x [M, K], w [O, K], b [O] or null, y [M, O]: contiguous float32. relu: 0 or 1. Returns 0, or
// -1 for arguments the Python side should never have passed.
int lrnserve_linear_forward(const float* x, const float* w, const float* b, float* y, int64_t M,
                            int64_t K, int64_t O, int relu, int threads) {
  if (M < 0 || K < 0 || O < 0) return -1;
  if (M == 0 || O == 0) return 0;
  if (threads < 1) threads = 1;
  const int64_t blocks = (O + kRows - 1) / kRows;
  const bool parallel = threads > 1 && blocks > 1 && O * K >= (int64_t{1} << 16);
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t o0 = block * kRows;
    const int64_t rows = O - o0 < kRows ? O - o0 : kRows;
    const float* wb = w + o0 * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float* ym = y + m * O + o0;
      float sums[kRows];
      if (rows == kRows) {
        dot4(wb, wb + K, wb + 2 * K, wb + 3 * K, xm, K, sums);
      } else {
        for (int64_t r = 0; r < rows; ++r) sums[r] = dot1(wb + r * K, xm, K);
      }
      for (int64_t r = 0; r < rows; ++r) ym[r] = activate(sums[r] + (b ? b[o0 + r] : 0.0f), relu != 0);
    }
  }
  return 0;
}

}  // extern "C"
