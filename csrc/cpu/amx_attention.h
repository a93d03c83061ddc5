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
// Tiles: 0 K rows (A, up to 16 keys x 32 head dimensions), 1 query pairs (B, 16 dimension pairs x 16
// query vectors), 2 logits (C, keys x 16 query vectors), 3 P rows (A, 16 query vectors x the block's
// keys), 4 V pairs (B, the block's key pairs x 16 head dimensions), 5 output (C, 16 query vectors x 16
// head dimensions). Query vectors come in groups of 16 (kLanes), zero-padded.

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

// Loads the tile shapes for cache blocks of bs keys (8, 16 or 32).
inline void configure(int bs) {
  amx::TileConfig cfg;
  const int key_rows = std::min(bs, kLanes);
  cfg.set(0, key_rows, 64);
  cfg.set(1, kLanes, 64);
  cfg.set(2, key_rows, 64);
  cfg.set(3, kLanes, bs * 2);
  cfg.set(4, bs / 2, 64);
  cfg.set(5, kLanes, 64);
  cfg.load();
}

// Tiles configured for one work item, released when it ends (so that the kernel need not save them).
struct Tiles {
  explicit Tiles(int bs) { configure(bs); }
  ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

// logits[r * lanes + 16 * v + m] = scale * q_m . k_r for the bs rows of k (bf16 [bs, D]) and the
// query vectors m of lane group v, from qp as bf16_tiles::pack_queries leaves it ([D / 2, lanes]).
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

// acc[m * D + d] for the 16 query vectors m of lane group v: acc * corr[m] when corrected, then plus
// the block's P.V, from pp as bf16_tiles::softmax_block leaves it ([bs / 2, lanes] key pairs) and vp
// as bf16_tiles::pack_values leaves it ([bs / 2, D]).
inline void block_values(const uint32_t* pp, int lanes, int v, const uint32_t* vp, int bs, int D, const float* corr,
                         bool corrected, float* acc) {
  const int pairs = bs / 2;
  alignas(64) uint32_t rows[kLanes * 16];  // P of the lane group, one query vector per row
  for (int m = 0; m < kLanes; ++m)
    for (int j = 0; j < pairs; ++j) rows[m * pairs + j] = pp[j * lanes + v * kLanes + m];
  if (corrected) {
    for (int m = 0; m < kLanes; ++m)
      if (corr[v * kLanes + m] != 1.f) scale_inplace(acc + int64_t{m} * D, corr[v * kLanes + m], D);
  }
  _tile_loadd(3, rows, pairs * 4);
  for (int d = 0; d < D; d += kLanes) {
    _tile_loadd(5, acc + d, D * 4);
    _tile_loadd(4, vp + d, D * 4);
    _tile_dpbf16ps(5, 3, 4);
    _tile_stored(5, acc + d, D * 4);
  }
}

}  // namespace pagedlm::cpu::amx_attention

#endif
