#pragma once
// Register-blocked Q·K and P·V over the rows of one run of cached keys, for any number of query vectors
// at once, so each run's K/V rows are converted to fp32 once for all of them. The blocking keeps about eight independent
// FMA chains in flight, which is what hides the FMA latency. Decode and prefill both walk the cache
// run by run with attend_rows, on K and V rows already in fp32 (fp32_rows).

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace pagedlm::cpu {

// Largest number of query vectors handled together; more would spill the accumulators.
constexpr int kMaxHeadChunk = 4;

// Calls f(std::integral_constant<int, NG>, first) for chunks of at most kMaxHeadChunk of [0, count).
template <typename F>
inline void for_each_head_chunk(int count, const F& f) {
  for (int first = 0; first < count; first += kMaxHeadChunk) {
    switch (std::min(kMaxHeadChunk, count - first)) {
      case 1: f(std::integral_constant<int, 1>{}, first); break;
      case 2: f(std::integral_constant<int, 2>{}, first); break;
      case 3: f(std::integral_constant<int, 3>{}, first); break;
      default: f(std::integral_constant<int, 4>{}, first); break;
    }
  }
}

// Where ATen's vec_reduce_all has its AVX2 specialisation (its guard: GCC, not clang): hsum8.
#if defined(CPU_CAPABILITY_AVX2) && defined(__GNUC__) && (__GNUC__ > 5)
#define PAGEDLM_HSUM8
// hsum(a[0]) .. hsum(a[7]) in one transposing reduction, returned in the order
// [0, 2, 4, 6, 1, 3, 5, 7]. Each sum is added as that specialisation adds (lanes four apart, then two
// apart, then adjacent), so it is the same bits as hsum.
PAGEDLM_ALWAYS_INLINE __m256 hsum8(const __m256 (&a)[8]) {
  __m256 c[4];  // 128-bit lane h of c[i]: b(2i + h)[t] = a[2i + h][t] + a[2i + h][t + 4]
  for (int i = 0; i < 4; ++i)
    c[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
  // lane h of s[i], with x = 4i + h, y = 4i + 2 + h: [b(x)[0] + b(x)[2], b(x)[1] + b(x)[3], b(y)[0] + b(y)[2], ...]
  __m256 s[2];
  for (int i = 0; i < 2; ++i)
    s[i] = _mm256_add_ps(_mm256_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44), _mm256_shuffle_ps(c[2 * i], c[2 * i + 1], 0xee));
  return _mm256_hadd_ps(s[0], s[1]);
}
#endif

// Stores the horizontal sums of the NG x R accumulators to logits[j * stride + r].
template <int NG, int R>
inline void store_sums(const fVec (&acc)[NG][R], float* logits, int stride) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (NG * R == 8) {
    // Transposing reduction: 8 sums for about a third of the shuffles of 8 separate ones.
    __m512 a[8], t[4], u[2];
    for (int i = 0; i < 8; ++i) a[i] = acc[i / R][i % R];
    for (int i = 0; i < 4; ++i)  // 128-bit lanes {0,1} of a[2i] and a[2i+1] + lanes {2,3}
      t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xee));
    for (int i = 0; i < 2; ++i)  // lane k of u[i] now holds 4 partial sums of a[4i + k]
      u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xdd));
    __m512 v = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xdd));
    v = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, 0xb1));  // lane k: [a[k], a[k], a[k+4], a[k+4]]
    alignas(64) float sums[16];
    _mm512_store_ps(sums, v);
    for (int i = 0; i < 8; ++i) logits[(i / R) * stride + i % R] = sums[(i % 4) * 4 + (i / 4) * 2];
    return;
  }
#endif
#ifdef PAGEDLM_HSUM8
  if constexpr (NG * R == 8) {
    __m256 a[8];
    for (int i = 0; i < 8; ++i) a[i] = acc[i / R][i % R];
    alignas(32) float sums[8];
    _mm256_store_ps(sums, hsum8(a));
    for (int i = 0; i < 8; ++i) logits[(i / R) * stride + i % R] = sums[(i % 2) * 4 + i / 2];
    return;
  }
#endif
  for (int j = 0; j < NG; ++j)
    for (int r = 0; r < R; ++r) logits[j * stride + r] = hsum(acc[j][r]);
}

// logits[j * stride + r] = q[j] · k[r] for NG query vectors (rows of q, fp32) and R rows of k.
template <int NG, int R, typename T>
PAGEDLM_ALWAYS_INLINE void qk_rows(const float* q, const T* k, int D, float* logits, int stride) {
  fVec acc[NG][R];
  for (int j = 0; j < NG; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = fVec(0.f);
  auto step = [&](auto whole, int d) {
    const int n = D - d;
    fVec kv[R];
    for (int r = 0; r < R; ++r) kv[r] = load_row<whole()>(k + r * D + d, n);
    for (int j = 0; j < NG; ++j) {
      const fVec qv = load_row<whole()>(q + j * D + d, n);
      for (int r = 0; r < R; ++r) acc[j][r] = at::vec::fmadd(qv, kv[r], acc[j][r]);
    }
  };
  int d = 0;
  for (; d + kVecLen <= D; d += kVecLen) step(std::true_type{}, d);
  if (d < D) step(std::false_type{}, d);  // a partial vector (zeros beyond D) adds nothing
  store_sums(acc, logits, stride);
}

// logits[m * stride + r] = q[m] · k[r] for count query vectors (rows of q, fp32, pre-scaled) and n
// consecutive K rows. One vector at a time, eight keys per pass (store_sums reduces them together):
// a logit's summation order then depends on the key's place in its run only, never on count or on
// the vectors beside it, so a position gets the same logits in any prefill tile and in decode (batch
// invariance).
template <typename T, typename Dim>
PAGEDLM_ALWAYS_INLINE void qk_tile(const float* q, int count, const T* k, int n, Dim D, float* logits, int stride) {
  for (int m = 0; m < count; ++m) {
    int r = 0;
    for (; r + 8 <= n; r += 8) qk_rows<1, 8>(q + m * D, k + r * D, D, logits + m * stride + r, 0);
    for (; r < n; ++r) qk_rows<1, 1>(q + m * D, k + r * D, D, logits + m * stride + r, 0);
  }
}

// acc[j][d0 : d0 + C * kVecLen] += sum_r p[j * stride + r] * v[r][...] over n rows; with kWhole
// false, C is 1 and only the D - d0 < kVecLen columns left are touched.
template <int NG, int C, bool kWhole, typename T>
PAGEDLM_ALWAYS_INLINE void pv_columns(const float* p, int stride, const T* v, int n, int D, int d0, float* acc) {
  const int width = D - d0;
  fVec a[NG][C];
  for (int j = 0; j < NG; ++j)
    for (int c = 0; c < C; ++c) a[j][c] = load_row<kWhole>(acc + j * D + d0 + c * kVecLen, width);
  for (int r = 0; r < n; ++r) {
    fVec vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load_row<kWhole>(v + r * D + d0 + c * kVecLen, width);
    for (int j = 0; j < NG; ++j) {
      const fVec pj(p[j * stride + r]);
      for (int c = 0; c < C; ++c) a[j][c] = at::vec::fmadd(pj, vv[c], a[j][c]);
    }
  }
  for (int j = 0; j < NG; ++j)
    for (int c = 0; c < C; ++c) store_row<kWhole>(acc + j * D + d0 + c * kVecLen, a[j][c], width);
}

// acc[j] (rows of D floats) += sum_r p[j * stride + r] * v[r] for NG vectors and n consecutive V rows.
template <int NG, typename T, typename Dim>
PAGEDLM_ALWAYS_INLINE void pv_block(const float* p, int stride, const T* v, int n, Dim D, float* acc) {
  constexpr int C = 8 / NG > 1 ? 8 / NG : 1;
  int d = 0;
  for (; d + C * kVecLen <= D; d += C * kVecLen) pv_columns<NG, C, true>(p, stride, v, n, D, d, acc);
  for (; d + kVecLen <= D; d += kVecLen) pv_columns<NG, 1, true>(p, stride, v, n, D, d, acc);
  if (d < D) pv_columns<NG, 1, false>(p, stride, v, n, D, d, acc);
}

// One step of the online softmax (flash attention) for count query vectors (q: [count, D], fp32,
// pre-scaled) over n consecutive K/V rows (fp32, or converted as they are read; see fp32_rows):
// rescales each vector's running max, exp-sum and unnormalised output acc [count, D] to the new max
// and adds the rows. With soft_cap > 0 the scaled logits are capped first. logits: [count, stride]
// scratch.
template <typename T, typename Dim>
void attend_rows(const float* q, int count, float soft_cap, const T* k, const T* v, int n, Dim D, float* logits,
                 int stride, float* running_max, float* running_sum, float* acc) {
  qk_tile(q, count, k, n, D, logits, stride);
  for (int j = 0; j < count; ++j) {
    float* l = logits + j * stride;
    if (soft_cap > 0.f) soft_cap_inplace(l, n, soft_cap);
    const float new_max = std::max(running_max[j], max_of(l, n));
    if (new_max > running_max[j] && running_sum[j] > 0.f) {
      const float correction = std::exp(running_max[j] - new_max);
      running_sum[j] *= correction;
      scale_inplace(acc + j * D, correction, D);
    }
    running_max[j] = new_max;
    running_sum[j] += exp_sum(l, n, new_max);
  }
  for_each_head_chunk(count, [&](auto ng, int first) {
    pv_block<ng()>(logits + first * stride, stride, v, n, D, acc + first * D);
  });
}

// f(D) with the head size as a compile-time constant where it is a common one, so that the
// microkernels' loops over it unroll.
template <typename F>
inline void with_head_size(int D, const F& f) {
  switch (D) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return f(D);
  }
}

// Attention over long contexts runs in partitions of the key positions [k * kPartitionSize,
// (k + 1) * kPartitionSize), each an online softmax from scratch, merged by merge_partitions
// (vLLM's paged_attention_v2). Decode uses them to spread one sequence over threads; prefill uses the
// same ones so that a position computed in a prefill chunk, a decode step or a recompute gets the
// same bits.
constexpr int kPartitionSize = 512;

// out = v_scale times the softmax-weighted sum of the partial states of `parts` partitions of one
// query vector: unnormalised acc (D floats, acc_stride apart), max logit and exp-sum (stride apart).
// scratch: D floats.
template <typename T>
inline void merge_partitions(T* out, const float* acc, int64_t acc_stride, const float* max, const float* sum,
                             int64_t stride, int parts, int D, float v_scale, float* scratch) {
  float global_max = -std::numeric_limits<float>::infinity();
  for (int part = 0; part < parts; ++part) global_max = std::max(global_max, max[part * stride]);
  std::fill(scratch, scratch + D, 0.f);
  float total = 0.f;
  for (int part = 0; part < parts; ++part) {
    const float w = std::exp(max[part * stride] - global_max);
    total += w * sum[part * stride];
    axpy(scratch, w, acc + part * acc_stride, D);
  }
  store_scaled(out, scratch, v_scale / total, D);
}

}  // namespace pagedlm::cpu
