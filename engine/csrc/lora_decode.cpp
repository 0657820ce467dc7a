// Multi-LoRA delta for decode rows, each row through its own adapter only (CPU, float32).
//
// The portable op (engine/lora/ops.py, lora_masked_dense) multiplies every row by every resident adapter's
// columns and masks the others away: three torch calls per projection, most of whose time on the CPU is call
// overhead at a few rows and wasted columns at many. Here each row reads its own slot's rank rows of A and of
// B transposed, in the packed layout the layer keeps (slot s at rows (s - 1) * rank ...): the shrink is rank
// dot products along the input, the expand rank vector updates along the output.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

void lora_decode_delta(
    const at::Tensor& x,           // [T, in]
    const at::Tensor& a_packed,    // [L * rank, in]
    const at::Tensor& b_packed_t,  // [L * rank, out]: B transposed, scaling folded in
    const at::Tensor& slots,       // [T] int64, 0 = no adapter, else 1..L
    int64_t rank,
    const at::Tensor& out) {       // [T, out], the delta is added in place
  for (const at::Tensor* t : {&x, &a_packed, &b_packed_t, &out}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu() && t->dim() == 2,
                "lora_decode_delta: float32 contiguous 2-D CPU tensors only");
  }
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.dim() == 1);
  const int64_t rows = x.size(0), in = x.size(1), out_features = out.size(1);
  const int64_t packed = a_packed.size(0);
  TORCH_CHECK(rank >= 1 && packed % rank == 0, "packed rows must be a whole number of ranks");
  TORCH_CHECK(a_packed.size(1) == in && b_packed_t.size(0) == packed && b_packed_t.size(1) == out_features,
              "adapter shapes do not match the projection");
  TORCH_CHECK(out.size(0) == rows && slots.size(0) == rows, "one slot and one output row per input row");
  const int64_t num_slots = packed / rank;

  const float* xs = x.data_ptr<float>();
  const float* a_all = a_packed.data_ptr<float>();
  const float* b_all = b_packed_t.data_ptr<float>();
  const int64_t* slot_of = slots.data_ptr<int64_t>();
  float* ys = out.data_ptr<float>();

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> shrunk(rank);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slot_of[t];
      TORCH_CHECK(slot >= 0, "negative adapter slot");
      if (slot == 0 || slot > num_slots) continue;  // the base, or an adapter that does not target this layer
      const float* xt = xs + t * in;
      const int64_t first = (slot - 1) * rank;
      for (int64_t j = 0; j < rank; ++j) {
        const float* a = a_all + (first + j) * in;
        float s = 0.f;
        for (int64_t i = 0; i < in; ++i) s += xt[i] * a[i];
        shrunk[j] = s;
      }
      float* yt = ys + t * out_features;
      for (int64_t j = 0; j < rank; ++j) {
        const float* b = b_all + (first + j) * out_features;
        const float s = shrunk[j];
        for (int64_t o = 0; o < out_features; ++o) yt[o] += s * b[o];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("lora_decode_delta(Tensor x, Tensor a_packed, Tensor b_packed_t, Tensor slots, int rank, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("lora_decode_delta", lora_decode_delta);
}
