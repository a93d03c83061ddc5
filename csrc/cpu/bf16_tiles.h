#pragma once
// bf16 attention on the dot-product instruction (vdpbf16ps: one fp32 lane adds the exact products of
// a pair of bf16 pairs), as tiles of query vectors against cache blocks. Decode and prefill are both
// built from these pieces, which fix the arithmetic of every logit and output element whatever tile
// or batch it is computed in (batch invariance):
//   logit(q, k) = scale * (s0 + s1), s0 and s1 fp32 sums over the head dimension's even and odd
//                 pairs (2i, 2i + 1) in order, one pair per vdpbf16ps step (two chains, not one:
//                 decode has few of them and would wait on the instruction's latency);
//   per cache block, over the keys of the query's range in it, one online-softmax step: the block's
//                 max b; the reference m' = b if b > m + kRescaleThreshold (or nothing was seen
//                 yet), else m' = m (lazy rescaling: the reference moves only when the max has
//                 grown a lot, so most blocks need no correction); the correction c = exp(m - m')
//                 (exactly 1 if m' == m or nothing was summed yet), p = bf16(exp(logit - m')) (0
//                 outside the range), and sum = sum * c + the block's p summed by halving (key
//                 r + half onto key r, half = n / 2 .. 1); c's exp is ATen's vector exp_u20, p's
//                 exp_p below;
//   out[d] = out[d] * c, then the block's key pairs (2j, 2j + 1) in order, one vdpbf16ps step each
//                 (p pair times v pair).
// Prefill puts 16 query vectors in a register's lanes for both products (K and V elements are
// broadcast); decode, with only a KV head's few query heads, puts keys' logits in lanes for Q·K and
// the head dimension in lanes for P·V. The per-element arithmetic is the same, since the two products
// of a pair are exact whichever operand holds them. Keys outside a query's range get p = 0, and V rows
// that may hold anything (stale slots, slots before a sliding window) are zeroed before they meet it.

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
// How far (in logits) a block's max may exceed the softmax reference before the reference moves to
// it (FlashAttention-4's conditional rescaling). p stays at most e^8 ~ 3e3, far inside fp32's and
// bf16's range, and a block that moves nothing needs no correction of the output accumulated so far.
constexpr float kRescaleThreshold = 8.f;

// The kernels take whole vdpbf16ps steps over the head dimension and the engine's block sizes,
// whose key pairs and halving sums fit a register's lanes.
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

// Unscaled logits of lanes = 16 * NM packed query vectors against the n rows of k: [n, lanes].
template <int NM>
PAGEDLM_ALWAYS_INLINE void block_logits(const uint32_t* qp, const bf16* k, int n, int D, float* logits) {
  constexpr int lanes = NM * kLanes;
  int r = 0;
  for (; r + 4 <= n; r += 4) logit_rows<NM, 4>(qp, lanes, k + r * D, D, logits + r * lanes);
  for (; r < n; ++r) logit_rows<NM, 1>(qp, lanes, k + r * D, D, logits + r * lanes);
}

// p = exp(x - max) for the 16 lanes of x, as 2^t, t = x log2(e) - max log2(e) (one fma): 2^round(t)
// times a degree-5 polynomial for 2^(t - round(t)) (fitted here for relative error, at most 2.4e-7 in
// fp32 over [-0.5, 0.5]; the p that leave here are rounded to bf16 next). t is clamped below at -150,
// where 2^t is 0 in fp32. neg_max_log2e: -max log2(e).
PAGEDLM_ALWAYS_INLINE __m512 exp_p(__m512 x, __m512 neg_max_log2e) {
  const __m512 t = _mm512_max_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), neg_max_log2e), _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.0013276358f), f, _mm512_set1_ps(0.0096755028f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.055507131f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.24022120f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.69314694f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.0000001f));
  return _mm512_scalef_ps(q, n);
}

PAGEDLM_ALWAYS_INLINE __m512 neg_max_log2e(__m512 max) { return _mm512_mul_ps(max, _mm512_set1_ps(-1.44269504f)); }

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

// One online-softmax step over a block of N keys at positions key0 .. key0 + N - 1 for lanes = 16 * nm
// query vectors: unscaled logits [N, lanes] in (the logit is scale times each, soft-capped where
// soft_cap > 0); lane m sees keys [lo[m], hi[m]], or every key when all_visible. Updates the state,
// writes each lane's correction to corr [lanes] and p as key pairs to pp [N / 2, lanes]
// (pp[j * lanes + m] = (p[2j][m], p[2j + 1][m])). Returns whether any correction differs from 1.
template <int N>
PAGEDLM_ALWAYS_INLINE bool softmax_block(const float* logits, int nm, float scale, int key0, const int* lo,
                                         const int* hi, bool all_visible, float soft_cap, SoftmaxState state,
                                         float* corr, uint32_t* pp) {
  const int lanes = nm * kLanes;
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 s = _mm512_set1_ps(scale), threshold = _mm512_set1_ps(kRescaleThreshold);
  bool corrected = false;
  for (int v = 0; v < nm; ++v) {
    const int off = v * kLanes;
    const __m512i lo_v = _mm512_loadu_si512(lo + off), hi_v = _mm512_loadu_si512(hi + off);
    __m512 x[N];
    __mmask16 visible[N];
    __m512 block_max = minus_inf;
    for (int r = 0; r < N; ++r) {
      const __m512i key = _mm512_set1_epi32(key0 + r);
      visible[r] = all_visible ? __mmask16{0xffff}
                               : static_cast<__mmask16>(_mm512_cmp_epi32_mask(key, lo_v, _MM_CMPINT_NLT) &
                                                        _mm512_cmp_epi32_mask(key, hi_v, _MM_CMPINT_LE));
      x[r] = _mm512_mul_ps(_mm512_loadu_ps(logits + r * lanes + off), s);
      if (soft_cap > 0.f) x[r] = fVec(soft_cap) * (fVec(x[r]) * fVec(1.f / soft_cap)).tanh();
      block_max = _mm512_mask_max_ps(block_max, visible[r], block_max, x[r]);
    }
    const __m512 old_max = _mm512_loadu_ps(state.max + off), old_sum = _mm512_loadu_ps(state.sum + off);
    const __m512 new_max = _mm512_mask_mov_ps(
        old_max, _mm512_cmp_ps_mask(block_max, _mm512_add_ps(old_max, threshold), _CMP_GT_OQ), block_max);
    const __m512 c = correction(old_max, new_max, old_sum);
    corrected |= _mm512_cmp_ps_mask(c, _mm512_set1_ps(1.f), _CMP_NEQ_UQ) != 0;
    _mm512_storeu_ps(corr + off, c);
    _mm512_storeu_ps(state.max + off, new_max);
    const __m512 shift = neg_max_log2e(new_max);
    __m512 block_sum[N];
    for (int r = 0; r < N; r += 2) {
      __m256bh p[2];
      for (int h = 0; h < 2; ++h) {
        // Keys outside the range are exactly 0, even while the lane's reference is still -inf.
        const __m512 e = exp_p(x[r + h], shift);
        p[h] = _mm512_cvtneps_pbh(_mm512_maskz_mov_ps(visible[r + h], e));
        block_sum[r + h] = bf16_to_fp32(p[h]);
      }
      _mm512_storeu_si512(pp + r / 2 * lanes + off, interleave((__m256i)p[0], (__m256i)p[1]));
    }
    for (int half = N / 2; half > 0; half /= 2)
      for (int r = 0; r < half; ++r) block_sum[r] = _mm512_add_ps(block_sum[r], block_sum[r + half]);
    _mm512_storeu_ps(state.sum + off, _mm512_add_ps(_mm512_mul_ps(old_sum, c), block_sum[0]));
  }
  return corrected;
}

// softmax_block for the engine's block sizes (bf16_tiles::supports).
inline bool softmax_block(int n, const float* logits, int nm, float scale, int key0, const int* lo, const int* hi,
                          bool all_visible, float soft_cap, SoftmaxState state, float* corr, uint32_t* pp) {
  switch (n) {
    case 8: return softmax_block<8>(logits, nm, scale, key0, lo, hi, all_visible, soft_cap, state, corr, pp);
    case 16: return softmax_block<16>(logits, nm, scale, key0, lo, hi, all_visible, soft_cap, state, corr, pp);
    default: return softmax_block<32>(logits, nm, scale, key0, lo, hi, all_visible, soft_cap, state, corr, pp);
  }
}

// Decode's Q·K, keys in lanes. kt[i * kt_stride + n] = (k[n][2i], k[n][2i + 1]) for the first 16 rows
// of a block (rows past n are zero): a 16 x 16 transpose of 32-bit pairs per 32 head dimensions (of
// any 32-bit elements, 16 rows of D / 2 of them D / 2 apart).
inline void transpose_keys(const bf16* k, int n, int D, uint32_t* kt, int64_t kt_stride = kLanes) {
  for (int i0 = 0; i0 < D / 2; i0 += kLanes) {
    __m512i r[kLanes], t[kLanes];
    for (int j = 0; j < kLanes; ++j) r[j] = j < n ? _mm512_loadu_si512(k + j * D + 2 * i0) : _mm512_setzero_si512();
    for (int j = 0; j < kLanes; j += 2) {
      t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
      t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
    }
    // r[4a + b], 128-bit lane L: pair 4L + b of rows 4a .. 4a + 3.
    for (int a = 0; a < kLanes; a += 4) {
      r[a] = _mm512_unpacklo_epi64(t[a], t[a + 2]);
      r[a + 1] = _mm512_unpackhi_epi64(t[a], t[a + 2]);
      r[a + 2] = _mm512_unpacklo_epi64(t[a + 1], t[a + 3]);
      r[a + 3] = _mm512_unpackhi_epi64(t[a + 1], t[a + 3]);
    }
    for (int b = 0; b < 4; ++b) {
      const __m512i x = _mm512_shuffle_i32x4(r[b], r[4 + b], 0x88), y = _mm512_shuffle_i32x4(r[b], r[4 + b], 0xdd);
      const __m512i z = _mm512_shuffle_i32x4(r[8 + b], r[12 + b], 0x88), w = _mm512_shuffle_i32x4(r[8 + b], r[12 + b], 0xdd);
      _mm512_storeu_si512(kt + (i0 + b) * kt_stride, _mm512_shuffle_i32x4(x, z, 0x88));
      _mm512_storeu_si512(kt + (i0 + b + 4) * kt_stride, _mm512_shuffle_i32x4(y, w, 0x88));
      _mm512_storeu_si512(kt + (i0 + b + 8) * kt_stride, _mm512_shuffle_i32x4(x, z, 0xdd));
      _mm512_storeu_si512(kt + (i0 + b + 12) * kt_stride, _mm512_shuffle_i32x4(y, w, 0xdd));
    }
  }
}

// logits[g * stride + n] = q[g] · k_n (not yet scaled) for NG query vectors and the 16 keys of kt.
template <int NG>
PAGEDLM_ALWAYS_INLINE void logits_by_key(const bf16* const* q, const uint32_t* kt, int D, float* logits, int stride) {
  __m512 acc[2][NG];
  for (int h = 0; h < 2; ++h)
    for (int g = 0; g < NG; ++g) acc[h][g] = _mm512_setzero_ps();
  for (int i = 0; i < D / 2; i += 2) {
    for (int h = 0; h < 2; ++h) {
      const __m512bh k = load_pairs(kt + (i + h) * kLanes);
      for (int g = 0; g < NG; ++g) acc[h][g] = _mm512_dpbf16_ps(acc[h][g], broadcast_pair(q[g] + 2 * (i + h)), k);
    }
  }
  for (int g = 0; g < NG; ++g) _mm512_storeu_ps(logits + g * stride, _mm512_add_ps(acc[0][g], acc[1][g]));
}

// softmax_block for one query vector with its keys' unscaled logits in lanes: logits [n] of the
// block's keys, of which [first, last) are visible. Updates *max and *sum, returns the correction and
// writes p to p [n] (bf16; pairs as softmax_block's pp).
inline float softmax_keys(const float* logits, int n, int first, int last, float scale, float soft_cap, float* max,
                          float* sum, bf16* p) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 x[2];
  __mmask16 visible[2];
  float block_max = -std::numeric_limits<float>::infinity();
  for (int v = 0; v * kLanes < n; ++v) {
    const int lo = std::clamp(first - v * kLanes, 0, kLanes), hi = std::clamp(last - v * kLanes, 0, kLanes);
    visible[v] = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
    x[v] = _mm512_mul_ps(_mm512_loadu_ps(logits + v * kLanes), _mm512_set1_ps(scale));
    if (soft_cap > 0.f) x[v] = fVec(soft_cap) * (fVec(x[v]) * fVec(1.f / soft_cap)).tanh();
    block_max = std::max(block_max, _mm512_reduce_max_ps(_mm512_mask_mov_ps(minus_inf, visible[v], x[v])));
  }
  const float new_max = block_max > *max + kRescaleThreshold ? block_max : *max;
  const float c = _mm512_cvtss_f32(correction(_mm512_set1_ps(*max), _mm512_set1_ps(new_max), _mm512_set1_ps(*sum)));
  __m512 block_sum = _mm512_setzero_ps();  // lanes past n stay 0: adding them changes nothing
  for (int v = 0; v * kLanes < n; ++v) {
    const __m512 e = exp_p(x[v], neg_max_log2e(_mm512_set1_ps(new_max)));
    const __m256bh pv = _mm512_cvtneps_pbh(_mm512_maskz_mov_ps(visible[v], e));
    // With 32 keys, the first halving: key r + 16 onto key r.
    block_sum = v == 0 ? bf16_to_fp32(pv) : _mm512_add_ps(block_sum, bf16_to_fp32(pv));
    if (n - v * kLanes >= kLanes) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + v * kLanes), (__m256i)pv);
    } else {
      alignas(32) bf16 tail[kLanes];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tail), (__m256i)pv);
      std::copy_n(tail, n - v * kLanes, p + v * kLanes);
    }
  }
  // Halving over the lanes: + lane r + 8, + r + 4, + r + 2, + r + 1.
  block_sum = _mm512_add_ps(block_sum, _mm512_shuffle_f32x4(block_sum, block_sum, 0x4e));
  block_sum = _mm512_add_ps(block_sum, _mm512_shuffle_f32x4(block_sum, block_sum, 0xb1));
  block_sum = _mm512_add_ps(block_sum, _mm512_permute_ps(block_sum, 0x4e));
  block_sum = _mm512_add_ps(block_sum, _mm512_permute_ps(block_sum, 0xb1));
  const float s = *sum * c + _mm512_cvtss_f32(block_sum);
  *max = new_max;
  *sum = s;
  return c;
}

// out[0 : 16 * C] += query g's p pairs times the pairs of vp's columns [0, 16 * C) (rows D apart).
template <int C>
PAGEDLM_ALWAYS_INLINE void values_columns(const uint32_t* pp, const uint32_t* vp, int pairs, int D, float* out) {
  __m512 o[C];
  for (int c = 0; c < C; ++c) o[c] = _mm512_loadu_ps(out + c * kLanes);
  for (int j = 0; j < pairs; ++j) {
    const __m512bh p = broadcast_pair(pp + j);
    for (int c = 0; c < C; ++c) o[c] = _mm512_dpbf16_ps(o[c], p, load_pairs(vp + j * D + c * kLanes));
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + c * kLanes, o[c]);
}

// Decode's P·V, head dimension in lanes: acc[g][0:D] = acc[g] * corr[g] plus the block's key pairs,
// for query vectors g < count; query g's pair j is pp[g * query_stride + j].
inline void values_by_dim(const uint32_t* pp, int64_t query_stride, int count, const float* corr, const uint32_t* vp,
                          int pairs, int D, float* acc) {
  for (int g = 0; g < count; ++g) {
    float* a = acc + g * D;
    if (corr[g] != 1.f) scale_inplace(a, corr[g], D);
    int d = 0;
    for (; d + 8 * kLanes <= D; d += 8 * kLanes) values_columns<8>(pp + g * query_stride, vp + d, pairs, D, a + d);
    if (d + 4 * kLanes <= D) values_columns<4>(pp + g * query_stride, vp + d, pairs, D, a + d), d += 4 * kLanes;
    if (d < D) values_columns<2>(pp + g * query_stride, vp + d, pairs, D, a + d);
  }
}

// The blocks of one partition as softmax_block and pack_values left them, for prefill's P·V.
struct BlockRun {
  int blocks;
  int pairs;               // key pairs per block
  const uint32_t* pp;      // [blocks][pairs, lanes]
  const uint32_t* vp;      // [blocks][pairs, D]
  const float* corr;       // [blocks][lanes]
  const uint8_t* corrected;  // [blocks]: whether any correction differs from 1
};

// Prefill's P·V, query vectors in lanes: acc_t[d * lanes + m] (head dimension major) = 0, then per
// block acc_t * corr, plus the block's key pairs.
template <int NM>
inline void values_by_lane(const BlockRun& run, int D, float* acc_t) {
  constexpr int lanes = NM * kLanes, C = 8;
  for (int d0 = 0; d0 < D; d0 += C) {
    __m512 o[C][NM];
    for (int c = 0; c < C; ++c)
      for (int v = 0; v < NM; ++v) o[c][v] = _mm512_setzero_ps();
    for (int b = 0; b < run.blocks; ++b) {
      if (run.corrected[b]) {
        for (int v = 0; v < NM; ++v) {
          const __m512 corr = _mm512_loadu_ps(run.corr + b * lanes + v * kLanes);
          for (int c = 0; c < C; ++c) o[c][v] = _mm512_mul_ps(o[c][v], corr);
        }
      }
      const uint32_t* pp = run.pp + int64_t{b} * run.pairs * lanes;
      const uint32_t* vp = run.vp + int64_t{b} * run.pairs * D + d0;
      for (int j = 0; j < run.pairs; ++j) {
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
