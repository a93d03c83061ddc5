// Cache writes (copies, or conversions into an fp8 cache) and whole-block copies (byte copies).
#include "vec.h"  // first: selects ATen's vector width

#include "../checks.h"
#include "dispatch.h"
#include "ops.h"
#include "parallel.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace pagedlm::cpu {
namespace {

// x as an fp8 entry: saturated at the largest finite value, then rounded to nearest even (NaN stays
// NaN), as torch's x.clamp(-max, max).to(C).
template <typename C>
inline C to_fp8_entry(float x) {
  static_assert(is_fp8<C>);
  const float max = static_cast<float>(std::numeric_limits<C>::max());
  return C(std::clamp(x, -max, max));
}

// n entries x of a key or value row into cache entries: copied for the model's dtypes, x * inv_scale
// (inv_scale = 1 / k_scale or 1 / v_scale, rounded to fp32) for fp8. With `stream`, a copied row of
// whole 64-byte lines at a line boundary goes out in streaming stores, which the caller fences
// (_mm_sfence) before its task ends.
template <typename T, typename C>
inline void write_row(C* dst, const T* src, int64_t n, float inv_scale, bool stream) {
  if constexpr (std::is_same_v<T, C>) {
    const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
#if defined(CPU_CAPABILITY_AVX512)
    if (stream && bytes % 64 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
      auto* out = reinterpret_cast<char*>(dst);
      const auto* in = reinterpret_cast<const char*>(src);
      for (int64_t b = 0; b < bytes; b += 64) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(out + b), _mm512_loadu_si512(in + b));
      }
      return;
    }
#endif
    std::memcpy(dst, src, bytes);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_fp8_entry<C>(static_cast<float>(src[i]) * inv_scale);
  }
}

template <typename T, typename C>
void write_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                 const int64_t* slot, double k_scale, double v_scale) {
  const int64_t num_heads = key.size(1), block_size = key_cache.size(2), num_slots = key_cache.size(0) * block_size;
  const int64_t D = key.size(2);
  const int64_t k_stride0 = key.stride(0), k_stride1 = key.stride(1);
  const int64_t v_stride0 = value.stride(0), v_stride1 = value.stride(1);
  const float inv_k = 1.f / static_cast<float>(k_scale), inv_v = 1.f / static_cast<float>(v_scale);
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  C* kc = key_cache.data_ptr<C>();
  C* vc = value_cache.data_ptr<C>();
  const int64_t tokens = key.size(0);
  parallel_for(0, tokens, grain_for(2 * num_heads * D), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      if (slot[t] < 0) continue;
      TORCH_CHECK(slot[t] < num_slots, "slot ", slot[t], " is outside the cache");
      const int64_t block = slot[t] / block_size, offset = slot[t] % block_size;
      // A lone token (a decode) writes a cold line of its sequence's last block in every layer, which
      // an ordinary store would first read from memory: it streams (reshape_and_cache at 112 decodes
      // 3.4x faster). A prompt's run of slots stores as usual, so that prefill reads it from cache
      // (streamed, 4 long prompts took 1.5-2% longer).
      const bool lone = (t == 0 || slot[t - 1] != slot[t] - 1) && (t + 1 == tokens || slot[t + 1] != slot[t] + 1);
      for (int64_t h = 0; h < num_heads; ++h) {
        const int64_t dst = ((block * num_heads + h) * block_size + offset) * D;
        write_row(kc + dst, k + t * k_stride0 + h * k_stride1, D, inv_k, lone);
        write_row(vc + dst, v + t * v_stride0 + h * v_stride1, D, inv_v, lone);
      }
    }
#if defined(CPU_CAPABILITY_AVX512)
    _mm_sfence();
#endif
  });
}

}  // namespace

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping, double k_scale, double v_scale) {
  check_cache_write(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale);
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  PAGEDLM_DISPATCH_FLOATING_TYPES(key.scalar_type(), "reshape_and_cache", [&] {
    dispatch_cache_type<scalar_t>(key_cache.scalar_type(), [&](auto entry) {
      write_cache<scalar_t, decltype(entry)>(key, value, key_cache, value_cache, slots.data_ptr<int64_t>(), k_scale,
                                             v_scale);
    });
  });
}

void copy_blocks(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping) {
  TORCH_CHECK(key_caches.size() == value_caches.size(), "need as many key caches as value caches");
  if (key_caches.empty()) return;
  std::vector<at::Tensor> caches;
  for (size_t layer = 0; layer < key_caches.size(); ++layer) {
    check_cache_pair(key_caches[layer], value_caches[layer]);
    TORCH_CHECK(key_caches[layer].size(0) == key_caches[0].size(0), "all layers must have the same number of blocks");
    caches.push_back(key_caches[layer]);
    caches.push_back(value_caches[layer]);
  }
  const at::Tensor pairs = host_block_pairs(block_mapping, key_caches[0].size(0));
  const int64_t* p = pairs.data_ptr<int64_t>();
  const int64_t n = pairs.size(0);
  parallel_for(0, static_cast<int64_t>(caches.size()) * n, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const at::Tensor& cache = caches[i / n];
      const int64_t j = i % n, block_bytes = cache.stride(0) * cache.element_size();
      char* base = static_cast<char*>(cache.data_ptr());
      std::memcpy(base + p[2 * j + 1] * block_bytes, base + p[2 * j] * block_bytes, block_bytes);
    }
  });
}

}  // namespace pagedlm::cpu
