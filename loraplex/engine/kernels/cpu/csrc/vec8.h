// Eight-lane float vectors for the CPU kernels, through GCC's vector extension (AVX on x86, pairs of NEON
// registers on ARM), so the kernels need no intrinsics.
//
// Shared so that every kernel loads, stores and reduces the same way: ``lanes_sum`` fixes the order in which a
// dot product's eight partial sums are added, and the partial forms pad with zeros, so a tail of fewer than
// eight elements takes the same vector operations as a full one.

#pragma once

#include <cstdint>
#include <cstring>
#if defined(__FMA__)
#include <immintrin.h>
#endif

namespace loraplex {

typedef float f8 __attribute__((vector_size(32)));

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }

// The first n (0..8) floats at p, the other lanes zero.
inline f8 load8_partial(const float* p, int64_t n) {
  f8 v = f8{};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

// The first n (0..8) lanes of v, written to p.
inline void store8_partial(float* p, f8 v, int64_t n) { std::memcpy(p, &v, n * sizeof(float)); }

// acc + a * b, one rounding where the CPU has FMA. Named, so that -ffast-math's reassociation cannot pair two
// consecutive updates of one sum (a different rounding) in one kernel and not in another that must agree with it.
inline f8 fma8(f8 a, f8 b, f8 acc) {
#if defined(__FMA__)
  return (f8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
  return acc + a * b;
#endif
}

inline f8 broadcast8(float v) { return f8{} + v; }

inline float lanes_sum(f8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

}  // namespace loraplex
