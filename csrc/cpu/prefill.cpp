// Causal varlen attention over the paged cache: the prompt rows of each sequence (possibly after a
// context that is already cached) attend to every cached token up to their own position.
#include "vec.h"  // first: selects ATen's vector width

#include "../checks.h"
#include "dispatch.h"
#include "microkernels.h"
#include "ops.h"
#include "paged_kv.h"
#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace pagedlm::cpu {
namespace {

// Query rows per work item: every K/V block is converted once and reused by all rows of the tile
// and all heads of the KV-head group.
constexpr int kQueryTile = 32;

struct Tile {
  int seq;
  int kv_head;
  int row0;  // first query row of the tile within its sequence
  int rows;
  int64_t cost;
};

template <typename T>
void prefill(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
             const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
             float scale, int64_t sliding_window, double soft_cap) {
  const auto p = make_attention_params<T>(out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                                          sliding_window, soft_cap);
  const int D = p.kv.head_size, group = p.group, bs = p.kv.block_size;
  const int32_t* starts = cu_seqlens_q.data_ptr<int32_t>();

  std::vector<Tile> tiles;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_len = starts[s + 1] - starts[s];
    TORCH_CHECK(q_len >= 0 && q_len <= p.seq_lens[s], "sequence ", s, " has more query rows than cached tokens");
    const int context = p.seq_lens[s] - q_len;
    for (int r0 = 0; r0 < q_len; r0 += kQueryTile) {
      const int rows = std::min(kQueryTile, q_len - r0);
      const int keys = context + r0 + rows, window = p.sliding_window > 0 ? p.sliding_window + rows : keys;
      for (int h = 0; h < p.num_kv_heads; ++h) tiles.push_back({s, h, r0, rows, int64_t{rows} * std::min(keys, window)});
    }
  }
  TORCH_CHECK(tiles.empty() || starts[p.num_seqs] <= query.size(0), "cu_seqlens_q exceeds the query rows");
  // Longest first, so the last tiles handed out are short ones.
  std::sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.cost > b.cost; });

  parallel_items(tiles.size(), [&](int64_t i) {
    const Tile tile = tiles[i];
    const int M = tile.rows * group;  // query vectors, row-major over (row, head in group)
    // Row r sits at position first_pos + r and sees keys first_key(first_pos + r) ..= first_pos + r,
    // in the partitions [part_lo, part_hi] (see kPartitionSize); each partition has its own softmax
    // state per query vector: acc [M, D], max [M], exp-sum [M].
    const int first_pos = p.seq_lens[tile.seq] - (starts[tile.seq + 1] - starts[tile.seq]) + tile.row0;
    const int last_pos = first_pos + tile.rows - 1;
    const int part_lo = p.first_key(first_pos) / kPartitionSize, part_hi = last_pos / kPartitionSize;
    const int64_t state_size = int64_t{M} * (D + 2);
    thread_local std::vector<float> scratch;
    scratch.resize(M * D + kMaxHeadChunk * bs + D + (part_hi - part_lo + 1) * state_size);
    float* q = scratch.data();
    float* logits = q + M * D;  // [kMaxHeadChunk, bs]
    float* merged = logits + kMaxHeadChunk * bs;  // [D]
    float* states = merged + D;

    const int64_t token0 = starts[tile.seq] + tile.row0;
    const int h0 = tile.kv_head * group;
    for (int r = 0; r < tile.rows; ++r)
      for (int g = 0; g < group; ++g)
        to_fp32_scaled(q + (r * group + g) * D, p.query_row(token0 + r, h0 + g), p.scale, D);
    const T* q_raw = raw_queries(p.query_row(token0, h0), p.query_stride[0], tile.rows, p.query_stride[1], group, D);

    for (int part = part_lo; part <= part_hi; ++part) {
      float* acc = states + (part - part_lo) * state_size;
      float* row_max = acc + M * D;
      float* row_sum = row_max + M;
      std::fill(acc, acc + M * D, 0.f);
      std::fill(row_max, row_max + M, -std::numeric_limits<float>::infinity());
      std::fill(row_sum, row_sum + M, 0.f);

      // Query vectors [m0, m0 + count) over the first n rows of a K/V block.
      auto attend = [&](const T* k, const T* v, int m0, int count, int n) {
        for_each_head_chunk(count, [&](auto ng, int first) {
          const int m = m0 + first;
          attend_rows<ng()>(q + m * D, q_raw ? q_raw + m * D : nullptr, p.scale, p.soft_cap, k, v, n, D, logits, bs,
                            row_max + m, row_sum + m, acc + m * D);
        });
      };
      const int begin = std::max(part * kPartitionSize, p.first_key(first_pos));
      const int end = std::min((part + 1) * kPartitionSize, last_pos + 1);
      for_each_run(p.kv, p.block_table(tile.seq), tile.kv_head, tile.kv_head + 1, begin, end, {p.kv.key, p.kv.value},
                   [&](int64_t row, int kb, int n, int) {
        const T* k = p.kv.key + row;
        const T* v = p.kv.value + row;
        // Rows [r_full, r_end) see all n keys of this run; the others only a part: the causal
        // diagonal cuts the run's end for earlier rows, the window's start cuts its beginning for
        // later ones.
        const int r_full = std::clamp(kb + n - 1 - first_pos, 0, tile.rows);
        const int r_end =
            p.sliding_window > 0 ? std::clamp(kb + p.sliding_window - first_pos, r_full, tile.rows) : tile.rows;
        for (int r = 0; r < tile.rows; ++r) {
          if (r == r_full) r = r_end;
          if (r == tile.rows) break;
          const int pos = first_pos + r, a = std::max(kb, p.first_key(pos)), b = std::min(kb + n, pos + 1);
          if (b > a) attend(k + int64_t{a - kb} * D, v + int64_t{a - kb} * D, r * group, group, b - a);
        }
        if (r_end > r_full) attend(k, v, r_full * group, (r_end - r_full) * group, n);
      });
    }

    // As decode ends: one partition normalised directly, several merged.
    for (int r = 0; r < tile.rows; ++r) {
      const int pos = first_pos + r;
      const int first = p.first_key(pos) / kPartitionSize - part_lo, parts = pos / kPartitionSize - part_lo - first + 1;
      for (int g = 0; g < group; ++g) {
        const int m = r * group + g;
        const float* acc = states + first * state_size + int64_t{m} * D;
        const float* row_max = states + first * state_size + int64_t{M} * D + m;
        const float* row_sum = row_max + M;
        if (parts == 1) {
          store_scaled(p.out_row(token0 + r, h0 + g), acc, 1.f / *row_sum, D);
        } else {
          merge_partitions(p.out_row(token0 + r, h0 + g), acc, state_size, row_max, row_sum, state_size, parts, D,
                           merged);
        }
      }
    }
  });
}

}  // namespace

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, double scale,
                             int64_t sliding_window, double logits_soft_cap) {
  check_attention(out, query, key_cache, value_cache, block_tables, seq_lens, sliding_window, logits_soft_cap);
  check_index(cu_seqlens_q, 1, "cu_seqlens_q");
  TORCH_CHECK(cu_seqlens_q.size(0) == seq_lens.size(0) + 1, "cu_seqlens_q must have num_seqs + 1 entries");
  TORCH_CHECK(cu_seqlens_q.device() == query.device(), "cu_seqlens_q must be on the query's device");
  PAGEDLM_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_prefill_attention", [&] {
    prefill<scalar_t>(out, query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens,
                      static_cast<float>(scale), sliding_window, logits_soft_cap);
  });
}

}  // namespace pagedlm::cpu
