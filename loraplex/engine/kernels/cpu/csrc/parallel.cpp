// The switch between the kernels' dynamic chunks and at::parallel_for's static split (parallel.h): on by
// default; off only to measure what it changes (benchmarks/contention.py).

#include <torch/library.h>

#include <atomic>

#include "parallel.h"

namespace {

std::atomic<bool> dynamic_split{true};

void set_dynamic_split(bool enabled) { dynamic_split.store(enabled, std::memory_order_relaxed); }

}  // namespace

namespace loraplex {

bool dynamic_split_enabled() { return dynamic_split.load(std::memory_order_relaxed); }

}  // namespace loraplex

TORCH_LIBRARY_FRAGMENT(loraplex, m) { m.def("set_dynamic_split(bool enabled) -> ()", &set_dynamic_split); }
