#pragma once
// fp32 vector helpers over ATen's Vectorized<float>. ATen picks the vector width from
// CPU_CAPABILITY_* macros, which torch defines only for its own per-ISA builds, so derive them here
// from what the compiler targets. Include this header before any other ATen header.

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>

namespace pagedlm::cpu {

// For the microkernels of the attention loops: the compiler's inliner gives up on them once their
// caller grows (a soft-cap branch cost decode 35% when qk_rows_bf16 and max_of became calls).
#define PAGEDLM_ALWAYS_INLINE inline __attribute__((always_inline))

using fVec = at::vec::Vectorized<float>;
constexpr int kVecLen = fVec::size();

// fp8 KV-cache entries: OCP e4m3fn and e5m2 (torch.float8_e4m3fn, torch.float8_e5m2).
template <typename T>
constexpr bool is_fp8 = std::is_same_v<T, c10::Float8_e4m3fn> || std::is_same_v<T, c10::Float8_e5m2>;

// 16 fp8 values as fp32, exactly. Both formats become fp16 bit patterns that vcvtph2ps widens:
// e5m2 is the top byte of the fp16 with the same value; e4m3fn's exponent bias is 8 less than
// fp16's, so its bits shifted into place read 2^-8 times the value (subnormals included), and its
// one NaN pattern (S.1111.111) is set explicitly.
template <typename T>
inline fVec fp8_to_fp32(const T* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<T, c10::Float8_e5m2>) {
    return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8));
  } else {
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16(-0x4080));
    const __m512 x = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f));
    const __m128i payload = _mm_and_si128(b, _mm_set1_epi8(0x7f));
    const __mmask16 nan = _mm_cmpeq_epi8_mask(payload, _mm_set1_epi8(0x7f));
    return _mm512_mask_mov_ps(x, nan, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
  }
#else
  float x[kVecLen];
  for (int i = 0; i < kVecLen; ++i) x[i] = static_cast<float>(p[i]);
  return fVec::loadu(x);
#endif
}

template <typename T>
inline fVec load_fp32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else if constexpr (is_fp8<T>) {
    return fp8_to_fp32(p);
  } else {
    fVec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// ATen's fp32 -> bf16 rounding (vec512_bfloat16.h's cvtfp32_bf16: to nearest even, NaN to 0xffff) of
// one vector, each lane's bf16 bits in its high half and zeros below, which read as fp32 are the
// rounded value. ATen's convert_from_float rounds two vectors at a time and packs them, twice the
// work where one is wanted (the element-wise kernels' roundings took ~40% of rotary_embedding).
inline __m512i round_bf16_bits_exact(__m512 v) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), high);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), high, rounded);
}

// The same rounding, packed: 16 bf16. With AVX512-BF16 the hardware conversion, which rounds finite
// values and infinities to nearest even as ATen does, in one instruction instead of seven; a vector
// with a NaN or a subnormal (the conversion keeps NaN payloads and flushes subnormals) takes the
// integer rounding.
inline __m256i round_bf16(__m512 v) {
#if defined(__AVX512BF16__)
  constexpr int kNanOrSubnormal = 0x01 | 0x20 | 0x80;  // vfpclassps: QNaN, denormal, SNaN
  if (_mm512_fpclass_ps_mask(v, kNanOrSubnormal) == 0) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bf16_bits_exact(v), 16));
}

// round_bf16 as round_bf16_bits_exact leaves it: the bits in each lane's high half.
inline __m512i round_bf16_bits(__m512 v) {
#if defined(__AVX512BF16__)
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(round_bf16(v)), 16);
#else
  return round_bf16_bits_exact(v);
#endif
}
#endif

template <typename T>
inline void store_fp32(T* p, fVec v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
#if defined(CPU_CAPABILITY_AVX512)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_bf16(v));
#endif
  } else {
    const auto packed = at::vec::convert_from_float<T>(v, v);
#if defined(CPU_CAPABILITY_AVX512)
    // A plain 256-bit store, not Vectorized::store(p, 16)'s masked one: a load soon after a masked
    // store to the same bytes cannot be forwarded from it and stalls until the store retires.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(packed));
#else
    packed.store(p, kVecLen);
#endif
  }
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// The bf16 bits of sums[0, 16) + bias[0, 16) (bias may be null; only its `mask` lanes are read),
// rounded once to nearest even: how the bf16 linear kernels round their fp32 sums.
inline __m256i round_sums_bf16(const float* sums, const float* bias, __mmask16 mask = 0xffff) {
  __m512 v = _mm512_loadu_ps(sums);
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias));
  return (__m256i)_mm512_cvtneps_pbh(v);
}

// out[0, cols) = round_sums_bf16(sums + bias): how the bf16 linear kernels store their fp32 sums.
// sums is read in whole vectors up to cols rounded up to 16. Whole 32-column runs go out in one
// 64-byte store, not two masked ones (the AMX linear's epilogue ran ~7% faster per product).
inline void store_sums_bf16(at::BFloat16* out, const float* sums, const float* bias, int64_t cols) {
  int64_t j = 0;
  for (; j + 32 <= cols; j += 32) {
    const __m256i lo = round_sums_bf16(sums + j, bias ? bias + j : nullptr);
    const __m256i hi = round_sums_bf16(sums + j + 16, bias ? bias + j + 16 : nullptr);
    _mm512_storeu_si512(out + j, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
  }
  for (; j < cols; j += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, cols - j)) - 1);
    _mm256_mask_storeu_epi16(out + j, mask, round_sums_bf16(sums + j, bias ? bias + j : nullptr, mask));
  }
}
#endif

// Partial vectors of n < kVecLen elements go through a zero-padded buffer, so tails get exactly
// the same vector math as full vectors.
template <typename T>
inline fVec load_fp32(const T* p, int n) {
  if (n == kVecLen) return load_fp32(p);
  T buf[kVecLen] = {};
  std::copy(p, p + n, buf);
  return load_fp32(buf);
}

template <typename T>
inline void store_fp32(T* p, fVec v, int n) {
  if (n == kVecLen) return store_fp32(p, v);
  T buf[kVecLen];
  store_fp32(buf, v);
  std::copy(buf, buf + n, p);
}

// n elements of rows in fp32: rows itself where T is float, else converted (exactly) into scratch.
template <typename T>
inline const float* fp32_rows(const T* rows, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return rows;
  } else {
    int64_t i = 0;
    for (; i + kVecLen <= n; i += kVecLen) load_fp32(rows + i).store(scratch + i);
    if (i < n) load_fp32(rows + i, n - i).store(scratch + i, n - i);
    return scratch;
  }
}

// v rounded to T and back: what storing an intermediate result in T (as eager torch does) keeps.
template <typename T>
inline fVec round_to(fVec v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
#if defined(CPU_CAPABILITY_AVX512)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(round_bf16_bits(v));
#endif
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  }
}

// Horizontal reductions (Vectorized::reduce_add does not compile for the DEFAULT capability).
inline float hsum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, v);
}

inline float hmax(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return at::vec::maximum(a, b); }, v);
}

// Loops over a row of n elements take whole vectors and then, where n is not a multiple of kVecLen
// (odd head sizes), one partial vector; the fast path for whole rows pays one comparison per call.
// load_row<false> is the partial load of a row's last n < kVecLen elements.
template <bool kWhole, typename T>
inline fVec load_row(const T* p, int n) {
  if constexpr (kWhole) {
    return load_fp32(p);
  } else if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p, n);
  } else {
    return load_fp32(p, n);
  }
}

template <bool kWhole>
inline void store_row(float* p, fVec v, int n) {
  if constexpr (kWhole) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

// acc[0:n] += p * v[0:n]
inline void axpy(float* acc, float p, const float* v, int n) {
  const fVec pv(p);
  int d = 0;
  for (; d + kVecLen <= n; d += kVecLen) at::vec::fmadd(pv, fVec::loadu(v + d), fVec::loadu(acc + d)).store(acc + d);
  if (d < n) at::vec::fmadd(pv, fVec::loadu(v + d, n - d), fVec::loadu(acc + d, n - d)).store(acc + d, n - d);
}

inline void scale_inplace(float* x, float s, int n) {
  const fVec sv(s);
  int d = 0;
  for (; d + kVecLen <= n; d += kVecLen) (fVec::loadu(x + d) * sv).store(x + d);
  if (d < n) (fVec::loadu(x + d, n - d) * sv).store(x + d, n - d);
}

template <typename T>
inline void store_scaled(T* out, const float* x, float s, int n) {
  const fVec sv(s);
  int d = 0;
  for (; d + kVecLen <= n; d += kVecLen) store_fp32(out + d, fVec::loadu(x + d) * sv);
  if (d < n) store_fp32(out + d, fVec::loadu(x + d, n - d) * sv, n - d);
}

template <typename T>
inline void to_fp32_scaled(float* dst, const T* src, float s, int n) {
  const fVec sv(s);
  int d = 0;
  for (; d + kVecLen <= n; d += kVecLen) (load_fp32(src + d) * sv).store(dst + d);
  if (d < n) (load_fp32(src + d, n - d) * sv).store(dst + d, n - d);
}

template <typename T>
PAGEDLM_ALWAYS_INLINE float max_of(const T* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= kVecLen) {
    fVec mv = load_fp32(x);
    for (i = kVecLen; i + kVecLen <= n; i += kVecLen) mv = at::vec::maximum(mv, load_fp32(x + i));
    m = hmax(mv);
  }
  for (; i < n; ++i) m = std::max(m, static_cast<float>(x[i]));
  return m;
}

// x[i] = cap * tanh(x[i] / cap) in place: Gemma 2's attention logit soft-capping.
// Not inlined: only Gemma 2's layers call it, and its Sleef tanh is large.
__attribute__((noinline)) inline void soft_cap_inplace(float* x, int n, float cap) {
  const fVec cv(cap), inv(1.f / cap);
  int i = 0;
  for (; i + kVecLen <= n; i += kVecLen) (cv * (fVec::loadu(x + i) * inv).tanh()).store(x + i);
  if (i < n) (cv * (fVec::loadu(x + i, n - i) * inv).tanh()).store(x + i, n - i);
}

// x[i] = exp(x[i] - max) in place; returns the sum.
inline float exp_sum(float* x, int n, float max) {
  const fVec mv(max);
  fVec sum(0.f);
  int i = 0;
  for (; i + kVecLen <= n; i += kVecLen) {
    const fVec e = (fVec::loadu(x + i) - mv).exp_u20();
    e.store(x + i);
    sum = sum + e;
  }
  float s = hsum(sum);
  if (i < n) {
    (fVec::loadu(x + i, n - i) - mv).exp_u20().store(x + i, n - i);
    for (; i < n; ++i) s += x[i];
  }
  return s;
}

}  // namespace pagedlm::cpu
