// Decode attention: one query token per sequence over its paged context.
#include "vec.h"  // first: selects ATen's vector width

#include "../checks.h"
#include "dispatch.h"
#include "microkernels.h"
#include "ops.h"
#include "paged_kv.h"
#include "parallel.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
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
// sequence (q: [heads, head_size], fp32, pre-scaled; q_raw: see attend_rows). Per query head i of
// the item, leaves the unnormalised weighted V sum in acc[i] and the max logit and exp-sum in
// max_out[i], sum_out[i].
template <typename T>
void attend_partition(const PagedKV<T>& kv, const int32_t* table, int kv_begin, int kv_end, int begin, int end,
                      const float* q, const T* q_raw, float scale, float soft_cap, int group, float* logits,
                      float* acc, float* max_out, float* sum_out) {
  const int D = kv.head_size, heads = (kv_end - kv_begin) * group;
  std::fill(acc, acc + heads * D, 0.f);
  std::fill(max_out, max_out + heads, -std::numeric_limits<float>::infinity());
  std::fill(sum_out, sum_out + heads, 0.f);
  for_each_run(kv, table, kv_begin, kv_end, begin, end, {kv.key, kv.value}, [&](int64_t row, int, int n, int h) {
    const int first = (h - kv_begin) * group;  // the item's query heads reading KV head h
    for_each_head_chunk(group, [&](auto ng, int g) {
      const int i = first + g;
      attend_rows<ng()>(q + i * D, q_raw ? q_raw + i * D : nullptr, scale, soft_cap, kv.key + row, kv.value + row, n, D,
                        logits, kv.block_size, max_out + i, sum_out + i, acc + i * D);
    });
  });
}

template <typename T>
void decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
            const at::Tensor& block_tables, const at::Tensor& seq_lens, float scale, int64_t sliding_window,
            double soft_cap) {
  const auto p = make_attention_params<T>(out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                                          sliding_window, soft_cap);
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
    scratch.resize(heads * (2 * D + 2) + kMaxHeadChunk * p.kv.block_size);
    float* q = scratch.data();
    for (int h = 0; h < heads; ++h) to_fp32_scaled(q + h * D, p.query_row(s, h0 + h), p.scale, D);
    const T* q_raw = raw_queries(p.query_row(s, h0), p.query_stride[0], 1, p.query_stride[1], heads, D);
    const int bound = (first_key[s] / kPartitionSize + part) * kPartitionSize;
    const int begin = std::max(first_key[s], bound), end = std::min<int>(p.seq_lens[s], bound + kPartitionSize);
    const int32_t* table = p.block_table(s);
    float* acc = q + heads * D;
    float* max = acc + heads * D;
    float* sum = max + heads;
    float* logits = sum + heads;
    if (first_part[s] >= 0) {
      const int64_t row = (first_part[s] + part) * num_heads + h0;
      attend_partition(p.kv, table, kv_begin, kv_end, begin, end, q, q_raw, p.scale, p.soft_cap, p.group, logits,
                       partial_acc + row * D, partial_max + row, partial_sum + row);
      return;
    }
    attend_partition(p.kv, table, kv_begin, kv_end, begin, end, q, q_raw, p.scale, p.soft_cap, p.group, logits, acc, max, sum);
    for (int h = 0; h < heads; ++h) {
      // An empty context attends to nothing; write zeros rather than 0/0.
      const float inv = sum[h] > 0.f ? 1.f / sum[h] : 0.f;
      store_scaled(p.out_row(s, h0 + h), acc + h * D, inv, D);
    }
  });

  if (num_partials == 0) return;
  at::parallel_for(0, int64_t{num_seqs} * num_heads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(D);
    for (int64_t i = lo; i < hi; ++i) {
      const int s = i / num_heads, h = i % num_heads;
      if (first_part[s] < 0) continue;
      const int64_t row = first_part[s] * num_heads + h;
      merge_partitions(p.out_row(s, h), partial_acc + row * D, int64_t{num_heads} * D, partial_max + row,
                       partial_sum + row, num_heads, parts[s], D, scratch.data());
    }
  });
}

}  // namespace

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                     double scale, int64_t sliding_window, double logits_soft_cap) {
  check_attention(out, query, key_cache, value_cache, block_tables, seq_lens, sliding_window, logits_soft_cap);
  TORCH_CHECK(query.size(0) == seq_lens.size(0), "paged_attention takes one query row per sequence");
  PAGEDLM_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_attention", [&] {
    decode<scalar_t>(out, query, key_cache, value_cache, block_tables, seq_lens, static_cast<float>(scale),
                     sliding_window, logits_soft_cap);
  });
}

}  // namespace pagedlm::cpu
