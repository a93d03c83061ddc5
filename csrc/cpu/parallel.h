#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

namespace pagedlm::cpu {

// Items per thread task for items of `elements` elements each: tasks of at least ~64k elements, so
// a small call (a decode step's few rows) runs on the calling thread. A parallel region costs a
// wake-up of the pool (tens of microseconds once its threads have gone to sleep), and on a busy
// machine a descheduled worker costs a whole time slice: measured 8 ms for a 16-row silu_and_mul
// split over two threads beside one busy process, against 8 us on one thread.
constexpr int64_t kMinTaskElements = int64_t{1} << 16;

inline int64_t grain_for(int64_t elements) { return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, elements)); }

// Runs fn(i) for i in [0, n) on the kernels' thread pool (thread_pool.cpp): i = 0 on the calling
// thread. Inside a region, or for n <= 1, runs them one after another on the calling thread.
void run_in_parallel(int n, const std::function<void(int)>& fn);

// Memory a kernel reads soon: `parts` runs of `bytes` bytes each, the i-th at begin + i * stride,
// read in step (a gated MLP's gate and up halves are read a block of each at a time).
struct ReadAhead {
  const char* begin;
  int64_t bytes;
  int64_t stride;
  int parts;
};

// Asks the pool's workers to read `ranges` (in order) into their caches while they wait for the next
// region, replacing any earlier request; `owner` keeps that memory alive while they may read it. A
// worker stops at the next region and drops the request when it goes to sleep. Workers spin only on
// a quiet machine, so this costs a busy one nothing.
void read_while_idle(std::vector<ReadAhead> ranges, std::shared_ptr<const void> owner);

// at::parallel_for's contract on the kernels' pool: f(lo, hi) over contiguous ranges of [begin, end),
// at most one per thread of torch's intra-op count, each of at least `grain` items but the last.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int64_t n = end - begin;
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / std::max<int64_t>(1, grain));
  if (tasks <= 1) return f(begin, end);
  const int64_t chunk = (n + tasks - 1) / tasks;
  run_in_parallel(static_cast<int>(tasks), [&](int t) {
    const int64_t lo = begin + t * chunk;
    if (lo < end) f(lo, std::min(end, lo + chunk));
  });
}

// Runs fn(i) for every i in [0, n) on the kernels' threads, handing items out one at a time:
// attention items differ a lot in cost (short and long sequences, causal tiles), and
// parallel_for alone would give each thread a fixed contiguous range. An fn(i, after) also learns
// the item its thread runs next, taken when i starts, so that it can ask for that item's memory
// while it works on i; after is -1 when no item is taken ahead, which is whenever no more items
// remain than threads (a thread that holds one then would leave another idle at the end).
template <typename F>
void parallel_items(int64_t n, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(n, at::get_num_threads());
  parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    if constexpr (std::is_invocable_v<F, int64_t, int64_t>) {
      for (int64_t i = next++; i < n;) {
        const int64_t after = n - next.load(std::memory_order_relaxed) > threads ? next++ : -1;
        fn(i, after < n ? after : -1);
        i = after >= 0 ? after : next++;
      }
    } else {
      for (int64_t i = next++; i < n; i = next++) fn(i);
    }
  });
}

// Items [0, n) taken one at a time from either end until none remain: parallel_items with two
// kinds of taker (bf16_blocked_linear's caller takes from the back, its workers from the front).
class TwoEnded {
 public:
  explicit TwoEnded(int64_t n) : span_(pack(0, n)) {}

  int64_t remaining() const {
    const uint64_t s = span_.load(std::memory_order_relaxed);
    return static_cast<int64_t>(s & 0xffffffffu) - static_cast<int64_t>(s >> 32);
  }

  // The front's or the back's next item, or -1 when none remain.
  int64_t take(bool from_back) {
    uint64_t s = span_.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t begin = static_cast<int64_t>(s >> 32), end = static_cast<int64_t>(s & 0xffffffffu);
      if (begin >= end) return -1;
      if (span_.compare_exchange_weak(s, from_back ? pack(begin, end - 1) : pack(begin + 1, end),
                                      std::memory_order_relaxed))
        return from_back ? end - 1 : begin;
    }
  }

 private:
  static uint64_t pack(int64_t begin, int64_t end) { return static_cast<uint64_t>(begin) << 32 | static_cast<uint64_t>(end); }
  std::atomic<uint64_t> span_;  // [begin, end) of what remains, 32 bits each
};

}  // namespace pagedlm::cpu
