// The kernels' own thread pool (parallel.h), whose waiting adapts to whether the CPUs are contended.
//
// libgomp, which at::parallel_for runs on, makes a waiting thread spin GOMP_SPINCOUNT times and then
// sleep on a futex. A decode step has hundreds of regions with gaps of 30-150 us between them (Python,
// the small ops that run on the calling thread), so one count cannot serve both cases: a short count
// sleeps in those gaps and pays a wake-up per region on a quiet machine (3,000 spins, 35 us here: ~10%
// of a decode step, ~180 context switches a step); a long one keeps spinning on a core that a busy
// neighbour needs (300,000: under a fifth of the quiet rate beside one busy process).
//
// Here a quiet pool spins (yielding every few pauses) for up to kQuietSpin between regions, and the
// caller spins until its region's tasks are done. The CPUs are contended when workers pick up tasks
// more than kLateStart after they were published (they were descheduled) twice within kLateWindow,
// or when the machine has had more runnable threads than the pool has awake at kBusyChecks checks in
// a row (check_load); for kContendedFor from then on everyone spins only kContendedSpin before
// sleeping, so that the threads doing the work get the cores (and the scheduler can move a neighbour
// onto a core nobody spins on).
//
// A spinning worker also reads ahead what the caller said the kernels read next (read_while_idle):
// between a small decode step's regions the caller runs Python and one-thread ops while the workers
// wait, and a weight they have read into their caches reads several times faster in the next region.
//
// One sign alone is not enough: a quiet machine's daemons (0.02 cores here) deschedule a spinning
// worker for 0.5-4 ms a few times a second, and a kernel thread is runnable at one load check in ~20.
// Acting on each kept the pool in its contended mode most of the time, where the wake-up after every
// sleep made decode steps of 1 and 8 sequences 6-11% slower. A busy neighbour deschedules a worker at
// every time slice and is runnable at every check.
#include "parallel.h"

#include <omp.h>
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace pagedlm::cpu {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::microseconds;
using std::chrono::milliseconds;

constexpr int kPausesPerYield = 16;  // a pause is ~12 ns on the AMX Xeon
constexpr Clock::duration kQuietSpin = milliseconds(2);  // longer than a step's gaps, not than its Python phases
constexpr Clock::duration kContendedSpin = microseconds(30);
constexpr Clock::duration kLateStart = microseconds(500);
constexpr Clock::duration kContendedFor = milliseconds(200);

constexpr Clock::duration kLateWindow = milliseconds(100);
constexpr Clock::duration kLoadCheckEvery = milliseconds(10);
constexpr int kBusyChecks = 2;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

int64_t now_ns() { return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count(); }

// Threads runnable on the whole machine right now (/proc/loadavg's fourth field, "running/total"),
// or -1 where that cannot be read.
int runnable_threads() {
  FILE* f = std::fopen("/proc/loadavg", "r");
  if (f == nullptr) return -1;
  double l1, l5, l15;
  int running = -1, total;
  if (std::fscanf(f, "%lf %lf %lf %d/%d", &l1, &l5, &l15, &running, &total) != 5) running = -1;
  std::fclose(f);
  return running;
}

// Spins until done() holds, yielding the core every kPausesPerYield pauses; false after `limit`.
template <typename F>
bool spin_until(const F& done, Clock::duration limit) {
  const auto start = Clock::now();
  for (;;) {
    for (int i = 0; i < kPausesPerYield; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    sched_yield();
    if (Clock::now() - start > limit) return done();
  }
}

class ThreadPool {
 public:
  // Runs fn(i) for i in [0, n): i = 0 on the calling thread, the others on workers 1 .. n - 1.
  // Rethrows the first exception a task threw, after every task has finished.
  void run(int n, const std::function<void(int)>& fn) {
    while (static_cast<int>(workers_.size()) < n - 1) {
      const int index = static_cast<int>(workers_.size()) + 1;
      const uint64_t seen = region_.load(std::memory_order_relaxed);  // it waits for the next one
      workers_.emplace_back([this, index, seen] { work(index, seen); });
      workers_.back().detach();
      num_workers_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    }
    check_load();
    task_ = &fn;
    error_ = nullptr;
    pending_.store(n - 1, std::memory_order_relaxed);
    published_ns_.store(now_ns(), std::memory_order_relaxed);
    region_.store(((region_.load(std::memory_order_relaxed) >> kCountBits) + 1) << kCountBits | n,
                  std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    try {
      fn(0);
    } catch (...) {
      record(std::current_exception());
    }
    auto done = [&] { return pending_.load(std::memory_order_acquire) == 0; };
    if (!spin_until(done, contended() ? kContendedSpin : Clock::duration::max())) {
      std::unique_lock<std::mutex> lock(mutex_);
      caller_sleeps_.store(true, std::memory_order_seq_cst);
      done_.wait(lock, done);
      caller_sleeps_.store(false, std::memory_order_relaxed);
    }
    if (error_) std::rethrow_exception(error_);
  }

  // Replaces the read-ahead request (none with no ranges).
  void read_ahead(std::vector<ReadAhead> ranges, std::shared_ptr<const void> owner) {
    std::shared_ptr<ReadAheadJob> job;
    if (!ranges.empty() && num_workers_.load(std::memory_order_relaxed) > 0) {
      job = std::make_shared<ReadAheadJob>();
      int64_t chunks = 0;
      for (const ReadAhead& r : ranges) {
        chunks += (r.bytes + kReadAheadChunk - 1) / kReadAheadChunk * r.parts;
        job->chunk_ends.push_back(chunks);
      }
      job->ranges = std::move(ranges);
      job->owner = std::move(owner);
    }
    std::lock_guard<std::mutex> lock(read_ahead_mutex_);
    read_ahead_.swap(job);  // the old one is released below, outside a worker's way
    has_read_ahead_.store(static_cast<bool>(read_ahead_), std::memory_order_release);
  }

 private:
  bool contended() const { return now_ns() < contended_until_ns_.load(std::memory_order_relaxed); }

  // A descheduled worker shows contention by starting late (work); a descheduled caller does not,
  // while its workers spin on the other cores. So every kLoadCheckEvery the caller also counts the
  // machine's runnable threads against the pool's awake ones (itself and the workers not asleep).
  void check_load() {
    const int64_t now = now_ns();
    if (now < next_load_check_ns_) return;
    next_load_check_ns_ = now + std::chrono::nanoseconds(kLoadCheckEvery).count();
    const int awake = static_cast<int>(workers_.size()) + 1 - sleepers_.load(std::memory_order_relaxed);
    busy_checks_ = runnable_threads() > awake ? busy_checks_ + 1 : 0;
    if (busy_checks_ >= kBusyChecks)
      contended_until_ns_.store(now + std::chrono::nanoseconds(kContendedFor).count(), std::memory_order_relaxed);
  }

  void work(int index, uint64_t seen) {
    omp_set_num_threads(1);  // ATen called from a task runs serially rather than opening a team here
    for (;;) {
      auto arrived = [&] { return region_.load(std::memory_order_acquire) != seen; };
      auto arrived_or_read = [&] { return arrived() || (read_ahead_step(), false); };
      if (!spin_until(arrived_or_read, contended() ? kContendedSpin : kQuietSpin)) {
        drop_read_ahead(nullptr);
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, arrived);
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
      }
      seen = region_.load(std::memory_order_acquire);
      if (index >= static_cast<int>(seen & kCountMask)) continue;  // not one of this region's tasks
      const int64_t start = now_ns();
      if (start - published_ns_.load(std::memory_order_relaxed) > std::chrono::nanoseconds(kLateStart).count())
        late_start(start);
      try {
        (*task_)(index);
      } catch (...) {
        record(std::current_exception());
      }
      if (pending_.fetch_sub(1, std::memory_order_seq_cst) == 1 && caller_sleeps_.load(std::memory_order_seq_cst)) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_all();
      }
    }
  }

  // A read_while_idle request: its ranges cut into chunks that the workers take in turn.
  struct ReadAheadJob {
    std::vector<ReadAhead> ranges;
    std::vector<int64_t> chunk_ends;  // chunks up to the end of each range
    std::shared_ptr<const void> owner;
    std::atomic<int64_t> next{0};
  };
  static constexpr int64_t kReadAheadChunk = 4096;  // per part of a range

  // The request, if there is one and nobody holds its lock (a worker never waits for it).
  std::shared_ptr<ReadAheadJob> current_read_ahead() {
    if (!has_read_ahead_.load(std::memory_order_acquire)) return nullptr;
    std::unique_lock<std::mutex> lock(read_ahead_mutex_, std::try_to_lock);
    return lock.owns_lock() ? read_ahead_ : nullptr;
  }

  // Reads the request's next chunk into this core's caches, if one is left.
  void read_ahead_step() {
    const std::shared_ptr<ReadAheadJob> job = current_read_ahead();
    if (!job) return;
    const int64_t c = job->next.fetch_add(1, std::memory_order_relaxed);
    if (c >= job->chunk_ends.back()) return drop_read_ahead(job);
    size_t i = 0;
    while (job->chunk_ends[i] <= c) ++i;
    const ReadAhead& r = job->ranges[i];
    const int64_t local = c - (i == 0 ? 0 : job->chunk_ends[i - 1]);
    const int64_t offset = local / r.parts * kReadAheadChunk;
    const char* p = r.begin + local % r.parts * r.stride + offset;
    uint64_t x = 0;  // one load a cache line; their xor keeps the compiler from dropping them
    for (int64_t j = 0; j + 8 <= std::min(kReadAheadChunk, r.bytes - offset); j += 64) {
      uint64_t v;
      std::memcpy(&v, p + j, 8);
      x ^= v;
    }
    read_ahead_sink_.store(x, std::memory_order_relaxed);
  }

  // Lets go of the request (the memory its owner holds) unless a newer one replaced it.
  void drop_read_ahead(const std::shared_ptr<ReadAheadJob>& job) {
    std::shared_ptr<ReadAheadJob> dropped;
    {
      std::unique_lock<std::mutex> lock(read_ahead_mutex_, std::try_to_lock);
      if (!lock.owns_lock() || !read_ahead_ || (job && read_ahead_ != job)) return;
      dropped.swap(read_ahead_);
      has_read_ahead_.store(false, std::memory_order_relaxed);
    }
  }

  // Contended when the late start before this one was within kLateWindow.
  void late_start(int64_t now) {
    const int64_t previous = last_late_ns_.exchange(now, std::memory_order_relaxed);
    if (previous > 0 && now - previous < std::chrono::nanoseconds(kLateWindow).count())
      contended_until_ns_.store(now + std::chrono::nanoseconds(kContendedFor).count(), std::memory_order_relaxed);
  }

  void record(std::exception_ptr error) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error_) error_ = error;
  }

  std::vector<std::thread> workers_;
  std::atomic<int> num_workers_{0};  // workers_.size(), for callers outside a region
  // The region's number and its task count in one word, read at once: a worker that sat out a region
  // and reads its number must not pair it with the next region's count (it would run that task twice).
  static constexpr int kCountBits = 16;
  static constexpr uint64_t kCountMask = (uint64_t{1} << kCountBits) - 1;
  const std::function<void(int)>* task_ = nullptr;  // the region's; changes only after its tasks are done
  std::exception_ptr error_;
  std::mutex read_ahead_mutex_;
  std::shared_ptr<ReadAheadJob> read_ahead_;  // under read_ahead_mutex_
  std::atomic<bool> has_read_ahead_{false};
  std::atomic<uint64_t> read_ahead_sink_{0};
  std::atomic<uint64_t> region_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_sleeps_{false};
  std::atomic<int64_t> published_ns_{0};
  std::atomic<int64_t> contended_until_ns_{0};
  std::atomic<int64_t> last_late_ns_{0};  // when a worker last started a task late
  int64_t next_load_check_ns_ = 0;
  int busy_checks_ = 0;  // checks in a row that saw more runnable threads than awake ones
  std::mutex mutex_;
  std::condition_variable wake_;  // workers: a new region
  std::condition_variable done_;  // the caller: its region's tasks are done
};

// Never destroyed: its detached workers may still be waiting when the process exits. A forked child
// has none of the parent's threads, so it starts a pool of its own (the parent's is left alone: its
// mutex may have been held at the fork).
std::atomic<ThreadPool*> pool{nullptr};
std::once_flag fork_handler;

// Called under run_in_parallel's lock: one thread at a time creates the pool.
ThreadPool& get_pool() {
  std::call_once(fork_handler, [] { pthread_atfork(nullptr, nullptr, [] { pool.store(nullptr); }); });
  if (pool.load() == nullptr) pool.store(new ThreadPool());
  return *pool.load();
}

thread_local bool in_region = false;

}  // namespace

void read_while_idle(std::vector<ReadAhead> ranges, std::shared_ptr<const void> owner) {
  ThreadPool* p = pool.load();  // no pool yet: no workers to read anything
  if (p != nullptr && !in_region) p->read_ahead(std::move(ranges), std::move(owner));
}

void run_in_parallel(int n, const std::function<void(int)>& fn) {
  if (n <= 1 || in_region) {
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  static std::mutex one_region_at_a_time;  // callers on several threads (a user's own threads) take turns
  std::lock_guard<std::mutex> lock(one_region_at_a_time);
  get_pool().run(n, [&](int i) {
    struct Region {
      Region() { in_region = true; }
      ~Region() { in_region = false; }
    } region;
    fn(i);
  });
}

}  // namespace pagedlm::cpu
