// How the CPU kernels share their work among threads: at::parallel_for's contract, with chunks handed out one at
// a time so the step degrades gracefully when another process shares the cores.
//
// Under OpenMP, at::parallel_for cuts a range into one chunk per thread and ends at a barrier: when another
// process holds a core, every one of the ~220 parallel regions of a decode step waits for the thread that the
// kernel scheduler has not run yet to do its half. Here the range is cut into several chunks per thread, taken
// from an atomic counter by whichever team thread is running: a late thread finds the chunks done and only
// passes the barrier. (OpenMP's threads wait passively; loraplex/engine/__init__.py sets that.)
//
// Which thread runs a chunk never changes a result: every kernel's chunk computes its own outputs in a fixed
// order, as under at::parallel_for, whose chunk boundaries depend on the thread count anyway.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace loraplex {

constexpr int64_t kChunksPerThread = 8;  // a late thread's share stays small; few enough that taking one is cheap

// False: one static chunk per thread, as at::parallel_for does (benchmarks/contention.py compares the two).
bool dynamic_split_enabled();

// at::parallel_for's contract: f(begin, end) over disjoint sub-ranges of [begin, end) of at least ``grain``
// items (the last may be shorter), inline when the range is one grain or torch runs one thread.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int64_t n = end - begin, step = std::max<int64_t>(grain, 1), threads = at::get_num_threads();
  const int64_t chunks = std::min((n + step - 1) / step, threads * kChunksPerThread);
  if (!dynamic_split_enabled() || threads <= 1 || chunks <= 1 || at::in_parallel_region()) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  const int64_t size = (n + chunks - 1) / chunks;
  std::atomic<int64_t> next{0};
  // One index per team thread; each then takes chunks until none is left.
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t first = begin + c * size;
      if (first < end) f(first, std::min(end, first + size));
    }
  });
}

}  // namespace loraplex
