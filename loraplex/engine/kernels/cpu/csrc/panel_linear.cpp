// Linear projection y = x @ W.T over a weight stored in 16-column panels (CPU, float32).
//
// Decode steps multiply the same weights by a few rows each; oneDNN's packed path (kernels/cpu/linear.py) reads
// them at about half the memory bandwidth there, and MKL repacks the whole weight per call once there are two
// or more rows. Here the weight is packed once, at load, as [ceil(N / 16)][K][16]: panel p holds output columns
// 16p .. 16p + 15, and for each k their 16 weights are adjacent. A tile of up to 6 rows x 16 columns keeps its
// 12 eight-lane accumulators in registers: per k, two vector loads of the panel, one broadcast per row, two
// fused multiply-adds per row. With a few rows the panel streams from memory once; with many, each 256-deep
// slice of a panel (16 KB) stays in L1 while every row tile passes over it.
//
// Every output element is the sum over k in the same order (256-deep slices, lane by lane) whatever the number
// of rows, so a row's result does not depend on its batch companions.
//
// panel_linear_q4 takes a projection kept in a GGUF file's 4-bit blocks (kernels/cpu/gguf_weights.py): it rebuilds
// each 256-deep slice of a panel in float32 in an L1 buffer, exactly the values gguf's dequantization gives,
// and runs the same tile code over it, so its outputs equal panel_linear's on the dequantized weight to the
// bit while it reads 6 bits a weight from memory instead of 32. Up to 6 rows (one tile: a decode step of a few
// sequences) it rebuilds the weights in registers as the tile's k loop reaches them instead (q4_tile, one or two
// rows over several panels at once), with the same values and the same fused multiply-adds in the same order,
// so the same bits.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "vec8.h"

namespace {

constexpr int64_t kCols = 16;       // output columns per panel
constexpr int64_t kDepth = 256;     // k per slice: a 16 KB panel slice stays in L1
constexpr int64_t kRowBlock = 96;   // rows per block handed to one thread: their slice of x stays in L2
// panel_linear_q4 rebuilds a slice once per row block: larger blocks (a 384 KB slice of x, still in L2 here)
// rebuild it less often in a prefill step
constexpr int64_t kRowBlockQ4 = 384;

using loraplex::broadcast8;
using loraplex::f8;
using loraplex::fma8;
using loraplex::load8;
using loraplex::store8;

// A tile's sums written to y, or added to it with ``accumulate``: the one store every tile shares.
template <int Rows>
inline void store_tile(const f8* lo, const f8* hi, float* y, int64_t ldy, int64_t cols, bool accumulate) {
  if (cols == kCols) {
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) {
      f8 out_lo = lo[i], out_hi = hi[i];
      if (accumulate) {
        out_lo += load8(y + i * ldy);
        out_hi += load8(y + i * ldy + 8);
      }
      store8(y + i * ldy, out_lo);
      store8(y + i * ldy + 8, out_hi);
    }
  } else {  // the last panel of a projection whose width is not a multiple of 16
    for (int i = 0; i < Rows; ++i) {
      alignas(32) float lanes[kCols];
      store8(lanes, lo[i]);
      store8(lanes + 8, hi[i]);
      for (int64_t j = 0; j < cols; ++j) y[i * ldy + j] = accumulate ? y[i * ldy + j] + lanes[j] : lanes[j];
    }
  }
}

// rows x 16 tile over k in [0, depth): y (+)= x[rows, :depth] @ panel[:depth, 16]. With Prefetch, each k also
// asks for the panel's cache line one slice further on (one k of a panel is 16 floats, one 64-byte line). Near
// the end of the weight that address lies past it: a prefetch is a hint and never faults.
template <int Rows, bool Prefetch>
inline void tile(const float* x, int64_t ldx, const float* panel, int64_t depth, float* y, int64_t ldy,
                 int64_t cols, bool accumulate) {
  f8 lo[Rows], hi[Rows];
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) lo[i] = hi[i] = f8{};
  for (int64_t k = 0; k < depth; ++k) {
    if (Prefetch) __builtin_prefetch(panel + (k + kDepth) * kCols, 0, 1);
    const f8 w_lo = load8(panel + k * kCols), w_hi = load8(panel + k * kCols + 8);
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) {
      const f8 xv = broadcast8(x[i * ldx + k]);
      lo[i] = fma8(xv, w_lo, lo[i]);
      hi[i] = fma8(xv, w_hi, hi[i]);
    }
  }
  store_tile<Rows>(lo, hi, y, ldy, cols, accumulate);
}

template <bool Prefetch>
inline void any_tile(int64_t rows, const float* x, int64_t ldx, const float* panel, int64_t depth, float* y,
                     int64_t ldy, int64_t cols, bool accumulate) {
  switch (rows) {
    case 6: tile<6, Prefetch>(x, ldx, panel, depth, y, ldy, cols, accumulate); break;
    case 5: tile<5, Prefetch>(x, ldx, panel, depth, y, ldy, cols, accumulate); break;
    case 4: tile<4, Prefetch>(x, ldx, panel, depth, y, ldy, cols, accumulate); break;
    case 3: tile<3, Prefetch>(x, ldx, panel, depth, y, ldy, cols, accumulate); break;
    case 2: tile<2, Prefetch>(x, ldx, panel, depth, y, ldy, cols, accumulate); break;
    case 1: tile<1, Prefetch>(x, ldx, panel, depth, y, ldy, cols, accumulate); break;
    default: break;
  }
}

// The rows are split into the fewest tiles of at most 6, of sizes that differ by at most one (8 rows: 4 + 4, not
// 6 + 2). A tile's k loop carries one chain of fused multiply-adds per accumulator, so a tile with few rows
// waits on the FMA latency; even tiles keep every tile busy. Every tile sums in the same order, so the split
// does not change any row's result.
//
// The first tile over a slice also prefetches the weights one slice ahead: a thread's jobs read its panels in
// memory order, so that is the data it needs next. Without it the memory sat idle while the other tiles reused
// the slice from L1. Over the default model's 210 projections (one-off interleaved timing) the two changes
// took 0.84-0.95x the time at 4-20 rows, and the same at 1-2 and 32-48 rows.
// Not inlined: both kernels run this one copy of the machine code, which is what makes them equal to the bit
// (-ffast-math would let two inlined copies sum differently).
__attribute__((noinline)) void rows_over_panel(const float* x, int64_t ldx, const float* panel, int64_t depth,
                                               float* y, int64_t ldy, int64_t cols, int64_t rows, bool accumulate) {
  const int64_t tiles = (rows + 5) / 6;
  int64_t r = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = (rows - r) / (tiles - t);
    if (t == 0) {
      any_tile<true>(n, x + r * ldx, ldx, panel, depth, y + r * ldy, ldy, cols, accumulate);
    } else {
      any_tile<false>(n, x + r * ldx, ldx, panel, depth, y + r * ldy, ldy, cols, accumulate);
    }
    r += n;
  }
}

at::Tensor pack_linear_weight(const at::Tensor& weight) {  // [N, K] -> [ceil(N / 16), K, 16], zero-padded
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.device().is_cpu() && weight.dim() == 2,
              "pack_linear_weight: a 2-D float32 CPU weight [out_features, in_features]");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), panels = (n + kCols - 1) / kCols;
  at::Tensor packed = at::zeros({panels, k, kCols}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  loraplex::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t c = 0; c < kCols && p * kCols + c < n; ++c) {
        const float* row = src + (p * kCols + c) * k;
        for (int64_t j = 0; j < k; ++j) dst[(p * k + j) * kCols + c] = row[j];
      }
    }
  });
  return packed;
}

// y = x @ W.T, W given slice by slice: slice_of(p, k0, depth, scratch) returns panel p's rows k0 .. k0 + depth
// ([depth][16] floats), in place or written into the thread's 16 KB scratch.
template <typename SliceOf>
at::Tensor over_panels(const char* op, const at::Tensor& x, int64_t depth, int64_t panels, int64_t out_features,
                       int64_t max_block_rows, SliceOf slice_of) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu() && x.dim() == 2, op,
              ": x must be a contiguous 2-D float32 CPU tensor [rows, in_features]");
  TORCH_CHECK(x.size(1) == depth, op, ": x has ", x.size(1), " features, the weight expects ", depth);
  TORCH_CHECK(out_features > (panels - 1) * kCols && out_features <= panels * kCols, op, ": out_features ",
              out_features, " does not match ", panels, " panels");
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const float* xs = x.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  // Row blocks of equal size (a multiple of the 6-row tile, at most max_block_rows, so every block has rows),
  // jobs ordered panel by panel: the threads' shares of the work are even whatever the row count.
  const int64_t row_blocks = (rows + max_block_rows - 1) / max_block_rows;
  const int64_t block_rows = ((rows + row_blocks - 1) / row_blocks + 5) / 6 * 6;
  loraplex::parallel_for(0, row_blocks * panels, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[kDepth * kCols];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t p = job / row_blocks, block = job % row_blocks;
      const int64_t r0 = block * block_rows, nrows = std::min(block_rows, rows - r0);
      const int64_t cols = std::min(kCols, out_features - p * kCols);
      for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
        const int64_t slice_depth = std::min(kDepth, depth - k0);
        rows_over_panel(xs + r0 * depth + k0, depth, slice_of(p, k0, slice_depth, scratch), slice_depth,
                        ys + r0 * out_features + p * kCols, out_features, cols, nrows, k0 > 0);
      }
    }
  });
  return y;
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(2) == kCols,
              "panel_linear: the weight must come from pack_linear_weight");
  const int64_t depth = packed.size(1);
  const float* ws = packed.data_ptr<float>();
  return over_panels("panel_linear", x, depth, packed.size(0), out_features, kRowBlock,
                     [&](int64_t p, int64_t k0, int64_t, float*) { return ws + (p * depth + k0) * kCols; });
}

constexpr int64_t kBlock = 32;  // weights per GGUF block: one scale and one minimum per column
static_assert(kDepth % kBlock == 0, "a slice holds whole blocks");

// Panel p's rows k0 .. k0 + depth, rebuilt in float32: w = scale * code + minimum. scale * code is exact in
// float32 (a half-precision scale times a 4-bit integer), so the sum rounds once, fused or not: the value gguf's
// numpy dequantization computes, whatever the vector width.
//
// Bytes widen to 32-bit integers, then to floats: GCC turns these conversions into vector zero-extensions, where
// it converts bytes straight to floats one lane at a time, through general registers. The vectors are as wide as
// the CPU's registers (16 lanes with AVX-512, 8 with AVX2): a 16-lane widening on an AVX2 CPU is split by GCC
// through memory, which made the 4-bit kernel 5x slower than the float32 one at one row on a Zen 3 CPU.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float fvec __attribute__((vector_size(4 * kLanes)));
typedef uint8_t u8vec __attribute__((vector_size(kLanes)));
typedef int32_t i32vec __attribute__((vector_size(4 * kLanes)));
static_assert(kCols % kLanes == 0, "a panel row is whole vectors");

// GCC's generic conversion of a byte vector goes lane by lane through general registers on AVX2; the
// zero-extending load (vpmovzxbd) is asked for by name there.
inline i32vec widen(const uint8_t* bytes) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  return (i32vec)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
#else
  u8vec v;
  std::memcpy(&v, bytes, sizeof v);
  return __builtin_convertvector(v, i32vec);
#endif
}
inline fvec to_floats(i32vec codes) { return __builtin_convertvector(codes, fvec); }

void dequantize_slice(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                      const float* __restrict__ minimums, int64_t depth, float* __restrict__ out) {
  for (int64_t b = 0; b < depth / kBlock; ++b) {
    for (int64_t lane0 = 0; lane0 < kCols; lane0 += kLanes) {  // the panel's columns, one vector at a time
      fvec scale, minimum;
      std::memcpy(&scale, scales + b * kCols + lane0, sizeof scale);
      std::memcpy(&minimum, minimums + b * kCols + lane0, sizeof minimum);
      for (int64_t j = 0; j < kBlock / 2; ++j) {
        // one byte per column holds the codes of two k, split after widening: x86 has no byte shifts
        const i32vec both = widen(codes + (b * kBlock / 2 + j) * kCols + lane0);
        const fvec even = scale * to_floats(both & 0x0F) + minimum, odd = scale * to_floats(both >> 4) + minimum;
        std::memcpy(out + (b * kBlock + 2 * j) * kCols + lane0, &even, sizeof even);
        std::memcpy(out + (b * kBlock + 2 * j + 1) * kCols + lane0, &odd, sizeof odd);
      }
    }
  }
}

// The same rebuild, eight columns at a time, into registers: the tile below uses it for steps of a few rows.
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));
inline i32x8 widen8(const uint8_t* bytes) {
#if defined(__AVX2__)
  return (i32x8)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
#else
  u8x8 v;
  std::memcpy(&v, bytes, sizeof v);
  return __builtin_convertvector(v, i32x8);
#endif
}
inline f8 rebuild8(i32x8 codes, f8 scale, f8 minimum) { return scale * __builtin_convertvector(codes, f8) + minimum; }

// rows x (16 x Panels) tile over one slice of 4-bit panels, their weights rebuilt in registers as the k loop
// reaches them. With one tile of rows, rebuilding the slice into scratch and reading it back cost more than the
// arithmetic (a decode step of one sequence was mostly that). The weights are the values dequantize_slice writes
// (scale * code is exact, so the fused or separate add rounds the same), and each row's sums take the same fused
// multiply-adds in the same k order as ``tile`` over the rebuilt slice, then the same store: the same bits, so a
// row's result still does not depend on how many rows share its step. Both tiles update their sums through
// fma8: -ffast-math paired this one's two k per code byte before adding them (a different rounding) when the
// updates were written as plain arithmetic.
//
// Each sum is one chain of multiply-adds, each waiting on the one before: with one or two rows a single panel
// gives the core two or four chains, too few to hide the latency, so such tiles take several panels side by side
// (``Panels``), each with its own chains; every sum is still taken in the same order. ``panel_codes`` and
// ``panel_blocks`` step from one panel to the next in the codes and in the scales and minimums.
template <int Rows, int Panels>
inline void q4_tile(const float* x, int64_t ldx, const uint8_t* codes, const float* scales, const float* minimums,
                    int64_t panel_codes, int64_t panel_blocks, int64_t depth, float* y, int64_t ldy, int64_t cols,
                    bool accumulate) {
  f8 lo[Panels][Rows], hi[Panels][Rows];
#pragma GCC unroll 8
  for (int q = 0; q < Panels; ++q)
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) lo[q][i] = hi[q][i] = f8{};
  for (int64_t b = 0; b < depth / kBlock; ++b) {
    for (int64_t j = 0; j < kBlock / 2; ++j) {
      const int64_t k = b * kBlock + 2 * j;
#pragma GCC unroll 8
      for (int q = 0; q < Panels; ++q) {
        const float* scale = scales + q * panel_blocks + b * kCols;
        const float* minimum = minimums + q * panel_blocks + b * kCols;
        const f8 scale_lo = load8(scale), scale_hi = load8(scale + 8);
        const f8 min_lo = load8(minimum), min_hi = load8(minimum + 8);
        // one byte per column: the codes of two k
        const uint8_t* pair = codes + q * panel_codes + (b * kBlock / 2 + j) * kCols;
        const i32x8 codes_lo = widen8(pair), codes_hi = widen8(pair + 8);
        const f8 even_lo = rebuild8(codes_lo & 0x0F, scale_lo, min_lo);
        const f8 even_hi = rebuild8(codes_hi & 0x0F, scale_hi, min_hi);
#pragma GCC unroll 8
        for (int i = 0; i < Rows; ++i) {
          const f8 xv = broadcast8(x[i * ldx + k]);
          lo[q][i] = fma8(xv, even_lo, lo[q][i]);
          hi[q][i] = fma8(xv, even_hi, hi[q][i]);
        }
        const f8 odd_lo = rebuild8(codes_lo >> 4, scale_lo, min_lo), odd_hi = rebuild8(codes_hi >> 4, scale_hi, min_hi);
#pragma GCC unroll 8
        for (int i = 0; i < Rows; ++i) {
          const f8 xv = broadcast8(x[i * ldx + k + 1]);
          lo[q][i] = fma8(xv, odd_lo, lo[q][i]);
          hi[q][i] = fma8(xv, odd_hi, hi[q][i]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < Panels; ++q) store_tile<Rows>(lo[q], hi[q], y + q * kCols, ldy, q + 1 < Panels ? kCols : cols, accumulate);
}

// y = x @ W.T for at most one tile of rows (a decode step of up to 6 sequences), with q4_tile: one or two rows take
// groups of 4 or 2 panels (the last panel, maybe narrower than 16 columns, on its own), more rows one panel.
template <int Rows>
void few_rows_over_panels(const float* xs, const uint8_t* cs, const float* ss, const float* ms, int64_t depth,
                          int64_t panels, int64_t out_features, float* ys) {
  constexpr int kGroup = Rows == 1 ? 4 : Rows == 2 ? 2 : 1;
  const int64_t full = (panels - 1) / kGroup, jobs = full + 1 + (panels - 1) % kGroup;  // groups, then singles
  const int64_t panel_codes = depth / 2 * kCols, panel_blocks = depth / kBlock * kCols;
  loraplex::parallel_for(0, jobs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const bool group = job < full;
      const int64_t p = group ? job * kGroup : full * kGroup + (job - full);
      const int64_t cols = std::min(kCols, out_features - p * kCols);
      for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
        const int64_t slice_depth = std::min(kDepth, depth - k0), block0 = (p * depth + k0) / kBlock;
        const uint8_t* codes = cs + (p * depth + k0) / 2 * kCols;
        const float *scales = ss + block0 * kCols, *minimums = ms + block0 * kCols;
        float* out = ys + p * kCols;
        if (group) {
          q4_tile<Rows, kGroup>(xs + k0, depth, codes, scales, minimums, panel_codes, panel_blocks, slice_depth, out,
                                out_features, kCols, k0 > 0);
        } else {
          q4_tile<Rows, 1>(xs + k0, depth, codes, scales, minimums, panel_codes, panel_blocks, slice_depth, out,
                           out_features, cols, k0 > 0);
        }
      }
    }
  });
}

at::Tensor few_rows_q4(const at::Tensor& x, const uint8_t* cs, const float* ss, const float* ms, int64_t depth,
                       int64_t panels, int64_t out_features) {
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  const float* xs = x.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  switch (rows) {
    case 6: few_rows_over_panels<6>(xs, cs, ss, ms, depth, panels, out_features, ys); break;
    case 5: few_rows_over_panels<5>(xs, cs, ss, ms, depth, panels, out_features, ys); break;
    case 4: few_rows_over_panels<4>(xs, cs, ss, ms, depth, panels, out_features, ys); break;
    case 3: few_rows_over_panels<3>(xs, cs, ss, ms, depth, panels, out_features, ys); break;
    case 2: few_rows_over_panels<2>(xs, cs, ss, ms, depth, panels, out_features, ys); break;
    default: few_rows_over_panels<1>(xs, cs, ss, ms, depth, panels, out_features, ys); break;
  }
  return y;
}

at::Tensor panel_linear_q4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                           const at::Tensor& minimums, int64_t out_features) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 3 &&
                  codes.size(2) == kCols,
              "panel_linear_q4: codes must be uint8 [panels, in_features / 2, 16] (kernels/cpu/gguf_weights.py)");
  const int64_t panels = codes.size(0), depth = codes.size(1) * 2;
  TORCH_CHECK(depth % kBlock == 0, "panel_linear_q4: in_features ", depth, " is not a multiple of ", kBlock);
  for (const at::Tensor* t : {&scales, &minimums}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == panels &&
                    t->size(1) == depth / kBlock && t->size(2) == kCols,
                "panel_linear_q4: scales and minimums must be float32 [panels, in_features / 32, 16]");
  }
  const uint8_t* cs = codes.data_ptr<uint8_t>();
  const float* ss = scales.data_ptr<float>();
  const float* ms = minimums.data_ptr<float>();
  if (x.size(0) >= 1 && x.size(0) <= 6 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 &&
      x.size(1) == depth && out_features > (panels - 1) * kCols && out_features <= panels * kCols) {
    return few_rows_q4(x, cs, ss, ms, depth, panels, out_features);
  }
  // rows_over_panel's prefetch then points past the scratch: a hint, never a fault; the codes are read in order
  return over_panels("panel_linear_q4", x, depth, panels, out_features, kRowBlockQ4,
                     [&](int64_t p, int64_t k0, int64_t slice_depth, float* scratch) {
                       const int64_t block0 = (p * depth + k0) / kBlock;
                       dequantize_slice(cs + (p * depth + k0) / 2 * kCols, ss + block0 * kCols,
                                        ms + block0 * kCols, slice_depth, scratch);
                       return static_cast<const float*>(scratch);
                     });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor packed, int out_features) -> Tensor");
  m.def("panel_linear_q4(Tensor x, Tensor codes, Tensor scales, Tensor minimums, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("pack_linear_weight", pack_linear_weight);
  m.impl("panel_linear", panel_linear);
  m.impl("panel_linear_q4", panel_linear_q4);
}
