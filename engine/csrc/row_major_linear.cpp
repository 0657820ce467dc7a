// Linear projection y = x @ W.T over a dense row-major weight (CPU, float32): the LM head.
//
// The LM head's weight is usually tied to the input embeddings, which need it dense, and a second, packed copy
// would cost as much memory as a fifth of the model; MKL reads it well below the memory's bandwidth for the few
// rows of a decode step (engine/cpu_linear.py). Its rows are long and contiguous, so each output is a dot
// product: a tile of 4 weight rows x 3 input rows keeps 12 eight-lane partial sums in registers, reading each
// weight row once per 3 input rows while the whole input stays in cache.
//
// Every output is summed in one order (lane-wise over k, then the lanes, then the tail of k beyond a multiple
// of 8) whatever the number of rows, so a row's logits do not depend on its batch companions.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "vec8.h"

namespace {


constexpr int64_t kWeightRows = 4;  // weight rows per tile (and per parallel job unit)
constexpr int64_t kInputRows = 3;   // input rows per tile

using loraplex::f8;
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
      for (int i = 0; i < W; ++i) acc[i][j] += wv[i] * xv;
    }
  }
  if (vec_depth < depth) {
    for (int i = 0; i < W; ++i) {
      const f8 wt = load8_partial(w_rows[i] + vec_depth, depth - vec_depth);
      for (int j = 0; j < X; ++j) acc[i][j] += wt * load8_partial(x + j * depth + vec_depth, depth - vec_depth);
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
void weight_group(const float* x, const float* w, float* y, int64_t n0, int64_t out_features, int64_t rows,
                  int64_t depth) {
  const float* w_rows[kWeightRows];
  for (int64_t i = 0; i < kWeightRows; ++i) w_rows[i] = w + std::min(n0 + i, out_features - 1) * depth;
  const int w_valid = static_cast<int>(std::min<int64_t>(kWeightRows, out_features - n0));
  const float* next = n0 + 2 * kWeightRows <= out_features ? w + (n0 + kWeightRows) * depth : nullptr;
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

at::Tensor row_major_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu() && x.dim() == 2,
              "row_major_linear: x must be a contiguous 2-D float32 CPU tensor [rows, in_features]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.device().is_cpu() &&
                  weight.dim() == 2,
              "row_major_linear: the weight must be a contiguous 2-D float32 CPU tensor [out_features, in_features]");
  const int64_t rows = x.size(0), depth = x.size(1), out_features = weight.size(0);
  TORCH_CHECK(weight.size(1) == depth, "row_major_linear: x has ", depth, " features, the weight expects ",
              weight.size(1));
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const float* xs = x.data_ptr<float>();
  const float* ws = weight.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const int64_t groups = (out_features + kWeightRows - 1) / kWeightRows;
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) weight_group(xs, ws, ys, g * kWeightRows, out_features, rows, depth);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("row_major_linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("row_major_linear", row_major_linear);
}
