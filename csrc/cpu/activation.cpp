// act(gate) * up over a packed [tokens, 2 * d] gate_up projection, rounded like eager torch: the
// activation's result is rounded to the model dtype before the multiply. act is SiLU, or GELU's tanh
// approximation (0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), torch's approximate="tanh").
#include "vec.h"

#include "../checks.h"
#include "dispatch.h"
#include "ops.h"
#include "parallel.h"

#include <cmath>

namespace pagedlm::cpu {
namespace {

enum class Activation { kSilu, kGeluTanh };

template <Activation kAct>
fVec activate(fVec x) {
  if constexpr (kAct == Activation::kSilu) {
    return x / (fVec(1.f) + x.neg().exp());
  } else {
    // torch's operation order, so results match it bit for bit.
    const fVec cube = x * x * x;
    const fVec inner = fVec(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5)) * (x + fVec(0.044715f) * cube);
    return fVec(0.5f) * x * (fVec(1.f) + inner.tanh());
  }
}

template <Activation kAct>
void act_and_mul(at::Tensor& out, const at::Tensor& input) {
  check_act_and_mul(out, input);
  const int64_t tokens = out.size(0), d = out.size(1);
  const int64_t in_stride = input.stride(0), out_stride = out.stride(0);
  PAGEDLM_DISPATCH_FLOATING_TYPES(input.scalar_type(), "act_and_mul", [&] {
    const auto* x = input.data_ptr<scalar_t>();
    auto* y = out.data_ptr<scalar_t>();
    parallel_for(0, tokens, grain_for(2 * d), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const scalar_t* gate = x + t * in_stride;
        const scalar_t* up = gate + d;
        for (int64_t i = 0; i < d; i += kVecLen) {
          const int n = static_cast<int>(std::min<int64_t>(kVecLen, d - i));
          const fVec act = round_to<scalar_t>(activate<kAct>(load_fp32(gate + i, n)));
          store_fp32(y + t * out_stride + i, act * load_fp32(up + i, n), n);
        }
      }
    });
  });
}

}  // namespace

void silu_and_mul(at::Tensor& out, const at::Tensor& input) { act_and_mul<Activation::kSilu>(out, input); }

void gelu_tanh_and_mul(at::Tensor& out, const at::Tensor& input) { act_and_mul<Activation::kGeluTanh>(out, input); }

}  // namespace pagedlm::cpu
