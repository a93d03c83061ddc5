// Cache writes (copies, or conversions into an fp8 cache) and whole-block copies (word copies).

#include <cassert>
#include <cstdint>
#include <type_traits>

#include "dtype.cuh"
#include "launchers.h"

namespace pagedlm::cuda {
namespace {

template <typename T, typename C>
__device__ __forceinline__ C to_cache(T x, float inv_scale) {
  if constexpr (std::is_same_v<T, C>) {
    return x;
  } else {
    return from_float<C>(to_float(x) * inv_scale);
  }
}

template <typename T, typename C>
__global__ void reshape_and_cache_kernel(const T* key, const T* value, C* key_cache, C* value_cache,
                                         const int64_t* slot_mapping, int64_t num_slots, int num_kv_heads,
                                         int head_size, int block_size, int64_t key_stride0,
                                         int64_t key_stride1, int64_t value_stride0, int64_t value_stride1,
                                         float inv_k_scale, float inv_v_scale) {
  const int token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;
  assert(slot < num_slots);  // checked here, not on the host: reading slot_mapping there would sync
  const int64_t block = slot / block_size, offset = slot % block_size;
  for (int i = threadIdx.x; i < num_kv_heads * head_size; i += blockDim.x) {
    const int head = i / head_size, d = i % head_size;
    const int64_t dst = ((block * num_kv_heads + head) * block_size + offset) * head_size + d;
    key_cache[dst] = to_cache<T, C>(key[token * key_stride0 + head * key_stride1 + d], inv_k_scale);
    value_cache[dst] = to_cache<T, C>(value[token * value_stride0 + head * value_stride1 + d], inv_v_scale);
  }
}

// Block (pair, cache) copies block `pairs[2 * pair]` to `pairs[2 * pair + 1]` of that cache; pairs
// on the grid's x dimension, which holds more than y's 65,535.
__global__ void copy_blocks_kernel(const int64_t* cache_addresses, const int64_t* pairs, int64_t block_words) {
  int4* cache = reinterpret_cast<int4*>(cache_addresses[blockIdx.y]);
  const int4* src = cache + pairs[2 * blockIdx.x] * block_words;
  int4* dst = cache + pairs[2 * blockIdx.x + 1] * block_words;
  for (int64_t i = threadIdx.x; i < block_words; i += blockDim.x) dst[i] = src[i];
}

}  // namespace

cudaError_t launch_reshape_and_cache(const void* key, const void* value, void* key_cache, void* value_cache,
                                     const int64_t* slot_mapping, int64_t num_slots, int num_tokens,
                                     int num_kv_heads, int head_size,
                                     int block_size, const int64_t key_stride[2], const int64_t value_stride[2],
                                     DType dtype, DType cache_dtype, float inv_k_scale, float inv_v_scale,
                                     cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int threads = min(512, num_kv_heads * head_size);
  return dispatch_dtype_and_cache(dtype, cache_dtype, [&](auto t, auto c) {
    using T = decltype(t);
    using C = decltype(c);
    reshape_and_cache_kernel<T, C><<<num_tokens, threads, 0, stream>>>(
        static_cast<const T*>(key), static_cast<const T*>(value), static_cast<C*>(key_cache),
        static_cast<C*>(value_cache), slot_mapping, num_slots, num_kv_heads, head_size, block_size, key_stride[0],
        key_stride[1], value_stride[0], value_stride[1], inv_k_scale, inv_v_scale);
    return cudaGetLastError();
  });
}

cudaError_t launch_copy_blocks(const int64_t* cache_addresses, int num_caches, const int64_t* pairs, int num_pairs,
                               int64_t block_bytes, cudaStream_t stream) {
  if (num_caches == 0 || num_pairs == 0) return cudaSuccess;
  if (block_bytes % sizeof(int4) != 0) return cudaErrorInvalidValue;
  if (num_caches > 65535) return cudaErrorInvalidValue;
  copy_blocks_kernel<<<dim3(num_pairs, num_caches), 256, 0, stream>>>(cache_addresses, pairs,
                                                                      block_bytes / sizeof(int4));
  return cudaGetLastError();
}

}  // namespace pagedlm::cuda
