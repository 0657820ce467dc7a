// Decode attention over the paged K/V cache, read in place (CPU, float32).
//
// Every decode token attends over its own sequence's context, found through its block table. torch's SDPA
// needs the context as one dense tensor, so the Python path first copies each sequence's blocks out of the
// cache (index_select) and pads them to the longest context of the group; on the CPU that copy and the
// padded read cost more than the attention itself. Here each sequence's K and V rows are read once, where
// they lie. Two passes per sequence: scores (Q K^T, scaled) and their softmax, then the weighted sum of V.
// Query head i reads KV head i / (num_heads / num_kv_heads), as transformers' repeat_kv does.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace {

void paged_decode_attention(
    const at::Tensor& query,         // [B, H, D]
    const at::Tensor& key_cache,     // [num_blocks, block_size, H_kv, D]
    const at::Tensor& value_cache,   // [num_blocks, block_size, H_kv, D]
    const at::Tensor& block_tables,  // [B, max_blocks] int64
    const at::Tensor& context_lens,  // [B] int64, keys each token attends over (itself included)
    double scale,
    const at::Tensor& out) {         // [B, H, D], written
  for (const at::Tensor* t : {&query, &key_cache, &value_cache, &out}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "paged_decode_attention: float32 contiguous CPU tensors only");
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() && block_tables.dim() == 2);
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.is_contiguous() && context_lens.dim() == 1);
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes());
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the query's shape");
  const int64_t batch = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t num_blocks = key_cache.size(0), block_size = key_cache.size(1), kv_heads = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == dim && heads % kv_heads == 0, "head shapes do not match the cache");
  TORCH_CHECK(block_tables.size(0) == batch && context_lens.size(0) == batch, "one table and length per query");
  const int64_t group = heads / kv_heads, max_blocks = block_tables.size(1);
  const int64_t row_stride = kv_heads * dim;  // floats between two tokens of one block

  const float* q_all = query.data_ptr<float>();
  const float* k_all = key_cache.data_ptr<float>();
  const float* v_all = value_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* out_all = out.data_ptr<float>();
  const float scale_f = static_cast<float>(scale);

  loraplex::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;           // [heads, n]
    std::vector<float> acc(heads * dim);  // [heads, dim]
    std::vector<float> inv_sum(heads);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = lens[b];
      TORCH_CHECK(n >= 1 && n <= max_blocks * block_size, "context length outside the block table");
      const int64_t* table = tables + b * max_blocks;
      const float* q = q_all + b * heads * dim;
      scores.resize(heads * n);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t block = table[t / block_size];
        TORCH_CHECK(block >= 0 && block < num_blocks, "block id outside the cache");
        const float* k_row = k_all + (block * block_size + t % block_size) * row_stride;
        for (int64_t h = 0; h < heads; ++h) {
          const float* k = k_row + (h / group) * dim;
          const float* qh = q + h * dim;
          float s = 0.f;
          for (int64_t d = 0; d < dim; ++d) s += qh[d] * k[d];
          scores[h * n + t] = s * scale_f;
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* row = scores.data() + h * n;
        float top = row[0];  // not -inf: -ffast-math lets the compiler assume no infinities
        for (int64_t t = 1; t < n; ++t) top = std::max(top, row[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) {
          row[t] = std::exp(row[t] - top);
          sum += row[t];
        }
        inv_sum[h] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t block = table[t / block_size];
        const float* v_row = v_all + (block * block_size + t % block_size) * row_stride;
        for (int64_t h = 0; h < heads; ++h) {
          const float p = scores[h * n + t];
          const float* v = v_row + (h / group) * dim;
          float* a = acc.data() + h * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] += p * v[d];
        }
      }
      float* o = out_all + b * heads * dim;
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t d = 0; d < dim; ++d) o[h * dim + d] = acc[h * dim + d] * inv_sum[h];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(loraplex, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
}
