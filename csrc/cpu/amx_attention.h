#pragma once
// bf16 attention's two products on AMX tiles, for decode and prefill alike (bf16_tiles.h defines the
// rest: query and value packing, the online softmax). On an AMX build whose process was granted the
// tile state, both kernels take these instead of bf16_tiles' vdpbf16ps products, so every logit and
// output element again has one arithmetic whatever tile or batch computes it:
//   logit(q, k) = scale * s, s one fp32 tile sum over the head dimension's 32-element blocks in
//                 order, one tdpbf16ps per block (its internal order is the hardware's);
//   out[d]      = out[d] * c when a chunk corrects the softmax (exactly out[d] when c == 1), then
//                 one tdpbf16ps over the chunk's 16 key pairs (p pair times v pair) into it.
// A tile row (keys in Q·K, query vectors in P·V) reads only its own operands, so a query's bits do
// not depend on the other query vectors of its tile, nor on how many there are.
//
// Tiles, decode: 0, 1, 2 Q.K's A, B and C (16 keys' rows straight from the cache, 32 head dimensions;
// the dimension pairs of up to 16 query heads of a KV head; the logits, keys x query heads), 3 P rows
// (A, query heads x the chunk's 32 keys), 4 V pairs (B, the chunk's 16 key pairs x 16 head
// dimensions), 5 output (C, query heads x 16 head dimensions).
// Tiles, prefill, for lane groups of 16 query vectors: 0, 1 Q.K's A (the 16-key groups of a chunk, 32
// head dimensions), 2, 3 their logits (C), 4-7 the query vectors' dimension pairs (B, 32 head
// dimensions each, loaded once per partition: one group's while D <= 128, or two groups' while
// D <= 64, chunk_logits_pair); then 0, 1 V transposed (A, 16 head dimensions x the chunk's 32 keys),
// 2, 3 P pairs (B, the chunk's 16 key pairs x the 16 query vectors of a group), 4-7 output (C, 16 head
// dimensions x 16 query vectors), which stay in registers across a partition's chunks.
// The products are the same either way round: a tdpbf16ps element sums the same pair products in the
// same order whichever operand holds the keys (test_attention_rows_equal_decode_bits).

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

// The tile shapes of one kernel (see above). Decode reshapes them (use) for its tiles' number of query
// heads.
class Tiles {
 public:
  enum Kernel { kDecode, kPrefill };
  explicit Tiles(Kernel kernel, int rows = kLanes) : kernel_(kernel) { use(rows); }
  ~Tiles() { _tile_release(); }  // so that the kernel need not save them
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;

  // Decode: reshapes P.V's tiles for `rows` (at most 16) query heads.
  void use(int rows) {
    if (rows == rows_) return;
    amx::TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.set(t, kLanes, 64);
    if (kernel_ == kDecode) {
      for (int t : {3, 5}) cfg.set(t, rows, 64);
    }
    cfg.load();
    rows_ = rows;
  }

 private:
  Kernel kernel_;
  int rows_ = 0;
};

// Prefill: loads lane group v's query pairs (qp as bf16_tiles::pack_queries leaves it, [D / 2, lanes])
// into tiles 4 .. 3 + D / 32, where chunk_logits finds them; D <= 128.
inline void load_queries(const uint32_t* qp, int lanes, int v, int D) {
  const uint32_t* q = qp + v * kLanes;
  _tile_loadd(4, q, lanes * 4);
  if (D > 32) _tile_loadd(5, q + 16 * lanes, lanes * 4);
  if (D > 64) _tile_loadd(6, q + 32 * lanes, lanes * 4);
  if (D > 96) _tile_loadd(7, q + 48 * lanes, lanes * 4);
}

// Prefill's Q.K for one lane group and one chunk: logits[r * 16 + m] = q_m . k_r (not yet scaled) for
// the chunk's keys r < 32, from keys(g) (bf16 [16, D], rows D apart) for its 16-key groups g (nullptr:
// no lane sees the group; its rows are left as they are). The query pairs are load_queries' where
// D <= 128, else lane group v's of qp. The two groups' products alternate, two chains whose K tile
// loads overlap the other's products (2% faster than one group after the other with heads of 128).
template <typename K>
inline void chunk_logits(const K& keys, const uint32_t* qp, int lanes, int v, int D, float* logits) {
  const bf16* const k0 = keys(0);
  const bf16* const k1 = keys(1);
  if (k0) _tile_zero(2);
  if (k1) _tile_zero(3);
  for (int c = 0; c < D / 32; ++c) {
    if (k0) _tile_loadd(0, k0 + c * 32, D * 2);
    if (k1) _tile_loadd(1, k1 + c * 32, D * 2);
    // tdpbf16ps names its tiles by literals: the query pairs' tile q.
#define PAGEDLM_PRODUCTS(q)              \
  if (k0) _tile_dpbf16ps(2, 0, q);       \
  if (k1) _tile_dpbf16ps(3, 1, q);       \
  break
    switch (D <= 128 ? c : -1) {
      case 0: PAGEDLM_PRODUCTS(4);
      case 1: PAGEDLM_PRODUCTS(5);
      case 2: PAGEDLM_PRODUCTS(6);
      case 3: PAGEDLM_PRODUCTS(7);
      default:
        _tile_loadd(4, qp + int64_t{c} * 16 * lanes + v * kLanes, lanes * 4);
        PAGEDLM_PRODUCTS(4);
    }
#undef PAGEDLM_PRODUCTS
  }
  if (k0) _tile_stored(2, logits, kLanes * 4);
  if (k1) _tile_stored(3, logits + kLanes * kLanes, kLanes * 4);
}

// Prefill, D <= 64: loads lane groups v's and v + 1's query pairs into tiles 4, 5 and 6, 7, where
// chunk_logits_pair finds them.
inline void load_query_pair(const uint32_t* qp, int lanes, int v, int D) {
  const uint32_t* q = qp + v * kLanes;
  _tile_loadd(4, q, lanes * 4);
  _tile_loadd(6, q + kLanes, lanes * 4);
  if (D > 32) {
    _tile_loadd(5, q + 16 * lanes, lanes * 4);
    _tile_loadd(7, q + 16 * lanes + kLanes, lanes * 4);
  }
}

// chunk_logits for lane groups v and v + 1 at once where D <= 64, from the query pairs
// load_query_pair left: each K tile loaded once for both products (C tiles 2 and 3), into logits0 and
// logits1.
template <typename K>
inline void chunk_logits_pair(const K& keys, int D, float* logits0, float* logits1) {
#define PAGEDLM_GROUP_LOGITS(g, kg)                                    \
  if (const bf16* k = keys(g)) {                                       \
    _tile_zero(2);                                                     \
    _tile_zero(3);                                                     \
    _tile_loadd(kg, k, D * 2);                                         \
    _tile_dpbf16ps(2, kg, 4);                                          \
    _tile_dpbf16ps(3, kg, 6);                                          \
    if (D > 32) {                                                      \
      _tile_loadd(kg, k + 32, D * 2);                                  \
      _tile_dpbf16ps(2, kg, 5);                                        \
      _tile_dpbf16ps(3, kg, 7);                                        \
    }                                                                  \
    _tile_stored(2, logits0 + (g) * kLanes * kLanes, kLanes * 4);      \
    _tile_stored(3, logits1 + (g) * kLanes * kLanes, kLanes * 4);      \
  }
  PAGEDLM_GROUP_LOGITS(0, 0)
  PAGEDLM_GROUP_LOGITS(1, 1)
#undef PAGEDLM_GROUP_LOGITS
}

// Decode's Q.K for 16 keys: logits[n * 16 + g] = k_n . q_g (not yet scaled) for the keys' rows k (bf16
// [16, D], rows D apart: a block's rows in the cache, read by the tile unit without a copy) and up to 16
// query heads' pairs qp as bf16_tiles::pack_queries leaves them ([D / 2, 16], zero past the heads).
inline void key_logits(const bf16* k, const uint32_t* qp, int D, float* logits) {
  _tile_zero(2);
  for (int c = 0; c < D; c += 32) {
    _tile_loadd(0, k + c, D * 2);
    _tile_loadd(1, qp + c / 2 * kLanes, kLanes * 4);
    _tile_dpbf16ps(2, 0, 1);
  }
  _tile_stored(2, logits, kLanes * 4);
}

// P.V for the tile's query vectors: acc[g * D + d] = acc * corr[g] (where corr[g] != 1), then plus the
// chunk's key pairs, from p (bf16 [rows, 32]) and vp as bf16_tiles::pack_chunk_values leaves it
// ([16, D]).
inline void values(const bf16* p, int rows, const float* corr, const uint32_t* vp, int D, float* acc) {
  for (int g = 0; g < rows; ++g)
    if (corr[g] != 1.f) scale_inplace(acc + int64_t{g} * D, corr[g], D);
  _tile_loadd(3, p, bf16_tiles::kChunk * 2);
  for (int d = 0; d < D; d += kLanes) {
    _tile_loadd(5, acc + d, D * 4);
    _tile_loadd(4, vp + d, D * 4);
    _tile_dpbf16ps(5, 3, 4);
    _tile_stored(5, acc + d, D * 4);
  }
}

// The values of the chunk of keys [c0, c0 + 32) as prefill's P.V reads them (its A operand, head
// dimensions as rows): vt[d * 16 + j] = (v[2j][d], v[2j + 1][d]), keys in [begin, end) from their
// blocks (block(kb) as for bf16_tiles::pack_chunk_values), the others zero. scratch: 16 * D dwords.
template <typename F>
inline void transpose_values(const F& block, int c0, int bs, int D, int begin, int end, uint32_t* scratch,
                             uint32_t* vt) {
  bf16_tiles::pack_chunk_values(block, c0, bs, D, begin, end, scratch);
  for (int d0 = 0; d0 < D; d0 += kLanes) bf16_tiles::transpose_16x16(scratch + d0, D, kLanes, vt + d0 * kLanes, kLanes);
}

// The output tiles of prefill's P.V (16 head dimensions x 16 query vectors each), with the A tile each
// reads (alternating, so that loading the next does not wait on the product before): the intrinsics
// take a tile's number as a literal, so a loop over them names each.
#define PAGEDLM_FOR_OUTPUT_TILES(count, body)                    \
  do {                                                           \
    { [[maybe_unused]] constexpr int kTile = 0; body(4, 0); }     \
    { [[maybe_unused]] constexpr int kTile = 1; body(5, 1); }     \
    if ((count) == 4) {                                          \
      { [[maybe_unused]] constexpr int kTile = 2; body(6, 0); }   \
      { [[maybe_unused]] constexpr int kTile = 3; body(7, 1); }   \
    }                                                            \
  } while (0)

// Output tile t (16 head dimensions x 16 query vectors) times each query vector's correction c.
#define PAGEDLM_CORRECT_TILE(t, c, buf)                                                            \
  do {                                                                                             \
    _tile_stored(t, buf, kLanes * 4);                                                              \
    for (int d = 0; d < kLanes; ++d)                                                               \
      _mm512_store_ps(buf + d * kLanes, _mm512_mul_ps(_mm512_load_ps(buf + d * kLanes), c));       \
    _tile_loadd(t, buf, kLanes * 4);                                                               \
  } while (0)

// Whether a chunk's softmax corrected any of a lane group's 16 query vectors (corr: their corrections).
inline bool corrects(bool corrected, const float* corr) {
  return corrected && std::any_of(corr, corr + kLanes, [](float c) { return c != 1.f; });
}

// Prefill's P.V for one lane group over a partition's chunks, as bf16_tiles::softmax_chunk left them
// (pp: [chunks][16, 16] pairs, corr: [chunks][16], corrected: [chunks]) and their values as
// transpose_values left them (vt: [chunks][D, 16] dwords): acc_t[d * acc_stride + m] for the 16 query
// vectors m, 0, then per chunk acc_t * corr (where corr != 1), plus the chunk's key pairs, up to 64
// head dimensions at a time in tiles that stay in registers across the chunks.
inline void lane_group_values(const uint32_t* pp, const float* corr, const uint8_t* corrected, int chunks,
                              const uint32_t* vt, int D, float* acc_t, int acc_stride) {
  alignas(64) float buf[kLanes * kLanes];
  for (int d0 = 0; d0 < D; d0 += 4 * kLanes) {
    const int tiles = std::min(4, (D - d0) / kLanes);  // 2 or 4: D is a multiple of 32
    float* out = acc_t + int64_t{d0} * acc_stride;
#define PAGEDLM_ZERO(t, a) _tile_zero(t)
    PAGEDLM_FOR_OUTPUT_TILES(tiles, PAGEDLM_ZERO);
    for (int b = 0; b < chunks; ++b) {
      if (corrects(corrected[b], corr + b * kLanes)) {
        const __m512 cv = _mm512_loadu_ps(corr + b * kLanes);
#define PAGEDLM_CORRECT(t, a) PAGEDLM_CORRECT_TILE(t, cv, buf)
        PAGEDLM_FOR_OUTPUT_TILES(tiles, PAGEDLM_CORRECT);
      }
      _tile_loadd(2, pp + int64_t{b} * bf16_tiles::kChunkPairs * kLanes, kLanes * 4);
      const uint32_t* chunk = vt + (int64_t{b} * D + d0) * kLanes;
#define PAGEDLM_VALUES(t, a)                                     \
  _tile_loadd(a, chunk + kTile * kLanes * kLanes, kLanes * 4); \
  _tile_dpbf16ps(t, a, 2)
      PAGEDLM_FOR_OUTPUT_TILES(tiles, PAGEDLM_VALUES);
    }
#define PAGEDLM_STORE(t, a) _tile_stored(t, out + kTile * kLanes * acc_stride, acc_stride * 4)
    PAGEDLM_FOR_OUTPUT_TILES(tiles, PAGEDLM_STORE);
#undef PAGEDLM_ZERO
#undef PAGEDLM_CORRECT
#undef PAGEDLM_VALUES
#undef PAGEDLM_STORE
  }
}

#undef PAGEDLM_FOR_OUTPUT_TILES

// lane_group_values for two lane groups at once (pp, corr, corrected and acc_t for each), 32 head
// dimensions at a time: each chunk's two A tiles of values serve both groups' products (tiles 0, 1
// the values, 2, 3 the groups' P pairs, 4, 5 and 6, 7 their outputs), so the values are read half as
// often. The arithmetic per output element is lane_group_values'.
inline void lane_pair_values(const uint32_t* const pp[2], const float* const corr[2], const uint8_t* const corrected[2],
                             int chunks, const uint32_t* vt, int D, float* const acc_t[2], int acc_stride) {
  alignas(64) float buf[kLanes * kLanes];
  auto needs = [&](int g, int b) { return corrects(corrected[g][b], corr[g] + b * kLanes); };
  for (int d0 = 0; d0 < D; d0 += 2 * kLanes) {
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int b = 0; b < chunks; ++b) {
      if (needs(0, b)) {
        const __m512 c = _mm512_loadu_ps(corr[0] + b * kLanes);
        PAGEDLM_CORRECT_TILE(4, c, buf);
        PAGEDLM_CORRECT_TILE(5, c, buf);
      }
      if (needs(1, b)) {
        const __m512 c = _mm512_loadu_ps(corr[1] + b * kLanes);
        PAGEDLM_CORRECT_TILE(6, c, buf);
        PAGEDLM_CORRECT_TILE(7, c, buf);
      }
      const uint32_t* chunk = vt + (int64_t{b} * D + d0) * kLanes;
      _tile_loadd(0, chunk, kLanes * 4);
      _tile_loadd(2, pp[0] + int64_t{b} * bf16_tiles::kChunkPairs * kLanes, kLanes * 4);
      _tile_dpbf16ps(4, 0, 2);
      _tile_loadd(1, chunk + kLanes * kLanes, kLanes * 4);
      _tile_dpbf16ps(5, 1, 2);
      _tile_loadd(3, pp[1] + int64_t{b} * bf16_tiles::kChunkPairs * kLanes, kLanes * 4);
      _tile_dpbf16ps(6, 0, 3);
      _tile_dpbf16ps(7, 1, 3);
    }
    _tile_stored(4, acc_t[0] + int64_t{d0} * acc_stride, acc_stride * 4);
    _tile_stored(5, acc_t[0] + int64_t{d0 + kLanes} * acc_stride, acc_stride * 4);
    _tile_stored(6, acc_t[1] + int64_t{d0} * acc_stride, acc_stride * 4);
    _tile_stored(7, acc_t[1] + int64_t{d0 + kLanes} * acc_stride, acc_stride * 4);
  }
}

#undef PAGEDLM_CORRECT_TILE

}  // namespace pagedlm::cpu::amx_attention

#endif
