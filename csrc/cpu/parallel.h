#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

namespace pagedlm::cpu {

// Items per thread task for items of `elements` elements each: tasks of at least ~64k elements, so
// a small call (a decode step's few rows) runs on the calling thread. A parallel region costs a
// wake-up of the pool (tens of microseconds once its threads have gone to sleep), and on a busy
// machine a descheduled worker costs a whole time slice: measured 8 ms for a 16-row silu_and_mul
// split over two threads beside one busy process, against 8 us on one thread.
constexpr int64_t kMinTaskElements = int64_t{1} << 16;

inline int64_t grain_for(int64_t elements) { return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, elements)); }

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
