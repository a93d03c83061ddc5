#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

namespace pagedlm::cpu {

// Runs fn(i) for every i in [0, n) on torch's intra-op threads, handing items out one at a time:
// attention items differ a lot in cost (short and long sequences, causal tiles), and
// at::parallel_for alone would give each thread a fixed contiguous range.
template <typename F>
void parallel_items(int64_t n, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) fn(i);
  });
}

}  // namespace pagedlm::cpu
