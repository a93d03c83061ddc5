// Cache writes and whole-block copies; all are dtype-agnostic word copies.

#include <cstdint>

#include "launchers.h"

namespace pagedlm::cuda {
namespace {

template <typename Word>
__global__ void reshape_and_cache_kernel(const Word* key, const Word* value, Word* key_cache, Word* value_cache,
                                         const int64_t* slot_mapping, int num_kv_heads, int head_size,
                                         int block_size, int64_t key_stride0, int64_t key_stride1,
                                         int64_t value_stride0, int64_t value_stride1) {
  const int token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;
  const int64_t block = slot / block_size, offset = slot % block_size;
  for (int i = threadIdx.x; i < num_kv_heads * head_size; i += blockDim.x) {
    const int head = i / head_size, d = i % head_size;
    const int64_t dst = ((block * num_kv_heads + head) * block_size + offset) * head_size + d;
    key_cache[dst] = key[token * key_stride0 + head * key_stride1 + d];
    value_cache[dst] = value[token * value_stride0 + head * value_stride1 + d];
  }
}

// Block (cache, pair) copies block `pairs[2 * pair]` to `pairs[2 * pair + 1]` of that cache.
__global__ void copy_blocks_kernel(const int64_t* cache_addresses, const int64_t* pairs, int64_t block_words) {
  int4* cache = reinterpret_cast<int4*>(cache_addresses[blockIdx.x]);
  const int4* src = cache + pairs[2 * blockIdx.y] * block_words;
  int4* dst = cache + pairs[2 * blockIdx.y + 1] * block_words;
  for (int64_t i = threadIdx.x; i < block_words; i += blockDim.x) dst[i] = src[i];
}

}  // namespace

cudaError_t launch_reshape_and_cache(const void* key, const void* value, void* key_cache, void* value_cache,
                                     const int64_t* slot_mapping, int num_tokens, int num_kv_heads, int head_size,
                                     int block_size, const int64_t key_stride[2], const int64_t value_stride[2],
                                     int elem_bytes, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int threads = min(512, num_kv_heads * head_size);
  auto launch = [&](auto word) {
    using Word = decltype(word);
    reshape_and_cache_kernel<Word><<<num_tokens, threads, 0, stream>>>(
        static_cast<const Word*>(key), static_cast<const Word*>(value), static_cast<Word*>(key_cache),
        static_cast<Word*>(value_cache), slot_mapping, num_kv_heads, head_size, block_size, key_stride[0],
        key_stride[1], value_stride[0], value_stride[1]);
    return cudaGetLastError();
  };
  switch (elem_bytes) {
    case 2: return launch(uint16_t{});
    case 4: return launch(uint32_t{});
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_copy_blocks(const int64_t* cache_addresses, int num_caches, const int64_t* pairs, int num_pairs,
                               int64_t block_bytes, cudaStream_t stream) {
  if (num_caches == 0 || num_pairs == 0) return cudaSuccess;
  if (block_bytes % sizeof(int4) != 0) return cudaErrorInvalidValue;
  copy_blocks_kernel<<<dim3(num_caches, num_pairs), 256, 0, stream>>>(cache_addresses, pairs,
                                                                      block_bytes / sizeof(int4));
  return cudaGetLastError();
}

}  // namespace pagedlm::cuda
