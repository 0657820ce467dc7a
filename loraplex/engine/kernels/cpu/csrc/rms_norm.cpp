// Llama's RMSNorm, weight * x / sqrt(mean(x^2) + eps), for float32 rows on the CPU.
//
// transformers computes it as six torch ops (to, pow, mean, add, rsqrt, two muls); at decode sizes (a few to
// 64 rows of 576) each op costs more in dispatch and thread wake-ups than in arithmetic, and a step runs 61 of
// these norms. One pass per row here: the sum of squares, then the scaled write.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "parallel.h"

namespace {

void normalise_rows(const float* x, const float* weight, float* out, int64_t begin, int64_t end, int64_t hidden,
                    double eps) {
  for (int64_t r = begin; r < end; ++r) {
    const float* row = x + r * hidden;
    float sum = 0.f;
    for (int64_t i = 0; i < hidden; ++i) sum += row[i] * row[i];
    const float scale = 1.f / std::sqrt(sum / static_cast<float>(hidden) + static_cast<float>(eps));
    float* o = out + r * hidden;
    for (int64_t i = 0; i < hidden; ++i) o[i] = weight[i] * (row[i] * scale);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "rms_norm: x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 1 && x.dim() >= 1 &&
                  weight.size(0) == x.size(-1),
              "rms_norm: the weight must be a float32 vector as long as x's last dimension");
  at::Tensor out = at::empty_like(x);
  const int64_t hidden = x.size(-1), rows = hidden ? x.numel() / hidden : 0;
  const float* xs = x.data_ptr<float>();
  const float* ws = weight.data_ptr<float>();
  float* os = out.data_ptr<float>();
  // a decode step's few rows are done by this thread: waking the others would cost more than the work
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(hidden, 1));
  loraplex::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    normalise_rows(xs, ws, os, begin, end, hidden, eps);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("rms_norm", rms_norm);
}
