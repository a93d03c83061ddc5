// Cache writes and whole-block copies. All are dtype-agnostic byte copies.
#include "../checks.h"
#include "ops.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace pagedlm::cpu {

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_cache_write(key, value, key_cache, value_cache, slot_mapping);
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_heads = key.size(1), block_size = key_cache.size(2), num_slots = key_cache.size(0) * block_size;
  const int64_t elem = key.element_size(), row_bytes = key.size(2) * elem;
  const int64_t k_stride0 = key.stride(0), k_stride1 = key.stride(1);
  const int64_t v_stride0 = value.stride(0), v_stride1 = value.stride(1);
  const auto* k = static_cast<const char*>(key.data_ptr());
  const auto* v = static_cast<const char*>(value.data_ptr());
  auto* kc = static_cast<char*>(key_cache.data_ptr());
  auto* vc = static_cast<char*>(value_cache.data_ptr());
  at::parallel_for(0, key.size(0), 16, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      if (slot[t] < 0) continue;
      TORCH_CHECK(slot[t] < num_slots, "slot ", slot[t], " is outside the cache");
      const int64_t block = slot[t] / block_size, offset = slot[t] % block_size;
      for (int64_t h = 0; h < num_heads; ++h) {
        const int64_t dst = ((block * num_heads + h) * block_size + offset) * row_bytes;
        std::memcpy(kc + dst, k + (t * k_stride0 + h * k_stride1) * elem, row_bytes);
        std::memcpy(vc + dst, v + (t * v_stride0 + h * v_stride1) * elem, row_bytes);
      }
    }
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
  at::parallel_for(0, static_cast<int64_t>(caches.size()) * n, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const at::Tensor& cache = caches[i / n];
      const int64_t j = i % n, block_bytes = cache.stride(0) * cache.element_size();
      char* base = static_cast<char*>(cache.data_ptr());
      std::memcpy(base + p[2 * j + 1] * block_bytes, base + p[2 * j] * block_bytes, block_bytes);
    }
  });
}

}  // namespace pagedlm::cpu
