#pragma once
// What the linears over a weight packed once at load share (amx_linear.cpp on AMX tiles, fma_linear.cpp
// on AVX2 FMA): their ops' checks, and how the FMA linear stores a gated block of sums (the bf16 AMX
// linear stores it as the blocked one does, activation.h's store_act_and_mul_bf16). The greedy
// argmax over a linear's outputs (RowArgmax) serves the blocked linear over oneDNN's layout too.
//
// Weight layouts (pagedlm/ops/reference.py): bf16, amx_pack_weight's [N_pad / 16][K_pad / 2][16][2],
// per block of 16 output columns and for each pair of input features (2p, 2p + 1), the 16 columns'
// two weights, zero-padded to N_pad = 16 * ceil(N / 16) and K_pad = 32 * ceil(K / 32); fp32,
// fp32_pack_weight's [N_pad / 16][K][16], per block and feature the 16 columns' weights. A gated MLP's
// gate_up weight (amx_pack_gate_up_weight, fp32_pack_gate_up_weight) alternates its column blocks:
// gate columns 16j..16j+15, then up columns 16j..16j+15.

#include "vec.h"  // first: selects ATen's vector width

#include "../checks.h"
#include "activation.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

namespace pagedlm::cpu {

constexpr int64_t kPackN = 16;  // output columns per packed block
constexpr int64_t kPackK = 32;  // K_pad's multiple

inline const char* dtype_name(at::ScalarType dtype) { return dtype == at::kBFloat16 ? "bfloat16" : "float32"; }

// input of `dtype` (bf16 or fp32), [M, K] with contiguous rows.
inline void check_packed_input(const at::Tensor& input, at::ScalarType dtype, const char* op) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == dtype && input.stride(1) == 1,
              op, ": input must be ", dtype_name(dtype), " [rows, in_features] with contiguous rows; got ",
              input.scalar_type(), " ", input.sizes(), " with strides ", input.strides());
}

// The checks every op of a kernel shares after check_packed_input: weight the packing of a
// [packed_n, K] weight: bf16, amx_pack_weight's [N_pad / 16][K_pad / 2][16][2]; fp32,
// fp32_pack_weight's [N_pad / 16][K][16] (per block of 16 output columns and per input feature, the 16
// columns' weights, zero-padded). Returns the bias as fp32.
inline at::Tensor check_packed_weight(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t packed_n, at::ScalarType dtype,
                                      const char* op) {
  const int64_t K = input.size(1);
  const int64_t blocks = (packed_n + kPackN - 1) / kPackN;
  const std::vector<int64_t> shape = dtype == at::kBFloat16
                                         ? std::vector<int64_t>{blocks, (K + kPackK - 1) / kPackK * kPackK / 2, kPackN, 2}
                                         : std::vector<int64_t>{blocks, K, kPackN};
  TORCH_CHECK(weight.sizes() == at::IntArrayRef(shape) && weight.scalar_type() == dtype && weight.is_contiguous() &&
                  weight.device().is_cpu(),
              op, ": weight must be a contiguous ", dtype_name(dtype), " CPU tensor ", at::IntArrayRef(shape),
              " (the packing of a [", packed_n, ", ", K, "] weight); got ", weight.sizes(), " ", weight.scalar_type());
  return linear_bias_fp32(bias, packed_n, op);
}

// check_packed_input, out of `dtype`, [M, N] with contiguous rows, then check_packed_weight.
inline at::Tensor check_packed_linear(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t packed_n, at::ScalarType dtype,
                                      const char* op) {
  check_packed_input(input, dtype, op);
  const int64_t M = input.size(0);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.scalar_type() == dtype && out.stride(1) == 1,
              op, ": out must be ", dtype_name(dtype), " [", M, ", out_features] with contiguous rows; got ",
              out.scalar_type(), " ", out.sizes(), " with strides ", out.strides());
  return check_packed_weight(input, weight, bias, packed_n, dtype, op);
}

// Each row's greedy token over the outputs a linear has produced so far: the first index of its
// maximum, or of its first NaN (torch.argmax's choice: a NaN is the maximum). The *_linear_argmax ops
// keep one per task over the task's columns, in any order (the blocked linear's caller takes its
// column blocks from the back), and merge them.
class RowArgmax {
 public:
  explicit RowArgmax(int64_t rows)
      : best_(rows, -std::numeric_limits<float>::infinity()), index_(rows, -1), first_nan_(rows, kNone) {}

  // Row r's outputs col .. col + n - 1 (as they would be stored), in v's first n lanes.
  void update(int64_t r, int64_t col, fVec v, int n) {
    if (n < kVecLen) {
      float x[kVecLen];
      v.store(x);
      for (int i = 0; i < n; ++i) update(r, col + i, x[i]);
      return;
    }
    if (const int nan = (v == v).zero_mask()) {
      first_nan_[r] = std::min<int64_t>(first_nan_[r], col + __builtin_ctz(nan));
      return;
    }
    const float m = max_lane(v);
    if (index_[r] >= 0 && m < best_[r]) return;  // the common case, before finding m's column
    consider(r, m, col + __builtin_ctz(~(v == fVec(m)).zero_mask()));
  }

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  // Row r's outputs col .. col + cols - 1 from their fp32 sums (+ bias, which may be null), rounded
  // to bf16 as the bf16 linears store them (round_sums_bf16).
  void update_bf16_sums(int64_t r, int64_t col, const float* sums, const float* bias, int64_t cols) {
    for (int64_t j = 0; j < cols; j += kVecLen) {
      const int n = static_cast<int>(std::min<int64_t>(kVecLen, cols - j));
      const __m256i bits = round_sums_bf16(sums + j, bias ? bias + j : nullptr, static_cast<__mmask16>((1u << n) - 1));
      update(r, col + j, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)), n);
    }
  }
#endif

  // Takes in another task's columns: the larger maximum, the earlier column among equal ones. Tasks
  // may merge at the same time.
  void merge(const RowArgmax& other) {
    const std::lock_guard<std::mutex> lock(merging_);
    for (size_t r = 0; r < index_.size(); ++r) {
      first_nan_[r] = std::min(first_nan_[r], other.first_nan_[r]);
      if (other.index_[r] >= 0) consider(r, other.best_[r], other.index_[r]);
    }
  }

  int64_t token(int64_t r) const { return first_nan_[r] != kNone ? first_nan_[r] : index_[r]; }

 private:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

  void update(int64_t r, int64_t col, float x) {
    if (x != x) first_nan_[r] = std::min(first_nan_[r], col);
    else consider(r, x, col);
  }

  // Row r's non-NaN output x at column col: kept if larger than the maximum so far, or equal to it
  // at an earlier column (so the order columns and tasks come in does not matter).
  void consider(int64_t r, float x, int64_t col) {
    if (index_[r] < 0 || x > best_[r] || (x == best_[r] && col < index_[r])) {
      best_[r] = x;
      index_[r] = col;
    }
  }

  static float max_lane(fVec v) {
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_reduce_max_ps(v);
#else
    float x[kVecLen];
    v.store(x);
    return *std::max_element(x, x + kVecLen);  // no NaN here
#endif
  }

  std::vector<float> best_;
  std::vector<int64_t> index_, first_nan_;
  std::mutex merging_;
};

// One task's RowArgmax (none without a total), merged into the op's when the task ends.
class TaskArgmax {
 public:
  TaskArgmax(RowArgmax* total, int64_t rows) : total_(total) {
    if (total_) seen_.emplace(rows);
  }
  ~TaskArgmax() {
    if (total_) total_->merge(*seen_);
  }
  RowArgmax* get() { return seen_ ? &*seen_ : nullptr; }

 private:
  RowArgmax* total_;
  std::optional<RowArgmax> seen_;
};

// token_ids of an argmax op (the *_linear_argmax ops) over M input rows: int64 [M], contiguous, on the CPU.
inline void check_token_ids(const at::Tensor& token_ids, int64_t M, const char* op) {
  TORCH_CHECK(token_ids.dim() == 1 && token_ids.size(0) == M && token_ids.scalar_type() == at::kLong &&
                  token_ids.is_contiguous() && token_ids.device().is_cpu(),
              op, ": token_ids must be a contiguous int64 CPU tensor [", M, "]; got ", token_ids.scalar_type(), " ",
              token_ids.sizes(), " with strides ", token_ids.strides(), " on ", token_ids.device());
}

// A packed kernel's greedy body, run once its op's arguments are checked: each row's argmax over the
// [M, N] outputs of the linear (bias_f32 undefined without a bias) merged into `tokens`.
using PackedArgmaxRun = void (*)(RowArgmax& tokens, const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& bias_f32, int64_t N, const char* op);

// The argmax op of a packed kernel (the *_linear_argmax ops): token_ids int64 [M] gets each row's
// argmax over the outputs the kernel's linear op would store for an [out_features, K] weight.
inline void packed_argmax_op(PackedArgmaxRun run, at::Tensor& token_ids, const at::Tensor& input,
                             const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t out_features,
                             at::ScalarType dtype, const char* op) {
  TORCH_CHECK(out_features > 0, op, ": out_features must be positive; got ", out_features);
  check_packed_input(input, dtype, op);
  const at::Tensor bias_f32 = check_packed_weight(input, weight, bias, out_features, dtype, op);
  const int64_t M = input.size(0);
  check_token_ids(token_ids, M, op);
  RowArgmax tokens(M);
  run(tokens, input, weight, bias_f32, out_features, op);
  int64_t* ids = token_ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < M; ++r) ids[r] = tokens.token(r);
}

// A packed kernel's body, run once its op's arguments are checked: the linear with act unset, the
// gated op (out [M, d] = act(gate) * up) with it set; bias_f32 is undefined without a bias.
using PackedLinearRun = void (*)(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& bias_f32, std::optional<Activation> act, const char* op);

// The linear op of a packed kernel (bf16_amx_linear, bf16_fma_linear, fp32_fma_linear): its checks, then `run`.
inline void packed_linear_op(PackedLinearRun run, at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::ScalarType dtype, const char* op) {
  const at::Tensor bias_f32 =
      check_packed_linear(out, input, weight, bias, out.dim() == 2 ? out.size(1) : 0, dtype, op);
  run(out, input, weight, bias_f32, std::nullopt, op);
}

// The gated op of a packed kernel (the *_act_and_mul ops): out [M, d] with d a multiple of 16 over a
// [2 * d, K] gate_up weight, then `run`.
inline void packed_act_and_mul_op(PackedLinearRun run, at::Tensor& out, const at::Tensor& input,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  c10::string_view activation, at::ScalarType dtype, const char* op) {
  const Activation act = parse_activation(activation, op);
  const int64_t d = out.dim() == 2 ? out.size(1) : 0;
  TORCH_CHECK(d % kPackN == 0, op, ": out_features (d = ", d, ") must be a multiple of 16");
  const at::Tensor bias_f32 = check_packed_linear(out, input, weight, bias, 2 * d, dtype, op);
  run(out, input, weight, bias_f32, act, op);
}

// One row of a gate block's and its up block's sums (16 each, biases null or 16 each) -> 16 outputs
// of act(gate) * up, each rounded where the linear and act_and_mul round it, so the bits are theirs.
template <Activation kAct, typename T>
inline void store_act_and_mul(T* out, const float* gate_sums, const float* up_sums, const float* gate_bias,
                              const float* up_bias) {
  for (int64_t j = 0; j < kPackN; j += kVecLen) {
    fVec gate = fVec::loadu(gate_sums + j), up = fVec::loadu(up_sums + j);
    if (gate_bias) {
      gate = gate + fVec::loadu(gate_bias + j);
      up = up + fVec::loadu(up_bias + j);
    }
    store_fp32(out + j, act_and_mul<kAct, T>(round_to<T>(gate), round_to<T>(up)));
  }
}

template <typename T>
inline void store_act_and_mul(Activation act, T* out, const float* gate_sums, const float* up_sums,
                              const float* gate_bias, const float* up_bias) {
  if (act == Activation::kSilu) store_act_and_mul<Activation::kSilu>(out, gate_sums, up_sums, gate_bias, up_bias);
  else store_act_and_mul<Activation::kGeluTanh>(out, gate_sums, up_sums, gate_bias, up_bias);
}

}  // namespace pagedlm::cpu
