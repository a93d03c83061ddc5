// Rotary position embedding, rotate-half ("neox") style as in Hugging Face's Llama, in place on
// query and key rows (views into the fused QKV buffer). Rounding follows HF's eager
// `x * cos + rotate_half(x) * sin` in the model dtype: each product, then the sum, is rounded.
#include "vec.h"

#include "../checks.h"
#include "dispatch.h"
#include "ops.h"
#include "parallel.h"

namespace pagedlm::cpu {
namespace {

template <typename T>
void rotate_heads(T* x, int64_t num_heads, int64_t head_stride, const T* cos, const T* sin, int64_t half) {
  for (int64_t h = 0; h < num_heads; ++h) {
    T* x1 = x + h * head_stride;
    T* x2 = x1 + half;
    for (int64_t i = 0; i < half; i += kVecLen) {
      const int n = static_cast<int>(std::min<int64_t>(kVecLen, half - i));
      const fVec a = load_fp32(x1 + i, n), b = load_fp32(x2 + i, n);
      const fVec c = load_fp32(cos + i, n), s = load_fp32(sin + i, n);
      store_fp32(x1 + i, round_to<T>(a * c) - round_to<T>(b * s), n);
      store_fp32(x2 + i, round_to<T>(b * c) + round_to<T>(a * s), n);
    }
  }
}

}  // namespace

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos_sin_cache) {
  check_rotary(positions, query, key, cos_sin_cache);
  const at::Tensor pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t tokens = query.size(0), half = cos_sin_cache.size(1) / 2, max_position = cos_sin_cache.size(0);
  const int64_t work = (query.size(1) + key.size(1)) * query.size(2);
  PAGEDLM_DISPATCH_FLOATING_TYPES(query.scalar_type(), "rotary_embedding", [&] {
    auto* q = query.data_ptr<scalar_t>();
    auto* k = key.data_ptr<scalar_t>();
    const auto* table = cos_sin_cache.data_ptr<scalar_t>();
    parallel_for(0, tokens, grain_for(work), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        TORCH_CHECK(p[t] >= 0 && p[t] < max_position, "position ", p[t], " is outside the rotary table");
        const scalar_t* cos = table + p[t] * 2 * half;
        rotate_heads(q + t * query.stride(0), query.size(1), query.stride(1), cos, cos + half, half);
        rotate_heads(k + t * key.stride(0), key.size(1), key.stride(1), cos, cos + half, half);
      }
    });
  });
}

}  // namespace pagedlm::cpu
