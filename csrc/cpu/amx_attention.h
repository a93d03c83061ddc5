#pragma once
// bf16 attention's two products on AMX tiles, for decode and prefill alike (bf16_tiles.h defines the
// rest: query and value packing, the online softmax). On an AMX build whose process was granted the
// tile state, both kernels take these instead of bf16_tiles' vdpbf16ps products, so every logit and
// output element again has one arithmetic whatever tile or batch computes it:
//   logit(q, k) = scale * s, s one fp32 tile sum over the head dimension's 32-element blocks in
//                 order, one tdpbf16ps per block (its internal order is the hardware's);
//   out[d]      = out[d] * c when a block corrects the softmax (exactly out[d] when c == 1), then
//                 one tdpbf16ps over the block's key pairs (p pair times v pair) into it.
// A tile row (keys in Q·K, query vectors in P·V) reads only its own operands, so a query's bits do
// not depend on the other query vectors of its tile, nor on how many there are.
//
// Tiles: 0, 1, 2 Q.K's A, B and C (32 head dimensions of keys or query vectors as rows, 16 query
// vectors' or keys' dimension pairs, the logits), 3 P rows (A, query vectors x the block's keys), 4 V
// pairs (B, the block's key pairs x 16 head dimensions), 5 output (C, query vectors x 16 head
// dimensions). The products are the same either way round: a tdpbf16ps element sums the same pair
// products in the same order whichever operand holds the keys (test_attention_rows_equal_decode_bits).

#include "amx.h"
#include "bf16_tiles.h"

#if defined(PAGEDLM_AMX) && defined(PAGEDLM_BF16_TILES)
#define PAGEDLM_AMX_ATTENTION 1

#include <algorithm>
#include <cstdint>

namespace pagedlm::cpu::amx_attention {

using bf16_tiles::bf16;
using bf16_tiles::kLanes;

// Whether the kernels take these products: decided once per process, the same for decode and prefill.
inline bool enabled() { return amx::permitted(); }

// Tile shapes for a work item: `rows` query vectors (at most 16) against cache blocks of bs keys (8,
// 16 or 32). Prefill (keys_as_rows) puts a block's keys in Q.K's rows and 16 query vectors in its
// columns; decode puts its few query heads in the rows and 16 keys in the columns.
class Tiles {
 public:
  Tiles(int rows, int bs, bool keys_as_rows) : bs_(bs), keys_as_rows_(keys_as_rows) { use(rows); }
  ~Tiles() { _tile_release(); }  // so that the kernel need not save them
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;

  // Reshapes the tiles for `rows` query vectors.
  void use(int rows) {
    if (rows == rows_) return;
    amx::TileConfig cfg;
    const int qk_rows = keys_as_rows_ ? std::min(bs_, kLanes) : rows;
    cfg.set(0, qk_rows, 64);
    cfg.set(1, kLanes, 64);
    cfg.set(2, qk_rows, 64);
    cfg.set(3, rows, bs_ * 2);
    cfg.set(4, bs_ / 2, 64);
    cfg.set(5, rows, 64);
    cfg.load();
    rows_ = rows;
  }

 private:
  int bs_;
  bool keys_as_rows_;
  int rows_ = 0;
};

// Prefill's Q.K: logits[r * lanes + 16 * v + m] = scale * q_m . k_r for the bs rows of k (bf16
// [bs, D]) and the query vectors m of lane group v, from qp as bf16_tiles::pack_queries leaves it
// ([D / 2, lanes]).
inline void block_logits(const uint32_t* qp, int lanes, int v, const bf16* k, int bs, int D, float scale,
                         float* logits) {
  for (int r0 = 0; r0 < bs; r0 += kLanes) {
    _tile_zero(2);
    for (int c = 0; c < D; c += 32) {
      _tile_loadd(0, k + int64_t{r0} * D + c, D * 2);
      _tile_loadd(1, qp + int64_t{c / 2} * lanes + v * kLanes, lanes * 4);
      _tile_dpbf16ps(2, 0, 1);
    }
    _tile_stored(2, logits + r0 * lanes + v * kLanes, lanes * 4);
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < bs; ++r) {
    float* l = logits + r * lanes + v * kLanes;
    _mm512_storeu_ps(l, _mm512_mul_ps(_mm512_loadu_ps(l), s));
  }
}

// Decode's Q.K: logits[g * stride + n] = scale * q_g . k_n for the tile's query rows q (bf16, rows
// q_stride elements apart) and the bs keys of kt as bf16_tiles::transpose_keys leaves them, per 16
// keys [D / 2, 16].
inline void key_logits(const bf16* q, int64_t q_stride, int rows, const uint32_t* kt, int bs, int D, float scale,
                       float* logits, int stride) {
  for (int n0 = 0; n0 < bs; n0 += kLanes) {
    _tile_zero(2);
    for (int c = 0; c < D; c += 32) {
      _tile_loadd(0, q + c, q_stride * 2);
      _tile_loadd(1, kt + int64_t{n0} * D / 2 + c / 2 * kLanes, 64);
      _tile_dpbf16ps(2, 0, 1);
    }
    _tile_stored(2, logits + n0, stride * 4);
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int g = 0; g < rows; ++g)
    for (int n0 = 0; n0 < bs; n0 += kLanes) {
      float* l = logits + g * stride + n0;
      _mm512_storeu_ps(l, _mm512_mul_ps(_mm512_loadu_ps(l), s));
    }
}

// P.V for the tile's query vectors: acc[g * D + d] = acc * corr[g] (where corr[g] != 1), then plus the
// block's key pairs, from p (bf16 [rows, bs], rows p_stride bytes apart) and vp as
// bf16_tiles::pack_values leaves it ([bs / 2, D]).
inline void values(const void* p, int p_stride, int rows, const float* corr, const uint32_t* vp, int D, float* acc) {
  for (int g = 0; g < rows; ++g)
    if (corr[g] != 1.f) scale_inplace(acc + int64_t{g} * D, corr[g], D);
  _tile_loadd(3, p, p_stride);
  for (int d = 0; d < D; d += kLanes) {
    _tile_loadd(5, acc + d, D * 4);
    _tile_loadd(4, vp + d, D * 4);
    _tile_dpbf16ps(5, 3, 4);
    _tile_stored(5, acc + d, D * 4);
  }
}

// Prefill's P.V over a partition's blocks as bf16_tiles::softmax_block and pack_values left them:
// acc[m * D + d] for the lanes = 16 * nm query vectors m, the arithmetic of values() block by block,
// with each 16 x 16 output tile kept in a tile register across the blocks (stored, scaled and
// reloaded only at a block that corrects one of its rows). rows: scratch for [run.blocks, 16,
// run.pairs] dwords.
inline void run_values(const bf16_tiles::BlockRun& run, int nm, int D, uint32_t* rows, float* acc) {
  const int lanes = nm * kLanes, pairs = run.pairs;
  alignas(64) float tile[kLanes * kLanes];
  for (int v = 0; v < nm; ++v) {
    for (int b = 0; b < run.blocks; ++b)  // the lane group's P, one query vector per row
      for (int m = 0; m < kLanes; ++m)
        for (int j = 0; j < pairs; ++j)
          rows[(b * kLanes + m) * pairs + j] = run.pp[(int64_t{b} * pairs + j) * lanes + v * kLanes + m];
    for (int d = 0; d < D; d += kLanes) {
      _tile_zero(5);
      for (int b = 0; b < run.blocks; ++b) {
        const float* corr = run.corr + b * lanes + v * kLanes;
        if (run.corrected[b] && std::any_of(corr, corr + kLanes, [](float c) { return c != 1.f; })) {
          _tile_stored(5, tile, kLanes * 4);
          for (int m = 0; m < kLanes; ++m)
            _mm512_store_ps(tile + m * kLanes, _mm512_mul_ps(_mm512_load_ps(tile + m * kLanes), _mm512_set1_ps(corr[m])));
          _tile_loadd(5, tile, kLanes * 4);
        }
        _tile_loadd(3, rows + b * kLanes * pairs, pairs * 4);
        _tile_loadd(4, run.vp + int64_t{b} * pairs * D + d, D * 4);
        _tile_dpbf16ps(5, 3, 4);
      }
      _tile_stored(5, acc + int64_t{v} * kLanes * D + d, D * 4);
    }
  }
}

}  // namespace pagedlm::cpu::amx_attention

#endif
