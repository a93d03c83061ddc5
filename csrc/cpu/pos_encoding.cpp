// Rotary position embedding, rotate-half ("neox") style as in Hugging Face's Llama, in place on
// query and key rows (views into the fused QKV buffer). Rounding follows HF's eager
// `x * cos + rotate_half(x) * sin` in the model dtype: each product, then the sum, is rounded; with
// a float32 table (OLMo 2/3 keep cos and sin in fp32) it all runs in fp32, rounded once.
#include "vec.h"

#include "../checks.h"
#include "dispatch.h"
#include "ops.h"
#include "parallel.h"

#include <type_traits>

namespace pagedlm::cpu {
namespace {

// Rounds a product to T where the table is in T (HF's products in the model dtype).
template <typename T, typename Table>
fVec product(const fVec& v) {
  if constexpr (std::is_same_v<Table, float>) return v;
  else return round_to<T>(v);
}

template <typename T, typename Table>
void rotate_heads(T* x, int64_t num_heads, int64_t head_stride, const Table* cos, const Table* sin, int64_t half) {
  for (int64_t h = 0; h < num_heads; ++h) {
    T* x1 = x + h * head_stride;
    T* x2 = x1 + half;
    for (int64_t i = 0; i < half; i += kVecLen) {
      const int n = static_cast<int>(std::min<int64_t>(kVecLen, half - i));
      const fVec a = load_fp32(x1 + i, n), b = load_fp32(x2 + i, n);
      const fVec c = load_fp32(cos + i, n), s = load_fp32(sin + i, n);
      store_fp32(x1 + i, product<T, Table>(a * c) - product<T, Table>(b * s), n);
      store_fp32(x2 + i, product<T, Table>(b * c) + product<T, Table>(a * s), n);
    }
  }
}

template <typename T, typename Table>
void rotate_tokens(const int64_t* p, at::Tensor& query, at::Tensor& key, const at::Tensor& cos_sin_cache) {
  const int64_t tokens = query.size(0), half = cos_sin_cache.size(1) / 2, max_position = cos_sin_cache.size(0);
  const int64_t work = (query.size(1) + key.size(1)) * query.size(2);
  auto* q = query.data_ptr<T>();
  auto* k = key.data_ptr<T>();
  const auto* table = cos_sin_cache.data_ptr<Table>();
  parallel_for(0, tokens, grain_for(work), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      TORCH_CHECK(p[t] >= 0 && p[t] < max_position, "position ", p[t], " is outside the rotary table");
      const Table* cos = table + p[t] * 2 * half;
      rotate_heads(q + t * query.stride(0), query.size(1), query.stride(1), cos, cos + half, half);
      rotate_heads(k + t * key.stride(0), key.size(1), key.stride(1), cos, cos + half, half);
    }
  });
}

}  // namespace

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos_sin_cache) {
  check_rotary(positions, query, key, cos_sin_cache);
  const at::Tensor pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  PAGEDLM_DISPATCH_FLOATING_TYPES(query.scalar_type(), "rotary_embedding", [&] {
    if (cos_sin_cache.scalar_type() == at::kFloat) {
      rotate_tokens<scalar_t, float>(p, query, key, cos_sin_cache);
    } else {
      rotate_tokens<scalar_t, scalar_t>(p, query, key, cos_sin_cache);
    }
  });
}

}  // namespace pagedlm::cpu
