// Fused Local Response Normalization for contiguous NCHW and channels-last (NHWC) tensors on the
// CPU.
//
// One pass over the input: every output element reads its window of squares
// straight from the (cache-resident) input rows, so nothing is materialised
// between the square, the window sum, the power and the multiply. Window sums
// are direct sums of non-negative terms (exact to rounding; no prefix sums,
// which cancel), accumulated in float for float/half inputs and in double for
// double inputs. Semantics follow docs/lrn.md (Caffe, extended to even sizes
// with PyTorch's window and with k applied in both modes).
//
// Plain C ABI so that Python can call it with ctypes: no torch headers, so the
// library compiles in about a second at model load time.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kMaxUnrolledWindow = 8;

// ---- element types -------------------------------------------------------

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint64_t double_bits(double f) {
  uint64_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline double bits_double(uint64_t u) {
  double f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Branch-free selects: gcc vectorizes these where it gives up on ?: chains.
inline uint32_t pick(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}
inline uint64_t pick(bool c, uint64_t a, uint64_t b) {
  const uint64_t m = 0ull - static_cast<uint64_t>(c);
  return (a & m) | (b & ~m);
}
inline float pick(bool c, float a, float b) {
  return bits_float(pick(c, float_bits(a), float_bits(b)));
}
inline double pick(bool c, double a, double b) {
  return bits_double(pick(c, double_bits(a), double_bits(b)));
}

// Half conversions are written with integer operations and selects, not the
// compiler's _Float16 (which gcc 12 converts one element at a time), so the
// loops around them vectorize. Both round to nearest even, like torch.
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16 v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }
inline float to_acc(fp16 v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t shifted = (h & 0x7FFFu) << 13;
  const uint32_t exponent = shifted & 0x0F800000u;
  const uint32_t normal = shifted + ((127u - 15u) << 23);
  const uint32_t inf_nan = normal + ((128u - 16u) << 23);
  const float sub = bits_float(normal + (1u << 23)) - bits_float(113u << 23);
  const uint32_t magnitude =
      pick(exponent == 0x0F800000u, inf_nan, pick(exponent == 0u, float_bits(sub), normal));
  return bits_float(magnitude | sign);
}

inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }
inline void store(bf16* p, float v) {
  const uint32_t u = float_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p->bits = v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}
inline void store(fp16* p, float v) {
  const uint32_t u = float_bits(v);
  const uint32_t sign = (u & 0x80000000u) >> 16;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t big = pick(a > 0x7F800000u, 0x7E00u, 0x7C00u);
  const float denorm_magic = bits_float(((127u - 15u) + (23u - 10u) + 1u) << 23);
  const uint32_t small = float_bits(bits_float(a) + denorm_magic) - float_bits(denorm_magic);
  const uint32_t odd = (a >> 13) & 1u;
  const uint32_t normal = (a + ((15u - 127u) << 23) + 0xFFFu + odd) >> 13;
  const uint32_t magnitude =
      pick(a >= ((127u + 16u) << 23), big, pick(a < (113u << 23), small, normal));
  p->bits = static_cast<uint16_t>(magnitude | sign);
}

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// ---- t^beta for the common exponents ---------------------------------------
// Division by t^beta rather than multiplication by t^-beta: one rounding less.

enum class Power { kThreeQuarters, kHalf, kOne, kGeneral };

inline Power classify(double beta) {
  if (beta == 0.75) return Power::kThreeQuarters;
  if (beta == 0.5) return Power::kHalf;
  if (beta == 1.0) return Power::kOne;
  return Power::kGeneral;
}

// t^beta for float accumulators and any beta, vectorizable: exp2(beta * log2(t))
// evaluated in double with series accurate to ~1e-12, far below float rounding.
// t >= k > 0 always; non-finite t (from non-finite inputs) takes pow's values.
inline float pow_float(float t_in, float beta_f) {
  const double beta = beta_f;
  const bool finite = t_in - t_in == 0.0f;
  const double t = pick(finite, static_cast<double>(t_in), 1.0);
  const uint64_t bits = double_bits(t);
  const double e0 = bits_double(0x4330000000000000ull | (bits >> 52)) - 4503599627371519.0;
  const double m0 = bits_double((bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
  const bool high = m0 > 1.4142135623730951;
  const double m = pick(high, m0 * 0.5, m0);
  const double e = e0 + pick(high, 1.0, 0.0);
  const double z = (m - 1.0) / (m + 1.0), z2 = z * z;
  const double ln_m =
      z * (2.0 + z2 * (2.0 / 3 +
                       z2 * (2.0 / 5 +
                             z2 * (2.0 / 7 + z2 * (2.0 / 9 + z2 * (2.0 / 11 + z2 * (2.0 / 13)))))));
  double y = beta * (e + ln_m * 1.4426950408889634);
  y = pick(y < -1022.0, -1022.0, y);
  y = pick(y > 1023.0, 1023.0, y);
  const double magic = 6755399441055744.0;
  const double shifted = y + magic;
  const double f = (y - (shifted - magic)) * 0.6931471805599453;
  const double poly =
      1.0 +
      f * (1.0 + f * (1.0 / 2 +
                      f * (1.0 / 6 +
                           f * (1.0 / 24 +
                                f * (1.0 / 120 +
                                     f * (1.0 / 720 +
                                          f * (1.0 / 5040 +
                                               f * (1.0 / 40320 + f * (1.0 / 362880 +
                                                                       f * (1.0 / 3628800))))))))));
  const double scale = bits_double((double_bits(shifted) + 1023) << 52);
  const float result = static_cast<float>(poly * scale);
  const float at_infinity = beta_f > 0 ? INFINITY : (beta_f < 0 ? 0.0f : 1.0f);
  return pick(finite, result, pick(t_in != t_in, t_in, at_infinity));
}

inline float general_pow(float t, float beta) { return pow_float(t, beta); }
inline double general_pow(double t, double beta) { return std::pow(t, beta); }

template <Power P, typename A>
inline A denominator(A t, A beta) {
  if constexpr (P == Power::kThreeQuarters) {
    const A r = std::sqrt(t);
    return r * std::sqrt(r);
  } else if constexpr (P == Power::kHalf) {
    return std::sqrt(t);
  } else if constexpr (P == Power::kOne) {
    return t;
  } else {
    return general_pow(t, beta);
  }
}

// ---- per-sample parameters -------------------------------------------------

template <typename A>
struct SampleParams {
  A scale;  // alpha / window element count
  A beta;
  A k;
  Power power;
};

template <typename A>
SampleParams<A> sample_params(const double* alpha, const double* beta, const double* k, int64_t n,
                              double window_elems) {
  return SampleParams<A>{static_cast<A>(alpha[n] / window_elems), static_cast<A>(beta[n]),
                         static_cast<A>(k[n]), classify(beta[n])};
}

// The part of a window of `size` that can overlap an extent of `extent` elements: offsets beyond
// extent - 1 only ever add zeros, so windows longer than the tensor cost no more than it.
struct Window {
  int64_t before, after;
  Window(int size, int64_t extent)
      : before(std::min<int64_t>(size / 2, extent - 1)),
        after(std::min<int64_t>((size - 1) / 2, extent - 1)) {}
  int64_t width() const { return before + after + 1; }
};

// ---- across channels ---------------------------------------------------------

// y[i] = x[i] / (k + scale * s[i])^beta, the last step shared by both modes.
template <Power P, typename T, typename A>
void scale_row(const T* x, T* y, const A* s, int64_t len, const SampleParams<A>& p) {
#pragma GCC ivdep
  for (int64_t i = 0; i < len; ++i)
    store(y + i, to_acc(x[i]) / denominator<P, A>(p.k + p.scale * s[i], p.beta));
}

// sum[i] = sum_w rows[w][i]^2, unrolled for windows of up to kMaxUnrolledWindow rows.
template <int W, typename T, typename A>
void square_sum(int nrows, const T* const* rows, A* sum, int64_t len) {
  if constexpr (W <= kMaxUnrolledWindow) {
    if (nrows != W) return square_sum<W + 1>(nrows, rows, sum, len);
    const T* r[W];
    for (int w = 0; w < W; ++w) r[w] = rows[w];
#pragma GCC ivdep
    for (int64_t i = 0; i < len; ++i) {
      A s = 0;
      for (int w = 0; w < W; ++w) {
        const A v = to_acc(r[w][i]);
        s += v * v;
      }
      sum[i] = s;
    }
  } else {
    std::fill(sum, sum + len, A(0));
    for (int w = 0; w < nrows; ++w) {
      const T* r = rows[w];
#pragma GCC ivdep
      for (int64_t i = 0; i < len; ++i) {
        const A v = to_acc(r[i]);
        sum[i] += v * v;
      }
    }
  }
}

// The fused form of square_sum + scale_row for the exponents with cheap powers:
// one pass, nothing stored in between.
template <int W, Power P, typename T, typename A>
void across_row_fused(const T* const* rows, const T* xc, T* y, int64_t len,
                      const SampleParams<A>& p) {
  const T* r[W];
  for (int w = 0; w < W; ++w) r[w] = rows[w];
#pragma GCC ivdep
  for (int64_t i = 0; i < len; ++i) {
    A s = 0;
    for (int w = 0; w < W; ++w) {
      const A v = to_acc(r[w][i]);
      s += v * v;
    }
    store(y + i, to_acc(xc[i]) / denominator<P, A>(p.k + p.scale * s, p.beta));
  }
}

template <int W, Power P, typename T, typename A>
void across_row(int nrows, const T* const* rows, const T* xc, T* y, int64_t len,
                const SampleParams<A>& p, A* sum) {
  if constexpr (P != Power::kGeneral && W <= kMaxUnrolledWindow) {
    if (nrows == W) return across_row_fused<W, P>(rows, xc, y, len, p);
    return across_row<W + 1, P>(nrows, rows, xc, y, len, p, sum);
  } else {
    // gcc will not vectorize the general power inside the fused loop; two passes it does.
    square_sum<1>(nrows, rows, sum, len);
    scale_row<P>(xc, y, sum, len, p);
  }
}

template <Power P, typename T, typename A>
void across_tile(const T* x, T* y, int64_t C, int64_t HW, int64_t p0, int64_t len, int size,
                 const SampleParams<A>& p, std::vector<const T*>& rows, A* sum) {
  const Window window(size, C);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t lo = std::max<int64_t>(0, c - window.before);
    const int64_t hi = std::min<int64_t>(C - 1, c + window.after);
    const int nrows = static_cast<int>(hi - lo + 1);
    for (int w = 0; w < nrows; ++w) rows[w] = x + (lo + w) * HW + p0;
    across_row<1, P>(nrows, rows.data(), x + c * HW + p0, y + c * HW + p0, len, p, sum);
  }
}

template <typename T>
void lrn_across(const T* x, T* y, int64_t N, int64_t C, int64_t HW, int size, const double* alpha,
                const double* beta, const double* k, int threads) {
  using A = typename Acc<T>::type;
  // Pixel tiles keep a window of rows (size x tile) in L1 while channels stream by.
  const int64_t tile = HW <= 1024 ? HW : 512;
  const int64_t tiles = (HW + tile - 1) / tile;
  const int64_t items = N * tiles;
  const bool parallel = threads > 1 && items > 1 && N * C * HW >= 32768;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<const T*> rows(static_cast<size_t>(std::min<int64_t>(size, C)));
    std::vector<A> sum(static_cast<size_t>(tile));
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t n = item / tiles, t = item % tiles;
      const int64_t p0 = t * tile, len = std::min(tile, HW - p0);
      const auto sp = sample_params<A>(alpha, beta, k, n, static_cast<double>(size));
      const T* xn = x + n * C * HW;
      T* yn = y + n * C * HW;
      switch (sp.power) {
        case Power::kThreeQuarters:
          across_tile<Power::kThreeQuarters>(xn, yn, C, HW, p0, len, size, sp, rows, sum.data());
          break;
        case Power::kHalf:
          across_tile<Power::kHalf>(xn, yn, C, HW, p0, len, size, sp, rows, sum.data());
          break;
        case Power::kOne:
          across_tile<Power::kOne>(xn, yn, C, HW, p0, len, size, sp, rows, sum.data());
          break;
        case Power::kGeneral:
          across_tile<Power::kGeneral>(xn, yn, C, HW, p0, len, size, sp, rows, sum.data());
          break;
      }
    }
  }
}

// ---- within channel ----------------------------------------------------------

// out[i] = sum_{j<W} in[i + j] for W known at compile time (in is zero-padded).
template <int W, typename A>
void box_row_fixed(const A* in, A* out, int64_t len) {
#pragma GCC ivdep
  for (int64_t i = 0; i < len; ++i) {
    A s = 0;
    for (int j = 0; j < W; ++j) s += in[i + j];
    out[i] = s;
  }
}

template <int W, typename A>
void box_row(int width, const A* in, A* out, int64_t len) {
  if constexpr (W <= kMaxUnrolledWindow) {
    if (width == W) return box_row_fixed<W>(in, out, len);
    return box_row<W + 1>(width, in, out, len);
  } else {
    for (int64_t i = 0; i < len; ++i) {
      A s = 0;
      for (int j = 0; j < width; ++j) s += in[i + j];
      out[i] = s;
    }
  }
}

// out[i] = sum_r rows[r][i] over nrows rows, unrolled for short windows.
template <int W, typename A>
void column_sum(int nrows, const A* const* rows, A* out, int64_t len) {
  if constexpr (W <= kMaxUnrolledWindow) {
    if (nrows == W) {
      const A* r[W];
      for (int w = 0; w < W; ++w) r[w] = rows[w];
#pragma GCC ivdep
      for (int64_t i = 0; i < len; ++i) {
        A s = 0;
        for (int w = 0; w < W; ++w) s += r[w][i];
        out[i] = s;
      }
      return;
    }
    return column_sum<W + 1>(nrows, rows, out, len);
  } else {
    std::fill(out, out + len, A(0));
    for (int w = 0; w < nrows; ++w) {
#pragma GCC ivdep
      for (int64_t i = 0; i < len; ++i) out[i] += rows[w][i];
    }
  }
}

// Channels-last (NHWC) input, across channels: each pixel's C values are contiguous, so a pixel's
// window sums are a box filter along its row of squares (zero-padded), then the shared scale.
// This is the layout oneDNN's convolutions produce, so a network needs no copy around its LRN.
template <Power P, typename T, typename A>
void across_pixels(const T* x, T* y, int64_t C, int64_t pixels, Window window,
                   const SampleParams<A>& p, A* padded, A* sum) {
  const int width = static_cast<int>(window.width());
  A* squares = padded + window.before;
  for (int64_t q = 0; q < pixels; ++q) {
    const T* xq = x + q * C;
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      const A v = to_acc(xq[c]);
      squares[c] = v * v;
    }
    box_row<1>(width, padded, sum, C);
    scale_row<P>(xq, y + q * C, sum, C, p);
  }
}

template <typename T>
void lrn_across_nhwc(const T* x, T* y, int64_t N, int64_t C, int64_t HW, int size,
                     const double* alpha, const double* beta, const double* k, int threads) {
  using A = typename Acc<T>::type;
  const Window window(size, C);
  const int64_t tile = 64;  // pixels per work item
  const int64_t tiles = (HW + tile - 1) / tile;
  const int64_t items = N * tiles;
  const bool parallel = threads > 1 && items > 1 && N * C * HW >= 32768;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<A> padded(static_cast<size_t>(C + window.width() - 1), A(0));
    std::vector<A> sum(static_cast<size_t>(C));
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t n = item / tiles, q0 = (item % tiles) * tile;
      const int64_t pixels = std::min(tile, HW - q0);
      const auto sp = sample_params<A>(alpha, beta, k, n, static_cast<double>(size));
      const T* xq = x + (n * HW + q0) * C;
      T* yq = y + (n * HW + q0) * C;
      switch (sp.power) {
        case Power::kThreeQuarters:
          across_pixels<Power::kThreeQuarters>(xq, yq, C, pixels, window, sp, padded.data(), sum.data());
          break;
        case Power::kHalf:
          across_pixels<Power::kHalf>(xq, yq, C, pixels, window, sp, padded.data(), sum.data());
          break;
        case Power::kOne:
          across_pixels<Power::kOne>(xq, yq, C, pixels, window, sp, padded.data(), sum.data());
          break;
        case Power::kGeneral:
          across_pixels<Power::kGeneral>(xq, yq, C, pixels, window, sp, padded.data(), sum.data());
          break;
      }
    }
  }
}

template <typename T, typename A>
struct WithinScratch {
  std::vector<A> padded;  // one row of squares with zero borders
  std::vector<A> rowsum;  // horizontal window sums for the block's rows plus halo
  std::vector<A> total;   // one output row of full window sums
  std::vector<const A*> rows;
};

// Output rows [h0, h1) of an H-row plane from the row sums of rows r0 on (``s.rowsum``, ``len``
// values a row: W, or W * C channels-last): each row's window of row sums added up, then scaled.
template <typename T, typename A>
void sum_rows_and_scale(const T* x, T* y, int64_t H, int64_t len, int64_t h0, int64_t h1, int64_t r0,
                        Window rows, const SampleParams<A>& p, WithinScratch<T, A>& s) {
  for (int64_t h = h0; h < h1; ++h) {
    const int64_t lo = std::max<int64_t>(0, h - rows.before);
    const int64_t hi = std::min<int64_t>(H - 1, h + rows.after);
    const int nrows = static_cast<int>(hi - lo + 1);
    for (int r = 0; r < nrows; ++r) s.rows[r] = s.rowsum.data() + (lo + r - r0) * len;
    column_sum<1>(nrows, s.rows.data(), s.total.data(), len);
    switch (p.power) {
      case Power::kThreeQuarters:
        scale_row<Power::kThreeQuarters>(x + h * len, y + h * len, s.total.data(), len, p);
        break;
      case Power::kHalf:
        scale_row<Power::kHalf>(x + h * len, y + h * len, s.total.data(), len, p);
        break;
      case Power::kOne:
        scale_row<Power::kOne>(x + h * len, y + h * len, s.total.data(), len, p);
        break;
      case Power::kGeneral:
        scale_row<Power::kGeneral>(x + h * len, y + h * len, s.total.data(), len, p);
        break;
    }
  }
}

// Channels-last (NHWC): a row of W pixels is W * C contiguous values, each a run of C channels;
// a row's squares are boxed along W with stride C, vectorised along the channels.
template <typename A>
void box_row_channels(int width, const A* padded, A* out, int64_t W, int64_t C) {
  for (int64_t w = 0; w < W; ++w) {
    A* o = out + w * C;
    const A* in = padded + w * C;
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) o[c] = A(0) + in[c];
    for (int j = 1; j < width; ++j) {
      const A* next = in + j * C;
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) o[c] += next[c];
    }
  }
}

// Rows [h0, h1) of one plane of H rows of W pixels, each pixel ``lanes`` values: 1 for an NCHW
// plane (one channel), C for an NHWC sample (every channel at once, the same sums in the same
// order).
template <typename T, typename A>
void within_block(const T* x, T* y, int64_t H, int64_t W, int64_t lanes, int64_t h0, int64_t h1,
                  Window rows, Window cols, const SampleParams<A>& p, WithinScratch<T, A>& s) {
  const int64_t len = W * lanes;
  const int64_t r0 = std::max<int64_t>(0, h0 - rows.before);
  const int64_t r1 = std::min<int64_t>(H, h1 + rows.after);
  const int width = static_cast<int>(cols.width());
  for (int64_t h = r0; h < r1; ++h) {
    const T* xr = x + h * len;
    A* pr = s.padded.data() + cols.before * lanes;
#pragma GCC ivdep
    for (int64_t i = 0; i < len; ++i) {
      const A v = to_acc(xr[i]);
      pr[i] = v * v;
    }
    A* out = s.rowsum.data() + (h - r0) * len;
    if (lanes == 1)
      box_row<1>(width, s.padded.data(), out, W);
    else
      box_row_channels(width, s.padded.data(), out, W, lanes);
  }
  sum_rows_and_scale(x, y, H, len, h0, h1, r0, rows, p, s);
}

// NCHW: N * C planes of single values; channels-last: N planes of C-value pixels.
template <typename T>
void lrn_within(const T* x, T* y, int64_t N, int64_t C, int64_t H, int64_t W, bool channels_last,
                int size, const double* alpha, const double* beta, const double* k, int threads) {
  using A = typename Acc<T>::type;
  const Window rows(size, H), cols(size, W);
  const int64_t lanes = channels_last ? C : 1;
  const int64_t planes_per_sample = channels_last ? 1 : C;
  const int64_t len = W * lanes;
  // Row blocks bound the scratch to ~256 KiB (L2) for large planes.
  const int64_t block = std::min<int64_t>(H, std::max<int64_t>(8, 65536 / len));
  const int64_t blocks = (H + block - 1) / block;
  const int64_t items = N * planes_per_sample * blocks;
  const int64_t halo = std::min<int64_t>(H, block + rows.width() - 1);
  const bool parallel = threads > 1 && items > 1 && N * C * H * W >= 32768;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    WithinScratch<T, A> s;
    s.padded.assign(static_cast<size_t>((W + cols.width() - 1) * lanes), A(0));
    s.rowsum.resize(static_cast<size_t>(halo * len));
    s.total.resize(static_cast<size_t>(len));
    s.rows.resize(static_cast<size_t>(std::min<int64_t>(rows.width(), H)));
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t plane = item / blocks, b = item % blocks;
      const int64_t n = plane / planes_per_sample;
      const auto sp = sample_params<A>(alpha, beta, k, n, static_cast<double>(size) * size);
      const int64_t h0 = b * block, h1 = std::min(H, h0 + block);
      within_block(x + plane * H * len, y + plane * H * len, H, W, lanes, h0, h1, rows, cols, sp, s);
    }
  }
}

template <typename T>
void run(int mode, bool channels_last, const void* x, void* y, int64_t N, int64_t C, int64_t H,
         int64_t W, int size, const double* alpha, const double* beta, const double* k,
         int threads) {
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  if (mode != 0)
    lrn_within(xt, yt, N, C, H, W, channels_last, size, alpha, beta, k, threads);
  else if (channels_last)
    lrn_across_nhwc(xt, yt, N, C, H * W, size, alpha, beta, k, threads);
  else
    lrn_across(xt, yt, N, C, H * W, size, alpha, beta, k, threads);
}

}  // namespace

extern "C" {

// Version of this ABI; the Python loader refuses a library that disagrees.
int lrnserve_abi_version() { return 6; }

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16. mode: 0 across, 1 within. layout: 0 NCHW
// (contiguous), 1 NHWC (channels-last contiguous). x and y share the layout.
// alpha/beta/k: one value per sample (N). Returns 0, or a negative error code for arguments the
// Python side should never have passed.
int lrnserve_lrn_forward(int dtype, int mode, int layout, const void* x, void* y, int64_t N,
                         int64_t C, int64_t H, int64_t W, int size, const double* alpha,
                         const double* beta, const double* k, int threads) {
  if (N < 0 || C < 0 || H < 0 || W < 0 || size < 1 || (mode != 0 && mode != 1)) return -1;
  if (layout != 0 && layout != 1) return -3;
  if (N == 0 || C == 0 || H == 0 || W == 0) return 0;
  if (threads < 1) threads = 1;
  const bool nhwc = layout == 1;
  switch (dtype) {
    case 0:
      run<float>(mode, nhwc, x, y, N, C, H, W, size, alpha, beta, k, threads);
      return 0;
    case 1:
      run<double>(mode, nhwc, x, y, N, C, H, W, size, alpha, beta, k, threads);
      return 0;
    case 2:
      run<fp16>(mode, nhwc, x, y, N, C, H, W, size, alpha, beta, k, threads);
      return 0;
    case 3:
      run<bf16>(mode, nhwc, x, y, N, C, H, W, size, alpha, beta, k, threads);
      return 0;
    default:
      return -2;
  }
}

}  // extern "C"
