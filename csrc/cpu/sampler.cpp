// Greedy sampling in one read of the logits: per row, the first index of the maximum and its
// log-probability, logit - logsumexp = -log(sum(exp(x - max))), without materialising an fp32
// copy or a log-softmax of a [rows, vocab] matrix.
#include "vec.h"

#include "../checks.h"
#include "dispatch.h"
#include "ops.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace pagedlm::cpu {
namespace {

template <typename T>
float row_max(const T* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= kVecLen) {
    fVec mv = load_fp32(x);
    for (i = kVecLen; i + kVecLen <= n; i += kVecLen) mv = at::vec::maximum(mv, load_fp32(x + i));
    m = hmax(mv);
  }
  for (; i < n; ++i) m = std::max(m, static_cast<float>(x[i]));
  return m;
}

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

}  // namespace

void argmax_logprob(const at::Tensor& logits, at::Tensor& token_ids, at::Tensor& logprobs) {
  check_argmax_logprob(logits, token_ids, logprobs);
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  int64_t* ids = token_ids.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  PAGEDLM_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "argmax_logprob", [&] {
    const auto* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = x + r * stride;
        const float max = row_max(row, vocab);
        ids[r] = first_index_of(row, vocab, max);
        lp[r] = -std::log(sum_exp(row, vocab, max));
      }
    });
  });
}

}  // namespace pagedlm::cpu
