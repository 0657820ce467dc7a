// Multi-LoRA delta for decode rows, each row through its own adapter only (CPU, float32).
//
// The portable op (lora/ops.py, lora_masked_dense) multiplies every row by every resident adapter's
// columns and masks the others away: three torch calls per projection, most of whose time on the CPU is call
// overhead at a few rows and wasted columns at many. Here each row reads its own slot's rank rows of A and of
// B transposed, in the packed layout the layer keeps (slot s at rows (s - 1) * rank ...): the shrink is rank
// dot products along the input, the expand rank vector updates along the output. Each slot is read to its own
// rank only: slots are padded to the largest resident rank, and adapters of ranks 4-16 side by side would
// otherwise read and multiply up to four times the rows they have (zero rows that add nothing).
//
// From 8 rows with an adapter, the rows are taken slot by slot and the expand runs over 64-column chunks of the
// output: each chunk of a slot's B (rank x 64, a few KB) is read once for all of that slot's rows while their 64
// outputs stay in registers. Going row by row read the slot's whole B (rank x out, up to ~100 KB) from L2 for
// every row; over the default model's 210 projections with 3 adapters that took 1.35-1.8x as long at 16-48 rows
// (one-off interleaved timing). Under 8 rows each row's shrink and expand run on one thread, in one parallel
// region. Either way each output element is y + s_0 b_0 + s_1 b_1 + ... in rank order and each shrink sums in
// one fixed order, so a row's result does not depend on its batch companions.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "vec8.h"

namespace {

constexpr int64_t kChunk = 64;  // output columns per expand job: 8 eight-lane accumulators

using loraplex::f8;
using loraplex::lanes_sum;
using loraplex::load8;
using loraplex::load8_partial;
using loraplex::store8;
using loraplex::store8_partial;

// shrunk[j] = x . a_j for J rows a_j = a + j * in: one chain of eight-lane products over k per row of A, then its
// lanes; the tail of k past a multiple of 8 goes through zero-padded vectors. J rows run side by side only so
// that their chains overlap; each output is computed the same way whatever J is.
template <int J>
inline void dot_rows(const float* x, const float* a, int64_t in, float* shrunk) {
  f8 acc[J];
#pragma GCC unroll 4
  for (int j = 0; j < J; ++j) acc[j] = f8{};
  const int64_t vec_in = in / 8 * 8;
  for (int64_t k = 0; k < vec_in; k += 8) {
    const f8 xv = load8(x + k);
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) acc[j] += xv * load8(a + j * in + k);
  }
  if (vec_in < in) {
    const f8 xt = load8_partial(x + vec_in, in - vec_in);
    for (int j = 0; j < J; ++j) acc[j] += xt * load8_partial(a + j * in + vec_in, in - vec_in);
  }
#pragma GCC unroll 4
  for (int j = 0; j < J; ++j) shrunk[j] = lanes_sum(acc[j]);
}

// The shrink of one row: its rank dot products with its slot's rows of A.
inline void shrink_row(const float* x, const float* a_slot, int64_t in, int64_t rank, float* shrunk) {
  int64_t j = 0;
  for (; j + 4 <= rank; j += 4) dot_rows<4>(x, a_slot + j * in, in, shrunk + j);
  for (; j < rank; ++j) dot_rows<1>(x, a_slot + j * in, in, shrunk + j);
}

// y[0 .. cols) += sum_j shrunk[j] * b[j * ldb + 0 .. cols), j in rank order. Columns past the last multiple of 8
// go through zero-padded vectors, so every element takes the same sequence of operations.
inline void expand_chunk(float* y, const float* shrunk, const float* b, int64_t ldb, int64_t rank, int64_t cols) {
  if (cols == kChunk) {
    f8 acc[kChunk / 8];
#pragma GCC unroll 8
    for (int v = 0; v < kChunk / 8; ++v) acc[v] = load8(y + 8 * v);
    for (int64_t j = 0; j < rank; ++j) {
      const float s = shrunk[j];
      const float* bj = b + j * ldb;
#pragma GCC unroll 8
      for (int v = 0; v < kChunk / 8; ++v) acc[v] += s * load8(bj + 8 * v);
    }
#pragma GCC unroll 8
    for (int v = 0; v < kChunk / 8; ++v) store8(y + 8 * v, acc[v]);
    return;
  }
  for (int64_t c0 = 0; c0 < cols; c0 += 8) {  // the last chunk of a width that is not a multiple of 64
    const int64_t n = std::min<int64_t>(8, cols - c0);
    f8 acc = load8_partial(y + c0, n);
    for (int64_t j = 0; j < rank; ++j) acc += shrunk[j] * load8_partial(b + j * ldb + c0, n);
    store8_partial(y + c0, acc, n);
  }
}

void lora_decode_delta(
    const at::Tensor& x,           // [T, in]
    const at::Tensor& a_packed,    // [L * rank, in]
    const at::Tensor& b_packed_t,  // [L * rank, out]: B transposed, scaling folded in
    const at::Tensor& slots,       // [T] int64, 0 = no adapter, else 1..L
    int64_t rank,                  // rows per slot in the packed matrices
    const at::Tensor& slot_ranks,  // [L] int64: slot s's own rank (its first rows; the rest are zero padding)
    const at::Tensor& out) {       // [T, out], the delta is added in place; rows may be strided (a column slice)
  for (const at::Tensor* t : {&x, &a_packed, &b_packed_t}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu() && t->dim() == 2,
                "lora_decode_delta: float32 contiguous 2-D CPU tensors only");
  }
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.device().is_cpu() && out.dim() == 2 && out.stride(1) == 1,
              "lora_decode_delta: out must be a float32 2-D CPU tensor with contiguous rows");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.dim() == 1);
  TORCH_CHECK(slot_ranks.scalar_type() == at::kLong && slot_ranks.is_contiguous() && slot_ranks.dim() == 1 &&
                  slot_ranks.device().is_cpu(),
              "lora_decode_delta: slot_ranks must be a 1-D int64 CPU tensor");
  const int64_t rows = x.size(0), in = x.size(1), out_features = out.size(1);
  const int64_t packed = a_packed.size(0);
  TORCH_CHECK(rank >= 1 && packed % rank == 0, "packed rows must be a whole number of ranks");
  TORCH_CHECK(a_packed.size(1) == in && b_packed_t.size(0) == packed && b_packed_t.size(1) == out_features,
              "adapter shapes do not match the projection");
  TORCH_CHECK(out.size(0) == rows && slots.size(0) == rows, "one slot and one output row per input row");
  const int64_t num_slots = packed / rank;
  TORCH_CHECK(slot_ranks.size(0) == num_slots, "one rank per packed slot");
  const int64_t* rank_of = slot_ranks.data_ptr<int64_t>();
  for (int64_t s = 0; s < num_slots; ++s) {
    TORCH_CHECK(rank_of[s] >= 0 && rank_of[s] <= rank, "a slot's rank must be within the packed rank");
  }

  const float* xs = x.data_ptr<float>();
  const float* a_all = a_packed.data_ptr<float>();
  const float* b_all = b_packed_t.data_ptr<float>();
  const int64_t* slot_of = slots.data_ptr<int64_t>();
  float* ys = out.data_ptr<float>();
  const int64_t ldy = out.size(0) > 1 ? out.stride(0) : out_features;

  // The rows with an adapter of this layer, slot by slot (a stable counting sort).
  std::vector<int64_t> starts(num_slots + 2, 0);
  for (int64_t t = 0; t < rows; ++t) {
    TORCH_CHECK(slot_of[t] >= 0, "negative adapter slot");
    if (slot_of[t] >= 1 && slot_of[t] <= num_slots) ++starts[slot_of[t] + 1];
  }
  for (int64_t s = 1; s <= num_slots + 1; ++s) starts[s] += starts[s - 1];
  const int64_t active = starts[num_slots + 1];
  if (active == 0) return;  // the base, or adapters that do not target this layer
  std::vector<int64_t> order(active);
  std::vector<int64_t> fill(starts.begin(), starts.end() - 1);
  for (int64_t t = 0; t < rows; ++t) {
    if (slot_of[t] >= 1 && slot_of[t] <= num_slots) order[fill[slot_of[t]]++] = t;
  }

  std::vector<float> shrunk(active * rank);
  if (active < 8) {
    // A few rows, mostly of different slots: one parallel region, each row's shrink and expand on one thread.
    loraplex::parallel_for(0, active, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = order[i], first = (slot_of[t] - 1) * rank, own = rank_of[slot_of[t] - 1];
        float* sh = shrunk.data() + i * rank;
        shrink_row(xs + t * in, a_all + first * in, in, own, sh);
        for (int64_t c0 = 0; c0 < out_features; c0 += kChunk) {
          expand_chunk(ys + t * ldy + c0, sh, b_all + first * out_features + c0, out_features, own,
                       std::min(kChunk, out_features - c0));
        }
      }
    });
    return;
  }
  loraplex::parallel_for(0, active, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = order[i];
      shrink_row(xs + t * in, a_all + (slot_of[t] - 1) * rank * in, in, rank_of[slot_of[t] - 1],
                 shrunk.data() + i * rank);
    }
  });
  // Each expand job is one 64-column chunk of the output, over every slot's rows.
  const int64_t chunks = (out_features + kChunk - 1) / kChunk;
  loraplex::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * kChunk, cols = std::min(kChunk, out_features - c0);
      for (int64_t s = 1; s <= num_slots; ++s) {
        const float* b_slot = b_all + (s - 1) * rank * out_features + c0;
        for (int64_t i = starts[s]; i < starts[s + 1]; ++i) {
          expand_chunk(ys + order[i] * ldy + c0, shrunk.data() + i * rank, b_slot, out_features,
                       rank_of[s - 1], cols);
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("lora_decode_delta(Tensor x, Tensor a_packed, Tensor b_packed_t, Tensor slots, int rank, Tensor slot_ranks, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("lora_decode_delta", lora_decode_delta);
}
