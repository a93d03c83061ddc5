// Sampling over [rows, vocab] logits without materialising fp32 copies, a softmax, a sort or
// vocab-many random numbers per row:
// * argmax_logprob: greedy, the first index of the maximum and its log-probability,
//   logit - logsumexp = -log(sum(exp(x - max))), in one read of the logits;
// * argmax: argmax_logprob's token alone, without the exp pass of its log-sum;
// * top_logprobs: a given token's log-probability by the same formula, (x - max) + -log(sum(exp(x -
//   max))), its rank, and the k largest log-probabilities, ties in token order, without a
//   log-softmax in memory;
// * sample: temperature, top-k, top-p and min-p reduce each row to the tokens whose tempered
//   probability reaches a threshold (found by a radix select over the float bits, among the few
//   entries near the top one first), and one uniform number per row picks among them by inverse CDF
//   in token order (vectorised sums over chunks, then the crossing chunk token by token);
// * apply_token_bitmask: -inf, in place, for the tokens a structured output's bitmask leaves out,
//   skipping the words that allow all 32 of theirs.
#include "vec.h"

#include "../checks.h"
#include "aligned_vector.h"
#include "dispatch.h"
#include "ops.h"
#include "parallel.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace pagedlm::cpu {
namespace {

template <typename T>
int64_t first_index_of(const T* x, int64_t n, float value) {
  const fVec v(value);
  int64_t i = 0;
  for (; i + kVecLen <= n; i += kVecLen) {
    const int not_equal = (load_fp32(x + i) == v).zero_mask();
    if (not_equal != (1 << kVecLen) - 1) return i + __builtin_ctz(~not_equal);
  }
  for (; i < n; ++i) {
    if (static_cast<float>(x[i]) == value) return i;
  }
  return n - 1;  // unreachable for a row without NaN
}

// torch.argmax's choice in a row with no softmax (a NaN, or an infinite maximum): the first NaN,
// else the first index of the maximum. max_of's `max` misses a NaN past its vector part.
template <typename T>
int64_t first_index_without_softmax(const T* x, int64_t n, float max) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(static_cast<float>(x[i]))) return i;
  }
  return first_index_of(x, n, max);
}

// Whether a row whose max_of is `max` has a softmax (neg_log_sum is not NaN), without the log-sum: a
// finite maximum, and no NaN in the tail past max_of's vector part, which its `max` does not see.
template <typename T>
bool has_softmax(const T* x, int64_t n, float max) {
  if (!std::isfinite(max)) return false;
  for (int64_t i = n - n % kVecLen; i < n; ++i) {
    if (std::isnan(static_cast<float>(x[i]))) return false;
  }
  return true;
}

template <typename T>
float sum_exp(const T* x, int64_t n, float max) {
  const fVec mv(max);
  fVec acc(0.f);
  int64_t i = 0;
  for (; i + kVecLen <= n; i += kVecLen) acc = acc + (load_fp32(x + i) - mv).exp_u20();
  float s = hsum(acc);
  for (; i < n; ++i) s += std::exp(static_cast<float>(x[i]) - max);
  return s;
}

// -log(sum(exp(x - max))), or NaN for a row with no softmax (a NaN, or an infinite maximum), as every
// sampling op reports such a row (exp_u20 takes NaN to +inf, which alone would give -inf).
template <typename T>
float neg_log_sum(const T* x, int64_t n, float max) {
  const float s = -std::log(sum_exp(x, n, max));
  return std::isfinite(max) && std::isfinite(s) ? s : std::numeric_limits<float>::quiet_NaN();
}

// A row's maximum, whether it has a softmax, and -log(sum(exp(x - max))) (NaN without a softmax)
// where `with_log_sum`, else 0: without it the exp pass is skipped and has_softmax tells the same
// rows apart.
struct RowMax {
  float max;
  float neg_log_sum;
  bool softmax;
};

template <typename T>
RowMax row_max(const T* x, int64_t n, bool with_log_sum) {
  const float max = max_of(x, n);
  if (!with_log_sum) return {max, 0.f, has_softmax(x, n, max)};
  const float nls = neg_log_sum(x, n, max);
  return {max, nls, !std::isnan(nls)};
}

// Unnormalised tempered probabilities p[i] = exp(x[i] / t - max / t), computed as torch computes
// exp(x / t - max(x / t)) (the same vectorised exp), so the top token has p = 1.
template <typename T>
void tempered_probs(const T* x, int64_t n, float max, float t, float* p) {
  const fVec tv(t), mv(max / t);
  for (int64_t i = 0; i < n; i += kVecLen) {
    const int len = static_cast<int>(std::min<int64_t>(kVecLen, n - i));
    store_fp32(p + i, (load_fp32(x + i, len) / tv - mv).exp(), len);
  }
}

// Positive floats order like their bit patterns; the top bits (exponent and 2 mantissa bits) of a
// value in [0, 1] pick one of these buckets.
constexpr int kBucketShift = 21;
constexpr int kBuckets = (0x3f800000 >> kBucketShift) + 1;

inline int bucket_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return static_cast<int>(bits >> kBucketShift);
}

// The largest threshold v such that the entries of p (in [0, 1]) that are >= v and >= floor weigh
// at least `goal`, where an entry weighs 1 (counting, for top-k) or its value (for top-p); false
// when even all of them weigh less. A histogram pass finds the bucket the threshold lies in; only
// that bucket's entries are sorted.
template <bool kByValue>
bool threshold_in(const float* p, int64_t n, float floor, double goal, AlignedVector<float>& scratch, float& threshold) {
  std::array<double, kBuckets> weight{};
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] >= floor) weight[bucket_of(p[i])] += kByValue ? p[i] : 1.0;
  }
  double above = 0;
  int b = kBuckets - 1;
  for (; b >= 0 && above + weight[b] < goal; --b) above += weight[b];
  if (b < 0) return false;
  scratch.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] >= floor && bucket_of(p[i]) == b) scratch.push_back(p[i]);
  }
  if (scratch.empty()) {  // goal <= 0: nothing needs to be cut
    threshold = floor;
    return true;
  }
  std::sort(scratch.begin(), scratch.end(), std::greater<float>());
  threshold = scratch.back();
  for (const float v : scratch) {
    above += kByValue ? v : 1.0;
    if (above >= goal) {
      threshold = v;
      break;
    }
  }
  return true;
}

// The entries of p [n] at or above `cut`, in token order, into `out`.
void entries_from(const float* p, int64_t n, float cut, AlignedVector<float>& out) {
  out.clear();
  const fVec cv(cut);
  int64_t i = 0;
  for (; i + kVecLen <= n; i += kVecLen) {
    for (int above = ~(fVec::loadu(p + i) >= cv).zero_mask() & ((1 << kVecLen) - 1); above; above &= above - 1) {
      out.push_back(p[i + __builtin_ctz(above)]);
    }
  }
  for (; i < n; ++i) {
    if (p[i] >= cut) out.push_back(p[i]);
  }
}

// threshold_in over all of p, floor when not reached. Most entries of a row are tiny: those at or
// above a cut (a power of two, so a bucket boundary: the buckets it keeps are whole and weigh what
// they weigh over all of p) are taken out in one vector pass, and the threshold is searched among
// them; when they weigh less than the goal, among those above a lower cut, then among all entries
// at or above floor.
template <bool kByValue>
float threshold_from_top(const float* p, int64_t n, float floor, double goal, AlignedVector<float>& candidates,
                         AlignedVector<float>& scratch) {
  float threshold = floor;
  for (const float cut : {0x1p-12f, 0x1p-24f, 0.f}) {
    entries_from(p, n, std::max(floor, cut), candidates);
    if (threshold_in<kByValue>(candidates.data(), static_cast<int64_t>(candidates.size()), floor, goal, scratch,
                               threshold) || floor >= cut) {
      break;
    }
  }
  return threshold;
}

// The kept entries (>= threshold) of p[begin, end) summed in double: 16 lanes, each over every
// 16th entry (GCC vector types: two vectors of 8 doubles), then the lanes in order.
typedef float Floats8 __attribute__((vector_size(32)));
typedef double Doubles8 __attribute__((vector_size(64)));
constexpr int64_t kMassChunk = 512;

double chunk_mass(const float* p, int64_t begin, int64_t end, float threshold) {
  Doubles8 low = {}, high = {};
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    Floats8 a, b;
    std::memcpy(&a, p + i, sizeof a);
    std::memcpy(&b, p + i + 8, sizeof b);
    low += __builtin_convertvector(a >= threshold ? a : 0.f, Doubles8);
    high += __builtin_convertvector(b >= threshold ? b : 0.f, Doubles8);
  }
  double sum = 0;
  for (int j = 0; j < 8; ++j) sum += low[j];
  for (int j = 0; j < 8; ++j) sum += high[j];
  for (; i < end; ++i) sum += p[i] >= threshold ? p[i] : 0.f;
  return sum;
}

// The kept mass as the sum of kMassChunk-entry chunks, one after another: inverse_cdf adds the
// same chunk sums, so its running total reaches this one bit for bit.
double kept_mass(const float* p, int64_t n, float threshold) {
  double total = 0;
  for (int64_t c = 0; c < n; c += kMassChunk) total += chunk_mass(p, c, std::min(c + kMassChunk, n), threshold);
  return total;
}

// The first token (in token order) at which the cumulative kept mass exceeds target: whole chunks
// while they stay below it, then the crossing chunk's entries one by one (where rounding leaves
// that walk short of the chunk's sum, on to the next chunk); the last token that weighs anything
// if target is at or above the total.
int64_t inverse_cdf(const float* p, int64_t n, float threshold, double target) {
  double acc = 0;
  for (int64_t c = 0; c < n; c += kMassChunk) {
    const int64_t end = std::min(c + kMassChunk, n);
    const double mass = chunk_mass(p, c, end, threshold);
    if (acc + mass <= target) {
      acc += mass;
      continue;
    }
    for (int64_t i = c; i < end; ++i) {
      if (p[i] < threshold) continue;
      acc += p[i];
      if (acc > target) return i;
    }
  }
  int64_t last = n - 1;
  while (last > 0 && !(p[last] >= threshold && p[last] > 0.f)) --last;
  return last;
}

struct RowParams {
  float temperature;  // 0: greedy
  int64_t top_k;      // >= vocab: off
  float top_p;        // 1: off
  float min_p;        // 0: off
  float uniform;      // in [0, 1)
};

template <typename T>
int64_t sample_row(const T* x, int64_t n, float max, const RowParams& row, AlignedVector<float>& p,
                   AlignedVector<float>& candidates, AlignedVector<float>& scratch) {
  if (row.temperature == 0.f) return first_index_of(x, n, max);
  p.resize(n);
  // A maximum that overflows once tempered (tempering would make inf - inf, every p NaN) leaves
  // every token below it a probability that underflows to 0: the tokens at the maximum, alike.
  if (std::isfinite(max / row.temperature)) {
    tempered_probs(x, n, max, row.temperature, p.data());
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(x[i]) == max ? 1.f : 0.f;
  }
  // Hugging Face's warper order: top-k, then top-p over what top-k kept, then min-p (relative to
  // the top token, whose p is 1, so it does not depend on the others).
  float threshold = 0.f;
  if (row.top_k < n) {
    threshold = threshold_from_top<false>(p.data(), n, 0.f, static_cast<double>(row.top_k), candidates, scratch);
  }
  if (row.top_p < 1.f) {
    const double goal = static_cast<double>(row.top_p) * kept_mass(p.data(), n, threshold);
    threshold = threshold_from_top<true>(p.data(), n, threshold, goal, candidates, scratch);
  }
  threshold = std::max(threshold, row.min_p);
  return inverse_cdf(p.data(), n, threshold, static_cast<double>(row.uniform) * kept_mass(p.data(), n, threshold));
}

// Entries of a row's top k: better = larger log-probability, then smaller token id.
struct Entry {
  float logprob;
  int64_t id;
};
inline bool better(const Entry& a, const Entry& b) { return a.logprob > b.logprob || (a.logprob == b.logprob && a.id < b.id); }

// Ranks token t of row x [n] and fills its top k (top/ids, k entries each); returns t's log-probability.
template <typename T>
float rank_and_top(const T* x, int64_t n, int64_t t, int64_t k, int64_t& rank, float* top, int64_t* ids,
                   std::vector<Entry>& heap) {
  const float max = max_of(x, n);
  const float nls = neg_log_sum(x, n, max);
  if (std::isnan(nls)) {  // no softmax
    for (int64_t j = 0; j < k; ++j) top[j] = std::numeric_limits<float>::quiet_NaN(), ids[j] = j;
    rank = 1;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float chosen = (static_cast<float>(x[t]) - max) + nls;
  const fVec mv(max), nv(nls), cv(chosen);
  heap.clear();  // a heap under `better`: its front is the worst of the best k so far
  int64_t at_least = 0;  // entries at least as likely as the token: its rank, as vLLM counts it
  for (int64_t i = 0; i < n; i += kVecLen) {
    const int len = static_cast<int>(std::min<int64_t>(kVecLen, n - i));
    const int valid = (1 << len) - 1;
    const fVec v = (load_fp32(x + i, len) - mv) + nv;
    at_least += __builtin_popcount(~(v >= cv).zero_mask() & valid);
    if (k == 0) continue;
    // Entries come in token order, so one equal to the worst kept loses the tie: only a larger one enters.
    int candidates = static_cast<int>(heap.size()) < k ? valid
                                                        : ~(v > fVec(heap.front().logprob)).zero_mask() & valid;
    if (candidates == 0) continue;
    float lanes[kVecLen];
    v.store(lanes);
    for (; candidates; candidates &= candidates - 1) {
      const int j = __builtin_ctz(candidates);
      const Entry e{lanes[j], i + j};
      if (static_cast<int64_t>(heap.size()) < k) {
        heap.push_back(e);
        std::push_heap(heap.begin(), heap.end(), better);
      } else if (better(e, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), better);
        heap.back() = e;
        std::push_heap(heap.begin(), heap.end(), better);
      }
    }
  }
  std::sort_heap(heap.begin(), heap.end(), better);  // best first
  for (int64_t j = 0; j < k; ++j) top[j] = heap[j].logprob, ids[j] = heap[j].id;
  rank = std::max<int64_t>(at_least, 1);
  return chosen;
}

}  // namespace

void top_logprobs(const at::Tensor& logits, const at::Tensor& token_ids, at::Tensor& logprobs, at::Tensor& ranks,
                  at::Tensor& top_logprobs, at::Tensor& top_ids) {
  check_top_logprobs(logits, token_ids, logprobs, ranks, top_logprobs, top_ids);
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0), k = top_logprobs.size(1);
  const int64_t* tokens = token_ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(tokens[r] >= 0 && tokens[r] < vocab, "token_ids[", r, "] = ", tokens[r], " is not in [0, ", vocab, ")");
  }
  float* lp = logprobs.data_ptr<float>();
  int64_t* rk = ranks.data_ptr<int64_t>();
  float* top = top_logprobs.data_ptr<float>();
  int64_t* ids = top_ids.data_ptr<int64_t>();
  PAGEDLM_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "top_logprobs", [&] {
    const auto* x = logits.data_ptr<scalar_t>();
    parallel_for(0, rows, grain_for(vocab), [&](int64_t lo, int64_t hi) {
      std::vector<Entry> heap;
      for (int64_t r = lo; r < hi; ++r)
        lp[r] = rank_and_top(x + r * stride, vocab, tokens[r], k, rk[r], top + r * k, ids + r * k, heap);
    });
  });
}

void sample(const at::Tensor& logits, const at::Tensor& temperatures, const at::Tensor& top_ks,
            const at::Tensor& top_ps, const at::Tensor& min_ps, const at::Tensor& uniforms, at::Tensor& token_ids,
            const std::optional<at::Tensor>& logprobs) {
  check_sample(logits, temperatures, top_ks, top_ps, min_ps, uniforms, token_ids, logprobs);
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  const float* temps = temperatures.data_ptr<float>();
  const int64_t* ks = top_ks.data_ptr<int64_t>();
  const float* ps = top_ps.data_ptr<float>();
  const float* mins = min_ps.data_ptr<float>();
  const float* us = uniforms.data_ptr<float>();
  // Out-of-range values would break the kernel's invariants (every p in [0, 1], the top token kept).
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(std::isfinite(temps[r]) && temps[r] >= 0.f, "temperatures[", r, "] = ", temps[r],
                ": must be finite and >= 0 (0 = greedy)");
    TORCH_CHECK(ks[r] >= 1, "top_ks[", r, "] = ", ks[r], ": must be >= 1 (>= vocab = off)");
    TORCH_CHECK(ps[r] > 0.f && ps[r] <= 1.f, "top_ps[", r, "] = ", ps[r], ": must be in (0, 1] (1 = off)");
    TORCH_CHECK(mins[r] >= 0.f && mins[r] <= 1.f, "min_ps[", r, "] = ", mins[r], ": must be in [0, 1] (0 = off)");
    TORCH_CHECK(us[r] >= 0.f && us[r] < 1.f, "uniforms[", r, "] = ", us[r], ": must be in [0, 1)");
  }
  int64_t* ids = token_ids.data_ptr<int64_t>();
  float* lp = logprobs ? logprobs->data_ptr<float>() : nullptr;
  PAGEDLM_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sample", [&] {
    const auto* x = logits.data_ptr<scalar_t>();
    parallel_for(0, rows, grain_for(vocab), [&](int64_t lo, int64_t hi) {
      AlignedVector<float> p, candidates, scratch;
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = x + r * stride;
        const RowMax m = row_max(row, vocab, lp != nullptr);
        // A row with no softmax has no distribution: greedy's token, as for temperature 0.
        ids[r] = m.softmax ? sample_row(row, vocab, m.max, RowParams{temps[r], ks[r], ps[r], mins[r], us[r]}, p,
                                        candidates, scratch)
                           : first_index_without_softmax(row, vocab, m.max);
        if (lp) lp[r] = (static_cast<float>(row[ids[r]]) - m.max) + m.neg_log_sum;
      }
    });
  });
}

namespace {

// argmax_logprob and argmax: each row's first maximum (torch.argmax's token in a row without a
// softmax), and its -log(sum(exp(x - max))) into lp unless lp is null.
void greedy_rows(const at::Tensor& logits, int64_t* ids, float* lp) {
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  PAGEDLM_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "argmax", [&] {
    const auto* x = logits.data_ptr<scalar_t>();
    parallel_for(0, rows, grain_for(vocab), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = x + r * stride;
        const RowMax m = row_max(row, vocab, lp != nullptr);
        ids[r] = m.softmax ? first_index_of(row, vocab, m.max) : first_index_without_softmax(row, vocab, m.max);
        if (lp) lp[r] = m.neg_log_sum;
      }
    });
  });
}

}  // namespace

void argmax_logprob(const at::Tensor& logits, at::Tensor& token_ids, at::Tensor& logprobs) {
  check_argmax_logprob(logits, token_ids, logprobs);
  greedy_rows(logits, token_ids.data_ptr<int64_t>(), logprobs.data_ptr<float>());
}

void argmax(const at::Tensor& logits, at::Tensor& token_ids) {
  check_argmax(logits, token_ids);
  greedy_rows(logits, token_ids.data_ptr<int64_t>(), nullptr);
}

void apply_token_bitmask(at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask) {
  check_apply_token_bitmask(logits, rows, bitmask);
  const int64_t n = rows.size(0), vocab = logits.size(1), stride = logits.stride(0), words = bitmask.size(1);
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(row_ids[i] >= 0 && row_ids[i] < logits.size(0), "rows[", i, "] = ", row_ids[i], ": must be in [0, ",
                logits.size(0), ")");
  }
  const auto* bits = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  PAGEDLM_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "apply_token_bitmask", [&] {
    auto* x = logits.data_ptr<scalar_t>();
    const auto neg_inf = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
    parallel_for(0, n, grain_for(vocab), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        scalar_t* row = x + row_ids[i] * stride;
        const uint32_t* mask = bits + i * words;
        for (int64_t w = 0; w * 32 < vocab; ++w) {
          const int end = static_cast<int>(std::min<int64_t>(32, vocab - w * 32));
          uint32_t left_out = ~mask[w] & (end == 32 ? ~0u : (1u << end) - 1);
          scalar_t* chunk = row + w * 32;
          if (left_out == ~0u) {
            std::fill(chunk, chunk + 32, neg_inf);
            continue;
          }
          for (; left_out; left_out &= left_out - 1) chunk[__builtin_ctz(left_out)] = neg_inf;
        }
      }
    });
  });
}

}  // namespace pagedlm::cpu
