// RMSNorm, alone and fused with the residual add, with Hugging Face's rounding: the sum of squares
// and the scaling run in fp32, the residual sum is rounded to the model dtype, and then
// - Llama: the normalised row is rounded to the model dtype before the weight multiplies it;
// - Gemma: the normalised row is multiplied by (1 + weight) in fp32 and rounded once;
// - OLMo 2: the normalised row is multiplied by the weight in fp32 and rounded once (its layers
//   normalise what attention and the MLP add to the residual: olmo_rms_norm_add).
#include "vec.h"

#include "../checks.h"
#include "dispatch.h"
#include "ops.h"
#include "parallel.h"

#include <array>
#include <cmath>

namespace pagedlm::cpu {
namespace {

// The levels of ATen's row_sum (aten/src/ATen/native/cpu/SumKernel.cpp: multi_row_sum and row_sum):
// `rows` rows go into level 0's accumulators (add_row(acc, i)), which spill into coarser levels every
// 2^level_power rows; returns level 0 with the other levels added to it in order. Acc{} is zero.
template <typename Acc, typename AddRow, typename Add>
Acc cascade_levels(int64_t rows, const AddRow& add_row, const Add& add) {
  constexpr int kLevels = 4;
  const int64_t ceil_log2 = rows <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(rows - 1));
  const int64_t level_power = std::max<int64_t>(4, ceil_log2 / kLevels);
  const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
  Acc acc[kLevels] = {};
  int64_t i = 0;
  while (i + level_step <= rows) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_row(acc[0], i);
    for (int j = 1; j < kLevels; ++j) {
      add(acc[j], acc[j - 1]);
      acc[j - 1] = Acc{};
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < rows; ++i) add_row(acc[0], i);
  for (int j = 1; j < kLevels; ++j) add(acc[0], acc[j]);
  return acc[0];
}

// ATen's row_sum over `count` items of W lanes: the items read as rows of 4 into 4 accumulators
// (cascade_levels), then the items past the last whole row into the first accumulator, then the other
// 3 into it. item(i) gives the i-th item's lanes.
template <int W, typename Item>
std::array<float, W> cascade_row_sum(int64_t count, const Item& item) {
  using Lanes = std::array<float, W>;
  using Row = std::array<Lanes, 4>;
  auto add = [](Lanes& a, const Lanes& b) {
    for (int l = 0; l < W; ++l) a[l] += b[l];
  };
  Row acc = cascade_levels<Row>(
      count / 4,
      [&](Row& r, int64_t i) {
        for (int k = 0; k < 4; ++k) add(r[k], item(i * 4 + k));
      },
      [&](Row& a, const Row& b) {
        for (int k = 0; k < 4; ++k) add(a[k], b[k]);
      });
  for (int64_t v = count / 4 * 4; v < count; ++v) add(acc[0], item(v));
  for (int k = 1; k < 4; ++k) add(acc[0], acc[k]);
  return acc[0];
}

#if defined(CPU_CAPABILITY_AVX512)
// cascade_row_sum<8> over the squares of x's `count` 8-element items, in 16-lane registers: a row's
// four items are two registers. The same additions lane by lane, in the same order.
template <typename T>
std::array<float, 8> squares_row_sum(const T* x, int64_t count) {
  struct Row {
    __m512 lo, hi;  // accumulators 0, 1 and 2, 3
  };
  auto squares = [&](int64_t item, int n) {  // items item, item + 1 (n = 16) or item alone (n = 8)
    const __m512 v = load_fp32(x + item * 8, n);
    return _mm512_mul_ps(v, v);
  };
  const Row acc = cascade_levels<Row>(
      count / 4,
      [&](Row& r, int64_t i) {
        r.lo = _mm512_add_ps(r.lo, squares(i * 4, 16));
        r.hi = _mm512_add_ps(r.hi, squares(i * 4 + 2, 16));
      },
      [](Row& a, const Row& b) {
        a.lo = _mm512_add_ps(a.lo, b.lo);
        a.hi = _mm512_add_ps(a.hi, b.hi);
      });
  __m256 sum = _mm512_castps512_ps256(acc.lo);
  for (int64_t v = count / 4 * 4; v < count; ++v) sum = _mm256_add_ps(sum, _mm512_castps512_ps256(squares(v, 8)));
  sum = _mm256_add_ps(sum, _mm512_extractf32x8_ps(acc.lo, 1));
  sum = _mm256_add_ps(sum, _mm512_castps512_ps256(acc.hi));
  sum = _mm256_add_ps(sum, _mm512_extractf32x8_ps(acc.hi, 1));
  std::array<float, 8> lanes;
  _mm256_storeu_ps(lanes.data(), sum);
  return lanes;
}
#endif

// The sum of a row's squares as Hugging Face's x.pow(2).mean(-1) sums them: each square rounded to
// fp32, then ATen's sum of a contiguous row (SumKernel.cpp's cascade_sum). Its sum kernel is
// registered with REGISTER_DISPATCH, which gives AVX-512 CPUs the AVX2 kernel: 8 lanes on every x86
// CPU, whatever this build's vector width. A row of at least 8 is summed as rows of 8-lane vectors
// (vectorized_inner_sum), its last n % 8 elements one by one into a scalar, then the lanes after
// them; a shorter row as scalars (scalar_inner_sum). One row of 32,768 or more elements alone is the
// exception: torch splits it over its threads (two_pass_reduction), and so do transformers' bits.
template <typename T>
float sum_of_squares(const T* x, int64_t n) {
  constexpr int kLanes = 8;
  auto square = [&](int64_t i) {
    const float v = static_cast<float>(x[i]);
    return v * v;
  };
  if (n < kLanes) return cascade_row_sum<1>(n, [&](int64_t i) { return std::array<float, 1>{square(i)}; })[0];
  const int64_t vecs = n / kLanes;
#if defined(CPU_CAPABILITY_AVX512)
  const std::array<float, kLanes> lanes = squares_row_sum(x, vecs);
#else
  const std::array<float, kLanes> lanes = cascade_row_sum<kLanes>(vecs, [&](int64_t v) {
    std::array<float, kLanes> squares;
    for (int l = 0; l < kLanes; ++l) squares[l] = square(v * kLanes + l);
    return squares;
  });
#endif
  float total = 0.f;
  for (int64_t e = vecs * kLanes; e < n; ++e) total += square(e);
  for (const float lane : lanes) total += lane;
  return total;
}

// 1 / sqrt(mean of squares + eps), rounded as torch.rsqrt(x.pow(2).mean(-1) + eps) rounds it: the mean
// is the sum divided by n.
template <typename T>
float inv_rms(const T* x, int64_t hidden, float eps) {
  return 1.f / std::sqrt(sum_of_squares(x, hidden) / static_cast<float>(hidden) + eps);
}

enum class NormStyle { kLlama, kGemma, kOlmo };

template <NormStyle kStyle, typename T>
void scale_row(T* out, const T* x, const T* weight, int64_t hidden, float inv) {
  const fVec iv(inv), one(1.f);
  for (int64_t d = 0; d < hidden; d += kVecLen) {
    const int n = static_cast<int>(std::min<int64_t>(kVecLen, hidden - d));
    if constexpr (kStyle == NormStyle::kGemma) {
      store_fp32(out + d, load_fp32(x + d, n) * iv * (one + load_fp32(weight + d, n)), n);
    } else if constexpr (kStyle == NormStyle::kOlmo) {
      store_fp32(out + d, load_fp32(weight + d, n) * (load_fp32(x + d, n) * iv), n);
    } else {
      store_fp32(out + d, load_fp32(weight + d, n) * round_to<T>(load_fp32(x + d, n) * iv), n);
    }
  }
}

template <NormStyle kStyle>
void rms_norm_rows(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  check_norm(out, "out", input, "input", weight, /*with_heads=*/true);
  const NormRows in_rows(input), out_rows(out);
  const int64_t hidden = input.size(-1);
  const float eps = static_cast<float>(epsilon);
  PAGEDLM_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rms_norm", [&] {
    const auto* x = input.data_ptr<scalar_t>();
    const auto* w = weight.data_ptr<scalar_t>();
    auto* y = out.data_ptr<scalar_t>();
    parallel_for(0, in_rows.tokens * in_rows.heads, grain_for(hidden), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = x + in_rows.offset(r);
        scale_row<kStyle>(y + out_rows.offset(r), row, w, hidden, inv_rms(row, hidden, eps));
      }
    });
  });
}

// Each row: residual += input (rounded), then input = norm(residual); or, kNormFirst (a post-norm
// layer's residual add), input = norm(input), then residual += input (rounded).
template <NormStyle kStyle, bool kNormFirst = false>
void fused_add_rms_norm_rows(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  check_norm(input, "input", residual, "residual", weight);
  const int64_t tokens = input.size(0), hidden = input.size(1);
  const int64_t in_stride = input.stride(0), res_stride = residual.stride(0);
  const float eps = static_cast<float>(epsilon);
  PAGEDLM_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fused_add_rms_norm", [&] {
    auto* x = input.data_ptr<scalar_t>();
    auto* r = residual.data_ptr<scalar_t>();
    const auto* w = weight.data_ptr<scalar_t>();
    auto add = [hidden](scalar_t* rr, const scalar_t* xr) {
      for (int64_t d = 0; d < hidden; d += kVecLen) {
        const int n = static_cast<int>(std::min<int64_t>(kVecLen, hidden - d));
        store_fp32(rr + d, load_fp32(xr + d, n) + load_fp32(rr + d, n), n);
      }
    };
    // A row reads two inputs: tasks of grain_for(2 * hidden) rows hold as many elements as
    // act_and_mul's (a 104-row SmolLM2 step then splits over two threads).
    parallel_for(0, tokens, grain_for(2 * hidden), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        scalar_t* xr = x + t * in_stride;
        scalar_t* rr = r + t * res_stride;
        if constexpr (kNormFirst) {
          scale_row<kStyle>(xr, xr, w, hidden, inv_rms(xr, hidden, eps));
          add(rr, xr);
        } else {
          add(rr, xr);
          scale_row<kStyle>(xr, rr, w, hidden, inv_rms(rr, hidden, eps));
        }
      }
    });
  });
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  rms_norm_rows<NormStyle::kLlama>(out, input, weight, epsilon);
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  fused_add_rms_norm_rows<NormStyle::kLlama>(input, residual, weight, epsilon);
}

void gemma_rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  rms_norm_rows<NormStyle::kGemma>(out, input, weight, epsilon);
}

void gemma_fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  fused_add_rms_norm_rows<NormStyle::kGemma>(input, residual, weight, epsilon);
}

void olmo_rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  rms_norm_rows<NormStyle::kOlmo>(out, input, weight, epsilon);
}

void olmo_rms_norm_add(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  fused_add_rms_norm_rows<NormStyle::kOlmo, /*kNormFirst=*/true>(input, residual, weight, epsilon);
}

}  // namespace pagedlm::cpu
