// Linear projection y = x @ W.T over a dense row-major weight (CPU, float32): the LM head.
//
// The LM head's weight is usually tied to the input embeddings, which need it dense, and a second, packed copy
// would cost as much memory as a fifth of the model; MKL reads it well below the memory's bandwidth for the few
// rows of a decode step (kernels/cpu/linear.py). Its rows are long and contiguous, so each output is a dot
// product: a tile of 4 weight rows x 3 input rows keeps 12 eight-lane partial sums in registers, reading each
// weight row once per 3 input rows while the whole input stays in cache.
//
// Every output is summed in one order (lane-wise over k, then the lanes, then the tail of k beyond a multiple
// of 8) whatever the number of rows, so a row's logits do not depend on its batch companions.
//
// row_major_linear_q8 takes the weight in a GGUF file's 8-bit blocks (Q8_0: w = scale * code, 32 codes a
// scale; kernels/cpu/gguf_weights.py): each group of 4 weight rows is rebuilt in float32 in a small buffer, exactly
// the values gguf's dequantization gives, and the same group code runs over it, so its logits equal
// row_major_linear's on the dequantized weight to the bit. One input row (a decode step of one sequence)
// rebuilds the weights in registers instead, 8 rows at a time, with the same values and the same multiply-adds in
// the same order.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "vec8.h"

namespace {


constexpr int64_t kWeightRows = 4;  // weight rows per tile (and per parallel job unit)
constexpr int64_t kInputRows = 3;   // input rows per tile

using loraplex::f8;
using loraplex::fma8;
using loraplex::lanes_sum;
using loraplex::load8;
using loraplex::load8_partial;

// W weight rows (``w_rows[i]``) x X input rows, summed lane-wise over k; the last partial 8 of k goes through a
// zero-padded vector, so every output is computed by the same sequence of vector operations. ``prefetch``, when
// set, is the start of the next weight group (W rows of ``depth``), asked for a line at a time as k advances.
template <int W, int X>
inline void tile(const float* x, const float* const* w_rows, float* y, int64_t depth, int64_t ldy, int w_valid,
                 const float* prefetch) {
  f8 acc[W][X];
#pragma GCC unroll 4
  for (int i = 0; i < W; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < X; ++j) acc[i][j] = f8{};
  const int64_t vec_depth = depth / 8 * 8;
  for (int64_t k = 0; k < vec_depth; k += 8) {
    if (prefetch != nullptr && k % 16 == 0) {
#pragma GCC unroll 4
      for (int i = 0; i < W; ++i) __builtin_prefetch(prefetch + i * depth + k, 0, 1);
    }
    f8 wv[W];
#pragma GCC unroll 4
    for (int i = 0; i < W; ++i) wv[i] = load8(w_rows[i] + k);
#pragma GCC unroll 4
    for (int j = 0; j < X; ++j) {
      const f8 xv = load8(x + j * depth + k);
#pragma GCC unroll 4
      for (int i = 0; i < W; ++i) acc[i][j] = fma8(wv[i], xv, acc[i][j]);
    }
  }
  if (vec_depth < depth) {
    for (int i = 0; i < W; ++i) {
      const f8 wt = load8_partial(w_rows[i] + vec_depth, depth - vec_depth);
      for (int j = 0; j < X; ++j) acc[i][j] = fma8(wt, load8_partial(x + j * depth + vec_depth, depth - vec_depth), acc[i][j]);
    }
  }
  for (int i = 0; i < w_valid; ++i) {
    for (int j = 0; j < X; ++j) y[j * ldy + i] = lanes_sum(acc[i][j]);
  }
}

// Weight rows n0 .. n0 + 3 (the last group of a width that is not a multiple of 4 repeats its last row and
// writes only the real ones) against every input row. The first input tile also prefetches the next group's
// weight rows (the next 4 rows in memory, what this thread reads next): with many input rows the weights are
// read from cache most of the time, and without the prefetch the memory sat idle then (one-off interleaved
// timing on the default LM head: 0.87-0.91x the time at 1-8 rows, 0.95-0.98x at 16-48).
//
// Not inlined: both kernels run this one copy of the machine code, which is what makes them equal to the bit
// (-ffast-math would let two inlined copies sum differently).
__attribute__((noinline)) void weight_group(const float* x, const float* const* w_rows, const float* next,
                                            float* y, int64_t n0, int64_t out_features, int64_t rows,
                                            int64_t depth) {
  const int w_valid = static_cast<int>(std::min<int64_t>(kWeightRows, out_features - n0));
  float* yn = y + n0;
  int64_t r = 0;
  for (; r + kInputRows <= rows; r += kInputRows) {
    tile<kWeightRows, kInputRows>(x + r * depth, w_rows, yn + r * out_features, depth, out_features, w_valid,
                                  r == 0 ? next : nullptr);
  }
  const float* tail_prefetch = r == 0 ? next : nullptr;
  if (rows - r == 2) {
    tile<kWeightRows, 2>(x + r * depth, w_rows, yn + r * out_features, depth, out_features, w_valid, tail_prefetch);
  }
  if (rows - r == 1) {
    tile<kWeightRows, 1>(x + r * depth, w_rows, yn + r * out_features, depth, out_features, w_valid, tail_prefetch);
  }
}

// Checks x against a weight of ``out_features`` rows of ``depth``; y = x @ W.T by weight groups.
// rows_of(n0, w_rows, scratch) sets the group's 4 row pointers (in place, or into rows it writes in the thread's
// scratch) and returns where the next group's rows start, for the prefetch, or nullptr for none.
template <typename RowsOf>
at::Tensor over_weight_groups(const char* op, const at::Tensor& x, int64_t depth, int64_t out_features,
                              RowsOf rows_of) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu() && x.dim() == 2, op,
              ": x must be a contiguous 2-D float32 CPU tensor [rows, in_features]");
  TORCH_CHECK(x.size(1) == depth, op, ": x has ", x.size(1), " features, the weight expects ", depth);
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const float* xs = x.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const int64_t groups = (out_features + kWeightRows - 1) / kWeightRows;
  loraplex::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t g = begin; g < end; ++g) {
      const float* w_rows[kWeightRows];
      const float* next = rows_of(g * kWeightRows, w_rows, scratch);
      weight_group(xs, w_rows, next, ys, g * kWeightRows, out_features, rows, depth);
    }
  });
  return y;
}

at::Tensor row_major_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.device().is_cpu() &&
                  weight.dim() == 2,
              "row_major_linear: the weight must be a contiguous 2-D float32 CPU tensor [out_features, in_features]");
  const int64_t depth = weight.size(1), out_features = weight.size(0);
  const float* ws = weight.data_ptr<float>();
  // The last group of a width that is not a multiple of 4 repeats its last row (and writes only the real ones).
  return over_weight_groups("row_major_linear", x, depth, out_features,
                            [&](int64_t n0, const float** w_rows, std::vector<float>&) {
                              for (int64_t i = 0; i < kWeightRows; ++i) {
                                w_rows[i] = ws + std::min(n0 + i, out_features - 1) * depth;
                              }
                              return n0 + 2 * kWeightRows <= out_features ? ws + (n0 + kWeightRows) * depth
                                                                          : nullptr;
                            });
}

constexpr int64_t kBlock = 32;  // codes per Q8_0 scale

// Weight rows n0 .. n0 + 3 of a Q8_0 weight, rebuilt in float32 into scratch: scale * code is exact (a
// half-precision scale times an 8-bit integer), the value gguf's numpy dequantization computes.
const float* dequantize_group(const int8_t* codes, const float* scales, int64_t n0, int64_t out_features,
                              int64_t depth, const float** w_rows, std::vector<float>& scratch) {
  scratch.resize(kWeightRows * depth);
  for (int64_t i = 0; i < kWeightRows; ++i) {
    const int64_t n = std::min(n0 + i, out_features - 1);
    float* __restrict__ row = scratch.data() + i * depth;
    const int8_t* __restrict__ code = codes + n * depth;
    const float* __restrict__ scale = scales + n * (depth / kBlock);
    // a plain loop: GCC vectorises it, sign extension included (its vector-extension conversion of signed
    // bytes goes one lane at a time, through general registers)
    for (int64_t b = 0; b < depth / kBlock; ++b) {
      const float s = scale[b];
      for (int64_t j = 0; j < kBlock; ++j) row[b * kBlock + j] = s * static_cast<float>(code[b * kBlock + j]);
    }
    w_rows[i] = row;
  }
  return nullptr;
}

// One input row against W weight rows of a Q8_0 weight, rebuilt in registers as k advances instead of into
// scratch: at one row, writing the rebuilt rows and reading them back cost about as much as the arithmetic. The
// values are dequantize_group's (scale * code is exact) and each logit takes tile's fused multiply-adds in the
// same order, then the same lane sum: the same bits as the scratch path. Eight weight rows give eight
// independent chains of multiply-adds, enough to hide their latency.
inline f8 rebuild_q8(const int8_t* codes, float scale) {
#if defined(__AVX2__)
  const f8 code = (f8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes))));
#else
  f8 code;
  for (int l = 0; l < 8; ++l) code[l] = static_cast<float>(codes[l]);
#endif
  return code * scale;
}

template <int W>
void q8_one_row(const float* x, const int8_t* codes, const float* scales, int64_t n0, int64_t out_features,
                int64_t depth, float* y) {
  const int8_t* rows[W];
  const float* row_scales[W];
  for (int i = 0; i < W; ++i) {
    const int64_t n = std::min<int64_t>(n0 + i, out_features - 1);  // past the end: repeat the last row, unwritten
    rows[i] = codes + n * depth;
    row_scales[i] = scales + n * (depth / kBlock);
  }
  f8 acc[W];
#pragma GCC unroll 8
  for (int i = 0; i < W; ++i) acc[i] = f8{};
  // the next group's codes (W whole rows, contiguous): one 64-byte line per step, all of them by the last step
  const int8_t* next = n0 + 2 * W <= out_features ? codes + (n0 + W) * depth : nullptr;
  for (int64_t k = 0; k < depth; k += 8) {  // depth is a multiple of 32: no tail
    if (next != nullptr) __builtin_prefetch(next + k * W, 0, 1);
    const f8 xv = load8(x + k);
#pragma GCC unroll 8
    for (int i = 0; i < W; ++i) acc[i] = fma8(rebuild_q8(rows[i] + k, row_scales[i][k / kBlock]), xv, acc[i]);
  }
  for (int i = 0; i < W && n0 + i < out_features; ++i) y[n0 + i] = lanes_sum(acc[i]);
}

at::Tensor row_major_linear_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.device().is_cpu() &&
                  codes.dim() == 2 && codes.size(1) % kBlock == 0,
              "row_major_linear_q8: codes must be int8 [out_features, in_features], in_features a multiple of 32");
  const int64_t depth = codes.size(1), out_features = codes.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == out_features && scales.size(1) == depth / kBlock,
              "row_major_linear_q8: scales must be float32 [out_features, in_features / 32]");
  const int8_t* cs = codes.data_ptr<int8_t>();
  const float* ss = scales.data_ptr<float>();
  if (x.size(0) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == depth) {
    constexpr int64_t kOneRowGroup = 8;
    at::Tensor y = at::empty({1, out_features}, x.options());
    const float* xs = x.data_ptr<float>();
    float* ys = y.data_ptr<float>();
    loraplex::parallel_for(0, (out_features + kOneRowGroup - 1) / kOneRowGroup, 16, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) q8_one_row<kOneRowGroup>(xs, cs, ss, g * kOneRowGroup, out_features, depth, ys);
    });
    return y;
  }
  return over_weight_groups("row_major_linear_q8", x, depth, out_features,
                            [&](int64_t n0, const float** w_rows, std::vector<float>& scratch) {
                              return dequantize_group(cs, ss, n0, out_features, depth, w_rows, scratch);
                            });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("row_major_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("row_major_linear_q8(Tensor x, Tensor codes, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("row_major_linear", row_major_linear);
  m.impl("row_major_linear_q8", row_major_linear_q8);
}
