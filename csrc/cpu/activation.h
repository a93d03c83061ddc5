#pragma once
// The gated MLPs' activations on fp32 vectors, shared by act_and_mul (activation.cpp) and the AMX
// linear that applies one as it stores (amx_linear.cpp), so both give the same bits.

#include "vec.h"

#include <cmath>

namespace pagedlm::cpu {

// SiLU, or GELU's tanh approximation (0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), torch's
// approximate="tanh").
enum class Activation { kSilu, kGeluTanh };

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

}  // namespace pagedlm::cpu
