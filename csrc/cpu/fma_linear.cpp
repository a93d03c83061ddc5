// bf16 linear in fp32 FMAs over a weight packed once at load (packed_linear.h), for CPUs without a
// bf16 dot-product instruction (AVX2: Haswell, Zen 1-3), where torch's bf16 matmul runs at a fifth
// of its fp32 rate and oneDNN takes no bf16. The weights stay bf16 in memory (half fp32's bytes, what
// bounds a decode step) and become fp32 in registers: a 32-bit lane of the packed layout holds one
// column's pair of features, the even one in its low half, so a shift and a mask give both as fp32.
//
// Each output is one fp32 chain over the features in order, one FMA each, then the bias, then one
// rounding to bf16. A row's chain reads only that row of the input, so its bits do not depend on the
// number of rows, nor on how rows and columns are split over threads, nor on which of the two paths
// (weights widened in registers per tile of up to 4 rows, or once per block for groups of 12 rows
// and more) ran it.
//
// bf16_fma_linear_act_and_mul takes a gated MLP's packed gate_up weight (gate and up blocks
// alternating) and stores act(gate) * up, as bf16_amx_linear_act_and_mul does, with the bits of this
// linear followed by silu_and_mul / gelu_tanh_and_mul.
//
// The *_argmax ops keep each row's argmax over the outputs (rounded as stored) instead of storing
// them, as bf16_amx_linear_argmax does.
//
// fp32_fma_linear and fp32_fma_linear_act_and_mul are the same over fp32 inputs and a weight packed
// as fp32 ([blocks][K][16]: a widened block, read in place), with no rounding at the end; an AVX-512
// build runs them in 512-bit tiles of 6 rows x 4 blocks (the same chains, so the same bits). They
// replace oneDNN's fp32 matmul: its sums for a row depend on the row count at one row, and its OpenMP
// regions stall a step beside a busy process (docs/performance.md, sessions 35 and 36).
#include "vec.h"  // first: selects ATen's vector width

#include "aligned_vector.h"
#include "ops.h"
#include "packed_linear.h"
#include "parallel.h"

#include <algorithm>
#include <optional>
#include <vector>

namespace pagedlm::cpu {
namespace {

#if defined(__AVX2__) && defined(__FMA__)

// Rows per tile of the weight-streaming path: 4 rows x 16 columns of accumulators (8 registers), the
// 4 weight vectors of a pair, 2 broadcasts: 14 of AVX2's 16 registers.
constexpr int kMaxTileRows = 4;
// Rows per tile of the path over a widened block: 6 x 16 accumulators, 2 weight vectors, a broadcast.
constexpr int kWideTileRows = 6;
// Rows whose fp32 inputs (at most 36 x K x 4 bytes: 216 KiB at K = 1,536) stay in L2 while a unit's
// column blocks pass over them.
constexpr int64_t kGroupRows = 36;
// Column blocks a unit sums: 64 columns, two gate/up pairs of a gated weight.
constexpr int64_t kUnitBlocks = 4;

void store_tile(const __m256 (&acc)[2], float* sums) {
  _mm256_storeu_ps(sums, acc[0]);
  _mm256_storeu_ps(sums + 8, acc[1]);
}

// Pair p of a packed block as fp32: its even feature's 16 weights (columns 0-7, 8-15), then its odd
// feature's. A 32-bit lane holds one column's pair, the even feature in its low half.
struct PairWeights {
  __m256 even0, even1, odd0, odd1;
};

PAGEDLM_ALWAYS_INLINE PairWeights widen_pair(const at::BFloat16* w, int64_t p) {
  const __m256i odd_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * p));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * p + 16));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(lo, odd_mask)), _mm256_castsi256_ps(_mm256_and_si256(hi, odd_mask))};
}

// sums[r * 16 + c] = the chain of row r of x (fp32, row stride ldx, zero past K) against column c
// of the packed block w, over `pairs` feature pairs, widening the weights in registers: for one
// tile of rows, a block read once (from memory, in a decode step).
template <int MT>
PAGEDLM_ALWAYS_INLINE void packed_sums(const float* x, int64_t ldx, const at::BFloat16* w, int64_t pairs,
                                       float* sums) {
  __m256 acc[MT][2];
  for (int r = 0; r < MT; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const PairWeights pw = widen_pair(w, p);
    for (int r = 0; r < MT; ++r) {
      const __m256 xe = _mm256_broadcast_ss(x + r * ldx + 2 * p);
      const __m256 xo = _mm256_broadcast_ss(x + r * ldx + 2 * p + 1);
      acc[r][0] = _mm256_fmadd_ps(xo, pw.odd0, _mm256_fmadd_ps(xe, pw.even0, acc[r][0]));
      acc[r][1] = _mm256_fmadd_ps(xo, pw.odd1, _mm256_fmadd_ps(xe, pw.even1, acc[r][1]));
    }
  }
  for (int r = 0; r < MT; ++r) store_tile(acc[r], sums + r * kPackN);
}

// The same sums from the block widened once into wide ([2 * pairs][16] fp32), for the many row tiles
// of a prefill: one FMA per feature and accumulator, 12 independent chains against packed_sums' 8 (each
// of which takes two FMAs a pair), and no widening per tile. Each chain adds the same products in the
// same order, so a row's bits are packed_sums'.
template <int MT>
PAGEDLM_ALWAYS_INLINE void wide_sums(const float* x, int64_t ldx, const float* wide, int64_t features,
                                     float* sums) {
  __m256 acc[MT][2];
  for (int r = 0; r < MT; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < features; ++k) {
    const __m256 w0 = _mm256_loadu_ps(wide + 16 * k), w1 = _mm256_loadu_ps(wide + 16 * k + 8);
    for (int r = 0; r < MT; ++r) {
      const __m256 xk = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xk, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xk, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < MT; ++r) store_tile(acc[r], sums + r * kPackN);
}

// wide[k][0..16) = the packed block's 16 weights of feature k, for k < 2 * pairs, as fp32.
void widen_block(const at::BFloat16* w, int64_t pairs, float* wide) {
  for (int64_t p = 0; p < pairs; ++p) {
    const PairWeights pw = widen_pair(w, p);
    float* even = wide + 32 * p;
    _mm256_storeu_ps(even, pw.even0);
    _mm256_storeu_ps(even + 8, pw.even1);
    _mm256_storeu_ps(even + 16, pw.odd0);
    _mm256_storeu_ps(even + 24, pw.odd1);
  }
}

// Below this many rows a block is widened in registers for each tile of up to kMaxTileRows rows; from
// it on, once into memory for tiles of kWideTileRows. Widened once, SmolLM2's shapes ran no faster at
// 8 rows (tiles of 6 and 2) and 1.3-1.6x faster at 64-256 (docs/performance.md, session 31).
constexpr int64_t kWideFromRows = 12;

template <int MaxRows, typename Sums>
PAGEDLM_ALWAYS_INLINE void tiles(int64_t rows, const Sums& sums) {
  for (int64_t r = 0; r < rows; r += MaxRows) {
    const int64_t n = std::min<int64_t>(MaxRows, rows - r);
    if (n == MaxRows) sums(r, std::integral_constant<int, MaxRows>{});
    else if (n == 1) sums(r, std::integral_constant<int, 1>{});
    else if (n == 2) sums(r, std::integral_constant<int, 2>{});
    else if (n == 3) sums(r, std::integral_constant<int, 3>{});
    else if constexpr (MaxRows > 4) {
      if (n == 4) sums(r, std::integral_constant<int, 4>{});
      else sums(r, std::integral_constant<int, 5>{});
    }
  }
}

// The `rows` rows of x (fp32, row stride ldx) against one fp32 block of `features` x 16 weights:
// fp32_pack_weight's block, or a bf16 block widened.
void wide_block_sums(int64_t rows, const float* x, int64_t ldx, const float* wide, int64_t features, float* sums) {
  tiles<kWideTileRows>(rows, [&](int64_t r, auto mt) { wide_sums<mt()>(x + r * ldx, ldx, wide, features, sums + r * kPackN); });
}

#if defined(__AVX512F__)
// fp32 tiles of up to 6 rows x 4 blocks on AVX-512: 24 accumulators of 16 columns, a block's 16
// weights of a feature in one register, a broadcast: 29 of its 32 registers, against wide_sums' 14
// of AVX2's 16. Each lane runs the chain wide_sums runs (one FMA per feature, in order), so the bits
// are the same.
constexpr int kZmmTileRows = 6;

template <int MT, int NB>
PAGEDLM_ALWAYS_INLINE void zmm_sums(const float* x, int64_t ldx, const float* w, int64_t block_elements, int64_t features,
                                    float* sums, int64_t sums_stride) {
  __m512 acc[MT][NB];
  for (int r = 0; r < MT; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < features; ++k) {
    __m512 wk[NB];
    for (int j = 0; j < NB; ++j) wk[j] = _mm512_loadu_ps(w + j * block_elements + kPackN * k);
    for (int r = 0; r < MT; ++r) {
      const __m512 xk = _mm512_set1_ps(x[r * ldx + k]);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_fmadd_ps(xk, wk[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MT; ++r)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(sums + j * sums_stride + r * kPackN, acc[r][j]);
}

template <int NB>
void zmm_unit_sums(int64_t rows, const float* x, int64_t ldx, const float* w, int64_t block_elements,
                   int64_t features, float* sums, int64_t sums_stride) {
  tiles<kZmmTileRows>(rows, [&](int64_t r, auto mt) {
    zmm_sums<mt(), NB>(x + r * ldx, ldx, w, block_elements, features, sums + r * kPackN, sums_stride);
  });
}
#endif

// The `rows` rows of x (fp32) against `blocks` consecutive fp32 blocks of `features` x 16 weights
// (fp32_pack_weight's), block j's sums at sums + j * sums_stride.
void fp32_unit_sums(int64_t rows, const float* x, int64_t ldx, const float* w, int64_t block_elements,
                    int64_t blocks, int64_t features, float* sums, int64_t sums_stride) {
#if defined(__AVX512F__)
  if (blocks == 4) return zmm_unit_sums<4>(rows, x, ldx, w, block_elements, features, sums, sums_stride);
  if (blocks == 3) return zmm_unit_sums<3>(rows, x, ldx, w, block_elements, features, sums, sums_stride);
  if (blocks == 2) return zmm_unit_sums<2>(rows, x, ldx, w, block_elements, features, sums, sums_stride);
  return zmm_unit_sums<1>(rows, x, ldx, w, block_elements, features, sums, sums_stride);
#else
  for (int64_t j = 0; j < blocks; ++j)
    wide_block_sums(rows, x, ldx, w + j * block_elements, features, sums + j * sums_stride);
#endif
}

// sums[r * 16 + c] for the `rows` rows of x against one packed block; wide: 2 * pairs * 16 floats.
void block_sums(int64_t rows, const float* x, int64_t ldx, const at::BFloat16* w, int64_t pairs, float* wide,
                float* sums) {
  if (rows < kWideFromRows) {
    tiles<kMaxTileRows>(rows, [&](int64_t r, auto mt) { packed_sums<mt()>(x + r * ldx, ldx, w, pairs, sums + r * kPackN); });
    return;
  }
  widen_block(w, pairs, wide);
  wide_block_sums(rows, x, ldx, wide, 2 * pairs, sums);
}

// T = bf16 (amx_pack_weight's layout) or float (fp32_pack_weight's). act unset: y [M, N] =
// input @ W.T + bias. act set: y [M, d] = act(gate) * up over a packed gate_up weight, bias [2 * d]
// in gate, up order. argmax set: no y; each row's greedy token over input @ W.T + bias (rounded to T)
// merged into *argmax.
template <typename T>
void fma_linear_kernel(T* y, int64_t ldy, int64_t N, const at::Tensor& input, const at::Tensor& weight,
                       const float* bias, std::optional<Activation> act, RowArgmax* argmax) {
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  const int64_t M = input.size(0), K = input.size(1);
  const int64_t pairs = (K + 1) / 2, blocks = weight.size(0);
  const auto* x = input.data_ptr<T>();
  const int64_t lda = input.stride(0);
  // bf16 rows are converted into a zero-padded fp32 group of row stride ldx; fp32 rows are read in place.
  const int64_t ldx = kBf16 ? 2 * pairs : lda;
  const auto* w = weight.data_ptr<T>();
  const int64_t block_elements = weight.numel() / blocks;
  const int64_t units = (blocks + kUnitBlocks - 1) / kUnitBlocks, groups = (M + kGroupRows - 1) / kGroupRows;
  const int64_t unit_work = kUnitBlocks * block_elements * std::min(M, kGroupRows);
  // Units are (column unit, row group) pairs, column-major: a thread's range reads its weights once.
  parallel_for(0, units * groups, grain_for(unit_work), [&](int64_t begin, int64_t end) {
    // Block j of a unit sums into sums + j * kBlockSums.
    constexpr int64_t kBlockSums = kGroupRows * kPackN;
    AlignedVector<float> sums(kUnitBlocks * kBlockSums), wide(kBf16 && M >= kWideFromRows ? 2 * pairs * kPackN : 0);
    // The unit's bf16 rows as fp32, zero past K (a pair past an odd K holds one feature); converted
    // again only when the row group changes (a 1/64 share of the unit's FMAs when it does).
    AlignedVector<float> xg(kBf16 ? std::min(M, kGroupRows) * ldx : 0, 0.f);
    int64_t converted = -1;
    TaskArgmax seen(argmax, M);  // argmax: this task's columns
    for (int64_t u = begin; u < end; ++u) {
      const int64_t m0 = u % groups * kGroupRows, rows = std::min(M, m0 + kGroupRows) - m0;
      const int64_t b0 = u / groups * kUnitBlocks, unit_blocks = std::min(blocks, b0 + kUnitBlocks) - b0;
      if constexpr (kBf16) {
        if (m0 != converted) {
          for (int64_t r = 0; r < rows; ++r) fp32_rows(x + (m0 + r) * lda, K, xg.data() + r * ldx);
          converted = m0;
        }
        for (int64_t j = 0; j < unit_blocks; ++j)
          block_sums(rows, xg.data(), ldx, w + (b0 + j) * block_elements, pairs, wide.data(), sums.data() + j * kBlockSums);
      } else {
        fp32_unit_sums(rows, x + m0 * lda, ldx, w + b0 * block_elements, block_elements, unit_blocks, K, sums.data(),
                       kBlockSums);
      }
      for (int64_t j = 0; j < unit_blocks; j += act ? 2 : 1) {
        const float* gate_sums = sums.data() + j * kBlockSums;
        const int64_t b = b0 + j;
        if (act) {
          const float* up_sums = gate_sums + kBlockSums;
          const int64_t n0 = b / 2 * kPackN;
          for (int64_t r = 0; r < rows; ++r)
            store_act_and_mul(*act, y + (m0 + r) * ldy + n0, gate_sums + r * kPackN, up_sums + r * kPackN,
                              bias ? bias + n0 : nullptr, bias ? bias + N + n0 : nullptr);
        } else {
          const int64_t n0 = b * kPackN;
          const int cols = static_cast<int>(std::min<int64_t>(kPackN, N - n0));
          for (int64_t r = 0; r < rows; ++r)
            for (int c = 0; c < cols; c += kVecLen) {
              const int n = std::min(kVecLen, cols - c);
              fVec v = fVec::loadu(gate_sums + r * kPackN + c);
              if (bias) v = v + fVec::loadu(bias + n0 + c, n);
              if (argmax) seen.get()->update(m0 + r, n0 + c, round_to<T>(v), n);
              else store_fp32(y + (m0 + r) * ldy + n0 + c, v, n);
            }
        }
      }
    }
  });
}

#endif

template <typename T>
void run_fma_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    std::optional<Activation> act, const char* op) {
#if defined(__AVX2__) && defined(__FMA__)
  if (input.size(0) == 0 || out.size(1) == 0) return;
  fma_linear_kernel<T>(out.data_ptr<T>(), out.stride(0), out.size(1), input, weight,
                       bias.defined() ? bias.data_ptr<float>() : nullptr, act, nullptr);
#else
  TORCH_CHECK(false, op, " needs pagedlm._C built with AVX2 and FMA (this build has neither)");
#endif
}

template <typename T>
void run_fma_argmax(RowArgmax& tokens, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    int64_t N, const char* op) {
#if defined(__AVX2__) && defined(__FMA__)
  if (input.size(0) == 0) return;
  fma_linear_kernel<T>(nullptr, 0, N, input, weight, bias.defined() ? bias.data_ptr<float>() : nullptr, std::nullopt,
                       &tokens);
#else
  TORCH_CHECK(false, op, " needs pagedlm._C built with AVX2 and FMA (this build has neither)");
#endif
}

}  // namespace

void bf16_fma_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias) {
  packed_linear_op(run_fma_linear<at::BFloat16>, out, input, weight, bias, at::kBFloat16, "bf16_fma_linear");
}

void bf16_fma_linear_act_and_mul(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, c10::string_view activation) {
  packed_act_and_mul_op(run_fma_linear<at::BFloat16>, out, input, weight, bias, activation, at::kBFloat16,
                        "bf16_fma_linear_act_and_mul");
}

void fp32_fma_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias) {
  packed_linear_op(run_fma_linear<float>, out, input, weight, bias, at::kFloat, "fp32_fma_linear");
}

void fp32_fma_linear_act_and_mul(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, c10::string_view activation) {
  packed_act_and_mul_op(run_fma_linear<float>, out, input, weight, bias, activation, at::kFloat,
                        "fp32_fma_linear_act_and_mul");
}

void bf16_fma_linear_argmax(at::Tensor& token_ids, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t out_features) {
  packed_argmax_op(run_fma_argmax<at::BFloat16>, token_ids, input, weight, bias, out_features, at::kBFloat16,
                   "bf16_fma_linear_argmax");
}

void fp32_fma_linear_argmax(at::Tensor& token_ids, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t out_features) {
  packed_argmax_op(run_fma_argmax<float>, token_ids, input, weight, bias, out_features, at::kFloat,
                   "fp32_fma_linear_argmax");
}

}  // namespace pagedlm::cpu
