// Decode attention: one query token per sequence over its paged context.
#include "vec.h"  // first: selects ATen's vector width

#include "../checks.h"
#include "aligned_vector.h"
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

#ifdef PAGEDLM_BF16_TILES
// Queues the K and V rows of keys [from, to) of KV heads [kv_begin, kv_end), block by block, then head
// by head (the cache's order), in runs of up to 16 rows; `from` is rounded down to a run, and the
// stale rows past `to` are not asked for (a sequence's last block is half stale on average).
template <typename C>
void queue_rows(PrefetchQueue& queue, const PagedKV<C>& kv, const int32_t* table, int kv_begin, int kv_end, int from,
                int to) {
  const int bs = kv.block_size, run = std::min(bs, bf16_tiles::kLanes);
  for (int kb = from / run * run; kb < to; kb += run) {
    const int rows = std::min(run, to - kb);
    for (int h = kv_begin; h < kv_end; ++h) {
      const int64_t row = table[kb / bs] * kv.block_stride + h * kv.head_stride() + (kb % bs) * kv.head_size;
      queue.add(kv.key + row, rows, kv.head_size);
      queue.add(kv.value + row, rows, kv.head_size);
    }
  }
}
#endif

// Attention of the query heads of KV heads [kv_begin, kv_end) over tokens [begin, end) of one
// sequence. Per query head i of the item, leaves the unnormalised weighted V sum in acc[i] and the
// max logit and exp-sum in max_out[i], sum_out[i]. query(i) is query head i's row. On the bf16
// tiles, queue_next(queue) queues the rows of the thread's next item, asked for during the last chunk.
template <typename T, typename C, typename Q, typename N>
void attend_partition(const PagedKV<C>& kv, const int32_t* table, int kv_begin, int kv_end, int begin, int end,
                      const Q& query, float scale, float soft_cap, int group, float* acc, float* max_out,
                      float* sum_out, const N& queue_next) {
  const int D = kv.head_size, bs = kv.block_size, heads = (kv_end - kv_begin) * group;
  std::fill(acc, acc + heads * D, 0.f);
  std::fill(max_out, max_out + heads, -std::numeric_limits<float>::infinity());
  std::fill(sum_out, sum_out + heads, 0.f);
#ifdef PAGEDLM_BF16_TILES
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_tiles::supports(D, bs)) {
      using namespace bf16_tiles;
      // A chunk's K rows where a 16-key group's rows are not one bf16 run in the cache (an fp8 cache,
      // blocks of 8), then in an fp8 cache the chunk's V rows of the item's KV heads, as bf16.
      const bool gathers_keys = is_fp8<C> || bs < kLanes;
      const int kv_heads = kv_end - kv_begin;
      thread_local AlignedVector<c10::BFloat16> rows;
      rows.resize(kChunk * D + (is_fp8<C> ? kv_heads * kChunk * D : 0));
      c10::BFloat16* keys = rows.data();
      c10::BFloat16* values = keys + kChunk * D;  // [kv_heads][kChunk][D]
#ifdef PAGEDLM_AMX_ATTENTION
      // With AMX both products on tiles (amx_attention.h): Q·K with a block's K rows as they are in the
      // cache and up to 16 query heads' pairs, P·V with up to 16 query heads as a tile's rows.
      std::optional<amx_attention::Tiles> tiles;
      if (amx_attention::enabled()) tiles.emplace(amx_attention::Tiles::kDecode, std::min(group, kLanes));
      const bool amx = tiles.has_value();
#else
      constexpr bool amx = false;
#endif
      // Query heads in blocks of 16 on AMX (Q·K's logits come out keys x 16 heads), else as they are.
      const int head_blocks = (group + kLanes - 1) / kLanes, padded_group = amx ? head_blocks * kLanes : group;
      // Per KV head of the item: V as pairs [16, D] for AMX's P·V, else K transposed [2][D / 2, 16] for
      // the vector Q·K.
      const int64_t head_pairs = amx ? kChunkPairs * D : kChunk * D / 2;
      thread_local AlignedVector<uint32_t> pairs;
      pairs.resize(kv_heads * head_pairs);
      // AMX: the query heads' pairs, [kv_heads][head_blocks][D / 2, 16].
      thread_local AlignedVector<uint32_t> query_pairs;
      query_pairs.resize(amx ? kv_heads * head_blocks * D / 2 * kLanes : 0);
      thread_local AlignedVector<float> logits_buffer;
      const int64_t logits_size = int64_t{kv_heads} * padded_group * kChunk;
      logits_buffer.resize((amx ? 2 : 1) * logits_size + heads);
      float* logits = logits_buffer.data();  // [kv_heads][padded_group][32]
      float* key_major = logits + logits_size;  // AMX: [kv_heads][head_blocks][2][16 keys, 16 heads]
      float* corr = logits_buffer.data() + logits_buffer.size() - heads;
      auto logits_row = [&](int i) { return logits + (i / group * padded_group + i % group) * kChunk; };
      thread_local AlignedVector<c10::BFloat16> p_buffer;
      p_buffer.resize(heads * kChunk);
      const auto* pp = reinterpret_cast<const uint32_t*>(p_buffer.data());
      if (amx) {
        for (int b = 0; b < kv_heads * head_blocks; ++b) {
          const int i0 = b / head_blocks * group + b % head_blocks * kLanes;
          pack_queries([&](int m) { return query(i0 + m); }, std::min(kLanes, group - b % head_blocks * kLanes), kLanes,
                       D, query_pairs.data() + int64_t{b} * D / 2 * kLanes);
        }
      }
      // Where the vector P·V takes V's pairs from its rows, the pack stage's share of the next
      // chunk's prefetches goes to the P·V stage.
      const int pv_lines = amx ? 1 : 1 + kChunk / bs;
      // Chunk by chunk, all of the item's KV heads of a chunk's blocks together (see kv_heads_per_item),
      // in stages over those heads: K (AMX: Q·K on the rows as the cache holds them, 3% faster than on K
      // transposed first; else K transposed), V (converted from fp8, and packed in pairs for AMX's P·V;
      // the vector P·V pairs V's rows in registers, which measured 3-8% faster with the K/V in cache
      // and the same from memory), the logits (AMX: transposed to query heads x keys; else Q·K),
      // softmax, P.V. Each stage's results are then in memory well before the next stage reads them
      // (the tile stores and vector loads between them would otherwise wait on each other, head after
      // head). The next chunk's rows are asked for a few lines after each step of each stage.
      PrefetchQueue next_chunk;
      const int lines_per_step = 12 * D / 64;  // ~2/3 of a SmolLM2 chunk spread, the rest at its start
      for (int c0 = begin / kChunk * kChunk; c0 < end; c0 += kChunk) {
        const int c_end = std::min(c0 + kChunk, end);
        auto block_row = [&](int kb, int h) { return table[kb / bs] * kv.block_stride + h * kv.head_stride(); };
        auto head_pairs_of = [&](int h) { return pairs.data() + (h - kv_begin) * head_pairs; };
        next_chunk.drain();
        if (c_end < end) {
          queue_rows(next_chunk, kv, table, kv_begin, kv_end, c_end, std::min(c_end + kChunk, end));
        } else {
          queue_next(next_chunk);
        }
        // Block by block, then head by head: the cache's own order, in which the hardware prefetcher
        // follows the reads.
        for (int g = 0; g < 2; ++g) {  // 16 keys' rows each; rows outside [begin, end) are masked
          const int k0 = c0 + g * kLanes;
          if (k0 + kLanes <= begin || k0 >= end) continue;
          for (int h = kv_begin; h < kv_end; ++h) {
            const c10::BFloat16* k = keys;
            if constexpr (!is_fp8<C>) {
              if (!gathers_keys) k = kv.key + block_row(k0, h) + (k0 % bs) * D;
            }
            if (gathers_keys) {
              // A run of the group's rows: a whole block, or the group's half of a 32-key block.
              const int run = std::min(bs, kLanes);
              for (int kb = k0; kb < k0 + kLanes; kb += run) {
                if (kb + run <= begin || kb >= end) continue;
                const auto* cached = kv.key + block_row(kb, h) + (kb % bs) * D;
                const c10::BFloat16* rows_kb = bf16_rows(cached, run * D, keys + (kb - k0) * D);
                if (rows_kb != keys + (kb - k0) * D) std::copy_n(rows_kb, run * D, keys + (kb - k0) * D);
              }
            }
            // Rows past the sequence's end are stale and masked: read as zeros, not from memory.
            const int n = std::min(kLanes, end - k0);
            if (!amx) {
              transpose_keys(k, n, D, head_pairs_of(h) + g * D / 2 * kLanes);
            } else {
#ifdef PAGEDLM_AMX_ATTENTION
              if (n < kLanes) {
                if (k != keys) std::copy_n(k, n * D, keys);
                std::fill(keys + n * D, keys + kLanes * D, c10::BFloat16(0.f));
                k = keys;
              }
              for (int b = 0; b < head_blocks; ++b) {
                const int kb = (h - kv_begin) * head_blocks + b;
                amx_attention::key_logits(k, query_pairs.data() + int64_t{kb} * D / 2 * kLanes, D,
                                          key_major + (kb * 2 + g) * kLanes * kLanes);
              }
#endif
            }
            next_chunk.issue(lines_per_step);
          }
        }
        // The V rows of KV head h from chunk row r on, as bf16.
        auto value_rows = [&](int h, int r) -> const c10::BFloat16* {
          if constexpr (is_fp8<C>) {
            return values + ((h - kv_begin) * kChunk + r) * D;
          } else {
            return kv.value + block_row(c0 + r, h) + (c0 + r) % bs * D;
          }
        };
        if (is_fp8<C> || amx) {
          for (int kb = c0; kb < c0 + kChunk; kb += bs) {
            const int first = std::clamp(begin - kb, 0, bs), last = std::clamp(end - kb, 0, bs);
            for (int h = kv_begin; h < kv_end; ++h) {
              if constexpr (is_fp8<C>) {
                if (first < last) bf16_rows(kv.value + block_row(kb, h), bs * D, values + ((h - kv_begin) * kChunk + kb - c0) * D);
              }
              if (amx) {
                pack_values(first < last ? value_rows(h, kb - c0) : nullptr, bs, D, first, last,
                            head_pairs_of(h) + (kb - c0) / 2 * D);
                next_chunk.issue(lines_per_step);
              }
            }
          }
        }
        for (int h = kv_begin; h < kv_end; ++h) {
          if (amx) {
            for (int b = 0; b < head_blocks; ++b) {
              const int kb = (h - kv_begin) * head_blocks + b;
              for (int g = 0; g < 2; ++g) {
                const auto* in = reinterpret_cast<const uint32_t*>(key_major + (kb * 2 + g) * kLanes * kLanes);
                auto* out = reinterpret_cast<uint32_t*>(logits + kb * kLanes * kChunk + g * kLanes);
                transpose_16x16(in, kLanes, kLanes, out, kChunk);
              }
            }
            next_chunk.issue(lines_per_step);
            continue;
          }
          const int i0 = (h - kv_begin) * group;  // the item's query heads of h
          for_each_head_chunk(group, [&](auto ng, int g0) {
            const c10::BFloat16* q[ng()];
            for (int g = 0; g < ng(); ++g) q[g] = query(i0 + g0 + g);
            logits_by_key<ng()>(q, head_pairs_of(h), D, logits + (i0 + g0) * kChunk, kChunk);
          });
          next_chunk.issue(lines_per_step);
        }
        for (int i = 0; i < heads; ++i) {
          corr[i] = softmax_keys(logits_row(i), std::max(begin, c0) - c0, c_end - c0, scale, soft_cap,
                                 max_out + i, sum_out + i, p_buffer.data() + i * kChunk);
          next_chunk.issue(lines_per_step);
        }
        for (int h = kv_begin; h < kv_end; ++h) {
          const int i0 = (h - kv_begin) * group;
#ifdef PAGEDLM_AMX_ATTENTION
          if (tiles) {
            const uint32_t* vp = head_pairs_of(h);
            for (int g0 = 0; g0 < group; g0 += kLanes) {
              tiles->use(std::min(kLanes, group - g0));
              amx_attention::values(p_buffer.data() + (i0 + g0) * kChunk, std::min(kLanes, group - g0), corr + i0 + g0,
                                    vp, D, acc + int64_t{i0 + g0} * D);
              next_chunk.issue(lines_per_step);
            }
            continue;
          }
#endif
          // The chunk's V rows of KV head h, nullptr outside [begin, end): one block-table lookup a
          // block (a division by the block size a row took ~10% of the kernel's samples, K/V in cache).
          const c10::BFloat16* v_rows[kChunk];
          for (int kb = c0; kb < c0 + kChunk; kb += bs) {
            const int first = std::clamp(begin - kb, 0, bs), last = std::clamp(end - kb, 0, bs);
            const c10::BFloat16* rows = first < last ? value_rows(h, kb - c0) : nullptr;
            for (int r = 0; r < bs; ++r) v_rows[kb - c0 + r] = first <= r && r < last ? rows + r * D : nullptr;
          }
          for_each_head_chunk(group, [&](auto ng, int g0) {
            values_by_dim<ng()>(pp + (i0 + g0) * kChunkPairs, corr + i0 + g0, [&](int r) { return v_rows[r]; }, D,
                                acc + int64_t{i0 + g0} * D);
          });
          next_chunk.issue(pv_lines * lines_per_step);
        }
      }
      return;
    }
  }
#endif
  thread_local AlignedVector<float> scratch;
  scratch.resize(heads * D + group * bs + 2 * bs * D);
  float* q = scratch.data();
  float* logits = q + heads * D;  // [group, bs]
  float* kv_rows = logits + group * bs;  // a run's K and V rows in fp32
  for (int i = 0; i < heads; ++i) to_fp32_scaled(q + i * D, query(i), scale, D);
  for_each_run(kv, table, kv_begin, kv_end, begin, end, {kv.key, kv.value}, [&](int64_t row, int, int n, int h) {
    const int i = (h - kv_begin) * group;  // the item's query heads reading KV head h
    auto attend = [&](const auto* k, const auto* v) {
      with_head_size(D, [&](auto d) {
        attend_rows(q + i * D, group, soft_cap, k, v, n, d, logits, bs, max_out + i, sum_out + i, acc + i * D);
      });
    };
    // One query head reads the rows once: converting them first cost it ~20% (bf16, 16 heads of 64).
    if (group == 1) return attend(kv.key + row, kv.value + row);
    attend(fp32_rows(kv.key + row, int64_t{n} * D, kv_rows), fp32_rows(kv.value + row, int64_t{n} * D, kv_rows + bs * D));
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

  // An item's keys: [begin, end) of its partition.
  auto key_range = [&](const Item& item) {
    const int bound = (first_key[item.seq] / kPartitionSize + item.part) * kPartitionSize;
    return std::pair{std::max(first_key[item.seq], bound), std::min<int>(p.seq_lens[item.seq], bound + kPartitionSize)};
  };
  parallel_items(items.size(), [&](int64_t i, int64_t after) {
    const auto [s, part, kv_begin, kv_end] = items[i];
    const int heads = (kv_end - kv_begin) * p.group, h0 = kv_begin * p.group;
    thread_local AlignedVector<float> scratch;
    scratch.resize(heads * (D + 2));
    auto query = [&](int i) { return p.query_row(s, h0 + i); };
    const auto [begin, end] = key_range(items[i]);
    const int32_t* table = p.block_table(s);
    // The first chunk of the thread's next item, so that it does not start by waiting on memory.
    auto queue_next = [&](PrefetchQueue& queue) {
#ifdef PAGEDLM_BF16_TILES
      if (after < 0) return;
      const Item& next = items[after];
      const auto [next_begin, next_end] = key_range(next);
      queue_rows(queue, p.kv, p.block_table(next.seq), next.kv_begin, next.kv_end, next_begin,
                 std::min(next_end, next_begin / bf16_tiles::kChunk * bf16_tiles::kChunk + bf16_tiles::kChunk));
#endif
    };
    float* acc = scratch.data();
    float* max = acc + heads * D;
    float* sum = max + heads;
    if (first_part[s] >= 0) {
      const int64_t row = (first_part[s] + part) * num_heads + h0;
      attend_partition<T>(p.kv, table, kv_begin, kv_end, begin, end, query, p.scale, p.soft_cap, p.group,
                       partial_acc + row * D, partial_max + row, partial_sum + row, queue_next);
      return;
    }
    attend_partition<T>(p.kv, table, kv_begin, kv_end, begin, end, query, p.scale, p.soft_cap, p.group, acc, max, sum,
                        queue_next);
    for (int h = 0; h < heads; ++h) {
      // An empty context attends to nothing; write zeros rather than 0/0.
      const float inv = sum[h] > 0.f ? p.v_scale / sum[h] : 0.f;
      store_scaled(p.out_row(s, h0 + h), acc + h * D, inv, D);
    }
  });

  if (num_partials == 0) return;
  parallel_for(0, int64_t{num_seqs} * num_heads, grain_for(2 * D), [&](int64_t lo, int64_t hi) {
    AlignedVector<float> scratch(D);
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
  check_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale, k_scale, v_scale,
                  sliding_window, logits_soft_cap);
  TORCH_CHECK(query.size(0) == seq_lens.size(0), "paged_attention takes one query row per sequence");
  PAGEDLM_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_attention", [&] {
    dispatch_cache_type<scalar_t>(key_cache.scalar_type(), [&](auto entry) {
      decode<scalar_t, decltype(entry)>(out, query, key_cache, value_cache, block_tables, seq_lens, scale, k_scale,
                                        v_scale, sliding_window, logits_soft_cap);
    });
  });
}

}  // namespace pagedlm::cpu
