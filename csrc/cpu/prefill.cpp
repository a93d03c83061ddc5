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
             float scale) {
  const int num_seqs = seq_lens.size(0), num_heads = query.size(1), D = query.size(2);
  const int num_kv_heads = key_cache.size(1), group = num_heads / num_kv_heads;
  const PagedKV<T> kv{key_cache.data_ptr<T>(), value_cache.data_ptr<T>(), key_cache.stride(0),
                      static_cast<int>(key_cache.size(2)), D};
  const int bs = kv.block_size;
  const int32_t* starts = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const T* q_ptr = query.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t q_stride0 = query.stride(0), q_stride1 = query.stride(1);
  const int64_t out_stride0 = out.stride(0), out_stride1 = out.stride(1);

  std::vector<Tile> tiles;
  for (int s = 0; s < num_seqs; ++s) {
    const int q_len = starts[s + 1] - starts[s];
    TORCH_CHECK(q_len >= 0 && q_len <= lens[s], "sequence ", s, " has more query rows than cached tokens");
    check_block_table(tables + s * table_stride, block_tables.size(1), lens[s], bs, key_cache.size(0), s);
    const int context = lens[s] - q_len;
    for (int r0 = 0; r0 < q_len; r0 += kQueryTile) {
      const int rows = std::min(kQueryTile, q_len - r0);
      for (int h = 0; h < num_kv_heads; ++h) tiles.push_back({s, h, r0, rows, int64_t{rows} * (context + r0 + rows)});
    }
  }
  TORCH_CHECK(tiles.empty() || starts[num_seqs] <= query.size(0), "cu_seqlens_q exceeds the query rows");
  // Longest first, so the last tiles handed out are short ones.
  std::sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.cost > b.cost; });

  parallel_items(tiles.size(), [&](int64_t i) {
    const Tile tile = tiles[i];
    const int M = tile.rows * group;  // query vectors, row-major over (row, head in group)
    thread_local std::vector<float> scratch;
    scratch.resize(2 * M * D + 2 * M + kMaxHeadChunk * bs);
    float* q = scratch.data();
    float* acc = q + M * D;
    float* row_max = acc + M * D;
    float* row_sum = row_max + M;
    float* logits = row_sum + M;  // [kMaxHeadChunk, bs]

    const int64_t token0 = starts[tile.seq] + tile.row0;
    const int h0 = tile.kv_head * group;
    for (int r = 0; r < tile.rows; ++r)
      for (int g = 0; g < group; ++g)
        to_fp32_scaled(q + (r * group + g) * D, q_ptr + (token0 + r) * q_stride0 + (h0 + g) * q_stride1, scale, D);
    const T* q_raw = raw_queries(q_ptr + token0 * q_stride0 + h0 * q_stride1, q_stride0, tile.rows, q_stride1, group, D);
    std::fill(acc, acc + M * D, 0.f);
    std::fill(row_max, row_max + M, -std::numeric_limits<float>::infinity());
    std::fill(row_sum, row_sum + M, 0.f);

    // Query vectors [m0, m0 + count) over the first n rows of a K/V block.
    auto attend = [&](const T* k, const T* v, int m0, int count, int n) {
      for_each_head_chunk(count, [&](auto ng, int first) {
        const int m = m0 + first;
        attend_rows<ng()>(q + m * D, q_raw ? q_raw + m * D : nullptr, scale, k, v, n, D, logits, bs, row_max + m,
                          row_sum + m, acc + m * D);
      });
    };

    // Row r sits at position first_pos + r and sees keys 0 ..= first_pos + r.
    const int first_pos = lens[tile.seq] - (starts[tile.seq + 1] - starts[tile.seq]) + tile.row0;
    const int last_pos = first_pos + tile.rows - 1;
    const int32_t* table = tables + tile.seq * table_stride;
    for_each_run(kv, table, tile.kv_head, tile.kv_head + 1, 0, last_pos + 1, {kv.key, kv.value},
                 [&](int64_t row, int kb, int n, int) {
      // Rows before r_full see only part of this block (the causal diagonal); the rest see all of it.
      const int r_begin = std::max(0, kb - first_pos);
      const int r_full = std::clamp(kb + n - 1 - first_pos, r_begin, tile.rows);
      const T* k = kv.key + row;
      const T* v = kv.value + row;
      for (int r = r_begin; r < r_full; ++r) attend(k, v, r * group, group, first_pos + r - kb + 1);
      if (r_full < tile.rows) attend(k, v, r_full * group, (tile.rows - r_full) * group, n);
    });
    for (int r = 0; r < tile.rows; ++r)
      for (int g = 0; g < group; ++g) {
        const int m = r * group + g;
        store_scaled(out_ptr + (token0 + r) * out_stride0 + (h0 + g) * out_stride1, acc + m * D, 1.f / row_sum[m], D);
      }
  });
}

}  // namespace

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, double scale) {
  check_attention(out, query, key_cache, value_cache, block_tables, seq_lens);
  check_index(cu_seqlens_q, 1, "cu_seqlens_q");
  TORCH_CHECK(cu_seqlens_q.size(0) == seq_lens.size(0) + 1, "cu_seqlens_q must have num_seqs + 1 entries");
  TORCH_CHECK(cu_seqlens_q.device() == query.device(), "cu_seqlens_q must be on the query's device");
  TORCH_CHECK(query.size(2) % kHeadSizeMultiple == 0, "head_size must be a multiple of ", kHeadSizeMultiple);
  PAGEDLM_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_prefill_attention", [&] {
    prefill<scalar_t>(out, query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens,
                      static_cast<float>(scale));
  });
}

}  // namespace pagedlm::cpu
