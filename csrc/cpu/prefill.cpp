// Causal varlen attention over the paged cache: the prompt rows of each sequence (possibly after a
// context that is already cached) attend to every cached token up to their own position.
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
#include <tuple>
#include <vector>

namespace pagedlm::cpu {
namespace {

// Query rows per work item: every K/V block is converted once and reused by all rows of the tile
// and all heads of the KV-head group.
constexpr int kQueryTile = 32;

struct Tile {
  int seq;
  int kv_head;
  int row0;   // first query row of the tile within its sequence
  int rows;
  int head0;  // first query head of the tile within its KV head's group
  int heads;
  int64_t cost;
};

// Tiles of rows_per_tile query rows and heads_per_tile query heads of one KV head. A KV head's tiles
// come one after another, so that each worker's next tile reads the keys and values its last one
// left in L2 (tiles ordered by cost alone alternate KV heads between the workers, and a context's
// keys come from L3 for every tile: 18% slower at 2,048-8,192 tokens with heads of 128). Sequences
// longest first and each KV head's tiles longest first, so the last tiles handed out are short.
template <typename T, typename C>
std::vector<Tile> make_tiles(const AttentionParams<T, C>& p, const int32_t* starts, int rows_per_tile, int heads_per_tile) {
  std::vector<Tile> tiles;
  std::vector<int64_t> seq_cost(p.num_seqs, 0);
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_len = starts[s + 1] - starts[s], context = p.seq_lens[s] - q_len;
    for (int r0 = 0; r0 < q_len; r0 += rows_per_tile) {
      const int rows = std::min(rows_per_tile, q_len - r0);
      const int keys = context + r0 + rows, window = p.sliding_window > 0 ? p.sliding_window + rows : keys;
      for (int h = 0; h < p.num_kv_heads; ++h)
        for (int g = 0; g < p.group; g += heads_per_tile) {
          tiles.push_back({s, h, r0, rows, g, std::min(heads_per_tile, p.group - g), int64_t{rows} * std::min(keys, window)});
          seq_cost[s] += tiles.back().cost;
        }
    }
  }
  std::sort(tiles.begin(), tiles.end(), [&](const Tile& a, const Tile& b) {
    if (a.seq != b.seq) return seq_cost[a.seq] != seq_cost[b.seq] ? seq_cost[a.seq] > seq_cost[b.seq] : a.seq < b.seq;
    if (a.kv_head != b.kv_head) return a.kv_head < b.kv_head;
    return a.cost != b.cost ? a.cost > b.cost : std::tie(a.row0, a.head0) < std::tie(b.row0, b.head0);
  });
  return tiles;
}

template <typename T, typename C>
void prefill(const AttentionParams<T, C>& p, const int32_t* starts) {
  const int D = p.kv.head_size, group = p.group, bs = p.kv.block_size;

  const std::vector<Tile> tiles = make_tiles(p, starts, kQueryTile, group);

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
    thread_local AlignedVector<float> scratch;
    scratch.resize(M * D + M * bs + 2 * bs * D + D + (part_hi - part_lo + 1) * state_size);
    float* q = scratch.data();
    float* logits = q + M * D;  // [M, bs]
    float* kv_rows = logits + M * bs;  // a run's K and V rows in fp32
    float* merged = kv_rows + 2 * bs * D;  // [D]
    float* states = merged + D;

    const int64_t token0 = starts[tile.seq] + tile.row0;
    const int h0 = tile.kv_head * group;
    for (int r = 0; r < tile.rows; ++r)
      for (int g = 0; g < group; ++g)
        to_fp32_scaled(q + (r * group + g) * D, p.query_row(token0 + r, h0 + g), p.scale, D);

    for (int part = part_lo; part <= part_hi; ++part) {
      float* acc = states + (part - part_lo) * state_size;
      float* row_max = acc + M * D;
      float* row_sum = row_max + M;
      std::fill(acc, acc + M * D, 0.f);
      std::fill(row_max, row_max + M, -std::numeric_limits<float>::infinity());
      std::fill(row_sum, row_sum + M, 0.f);

      // Query vectors [m0, m0 + count) over the first n rows of a run.
      auto attend = [&](const float* k, const float* v, int m0, int count, int n) {
        with_head_size(D, [&](auto d) {
          attend_rows(q + m0 * D, count, p.soft_cap, k, v, n, d, logits, bs, row_max + m0, row_sum + m0, acc + m0 * D);
        });
      };
      const int begin = std::max(part * kPartitionSize, p.first_key(first_pos));
      const int end = std::min((part + 1) * kPartitionSize, last_pos + 1);
      for_each_run(p.kv, p.block_table(tile.seq), tile.kv_head, tile.kv_head + 1, begin, end, {p.kv.key, p.kv.value},
                   [&](int64_t row, int kb, int n, int) {
        const float* k = fp32_rows(p.kv.key + row, int64_t{n} * D, kv_rows);
        const float* v = fp32_rows(p.kv.value + row, int64_t{n} * D, kv_rows + bs * D);
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
          store_scaled(p.out_row(token0 + r, h0 + g), acc, p.v_scale / *row_sum, D);
        } else {
          merge_partitions(p.out_row(token0 + r, h0 + g), acc, state_size, row_max, row_sum, state_size, parts, D,
                           p.v_scale, merged);
        }
      }
    }
  });
}

#ifdef PAGEDLM_AMX_ATTENTION
// The chunks of keys (bf16_tiles::kChunk) that a prefill call's prompt rows read, converted once per
// call for the AMX kernel rather than once per query tile: values as amx_attention::transpose_values
// leaves them (keys outside the sequence's [first_key(first prompt position), seq_len) zero), and,
// where a 16-key group's rows are not one bf16 run in the cache (an fp8 cache, blocks of 8), its keys
// as bf16 (exactly; [32, D] per chunk). Sequence s's KV head h reads its chunks
// first_chunk[s] .. as the consecutive items first_item[s] + h * chunks[s] + i.
template <typename C>
class PackedChunks {
 public:
  PackedChunks(const AttentionParams<c10::BFloat16, C>& p, const int32_t* starts)
      : D_(p.kv.head_size),
        packs_keys_(is_fp8<C> || p.kv.block_size < kLanes),
        first_chunk_(p.num_seqs),
        chunks_(p.num_seqs),
        first_item_(p.num_seqs + 1) {
    const int bs = p.kv.block_size;
    std::vector<int> first_key(p.num_seqs);
    for (int s = 0; s < p.num_seqs; ++s) {
      const int q_len = starts[s + 1] - starts[s];
      first_key[s] = q_len > 0 ? p.first_key(p.seq_lens[s] - q_len) : 0;
      first_chunk_[s] = first_key[s] / kChunk;
      chunks_[s] = q_len > 0 ? (p.seq_lens[s] - 1) / kChunk - first_chunk_[s] + 1 : 0;
      first_item_[s + 1] = first_item_[s] + int64_t{p.num_kv_heads} * chunks_[s];
    }
    const int64_t items = first_item_.back();
    values_ = at::empty({items, D_, kLanes}, at::kInt);
    if (packs_keys_) keys_ = at::empty({items, kChunk, D_}, at::kBFloat16);
    parallel_items(items, [&](int64_t i) {
      const int s = std::upper_bound(first_item_.begin(), first_item_.end(), i) - first_item_.begin() - 1;
      const int h = (i - first_item_[s]) / chunks_[s], c0 = (first_chunk_[s] + (i - first_item_[s]) % chunks_[s]) * kChunk;
      const int begin = first_key[s], end = p.seq_lens[s];
      auto block_row = [&](int kb) { return p.block_table(s)[kb / bs] * p.kv.block_stride + h * p.kv.head_stride(); };
      thread_local AlignedVector<bf16_tiles::bf16> rows;
      thread_local AlignedVector<uint32_t> scratch;
      rows.resize(is_fp8<C> ? bs * D_ : 0);
      scratch.resize(kChunkPairs * D_);
      amx_attention::transpose_values(
          [&](int kb) { return bf16_tiles::bf16_rows(p.kv.value + block_row(kb), bs * D_, rows.data()); }, c0, bs, D_,
          begin, end, scratch.data(), value_chunk(i));
      if (packs_keys_) {
        for (int kb = std::max(c0, begin / bs * bs); kb < std::min(c0 + kChunk, end); kb += bs) {
          bf16_tiles::bf16* k = key_chunk(i) + (kb - c0) * D_;
          const bf16_tiles::bf16* src = bf16_tiles::bf16_rows(p.kv.key + block_row(kb), bs * D_, k);
          if (src != k) std::copy_n(src, bs * D_, k);
        }
      }
    });
  }

  // The item of the chunk holding key `key` of sequence s, KV head h.
  int64_t item(int s, int h, int key) const {
    return first_item_[s] + int64_t{h} * chunks_[s] + key / kChunk - first_chunk_[s];
  }
  uint32_t* value_chunk(int64_t item) const {
    return reinterpret_cast<uint32_t*>(values_.data_ptr<int32_t>()) + item * D_ * kLanes;
  }
  // Whether key_chunk holds the keys: else they are read from the cache.
  bool packs_keys() const { return packs_keys_; }
  c10::BFloat16* key_chunk(int64_t item) const { return keys_.data_ptr<c10::BFloat16>() + item * kChunk * D_; }

 private:
  static constexpr int kLanes = bf16_tiles::kLanes, kChunk = bf16_tiles::kChunk, kChunkPairs = bf16_tiles::kChunkPairs;
  int D_;
  bool packs_keys_;
  std::vector<int> first_chunk_, chunks_;
  std::vector<int64_t> first_item_;
  at::Tensor values_, keys_;
};
#endif

#ifdef PAGEDLM_BF16_TILES
// bf16 prefill on bf16_tiles: a tile is up to kMaxTileLanes query vectors of one KV head (whole rows
// of its query-head group where that fits), each partition of their keys two passes over its chunks:
// Q·K, softmax and packing chunk by chunk, then P·V over the whole partition with the accumulators in
// registers (vector registers, or on AMX tile registers).
template <typename C>
void prefill_tiles(const AttentionParams<c10::BFloat16, C>& p, const int32_t* starts) {
  using namespace bf16_tiles;
  const int D = p.kv.head_size, group = p.group, bs = p.kv.block_size;
#ifdef PAGEDLM_AMX_ATTENTION
  const bool amx = amx_attention::enabled();
  std::optional<PackedChunks<C>> packed;
  if (amx) packed.emplace(p, starts);
#else
  constexpr bool amx = false;
#endif
  // AMX runs a tile's lane groups one at a time, so its tiles can be wider: each partition's keys and
  // values are then read from memory once for more query vectors.
  const int max_lanes = amx ? std::max(kLanes, kAmxTileElements / D / kLanes * kLanes) : kMaxTileLanes;
  const int rows_per_tile = std::max(1, max_lanes / group), heads_per_tile = std::min(group, max_lanes);
  const std::vector<Tile> tiles = make_tiles(p, starts, rows_per_tile, heads_per_tile);

  parallel_items(tiles.size(), [&](int64_t i) {
    const Tile tile = tiles[i];
    const int count = tile.rows * tile.heads, nm = (count + kLanes - 1) / kLanes, lanes = nm * kLanes;
    const int first_pos = p.seq_lens[tile.seq] - (starts[tile.seq + 1] - starts[tile.seq]) + tile.row0;
    const int last_pos = first_pos + tile.rows - 1;
    const int part_lo = p.first_key(first_pos) / kPartitionSize, part_hi = last_pos / kPartitionSize;
    const int parts = part_hi - part_lo + 1, max_chunks = kPartitionSize / kChunk;
    const int64_t token0 = starts[tile.seq] + tile.row0;
    const int h0 = tile.kv_head * group + tile.head0;

    thread_local AlignedVector<uint32_t> packed_rows;
    packed_rows.resize(int64_t{D} / 2 * lanes + int64_t{max_chunks} * kChunkPairs * (lanes + (amx ? 0 : D)));
    uint32_t* qp = packed_rows.data();
    uint32_t* pp = qp + D / 2 * lanes;
    uint32_t* vp = pp + int64_t{max_chunks} * kChunkPairs * lanes;  // the vector kernel's values
    thread_local AlignedVector<float> scratch;
    scratch.resize(int64_t{parts} * lanes * (D + 2) + 2 * kChunk * lanes + int64_t{max_chunks} * lanes +
                   int64_t{parts} * kLanes * D + D);
    float* acc_t = scratch.data();                          // [parts][D, lanes]
    float* part_max = acc_t + int64_t{parts} * lanes * D;  // [parts][lanes]
    float* part_sum = part_max + parts * lanes;
    float* logits = part_sum + parts * lanes;  // [32, lanes], or on AMX two of [32, 16]
    float* corr = logits + 2 * kChunk * lanes;  // [chunks][lanes]
    float* acc = corr + max_chunks * lanes;    // a lane group's [parts][16, D]
    float* merged = acc + int64_t{parts} * kLanes * D;  // [D]
    thread_local std::vector<uint8_t> corrected;
    corrected.resize(2 * max_chunks);
    thread_local AlignedVector<bf16> rows;  // the vector kernel's fp8 block: K, then V rows as bf16
    rows.resize(is_fp8<C> && !amx ? 2 * bs * D : 0);

    // Lane m = r * heads + g: query row r of the tile, query head head0 + g of the KV head.
    pack_queries([&](int m) { return p.query_row(token0 + m / tile.heads, h0 + m % tile.heads); }, count, lanes, D, qp);
    int lo[kMaxAmxTileLanes], hi[kMaxAmxTileLanes];
    for (int m = 0; m < lanes; ++m) {
      const int pos = first_pos + m / tile.heads;
      lo[m] = m < count ? p.first_key(pos) : 1;
      hi[m] = m < count ? pos : 0;
    }
    // Keys every lane sees: [p.first_key(last_pos), first_pos].
    const int all_lo = p.first_key(last_pos), all_hi = first_pos;
#ifdef PAGEDLM_AMX_ATTENTION
    std::optional<amx_attention::Tiles> amx_tiles;
    if (amx) amx_tiles.emplace(amx_attention::Tiles::kPrefill);
#endif
    const int32_t* table = p.block_table(tile.seq);
    const int64_t head_offset = tile.kv_head * p.kv.head_stride();
    auto block_row = [&](int kb) { return table[kb / bs] * p.kv.block_stride + head_offset; };

    for (int part = part_lo; part <= part_hi; ++part) {
      const int k = part - part_lo;
      SoftmaxState state{part_max + k * lanes, part_sum + k * lanes};
      std::fill(state.max, state.max + lanes, -std::numeric_limits<float>::infinity());
      std::fill(state.sum, state.sum + lanes, 0.f);
      const int begin = std::max(part * kPartitionSize, p.first_key(first_pos));
      const int end = std::min((part + 1) * kPartitionSize, last_pos + 1);
      float* part_acc = acc_t + int64_t{k} * lanes * D;
      const int c_begin = begin / kChunk * kChunk, chunks = (end - c_begin + kChunk - 1) / kChunk;
#ifdef PAGEDLM_AMX_ATTENTION
      if (amx) {
        // Two lane groups at a time, their query pairs in tiles: Q·K for both from each key tile where
        // D <= 64, else one group after the other (then a chunk's Q·K runs before the softmax of the
        // one before, whose logits are then in memory); then P·V for both from each value tile. The keys
        // are not prefetched: they are in L2 (make_tiles' order), and prefetches into L1 held the fill
        // buffers that the tile loads wait for (8-10% slower with heads of 128).
        const int64_t item0 = packed->item(tile.seq, tile.kv_head, c_begin);
        auto group_keys = [&](int i, int g) -> const bf16* {  // nullptr: no lane sees the 16 keys
          const int k0 = c_begin + i * kChunk + g * kLanes;
          if (k0 + kLanes <= begin || k0 >= end) return nullptr;
          if constexpr (!is_fp8<C>) {
            if (!packed->packs_keys()) return p.kv.key + block_row(k0) + (k0 % bs) * D;
          }
          return packed->key_chunk(item0 + i) + g * kLanes * D;
        };
        // Per lane group of the two (v % 2): logits [2][32, 16] (by chunk parity), P pairs
        // [chunks][16, 16], corrections [chunks][16] and whether any [chunks].
        auto logits_of = [&](int v, int i) { return logits + ((v % 2) * 2 + i % 2) * kChunk * kLanes; };
        auto group_pp = [&](int v) { return pp + int64_t{v % 2} * max_chunks * kChunkPairs * kLanes; };
        auto group_corr = [&](int v) { return corr + (v % 2) * max_chunks * kLanes; };
        auto group_corrected = [&](int v) { return corrected.data() + (v % 2) * max_chunks; };
        auto softmax = [&](int v, int i) {
          const int off = v * kLanes, c0 = c_begin + i * kChunk;
          // Keys every lane of the group sees.
          const int v_lo = p.first_key(first_pos + (std::min(off + kLanes, count) - 1) / tile.heads);
          const int v_hi = first_pos + off / tile.heads;
          group_corrected(v)[i] = softmax_chunk(logits_of(v, i), 1, p.scale, c0, lo + off, hi + off,
                                                c0 >= v_lo && c0 + kChunk - 1 <= v_hi, p.soft_cap,
                                                {state.max + off, state.sum + off}, group_corr(v) + i * kLanes,
                                                group_pp(v) + int64_t{i} * kChunkPairs * kLanes);
        };
        const uint32_t* vt = packed->value_chunk(item0);
        for (int v0 = 0; v0 < nm; v0 += 2) {
          // The chunks up to the pair's last query position: the later ones are masked for all its
          // lanes (causal), so they would add nothing but zeros (decode does not read them either). A
          // short prompt's tile spans its whole length, and its first lane groups need one chunk.
          const int pair_end = first_pos + (std::min(count, (v0 + 2) * kLanes) - 1) / tile.heads + 1;
          const int pair_chunks = std::min(chunks, (pair_end - c_begin + kChunk - 1) / kChunk);
          if (pair_chunks <= 0) continue;  // no lane of the pair reads this partition
          // Q·K and the softmax for groups [v, v + step): both of the two at once where they fit.
          const int step = v0 + 1 < nm && D <= 64 ? 2 : 1;
          for (int v = v0; v < std::min(nm, v0 + 2); v += step) {
            auto qk = [&](int i) {
              auto keys = [&](int g) { return group_keys(i, g); };
              if (step == 2) {
                amx_attention::chunk_logits_pair(keys, D, logits_of(v, i), logits_of(v + 1, i));
              } else {
                amx_attention::chunk_logits(keys, qp, lanes, v, D, logits_of(v, i));
              }
            };
            if (step == 2) {
              amx_attention::load_query_pair(qp, lanes, v, D);
            } else if (D <= 128) {
              amx_attention::load_queries(qp, lanes, v, D);
            }
            // Both groups' Q·K in one pass (D <= 64): each chunk's softmax before the next chunk's
            // Q·K measured 2-3% faster; one group's: the next chunk's Q·K first, 3% faster.
            qk(0);
            if (step == 2) {
              for (int i = 0; i < pair_chunks; ++i) {
                softmax(v, i);
                softmax(v + 1, i);
                if (i + 1 < pair_chunks) qk(i + 1);
              }
            } else {
              for (int i = 0; i < pair_chunks; ++i) {
                if (i + 1 < pair_chunks) qk(i + 1);
                softmax(v, i);
              }
            }
          }
          float* acc0 = part_acc + v0 * kLanes;
          if (v0 + 1 < nm) {
            const uint32_t* const pps[2] = {group_pp(v0), group_pp(v0 + 1)};
            const float* const corrs[2] = {group_corr(v0), group_corr(v0 + 1)};
            const uint8_t* const corrected2[2] = {group_corrected(v0), group_corrected(v0 + 1)};
            float* const accs[2] = {acc0, acc0 + kLanes};
            amx_attention::lane_pair_values(pps, corrs, corrected2, pair_chunks, vt, D, accs, lanes);
          } else {
            amx_attention::lane_group_values(group_pp(v0), group_corr(v0), group_corrected(v0), pair_chunks, vt, D,
                                             acc0, lanes);
          }
        }
        continue;
      }
#endif
      for (int i = 0; i < chunks; ++i) {
        const int c0 = c_begin + i * kChunk;
        // The logits of the chunk's blocks that hold keys in [begin, end); the other rows are masked.
        for (int kb = std::max(c0, begin / bs * bs); kb < std::min(c0 + kChunk, end); kb += bs) {
          if (kb + bs < end) {
            prefetch(p.kv.key + block_row(kb + bs), bs, D);
            prefetch(p.kv.value + block_row(kb + bs), bs, D);
          }
          const bf16* keys = bf16_rows(p.kv.key + block_row(kb), bs * D, rows.data());
          float* out = logits + (kb - c0) * lanes;
          switch (nm) {
            case 1: block_logits<1>(qp, keys, bs, D, out); break;
            case 2: block_logits<2>(qp, keys, bs, D, out); break;
            default: block_logits<3>(qp, keys, bs, D, out); break;
          }
        }
        const bool all_visible = c0 >= all_lo && c0 + kChunk - 1 <= all_hi;
        corrected[i] = softmax_chunk(logits, nm, p.scale, c0, lo, hi, all_visible, p.soft_cap, state, corr + i * lanes,
                                     pp + int64_t{i} * kChunkPairs * lanes);
        pack_chunk_values([&](int kb) { return bf16_rows(p.kv.value + block_row(kb), bs * D, rows.data() + bs * D); },
                          c0, bs, D, begin, end, vp + int64_t{i} * kChunkPairs * D);
      }
      const ChunkRun run{chunks, pp, vp, corr, corrected.data()};
      switch (nm) {
        case 1: values_by_lane<1>(run, D, part_acc); break;
        case 2: values_by_lane<2>(run, D, part_acc); break;
        default: values_by_lane<3>(run, D, part_acc); break;
      }
    }

    // As decode ends: one partition normalised directly, several merged, from each query vector's row.
    for (int v = 0; v < nm; ++v) {
      for (int k = 0; k < parts; ++k)
        for (int d0 = 0; d0 < D; d0 += kLanes)
          transpose_16x16(reinterpret_cast<const uint32_t*>(acc_t + (int64_t{k} * D + d0) * lanes + v * kLanes), lanes,
                          kLanes, reinterpret_cast<uint32_t*>(acc + int64_t{k} * kLanes * D + d0), D);
      for (int m = v * kLanes; m < std::min(count, (v + 1) * kLanes); ++m) {
        const int pos = first_pos + m / tile.heads;
        const int first = p.first_key(pos) / kPartitionSize - part_lo, n = pos / kPartitionSize - part_lo - first + 1;
        const float* rows = acc + (int64_t{first} * kLanes + m % kLanes) * D;
        c10::BFloat16* out = p.out_row(token0 + m / tile.heads, h0 + m % tile.heads);
        if (n == 1) {
          store_scaled(out, rows, p.v_scale / part_sum[first * lanes + m], D);
        } else {
          merge_partitions(out, rows, int64_t{kLanes} * D, part_max + first * lanes + m,
                           part_sum + first * lanes + m, lanes, n, D, p.v_scale, merged);
        }
      }
    }
  });
}
#endif

// Every sequence's query rows must lie within the query tensor and be at most its cached tokens.
void check_query_spans(const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, int64_t query_rows) {
  const int32_t* starts = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < seq_lens.size(0); ++s) {
    const int q_len = starts[s + 1] - starts[s];
    TORCH_CHECK(q_len >= 0 && q_len <= lens[s], "sequence ", s, " has more query rows than cached tokens");
    TORCH_CHECK(q_len == 0 || (starts[s] >= 0 && starts[s + 1] <= query_rows), "cu_seqlens_q exceeds the query rows");
  }
}

}  // namespace

bool bf16_attention_tiles() {
#ifdef PAGEDLM_BF16_TILES
  return true;
#else
  return false;
#endif
}

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, double scale,
                             int64_t sliding_window, double logits_soft_cap, double k_scale, double v_scale) {
  check_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale, k_scale, v_scale,
                  sliding_window, logits_soft_cap);
  check_index(cu_seqlens_q, 1, "cu_seqlens_q");
  TORCH_CHECK(cu_seqlens_q.size(0) == seq_lens.size(0) + 1, "cu_seqlens_q must have num_seqs + 1 entries");
  TORCH_CHECK(cu_seqlens_q.device() == query.device(), "cu_seqlens_q must be on the query's device");
  check_query_spans(cu_seqlens_q, seq_lens, query.size(0));
  const int32_t* starts = cu_seqlens_q.data_ptr<int32_t>();
  PAGEDLM_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_prefill_attention", [&] {
    dispatch_cache_type<scalar_t>(key_cache.scalar_type(), [&](auto entry) {
      const auto p = make_attention_params<scalar_t, decltype(entry)>(
          out, query, key_cache, value_cache, block_tables, seq_lens, scale, k_scale, v_scale, sliding_window,
          logits_soft_cap);
#ifdef PAGEDLM_BF16_TILES
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (bf16_tiles::supports(p.kv.head_size, p.kv.block_size)) return prefill_tiles(p, starts);
      }
#endif
      prefill(p, starts);
    });
  });
}

}  // namespace pagedlm::cpu
