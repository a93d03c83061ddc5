#pragma once
// Addressing of one layer's paged KV cache, [num_blocks, num_kv_heads, block_size, head_size], and
// the tensors of one attention call over it.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>

namespace pagedlm::cpu {

template <typename T>
struct PagedKV {
  const T* key;
  const T* value;
  int64_t block_stride;  // num_kv_heads * block_size * head_size
  int block_size;
  int head_size;

  // Distance between the rows of consecutive KV heads within a block.
  int64_t head_stride() const { return int64_t{block_size} * head_size; }
};

// The blocks holding a sequence's first `len` tokens must exist: a bad table entry would otherwise
// read outside the cache.
inline void check_block_table(const int32_t* table, int64_t table_width, int len, int block_size,
                              int64_t num_blocks, int seq) {
  TORCH_CHECK(len >= 0 && len <= table_width * block_size, "seq_lens[", seq, "] does not fit its block table");
  for (int i = 0; i < (len + block_size - 1) / block_size; ++i) {
    TORCH_CHECK(table[i] >= 0 && table[i] < num_blocks, "block_tables[", seq, ", ", i, "] = ", table[i],
                " is not a cache block");
  }
}

// The tensors of one decode or prefill call as pointers and strides (in elements), like CUDA's
// AttentionParams in cuda/launchers.h. Queries and outputs are T; cache entries are C, T itself or
// fp8 (read as entry * k_scale or entry * v_scale).
template <typename T, typename C = T>
struct AttentionParams {
  T* out;
  const T* query;
  PagedKV<C> kv;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  int num_seqs;
  int num_heads;
  int num_kv_heads;
  int group;  // query heads per KV head
  int64_t query_stride[2];  // token, head
  int64_t out_stride[2];
  int64_t table_stride;
  float scale;    // the logits' scale times k_scale: dequantising K is a factor on each logit
  float v_scale;  // likewise a factor on each output
  int sliding_window;  // > 0: a query at position i sees keys (i - sliding_window, i]; 0: all keys up to i
  float soft_cap;      // > 0: logits become soft_cap * tanh(logits / soft_cap)

  const T* query_row(int64_t token, int head) const { return query + token * query_stride[0] + head * query_stride[1]; }
  T* out_row(int64_t token, int head) const { return out + token * out_stride[0] + head * out_stride[1]; }
  const int32_t* block_table(int seq) const { return block_tables + seq * table_stride; }
  // The first key a query at position `pos` sees.
  int first_key(int pos) const { return sliding_window > 0 ? std::max(0, pos - sliding_window + 1) : 0; }
};

// For tensors that passed check_attention; also checks every sequence's block table.
template <typename T, typename C>
AttentionParams<T, C> make_attention_params(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                                            const at::Tensor& seq_lens, double scale, double k_scale, double v_scale,
                                            int64_t sliding_window, double soft_cap) {
  const int num_heads = query.size(1), num_kv_heads = key_cache.size(1);
  const AttentionParams<T, C> p{out.data_ptr<T>(),
                             query.data_ptr<T>(),
                             {key_cache.data_ptr<C>(), value_cache.data_ptr<C>(), key_cache.stride(0),
                              static_cast<int>(key_cache.size(2)), static_cast<int>(query.size(2))},
                             block_tables.data_ptr<int32_t>(),
                             seq_lens.data_ptr<int32_t>(),
                             static_cast<int>(seq_lens.size(0)),
                             num_heads,
                             num_kv_heads,
                             num_heads / num_kv_heads,
                             {query.stride(0), query.stride(1)},
                             {out.stride(0), out.stride(1)},
                             block_tables.stride(0),
                             static_cast<float>(scale * k_scale),
                             static_cast<float>(v_scale),
                             static_cast<int>(std::min<int64_t>(sliding_window, INT32_MAX)),
                             static_cast<float>(soft_cap)};
  for (int s = 0; s < p.num_seqs; ++s) {
    check_block_table(p.block_table(s), block_tables.size(1), p.seq_lens[s], p.kv.block_size, key_cache.size(0), s);
  }
  return p;
}

// Blocks are scattered over the cache, which defeats the hardware prefetcher at every block
// boundary; asking for the next block while computing on this one keeps memory busy (~25% faster
// decode on the dev machine). Into L2 (locality 2) measured a few percent faster than into L1 there;
// on the AMX machine decode's bf16 chunks read 5-13% faster with locality 1 (prefetcht2), whose
// requests held the core's fill buffers less (the AMX prefill asks for none: its keys are in L2).
template <int Locality = 2, typename T>
inline void prefetch(const T* rows, int count, int head_size) {
  const char* p = reinterpret_cast<const char*>(rows);
  const int64_t bytes = int64_t{count} * head_size * sizeof(T);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, Locality);
}

// Cache rows asked for a few lines at a time between the steps of a computation instead of in one
// burst: each prefetch holds an L1 fill buffer until its line arrives from memory, so a burst takes
// them all and the computation's own loads from L2 wait behind it (decode ~10% slower on the AMX
// Xeon). Ranges past kMaxRanges are asked for at once.
class PrefetchQueue {
 public:
  template <typename T>
  void add(const T* rows, int count, int head_size) {
    if (size_ == kMaxRanges) return prefetch<1>(rows, count, head_size);
    const char* begin = reinterpret_cast<const char*>(rows);
    ranges_[size_++] = {begin, begin + int64_t{count} * head_size * sizeof(T)};
  }
  // The next `lines` 64-byte lines, with locality 1 (see prefetch). A range's lines go out from a
  // local pointer: stepping ranges_[next_].first itself line by line made each prefetch wait for
  // the previous one's store (~30% of decode attention's samples with its K/V in cache).
  void issue(int lines) {
    while (lines > 0 && next_ < size_) {
      const char* p = ranges_[next_].first;
      const char* end = ranges_[next_].second;
      const int n = static_cast<int>(std::min<int64_t>(lines, (end - p + 63) / 64));
      for (int i = 0; i < n; ++i) __builtin_prefetch(p + int64_t{i} * 64, 0, 1);
      lines -= n;
      p += int64_t{n} * 64;
      if (p >= end) {
        ++next_;
      } else {
        ranges_[next_].first = p;
      }
    }
  }
  // Everything not yet asked for; the queue is then empty.
  void drain() {
    issue(std::numeric_limits<int>::max());
    size_ = next_ = 0;
  }

 private:
  static constexpr int kMaxRanges = 64;
  std::pair<const char*, const char*> ranges_[kMaxRanges];
  int size_ = 0, next_ = 0;
};

// Walks tokens [begin, end) of a sequence in runs that share a block and, within a run, KV heads
// [head_begin, head_end): fn(rows, t, n, h) gets the cache offset of token t's row for KV head h,
// where n rows follow contiguously. Before each call, the same head's rows of the next run are
// requested from the `prefetched` caches, which spreads the prefetches over the computation.
template <typename T, typename F>
inline void for_each_run(const PagedKV<T>& kv, const int32_t* table, int head_begin, int head_end, int begin, int end,
                         std::initializer_list<const T*> prefetched, const F& fn) {
  const int bs = kv.block_size;
  for (int t = begin; t < end;) {
    const int n = std::min(end, (t / bs + 1) * bs) - t;
    const int64_t row = table[t / bs] * kv.block_stride + (t % bs) * kv.head_size;
    const int64_t next = t + n < end ? table[t / bs + 1] * kv.block_stride : -1;
    for (int h = head_begin; h < head_end; ++h) {
      if (next >= 0) {
        for (const T* cache : prefetched)
          prefetch(cache + next + h * kv.head_stride(), std::min(bs, end - t - n), kv.head_size);
      }
      fn(row + h * kv.head_stride(), t, n, h);
    }
    t += n;
  }
}

}  // namespace pagedlm::cpu
