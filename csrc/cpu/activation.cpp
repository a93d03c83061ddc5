// silu(gate) * up over a packed [tokens, 2 * d] gate_up projection, rounded like eager torch:
// silu's result is rounded to the model dtype before the multiply.
#include "vec.h"

#include "../checks.h"
#include "dispatch.h"
#include "ops.h"

#include <ATen/Parallel.h>

namespace pagedlm::cpu {

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  check_silu_and_mul(out, input);
  const int64_t tokens = out.size(0), d = out.size(1);
  const int64_t in_stride = input.stride(0), out_stride = out.stride(0);
  PAGEDLM_DISPATCH_FLOATING_TYPES(input.scalar_type(), "silu_and_mul", [&] {
    const auto* x = input.data_ptr<scalar_t>();
    auto* y = out.data_ptr<scalar_t>();
    const fVec one(1.f);
    at::parallel_for(0, tokens, std::max<int64_t>(1, 8192 / d), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const scalar_t* gate = x + t * in_stride;
        const scalar_t* up = gate + d;
        for (int64_t i = 0; i < d; i += kVecLen) {
          const int n = static_cast<int>(std::min<int64_t>(kVecLen, d - i));
          const fVec g = load_fp32(gate + i, n);
          const fVec silu = round_to<scalar_t>(g / (one + g.neg().exp()));
          store_fp32(y + t * out_stride + i, silu * load_fp32(up + i, n), n);
        }
      }
    });
  });
}

}  // namespace pagedlm::cpu
