// A whole small network in one call: a straight chain of layers (convolution, max and average
// pooling, ReLU, LRN, fully connected, softmax), float32, activations channels-last between
// layers. At batch 1 cifar10_full took 420 us through torch layer by layer, its three oneDNN
// convolutions 81 / 102 / 70 us each for 26 / 53 / 25 us of kernel time; as one call, 197 us
// (onnxruntime: 280). The program is made by
// lrnserve.server.models.chain, which checks every shape; this file only runs it.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

extern "C" {
int lrnserve_conv_nhwc(const float* x, const float* w, const float* b, float* y, float* padded, int64_t N,
                       int64_t C, int64_t H, int64_t W, int64_t OC, int64_t OH, int64_t OW, int KH, int KW, int SH,
                       int SW, int PH, int PW, int relu, int threads);
int lrnserve_max_pool_nhwc(const float* x, float* y, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                           int64_t OW, int kh, int kw, int sh, int sw, int ph, int pw, int threads);
int lrnserve_lrn_forward(int dtype, int mode, int layout, const void* x, void* y, int64_t N, int64_t C, int64_t H,
                         int64_t W, int size, const double* alpha, const double* beta, const double* k, int threads);
int lrnserve_linear_forward(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K,
                            int64_t O, int relu, int threads);
}

namespace {

// One layer: 16 int64s. in_* is the layer's input (C, H, W), out_* its output.
enum Code : int64_t { kConv = 1, kMaxPool = 2, kAvgPool = 3, kRelu = 4, kLrn = 5, kLinear = 6, kSoftmax = 7 };
struct Op {
  int64_t code, C, H, W, OC, OH, OW, KH, KW, SH, SW, PH, PW, flag, size, unused;
};
static_assert(sizeof(Op) == 16 * sizeof(int64_t), "the Python side writes 16 int64s a layer");

// One axis of a pooling window: [begin, end) inside the input, and its length clipped to the
// padded input instead.
struct Window {
  int64_t begin, end, padded;
};

inline Window window(int64_t out, int64_t stride, int64_t pad, int64_t kernel, int64_t extent) {
  const int64_t start = out * stride - pad;
  const int64_t stop = start + kernel < extent + pad ? start + kernel : extent + pad;
  return {start > 0 ? start : 0, stop < extent ? stop : extent, stop - start};
}

// torch's AvgPool2d: each window's sum is over its part inside the input; its divisor is its
// size clipped to the padded input (count_include_pad), or with op.flag set the part inside.
void avg_pool_nhwc(const float* x, float* y, int64_t N, const Op& op) {
  const int64_t C = op.C, H = op.H, W = op.W;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oh = 0; oh < op.OH; ++oh) {
      const Window r = window(oh, op.SH, op.PH, op.KH, H);
      for (int64_t ow = 0; ow < op.OW; ++ow) {
        const Window q = window(ow, op.SW, op.PW, op.KW, W);
        const int64_t inside = (r.end - r.begin) * (q.end - q.begin);
        const float divisor = static_cast<float>(op.flag ? inside : r.padded * q.padded);
        float* out = y + ((n * op.OH + oh) * op.OW + ow) * C;
        for (int64_t c = 0; c < C; ++c) out[c] = 0.0f;
        for (int64_t ih = r.begin; ih < r.end; ++ih)
          for (int64_t iw = q.begin; iw < q.end; ++iw) {
            const float* in = x + ((n * H + ih) * W + iw) * C;
            for (int64_t c = 0; c < C; ++c) out[c] += in[c];
          }
        for (int64_t c = 0; c < C; ++c) out[c] /= divisor;
      }
    }
}

void softmax_rows(const float* x, float* y, int64_t N, int64_t K) {
  for (int64_t n = 0; n < N; ++n) {
    const float* in = x + n * K;
    float* out = y + n * K;
    float top = -INFINITY;
    for (int64_t i = 0; i < K; ++i) top = in[i] > top ? in[i] : top;
    float total = 0.0f;
    for (int64_t i = 0; i < K; ++i) total += (out[i] = std::exp(in[i] - top));
    for (int64_t i = 0; i < K; ++i) out[i] /= total;
  }
}

// NCHW [N, C, HW] <-> NHWC [N, HW, C].
void transpose(const float* x, float* y, int64_t N, int64_t rows, int64_t cols) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) y[(n * cols + c) * rows + r] = x[(n * rows + r) * cols + c];
}

}  // namespace

extern "C" {

// Runs ``count`` layers ``ops`` on x [N, C, H, W] (NCHW, the first layer's input) into y (the last
// layer's output, NCHW). params: two pointers a layer (conv: packed weights and bias; linear:
// weights and bias or null; LRN: alpha, beta, k as three doubles). workspace: N * (2 * act +
// scratch) floats, act the largest activation of one sample, scratch the largest zero-padded
// convolution input of one sample. Returns 0, or the negative code of the first layer that failed.
int lrnserve_chain_forward(const int64_t* program, int64_t count, const void* const* params, const float* x,
                           float* y, float* workspace, int64_t N, int64_t act, int threads) {
  if (count < 1 || N < 1 || act < 1) return -1;
  if (threads < 1) threads = 1;
  const Op* ops = reinterpret_cast<const Op*>(program);
  float* buffers[2] = {workspace, workspace + N * act};
  float* scratch = workspace + 2 * N * act;
  float* cur = buffers[0];
  transpose(x, cur, N, ops[0].C, ops[0].H * ops[0].W);
  std::vector<double> lrn_params(3 * N);
  for (int64_t i = 0; i < count; ++i) {
    const Op& op = ops[i];
    const float* const* p = reinterpret_cast<const float* const*>(params + 2 * i);
    float* out = cur == buffers[0] ? buffers[1] : buffers[0];
    int rc = 0;
    switch (op.code) {
      case kConv:
        rc = lrnserve_conv_nhwc(cur, p[0], p[1], out, scratch, N, op.C, op.H, op.W, op.OC, op.OH, op.OW, op.KH,
                                op.KW, op.SH, op.SW, op.PH, op.PW, op.flag, threads);
        break;
      case kMaxPool:
        rc = lrnserve_max_pool_nhwc(cur, out, N, op.C, op.H, op.W, op.OH, op.OW, op.KH, op.KW, op.SH, op.SW, op.PH,
                                    op.PW, threads);
        break;
      case kAvgPool:
        avg_pool_nhwc(cur, out, N, op);
        break;
      case kRelu:
        for (int64_t j = 0; j < N * op.C * op.H * op.W; ++j) cur[j] = lrnserve::relu(cur[j]);
        out = cur;
        break;
      case kLrn: {
        const double* abk = static_cast<const double*>(params[2 * i]);
        for (int64_t n = 0; n < N; ++n)
          for (int j = 0; j < 3; ++j) lrn_params[j * N + n] = abk[j];
        rc = lrnserve_lrn_forward(0, static_cast<int>(op.flag), 1, cur, out, N, op.C, op.H, op.W,
                                  static_cast<int>(op.size), lrn_params.data(), lrn_params.data() + N,
                                  lrn_params.data() + 2 * N, threads);
        break;
      }
      case kLinear:
        rc = lrnserve_linear_forward(cur, p[0], p[1], out, N, op.C * op.H * op.W, op.OC, static_cast<int>(op.flag),
                                     threads);
        break;
      case kSoftmax:
        softmax_rows(cur, out, N, op.C * op.H * op.W);
        break;
      default:
        return -2 - static_cast<int>(i);
    }
    if (rc != 0) return -2 - static_cast<int>(i);
    cur = out;
  }
  const Op& last = ops[count - 1];
  transpose(cur, y, N, last.OH * last.OW, last.OC);
  return 0;
}

}  // extern "C"
