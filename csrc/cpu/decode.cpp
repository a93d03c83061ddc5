// Decode attention: one query token per sequence over its paged context.
#include "vec.h"  // first: selects ATen's vector width

#include "../checks.h"
#include "amx_attention.h"
#include "bf16_tiles.h"
#include "dispatch.h"
#include "microkernels.h"
#include "ops.h"
#include "paged_kv.h"
#include "parallel.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace pagedlm::cpu {
namespace {

// Contexts are split into partitions (kPartitionSize, merge_partitions) so even a single sequence
// spreads over all threads. Within a partition the softmax is online, block by block.

// A work item: one partition of one sequence, for KV heads [kv_begin, kv_end).
struct Item {
  int seq;
  int part;
  int kv_begin;
  int kv_end;
};

// Reading all KV heads of a block at once turns 4 KiB reads scattered over the cache into
// num_kv_heads times longer contiguous ones, which the memory system streams much faster. Heads are
// split over items only when there would otherwise be too few items to keep every thread busy.
int kv_heads_per_item(int num_kv_heads, int64_t partitions) {
  const int64_t wanted = 4 * int64_t{at::get_num_threads()};
  for (int span = num_kv_heads; span > 1; --span) {
    if (num_kv_heads % span == 0 && partitions * (num_kv_heads / span) >= wanted) return span;
  }
  return 1;
}

// Attention of the query heads of KV heads [kv_begin, kv_end) over tokens [begin, end) of one
// sequence. Per query head i of the item, leaves the unnormalised weighted V sum in acc[i] and the
// max logit and exp-sum in max_out[i], sum_out[i]. query(i) is query head i's row.
template <typename T, typename C, typename Q>
void attend_partition(const PagedKV<C>& kv, const int32_t* table, int kv_begin, int kv_end, int begin, int end,
                      const Q& query, float scale, float soft_cap, int group, float* acc, float* max_out,
                      float* sum_out) {
  const int D = kv.head_size, bs = kv.block_size, heads = (kv_end - kv_begin) * group;
  std::fill(acc, acc + heads * D, 0.f);
  std::fill(max_out, max_out + heads, -std::numeric_limits<float>::infinity());
  std::fill(sum_out, sum_out + heads, 0.f);
#ifdef PAGEDLM_BF16_TILES
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_tiles::supports(D, bs)) {
      using namespace bf16_tiles;
      // A chunk's K rows where a 16-key group's rows are not one bf16 run in the cache (an fp8 cache,
      // blocks of 8), then an fp8 block's V rows, as bf16.
      const bool gathers_keys = is_fp8<C> || bs < kLanes;
      thread_local std::vector<c10::BFloat16> rows;
      rows.resize(kChunk * D + (is_fp8<C> ? bs * D : 0));
      c10::BFloat16* keys = rows.data();
      thread_local std::vector<uint32_t> pairs;  // K transposed [2][D / 2, 16], then V as pairs [16, D]
      pairs.resize(kChunk * D / 2 + kChunkPairs * D);
      uint32_t* kt = pairs.data();
      uint32_t* vp = kt + kChunk * D / 2;
      thread_local std::vector<float> logits_buffer;
      logits_buffer.resize(group * kChunk + group);
      float* logits = logits_buffer.data();  // [group, 32]
      float* corr = logits + group * kChunk;
      thread_local std::vector<c10::BFloat16> p_buffer;
      p_buffer.resize(group * kChunk);
      const auto* pp = reinterpret_cast<const uint32_t*>(p_buffer.data());
#ifdef PAGEDLM_AMX_ATTENTION
      // With AMX both products on tiles (amx_attention.h), up to 16 query heads as a tile's rows.
      std::optional<amx_attention::Tiles> tiles;
      if (amx_attention::enabled()) tiles.emplace(amx_attention::Tiles::kDecode, std::min(group, kLanes));
      const int64_t q_stride = group > 1 ? query(1) - query(0) : D;
#endif
      // Chunk by chunk, all of the item's KV heads of a chunk's blocks together (see kv_heads_per_item).
      for (int c0 = begin / kChunk * kChunk; c0 < end; c0 += kChunk) {
        const int c_end = std::min(c0 + kChunk, end);
        for (int h = kv_begin; h < kv_end; ++h) {
          const int64_t head = h * kv.head_stride();
          auto block_row = [&](int kb) { return table[kb / bs] * kv.block_stride + head; };
          for (int kb = c_end; kb < std::min(c_end + kChunk, end); kb += bs) {
            prefetch(kv.key + block_row(kb), bs, D);
            prefetch(kv.value + block_row(kb), bs, D);
          }
          if (gathers_keys) {
            for (int kb = std::max(c0, begin / bs * bs); kb < c_end; kb += bs) {
              const c10::BFloat16* k = bf16_rows(kv.key + block_row(kb), bs * D, keys + (kb - c0) * D);
              if (k != keys + (kb - c0) * D) std::copy_n(k, bs * D, keys + (kb - c0) * D);
            }
          }
          for (int g = 0; g < 2; ++g) {  // 16 keys' rows each; rows outside [begin, end) are masked
            const int k0 = c0 + g * kLanes;
            if (k0 + kLanes <= begin || k0 >= end) continue;
            const c10::BFloat16* k = keys + g * kLanes * D;
            if constexpr (!is_fp8<C>) {
              if (!gathers_keys) k = kv.key + block_row(k0) + (k0 % bs) * D;
            }
            transpose_keys(k, kLanes, D, kt + g * D / 2 * kLanes);
          }
          pack_chunk_values([&](int kb) { return bf16_rows(kv.value + block_row(kb), bs * D, keys + kChunk * D); },
                            c0, bs, D, begin, end, vp);
          const int i0 = (h - kv_begin) * group;  // the item's query heads of h
#ifdef PAGEDLM_AMX_ATTENTION
          if (tiles) {
            for (int g0 = 0; g0 < group; g0 += kLanes) {
              tiles->use(std::min(kLanes, group - g0));
              amx_attention::key_logits(query(i0 + g0), q_stride, kt, D, logits + g0 * kChunk);
            }
          } else
#endif
          for_each_head_chunk(group, [&](auto ng, int g0) {
            const c10::BFloat16* q[ng()];
            for (int g = 0; g < ng(); ++g) q[g] = query(i0 + g0 + g);
            for (int k = 0; k < 2; ++k)
              logits_by_key<ng()>(q, kt + k * D / 2 * kLanes, D, logits + g0 * kChunk + k * kLanes, kChunk);
          });
          for (int g = 0; g < group; ++g)
            corr[g] = softmax_keys(logits + g * kChunk, std::max(begin, c0) - c0, c_end - c0, scale, soft_cap,
                                   max_out + i0 + g, sum_out + i0 + g, p_buffer.data() + g * kChunk);
#ifdef PAGEDLM_AMX_ATTENTION
          if (tiles) {
            for (int g0 = 0; g0 < group; g0 += kLanes) {
              tiles->use(std::min(kLanes, group - g0));
              amx_attention::values(p_buffer.data() + g0 * kChunk, std::min(kLanes, group - g0), corr + g0, vp, D,
                                    acc + int64_t{i0 + g0} * D);
            }
            continue;
          }
#endif
          values_by_dim(pp, group, corr, vp, D, acc + i0 * D);
        }
      }
      return;
    }
  }
#endif
  thread_local std::vector<float> scratch;
  scratch.resize(heads * D + kMaxHeadChunk * bs);
  float* q = scratch.data();
  float* logits = q + heads * D;
  for (int i = 0; i < heads; ++i) to_fp32_scaled(q + i * D, query(i), scale, D);
  for_each_run(kv, table, kv_begin, kv_end, begin, end, {kv.key, kv.value}, [&](int64_t row, int, int n, int h) {
    const int first = (h - kv_begin) * group;  // the item's query heads reading KV head h
    for_each_head_chunk(group, [&](auto ng, int g) {
      const int i = first + g;
      attend_rows<ng()>(q + i * D, soft_cap, kv.key + row, kv.value + row, n, D, logits, bs, max_out + i,
                        sum_out + i, acc + i * D);
    });
  });
}

template <typename T, typename C>
void decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, double k_scale, double v_scale,
            int64_t sliding_window, double soft_cap) {
  const auto p = make_attention_params<T, C>(out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                                             k_scale, v_scale, sliding_window, soft_cap);
  const int num_seqs = p.num_seqs, num_heads = p.num_heads, D = p.kv.head_size;

  // Partial results of multi-partition sequences: row (first_part[s] + part) * num_heads + head.
  // A sequence's keys are [first_key[s], seq_lens[s]) (with a sliding window, only the window's
  // blocks), in the partitions that range touches.
  std::vector<int> parts(num_seqs), first_key(num_seqs);
  std::vector<int64_t> first_part(num_seqs, -1);
  int64_t num_partials = 0, num_parts = 0;
  for (int s = 0; s < num_seqs; ++s) {
    first_key[s] = p.first_key(p.seq_lens[s] - 1);
    parts[s] = std::max(1, (p.seq_lens[s] - 1) / kPartitionSize - first_key[s] / kPartitionSize + 1);
    if (parts[s] > 1) first_part[s] = num_partials, num_partials += parts[s];
    num_parts += parts[s];
  }
  const int span = kv_heads_per_item(p.num_kv_heads, num_parts);
  std::vector<Item> items;
  for (int s = 0; s < num_seqs; ++s)
    for (int part = 0; part < parts[s]; ++part)
      for (int h = 0; h < p.num_kv_heads; h += span) items.push_back({s, part, h, h + span});
  const at::Tensor partials = at::empty({num_partials * num_heads, D + 2}, query.options().dtype(at::kFloat));
  float* partial_acc = partials.data_ptr<float>();
  float* partial_max = partial_acc + num_partials * num_heads * D;
  float* partial_sum = partial_max + num_partials * num_heads;

  parallel_items(items.size(), [&](int64_t i) {
    const auto [s, part, kv_begin, kv_end] = items[i];
    const int heads = (kv_end - kv_begin) * p.group, h0 = kv_begin * p.group;
    thread_local std::vector<float> scratch;
    scratch.resize(heads * (D + 2));
    auto query = [&](int i) { return p.query_row(s, h0 + i); };
    const int bound = (first_key[s] / kPartitionSize + part) * kPartitionSize;
    const int begin = std::max(first_key[s], bound), end = std::min<int>(p.seq_lens[s], bound + kPartitionSize);
    const int32_t* table = p.block_table(s);
    float* acc = scratch.data();
    float* max = acc + heads * D;
    float* sum = max + heads;
    if (first_part[s] >= 0) {
      const int64_t row = (first_part[s] + part) * num_heads + h0;
      attend_partition<T>(p.kv, table, kv_begin, kv_end, begin, end, query, p.scale, p.soft_cap, p.group,
                       partial_acc + row * D, partial_max + row, partial_sum + row);
      return;
    }
    attend_partition<T>(p.kv, table, kv_begin, kv_end, begin, end, query, p.scale, p.soft_cap, p.group, acc, max, sum);
    for (int h = 0; h < heads; ++h) {
      // An empty context attends to nothing; write zeros rather than 0/0.
      const float inv = sum[h] > 0.f ? p.v_scale / sum[h] : 0.f;
      store_scaled(p.out_row(s, h0 + h), acc + h * D, inv, D);
    }
  });

  if (num_partials == 0) return;
  at::parallel_for(0, int64_t{num_seqs} * num_heads, grain_for(2 * D), [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(D);
    for (int64_t i = lo; i < hi; ++i) {
      const int s = i / num_heads, h = i % num_heads;
      if (first_part[s] < 0) continue;
      const int64_t row = first_part[s] * num_heads + h;
      merge_partitions(p.out_row(s, h), partial_acc + row * D, int64_t{num_heads} * D, partial_max + row,
                       partial_sum + row, num_heads, parts[s], D, p.v_scale, scratch.data());
    }
  });
}

}  // namespace

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                     double scale, int64_t sliding_window, double logits_soft_cap, double k_scale,
                     double v_scale) {
  check_attention(out, query, key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale, sliding_window,
                  logits_soft_cap);
  TORCH_CHECK(query.size(0) == seq_lens.size(0), "paged_attention takes one query row per sequence");
  PAGEDLM_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_attention", [&] {
    dispatch_cache_type<scalar_t>(key_cache.scalar_type(), [&](auto entry) {
      decode<scalar_t, decltype(entry)>(out, query, key_cache, value_cache, block_tables, seq_lens, scale, k_scale,
                                        v_scale, sliding_window, logits_soft_cap);
    });
  });
}

}  // namespace pagedlm::cpu
