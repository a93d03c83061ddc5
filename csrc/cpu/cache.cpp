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

namespace {

// One cache to copy blocks within or between; block i is the contiguous cache[i].
struct BlockSpan {
  const char* src;
  char* dst;
  int64_t block_bytes;
};

void copy_pairs(const std::vector<BlockSpan>& spans, const at::Tensor& pairs) {
  const int64_t* p = pairs.data_ptr<int64_t>();
  const int64_t n = pairs.size(0);
  at::parallel_for(0, static_cast<int64_t>(spans.size()) * n, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const BlockSpan& c = spans[i / n];
      const int64_t j = i % n;
      std::memcpy(c.dst + p[2 * j + 1] * c.block_bytes, c.src + p[2 * j] * c.block_bytes, c.block_bytes);
    }
  });
}

BlockSpan span(const at::Tensor& src, const at::Tensor& dst) {
  return {static_cast<const char*>(src.data_ptr()), static_cast<char*>(dst.data_ptr()),
          src.stride(0) * src.element_size()};
}

}  // namespace

void copy_blocks(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping) {
  TORCH_CHECK(key_caches.size() == value_caches.size(), "need as many key caches as value caches");
  if (key_caches.empty()) return;
  std::vector<BlockSpan> spans;
  for (size_t layer = 0; layer < key_caches.size(); ++layer) {
    check_cache_pair(key_caches[layer], value_caches[layer]);
    TORCH_CHECK(key_caches[layer].size(0) == key_caches[0].size(0), "all layers must have the same number of blocks");
    spans.push_back(span(key_caches[layer], key_caches[layer]));
    spans.push_back(span(value_caches[layer], value_caches[layer]));
  }
  const int64_t num_blocks = key_caches[0].size(0);
  copy_pairs(spans, host_block_pairs(block_mapping, num_blocks, num_blocks));
}

void swap_blocks(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  check_block_caches(src, dst);
  copy_pairs({span(src, dst)}, host_block_pairs(block_mapping, src.size(0), dst.size(0)));
}

}  // namespace pagedlm::cpu
