#pragma once
// bf16 attention on the dot-product instruction (vdpbf16ps: one fp32 lane adds the exact products of
// a pair of bf16 pairs), as tiles of query vectors against chunks of keys. Decode and prefill are both
// built from these pieces, which fix the arithmetic of every logit and output element whatever tile
// or batch it is computed in (batch invariance):
//   logit(q, k) = scale * (s0 + s1), s0 and s1 fp32 sums over the head dimension's even and odd
//                 pairs (2i, 2i + 1) in order, one pair per vdpbf16ps step (two chains, not one:
//                 decode has few of them and would wait on the instruction's latency); with a soft
//                 cap, soft_cap * tanh(logit / soft_cap);
//   per chunk of kChunk = 32 keys (positions [32 c, 32 c + 32), one to four cache blocks), over the
//                 keys of the query's range in it, one online-softmax step: the chunk's max logit b;
//                 the reference m' = b if b > m + kRescaleThreshold (or nothing was seen yet), else
//                 m' = m (lazy rescaling: the reference moves only when the max has grown a lot, so
//                 most chunks need no correction); the correction c = exp(m - m') (ATen's exp_u20;
//                 exactly 1 if m' == m or nothing was summed yet); p = bf16(exp_p(logit - m')) (0
//                 outside the range; exp_p's fma takes the unscaled sum and scale * log2(e) where
//                 there is no soft cap); and sum = sum * c + the chunk's p summed by halving (key
//                 r + half onto key r, half = 16 .. 1);
//   out[d] = out[d] * c, then the chunk's key pairs (2j, 2j + 1) in order, one vdpbf16ps step each
//                 (p pair times v pair).
// Prefill puts 16 query vectors in a register's lanes for both products (K and V elements are
// broadcast); decode, with only a KV head's few query heads, puts keys' logits in lanes for Q·K and
// the head dimension in lanes for P·V. The per-element arithmetic is the same, since the two products
// of a pair are exact whichever operand holds them. Keys outside a query's range get p = 0, and V rows
// that may hold anything (stale slots, slots before a sliding window, blocks past the sequence) are
// zeroed before they meet it. The chunks do not depend on the cache's block size, so neither do the
// bits.

#include "vec.h"

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define PAGEDLM_BF16_TILES 1

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace pagedlm::cpu::bf16_tiles {

using bf16 = c10::BFloat16;

constexpr int kLanes = 16;
// Query vectors of one prefill tile: three registers of lanes; with 4 keys in two chains (Q·K) or 8
// head dimensions (P·V) that is 24 accumulators.
constexpr int kMaxTileLanes = 48;
// The AMX kernel's, which takes one register of lanes at a time: query vectors times head size
// (192 x 64 measured best on SmolLM2's heads; 48 .. 384 within 10%), so that its per-partition
// accumulators stay within L2 while each partition's keys and values are read once for all of them.
constexpr int kAmxTileElements = 192 * 64;
constexpr int kMaxAmxTileLanes = kAmxTileElements / 32;
// How far (in logits) a chunk's max may exceed the softmax reference before the reference moves to
// it (FlashAttention-4's conditional rescaling). p stays at most e^8 ~ 3e3, far inside fp32's and
// bf16's range, and a chunk that moves nothing needs no correction of the output accumulated so far.
constexpr float kRescaleThreshold = 8.f;

// Keys per online-softmax step: its key pairs fill an AMX tile's depth.
constexpr int kChunk = 32;
constexpr int kChunkPairs = kChunk / 2;

// The kernels take whole vdpbf16ps steps over the head dimension, and chunks of whole cache blocks.
inline bool supports(int head_size, int block_size) {
  return head_size % 32 == 0 && (block_size == 8 || block_size == 16 || block_size == 32);
}

PAGEDLM_ALWAYS_INLINE __m512bh broadcast_pair(const void* p) {
  int32_t x;
  std::memcpy(&x, p, sizeof(x));
  return (__m512bh)_mm512_set1_epi32(x);
}

PAGEDLM_ALWAYS_INLINE __m512bh load_pairs(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

PAGEDLM_ALWAYS_INLINE __m512 bf16_to_fp32(__m256bh x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)x), 16));
}

// The `count` entries (a multiple of 32) of cache rows as bf16: the rows themselves in a bf16
// cache; fp8 entries converted into buf, exactly (bf16 holds every fp8 value), so the arithmetic
// below is the same for every cache dtype.
template <typename C>
PAGEDLM_ALWAYS_INLINE const bf16* bf16_rows(const C* rows, int64_t count, bf16* buf) {
  if constexpr (std::is_same_v<C, bf16>) {
    return rows;
  } else {
    for (int64_t i = 0; i < count; i += 2 * kLanes) {
      const __m512 lo = fp8_to_fp32(rows + i), hi = fp8_to_fp32(rows + i + kLanes);
      _mm512_storeu_si512(buf + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    return buf;
  }
}

// 16 dwords (a[i], b[i]) from two vectors of 16 bf16.
PAGEDLM_ALWAYS_INLINE __m512i interleave(__m256i a, __m256i b) {
  const __m512i index = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), index, _mm512_castsi256_si512(b));
}

// qp[i * lanes + m] = (q_m[2i], q_m[2i + 1]) for the query vectors row(0) .. row(count - 1); lanes
// past count are zero.
template <typename F>
inline void pack_queries(const F& row, int count, int lanes, int D, uint32_t* qp) {
  std::fill(qp, qp + D / 2 * lanes, 0u);
  for (int m = 0; m < count; ++m) {
    const bf16* q = row(m);
    for (int i = 0; i < D / 2; ++i) std::memcpy(qp + i * lanes + m, q + 2 * i, sizeof(uint32_t));
  }
}

// vp[j * D + d] = (v[2j][d], v[2j + 1][d]) for the n rows of a block; rows outside [first, last) are
// read as zeros.
inline void pack_values(const bf16* v, int n, int D, int first, int last, uint32_t* vp) {
  for (int r = 0; r < n; r += 2, vp += D) {
    const bool a_in = r >= first && r < last, b_in = r + 1 >= first && r + 1 < last;
    for (int d = 0; d < D; d += kLanes) {
      const __m256i a = a_in ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + r * D + d)) : __m256i{};
      const __m256i b = b_in ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + (r + 1) * D + d)) : __m256i{};
      _mm512_storeu_si512(vp + d, interleave(a, b));
    }
  }
}

// logits[r * lanes + 16 * v + m] = q · k_r (not yet scaled) for NK rows of k and NM registers of query
// lanes.
template <int NM, int NK>
PAGEDLM_ALWAYS_INLINE void logit_rows(const uint32_t* qp, int lanes, const bf16* k, int D, float* logits) {
  __m512 acc[2][NK][NM];
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < NK; ++r)
      for (int v = 0; v < NM; ++v) acc[h][r][v] = _mm512_setzero_ps();
  for (int i = 0; i < D / 2; i += 2) {
    for (int h = 0; h < 2; ++h) {
      __m512bh q[NM];
      for (int v = 0; v < NM; ++v) q[v] = load_pairs(qp + (i + h) * lanes + v * kLanes);
      for (int r = 0; r < NK; ++r) {
        const __m512bh kr = broadcast_pair(k + r * D + 2 * (i + h));
        for (int v = 0; v < NM; ++v) acc[h][r][v] = _mm512_dpbf16_ps(acc[h][r][v], kr, q[v]);
      }
    }
  }
  for (int r = 0; r < NK; ++r)
    for (int v = 0; v < NM; ++v)
      _mm512_storeu_ps(logits + r * lanes + v * kLanes, _mm512_add_ps(acc[0][r][v], acc[1][r][v]));
}

// vp[j * D + d] = (v[2j][d], v[2j + 1][d]) for the chunk of keys [c0, c0 + 32): keys in [begin, end)
// from their blocks' rows (block(kb): bf16 [bs, D] of the block that starts at key kb), the others
// zero.
template <typename F>
inline void pack_chunk_values(const F& block, int c0, int bs, int D, int begin, int end, uint32_t* vp) {
  for (int kb = c0; kb < c0 + kChunk; kb += bs) {
    const int first = std::clamp(begin - kb, 0, bs), last = std::clamp(end - kb, 0, bs);
    pack_values(first < last ? block(kb) : nullptr, bs, D, first, last, vp + (kb - c0) / 2 * D);
  }
}

// Unscaled logits of lanes = 16 * NM packed query vectors against the n rows of k: [n, lanes].
template <int NM>
PAGEDLM_ALWAYS_INLINE void block_logits(const uint32_t* qp, const bf16* k, int n, int D, float* logits) {
  constexpr int lanes = NM * kLanes;
  int r = 0;
  for (; r + 4 <= n; r += 4) logit_rows<NM, 4>(qp, lanes, k + r * D, D, logits + r * lanes);
  for (; r < n; ++r) logit_rows<NM, 1>(qp, lanes, k + r * D, D, logits + r * lanes);
}

// p = exp(x - max) for the 16 lanes of a logit x = a * l (the scaled logit is a = scale, a soft-capped
// one l itself with a = 1), as 2^t, t = l a log2(e) - max log2(e) (one fma; shift = -max log2(e)):
// 2^floor(t) (vscalefps, which gives 0 far below fp32's range) times a degree-4 polynomial for
// 2^(t - floor(t)) (vreduceps; fitted here for relative error, at most 2.7e-6 in fp32 over [0, 1):
// the p that leave here are rounded to bf16 next, whose half-ulp is 2e-3). a_log2e: a log2(e).
PAGEDLM_ALWAYS_INLINE __m512 exp_p(__m512 l, __m512 a_log2e, __m512 shift) {
  const __m512 t = _mm512_fmadd_ps(l, a_log2e, shift);
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.013534014f), f, _mm512_set1_ps(0.052011319f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.24144320f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.69300365f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.0000026f));
  return _mm512_scalef_ps(q, t);
}

constexpr float kLog2e = 1.44269504f;

// The logits of a row of 16: without a soft cap the unscaled l (the softmax scales it within exp_p,
// and its max as scale * max(l), which is max(scale * l) exactly for scale > 0), with one the capped
// soft_cap * tanh(scale * l / soft_cap).
PAGEDLM_ALWAYS_INLINE __m512 capped(__m512 l, float scale, float soft_cap) {
  if (soft_cap <= 0.f) return l;
  return fVec(soft_cap) * (fVec(_mm512_mul_ps(l, _mm512_set1_ps(scale))) * fVec(1.f / soft_cap)).tanh();
}

// The online softmax's correction per lane: exp(old_max - new_max) where the max grew over a nonzero
// sum, else exactly 1; one vector exp for 16 lanes (softmax_keys takes it for one lane, so the two
// agree).
PAGEDLM_ALWAYS_INLINE __m512 correction(__m512 old_max, __m512 new_max, __m512 old_sum) {
  const __mmask16 grew = _mm512_cmp_ps_mask(new_max, old_max, _CMP_GT_OQ) &
                         _mm512_cmp_ps_mask(old_sum, _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 e = (fVec(old_max) - fVec(new_max)).exp_u20();
  return _mm512_mask_mov_ps(_mm512_set1_ps(1.f), grew, e);
}

// Per-lane online-softmax state of up to kMaxTileLanes query vectors over one partition.
struct SoftmaxState {
  float* max;  // running max logit, -inf before the first key
  float* sum;  // running sum of p
};

// One online-softmax step over the chunk of keys at positions key0 .. key0 + 31 for lanes = 16 * nm
// query vectors: unscaled logits [32, lanes] in (the logit is scale times each, soft-capped where
// soft_cap > 0; rows of keys no lane sees may hold anything; with a soft cap the capped logits are
// left in their place); lane m sees keys [lo[m], hi[m]], or every key when all_visible. Updates the
// state, writes each lane's correction to corr [lanes] and p as key pairs to pp [16, lanes]
// (pp[j * lanes + m] = (p[2j][m], p[2j + 1][m])). Returns whether any correction differs from 1.
inline bool softmax_chunk(float* logits, int nm, float scale, int key0, const int* lo, const int* hi, bool all_visible,
                          float soft_cap, SoftmaxState state, float* corr, uint32_t* pp) {
  const int lanes = nm * kLanes;
  // Per the row values capped() leaves: the factor to the logit, and that times log2(e).
  const float a = soft_cap > 0.f ? 1.f : scale;
  const __m512 a_log2e = _mm512_set1_ps(a * kLog2e), threshold = _mm512_set1_ps(kRescaleThreshold);
  const __m512i hi_bits = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  bool corrected = false;
  for (int v = 0; v < nm; ++v) {
    const int off = v * kLanes;
    const __m512i lo_v = _mm512_loadu_si512(lo + off), hi_v = _mm512_loadu_si512(hi + off);
    auto visible = [&](int r) -> __mmask16 {
      if (all_visible) return 0xffff;
      const __m512i key = _mm512_set1_epi32(key0 + r);
      return _mm512_cmp_epi32_mask(key, lo_v, _MM_CMPINT_NLT) & _mm512_cmp_epi32_mask(key, hi_v, _MM_CMPINT_LE);
    };
    auto row = [&](int r) { return logits + r * lanes + off; };
    __m512 max4[4];
    for (int i = 0; i < 4; ++i) max4[i] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int r = 0; r < kChunk; ++r) {
      __m512 l = _mm512_loadu_ps(row(r));
      if (soft_cap > 0.f) _mm512_storeu_ps(row(r), l = capped(l, scale, soft_cap));
      max4[r % 4] = _mm512_mask_max_ps(max4[r % 4], visible(r), max4[r % 4], l);
    }
    const __m512 chunk_max = _mm512_mul_ps(
        _mm512_max_ps(_mm512_max_ps(max4[0], max4[1]), _mm512_max_ps(max4[2], max4[3])), _mm512_set1_ps(a));
    const __m512 old_max = _mm512_loadu_ps(state.max + off), old_sum = _mm512_loadu_ps(state.sum + off);
    const __m512 new_max = _mm512_mask_mov_ps(
        old_max, _mm512_cmp_ps_mask(chunk_max, _mm512_add_ps(old_max, threshold), _CMP_GT_OQ), chunk_max);
    const __m512 c = correction(old_max, new_max, old_sum);
    corrected |= _mm512_cmp_ps_mask(c, _mm512_set1_ps(1.f), _CMP_NEQ_UQ) != 0;
    _mm512_storeu_ps(corr + off, c);
    _mm512_storeu_ps(state.max + off, new_max);
    const __m512 shift = _mm512_mul_ps(new_max, _mm512_set1_ps(-kLog2e));
    // Rows r and r + 1's p as pairs: dword m = (p[r][m], p[r + 1][m]). Keys outside the range are
    // exactly 0, even while the lane's reference is still -inf.
    const __m512i pairs_index = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23,
                                                 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    auto p_pairs = [&](int r) {
      const __m512 e0 = exp_p(_mm512_loadu_ps(row(r)), a_log2e, shift);
      const __m512 e1 = exp_p(_mm512_loadu_ps(row(r + 1)), a_log2e, shift);
      const __m512bh x = _mm512_maskz_cvtne2ps_pbh(_mm512_kunpackw(visible(r + 1), visible(r)), e1, e0);
      return _mm512_permutexvar_epi16(pairs_index, (__m512i)x);
    };
    // Rows 2j, 2j + 1 + {0, 8, 16, 24} at a time, so that the halving sum's first two steps (row r + 16
    // onto r, then r + 8 onto r) close as soon as their rows are done. A pair's dword holds row 2j's p
    // in its low half and 2j + 1's in its high half: each as fp32 by one shift or mask.
    __m512 sum8[8];
    for (int j = 0; j < 4; ++j) {
      __m512 half[2][2];  // [row 2j (+ 8) or 2j + 1 (+ 8)][+ 0 or + 8]
      for (int e = 0; e < 2; ++e) {
        const int r = 2 * j + 8 * e;
        const __m512i x = p_pairs(r), y = p_pairs(r + 16);
        _mm512_storeu_si512(pp + (r / 2) * lanes + off, x);
        _mm512_storeu_si512(pp + (r / 2 + 8) * lanes + off, y);
        half[0][e] = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)),
                                   _mm512_castsi512_ps(_mm512_slli_epi32(y, 16)));
        half[1][e] = _mm512_add_ps(_mm512_castsi512_ps(_mm512_and_si512(x, hi_bits)),
                                   _mm512_castsi512_ps(_mm512_and_si512(y, hi_bits)));
      }
      sum8[2 * j] = _mm512_add_ps(half[0][0], half[0][1]);
      sum8[2 * j + 1] = _mm512_add_ps(half[1][0], half[1][1]);
    }
    for (int h = 4; h > 0; h /= 2)
      for (int r = 0; r < h; ++r) sum8[r] = _mm512_add_ps(sum8[r], sum8[r + h]);
    _mm512_storeu_ps(state.sum + off, _mm512_add_ps(_mm512_mul_ps(old_sum, c), sum8[0]));
  }
  return corrected;
}

// out[i * out_stride + j] = in[j * in_stride + i] for a 16 x 16 block of 32-bit elements; rows j >= n
// of in are read as zeros.
inline void transpose_16x16(const uint32_t* in, int64_t in_stride, int n, uint32_t* out, int64_t out_stride) {
  __m512i r[kLanes], t[kLanes];
  for (int j = 0; j < kLanes; ++j) r[j] = j < n ? _mm512_loadu_si512(in + j * in_stride) : _mm512_setzero_si512();
  for (int j = 0; j < kLanes; j += 2) {
    t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
  }
  // r[4a + b], 128-bit lane L: element 4L + b of rows 4a .. 4a + 3.
  for (int a = 0; a < kLanes; a += 4) {
    r[a] = _mm512_unpacklo_epi64(t[a], t[a + 2]);
    r[a + 1] = _mm512_unpackhi_epi64(t[a], t[a + 2]);
    r[a + 2] = _mm512_unpacklo_epi64(t[a + 1], t[a + 3]);
    r[a + 3] = _mm512_unpackhi_epi64(t[a + 1], t[a + 3]);
  }
  for (int b = 0; b < 4; ++b) {
    const __m512i x = _mm512_shuffle_i32x4(r[b], r[4 + b], 0x88), y = _mm512_shuffle_i32x4(r[b], r[4 + b], 0xdd);
    const __m512i z = _mm512_shuffle_i32x4(r[8 + b], r[12 + b], 0x88), w = _mm512_shuffle_i32x4(r[8 + b], r[12 + b], 0xdd);
    _mm512_storeu_si512(out + b * out_stride, _mm512_shuffle_i32x4(x, z, 0x88));
    _mm512_storeu_si512(out + (b + 4) * out_stride, _mm512_shuffle_i32x4(y, w, 0x88));
    _mm512_storeu_si512(out + (b + 8) * out_stride, _mm512_shuffle_i32x4(x, z, 0xdd));
    _mm512_storeu_si512(out + (b + 12) * out_stride, _mm512_shuffle_i32x4(y, w, 0xdd));
  }
}

// Decode's Q·K, keys in lanes. kt[i * 16 + n] = (k[n][2i], k[n][2i + 1]) for the first 16 rows of a
// block (rows past n are zero): a 16 x 16 transpose of 32-bit pairs per 32 head dimensions.
inline void transpose_keys(const bf16* k, int n, int D, uint32_t* kt) {
  const auto* rows = reinterpret_cast<const uint32_t*>(k);
  for (int i0 = 0; i0 < D / 2; i0 += kLanes) transpose_16x16(rows + i0, D / 2, n, kt + i0 * kLanes, kLanes);
}

// logits[g * stride + 16 * h + n] = q[g] · k_{16 h + n} (not yet scaled) for NG query vectors and a
// chunk's 32 keys, whose halves h are transposed at kt + h * 8 D. Both halves and all NG vectors at
// once: 4 NG independent chains hide the instruction's latency, and each q pair is broadcast once.
template <int NG>
PAGEDLM_ALWAYS_INLINE void logits_by_key(const bf16* const* q, const uint32_t* kt, int D, float* logits, int stride) {
  __m512 acc[2][2][NG];  // [key half][chain][query vector]
  for (int k = 0; k < 2; ++k)
    for (int h = 0; h < 2; ++h)
      for (int g = 0; g < NG; ++g) acc[k][h][g] = _mm512_setzero_ps();
  const uint32_t* kt1 = kt + D / 2 * kLanes;
  for (int i = 0; i < D / 2; i += 2) {
    for (int h = 0; h < 2; ++h) {
      const __m512bh k0 = load_pairs(kt + (i + h) * kLanes), k1 = load_pairs(kt1 + (i + h) * kLanes);
      for (int g = 0; g < NG; ++g) {
        const __m512bh qg = broadcast_pair(q[g] + 2 * (i + h));
        acc[0][h][g] = _mm512_dpbf16_ps(acc[0][h][g], qg, k0);
        acc[1][h][g] = _mm512_dpbf16_ps(acc[1][h][g], qg, k1);
      }
    }
  }
  for (int k = 0; k < 2; ++k)
    for (int g = 0; g < NG; ++g)
      _mm512_storeu_ps(logits + g * stride + k * kLanes, _mm512_add_ps(acc[k][0][g], acc[k][1][g]));
}

// softmax_chunk for one query vector with its keys' unscaled logits in lanes: logits [32] of the
// chunk's keys, of which [first, last) are visible (the others may hold anything). Updates *max and
// *sum, returns the correction and writes p to p [32] (bf16; pairs as softmax_chunk's pp). Inlined:
// decode attention calls it head after head, and its reductions are chains that the next head's
// can then overlap (5% of the kernel's time with the K/V in cache).
PAGEDLM_ALWAYS_INLINE float softmax_keys(const float* logits, int first, int last, float scale, float soft_cap, float* max,
                          float* sum, bf16* p) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 x[2];
  __mmask16 visible[2];
  float chunk_max = -std::numeric_limits<float>::infinity();
  for (int v = 0; v < 2; ++v) {
    const int lo = std::clamp(first - v * kLanes, 0, kLanes), hi = std::clamp(last - v * kLanes, 0, kLanes);
    visible[v] = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
    x[v] = capped(_mm512_loadu_ps(logits + v * kLanes), scale, soft_cap);
    chunk_max = std::max(chunk_max, _mm512_reduce_max_ps(_mm512_mask_mov_ps(minus_inf, visible[v], x[v])));
  }
  const float a = soft_cap > 0.f ? 1.f : scale;  // as softmax_chunk
  chunk_max *= a;
  const float new_max = chunk_max > *max + kRescaleThreshold ? chunk_max : *max;
  const float c = _mm512_cvtss_f32(correction(_mm512_set1_ps(*max), _mm512_set1_ps(new_max), _mm512_set1_ps(*sum)));
  const __m512 shift = _mm512_mul_ps(_mm512_set1_ps(new_max), _mm512_set1_ps(-kLog2e));
  __m256bh pv[2];
  for (int v = 0; v < 2; ++v) {
    pv[v] = _mm512_maskz_cvtneps_pbh(visible[v], exp_p(x[v], _mm512_set1_ps(a * kLog2e), shift));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + v * kLanes), (__m256i)pv[v]);
  }
  // Halving: key r + 16 onto key r, then over the lanes + lane r + 8, + r + 4, + r + 2, + r + 1.
  __m512 chunk_sum = _mm512_add_ps(bf16_to_fp32(pv[0]), bf16_to_fp32(pv[1]));
  chunk_sum = _mm512_add_ps(chunk_sum, _mm512_shuffle_f32x4(chunk_sum, chunk_sum, 0x4e));
  chunk_sum = _mm512_add_ps(chunk_sum, _mm512_shuffle_f32x4(chunk_sum, chunk_sum, 0xb1));
  chunk_sum = _mm512_add_ps(chunk_sum, _mm512_permute_ps(chunk_sum, 0x4e));
  chunk_sum = _mm512_add_ps(chunk_sum, _mm512_permute_ps(chunk_sum, 0xb1));
  *sum = *sum * c + _mm512_cvtss_f32(chunk_sum);
  *max = new_max;
  return c;
}

// For NG query vectors g: out[g * D + d0 : + 16 C] times corr[g], plus query g's p pairs
// (pp[g * 16 + j]) times the pairs (v[2j][d], v[2j + 1][d]) of the chunk's V rows, columns [d0, d0 +
// 16 C). rows(r) is key r's row (bf16 [D]), or nullptr for a key outside the range (read as zeros);
// the pairs are interleaved in registers. The vectors share each pair, and their NG C chains hide
// the instruction's latency.
template <int NG, int C, typename R>
PAGEDLM_ALWAYS_INLINE void values_columns(const uint32_t* pp, const float* corr, const R& rows, int d0, int D,
                                          float* out) {
  __m512 o[NG][C];
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < C; ++c) {
      o[g][c] = _mm512_loadu_ps(out + g * D + d0 + c * kLanes);
      if (corr[g] != 1.f) o[g][c] = _mm512_mul_ps(o[g][c], _mm512_set1_ps(corr[g]));
    }
  for (int j = 0; j < kChunkPairs; ++j) {
    const bf16* a = rows(2 * j);
    const bf16* b = rows(2 * j + 1);
    __m512bh v[C];
    for (int c = 0; c < C; ++c) {
      const __m256i av = a ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + d0 + c * kLanes)) : __m256i{};
      const __m256i bv = b ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + d0 + c * kLanes)) : __m256i{};
      v[c] = (__m512bh)interleave(av, bv);
    }
    for (int g = 0; g < NG; ++g) {
      const __m512bh p = broadcast_pair(pp + g * kChunkPairs + j);
      for (int c = 0; c < C; ++c) o[g][c] = _mm512_dpbf16_ps(o[g][c], p, v[c]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * D + d0 + c * kLanes, o[g][c]);
}

// Decode's P·V, head dimension in lanes: acc[g][0:D] = acc[g] * corr[g] plus the chunk's key pairs,
// for NG query vectors; query g's pair j is pp[g * 16 + j], key r's V row rows(r) (values_columns).
template <int NG, typename R>
inline void values_by_dim(const uint32_t* pp, const float* corr, const R& rows, int D, float* acc) {
  int d = 0;
  for (; d + 4 * kLanes <= D; d += 4 * kLanes) values_columns<NG, 4>(pp, corr, rows, d, D, acc);
  if (d < D) values_columns<NG, 2>(pp, corr, rows, d, D, acc);
}

// The chunks of one partition as softmax_chunk and pack_values left them, for prefill's P·V.
struct ChunkRun {
  int chunks;
  const uint32_t* pp;        // [chunks][16, lanes]
  const uint32_t* vp;        // [chunks][16, D]
  const float* corr;         // [chunks][lanes]
  const uint8_t* corrected;  // [chunks]: whether any correction differs from 1
};

// Prefill's P·V, query vectors in lanes: acc_t[d * lanes + m] (head dimension major) = 0, then per
// chunk acc_t * corr, plus the chunk's key pairs.
template <int NM>
inline void values_by_lane(const ChunkRun& run, int D, float* acc_t) {
  constexpr int lanes = NM * kLanes, C = 8;
  for (int d0 = 0; d0 < D; d0 += C) {
    __m512 o[C][NM];
    for (int c = 0; c < C; ++c)
      for (int v = 0; v < NM; ++v) o[c][v] = _mm512_setzero_ps();
    for (int b = 0; b < run.chunks; ++b) {
      if (run.corrected[b]) {
        for (int v = 0; v < NM; ++v) {
          const __m512 corr = _mm512_loadu_ps(run.corr + b * lanes + v * kLanes);
          for (int c = 0; c < C; ++c) o[c][v] = _mm512_mul_ps(o[c][v], corr);
        }
      }
      const uint32_t* pp = run.pp + int64_t{b} * kChunkPairs * lanes;
      const uint32_t* vp = run.vp + int64_t{b} * kChunkPairs * D + d0;
      for (int j = 0; j < kChunkPairs; ++j) {
        __m512bh p[NM];
        for (int v = 0; v < NM; ++v) p[v] = load_pairs(pp + j * lanes + v * kLanes);
        for (int c = 0; c < C; ++c) {
          const __m512bh x = broadcast_pair(vp + j * D + c);
          for (int v = 0; v < NM; ++v) o[c][v] = _mm512_dpbf16_ps(o[c][v], x, p[v]);
        }
      }
    }
    for (int c = 0; c < C; ++c)
      for (int v = 0; v < NM; ++v) _mm512_storeu_ps(acc_t + (d0 + c) * lanes + v * kLanes, o[c][v]);
  }
}

}  // namespace pagedlm::cpu::bf16_tiles

#endif
