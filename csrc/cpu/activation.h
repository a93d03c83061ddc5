#pragma once
// The gated MLPs' activations on fp32 vectors, shared by act_and_mul (activation.cpp) and the linears
// that apply one as they store (amx_linear.cpp, linear.cpp), so all give the same bits.

#include "vec.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace pagedlm::cpu {

// SiLU, or GELU's tanh approximation (0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), torch's
// approximate="tanh").
enum class Activation { kSilu, kGeluTanh };

// The ops' name for it ("silu" or "gelu_tanh"); `op` names the op in the error otherwise.
inline Activation parse_activation(c10::string_view name, const char* op) {
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(name == "gelu_tanh", op, ": activation must be 'silu' or 'gelu_tanh'; got '", std::string(name), "'");
  return Activation::kGeluTanh;
}

template <Activation kAct>
inline fVec activate(fVec x) {
  if constexpr (kAct == Activation::kSilu) {
    return x / (fVec(1.f) + x.neg().exp());
  } else {
    // torch's operation order, so results match it bit for bit.
    const fVec cube = x * x * x;
    const fVec inner = fVec(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5)) * (x + fVec(0.044715f) * cube);
    return fVec(0.5f) * x * (fVec(1.f) + inner.tanh());
  }
}

// act(gate) * up for one vector of each, as eager torch rounds it: act's result is rounded to T
// before the multiply (the caller rounds the product when it stores it).
template <Activation kAct, typename T>
inline fVec act_and_mul(fVec gate, fVec up) {
  return round_to<T>(activate<kAct>(gate)) * up;
}

// act(x) rounded to bf16 for each of the 65,536 bf16 bit patterns x (one more, zero, so that a 32-bit
// gather at the last one stays inside), computed by activate<kAct> itself: a bf16 gate's activation is
// then one gather with activate's bits. On the Zen 5 EPYC a [256, 2 x 1536] act_and_mul took 110 us
// either way, against 117 (SiLU) and 325 (GELU's tanh) computed. Built on first use, 128 KiB, with
// subnormals kept (the build clears the calling thread's flush-to-zero and denormals-are-zero modes,
// e.g. torch.set_flush_denormal(True), and restores them), so the table never depends on them.
#if defined(CPU_CAPABILITY_AVX512)
template <Activation kAct>
const uint16_t* bf16_activation_table() {
  static const auto table = [] {
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr & ~(_MM_FLUSH_ZERO_ON | 0x0040u));  // 0x0040: denormals-are-zero
    std::vector<uint16_t> t(65536 + 1, 0);
    for (uint32_t x = 0; x < 65536; x += kVecLen) {
      c10::BFloat16 in[kVecLen], out[kVecLen];
      for (int i = 0; i < kVecLen; ++i) in[i].x = static_cast<uint16_t>(x + i);
      store_fp32(out, activate<kAct>(load_fp32(in)));
      for (int i = 0; i < kVecLen; ++i) t[x + i] = out[i].x;
    }
    _mm_setcsr(csr);
    return t;
  }();
  return table.data();
}

// act(gate) * up for 16 bf16 gates and ups, given as their bits in 32-bit lanes: the gate's
// activation from `table` (one of the above), the product in fp32 (the caller rounds it as it stores).
inline fVec table_act_and_mul(const uint16_t* table, __m512i gate_bits, __m512i up_bits) {
  const __m512i act = _mm512_slli_epi32(_mm512_i32gather_epi32(gate_bits, table, 2), 16);
  return fVec(_mm512_castsi512_ps(act)) * fVec(_mm512_castsi512_ps(_mm512_slli_epi32(up_bits, 16)));
}

inline const uint16_t* bf16_activation_table(Activation act) {
  return act == Activation::kSilu ? bf16_activation_table<Activation::kSilu>()
                                  : bf16_activation_table<Activation::kGeluTanh>();
}

#if defined(__AVX512BF16__)
// act(gate) * up for `cols` (a multiple of 16) columns of one row of a gate block's and its up block's
// sums (biases null or `cols` each), each rounded to bf16 as the bf16 linears store their sums
// (round_sums_bf16), then joined by `table` (bf16_activation_table) as act_and_mul joins them: the
// bits of the bf16 linear followed by silu_and_mul / gelu_tanh_and_mul. The table's gather rather than
// the activation's exp or tanh, because the linears store while their matrix products run and the
// vector arithmetic competes with them: a [128, 2 x 512] AMX gate_up call took 106 us computed, 90
// gathered, 60 without storing at all (one thread, weight in L2).
inline void store_act_and_mul_bf16(c10::BFloat16* out, const float* gate_sums, const float* up_sums,
                                   const float* gate_bias, const float* up_bias, const uint16_t* table, int64_t cols) {
  for (int64_t j = 0; j < cols; j += 16) {
    const __m512i gate = _mm512_cvtepu16_epi32(round_sums_bf16(gate_sums + j, gate_bias ? gate_bias + j : nullptr));
    const __m512i up = _mm512_cvtepu16_epi32(round_sums_bf16(up_sums + j, up_bias ? up_bias + j : nullptr));
    store_fp32(out + j, table_act_and_mul(table, gate, up));
  }
}
#endif
#endif

}  // namespace pagedlm::cpu
