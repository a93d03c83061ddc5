// act(gate) * up over a packed [tokens, 2 * d] gate_up projection (activation.h).
#include "vec.h"

#include "../checks.h"
#include "activation.h"
#include "dispatch.h"
#include "ops.h"
#include "parallel.h"

namespace pagedlm::cpu {
namespace {

template <Activation kAct>
void act_and_mul_rows(at::Tensor& out, const at::Tensor& input) {
  check_act_and_mul(out, input);
  const int64_t tokens = out.size(0), d = out.size(1);
  const int64_t in_stride = input.stride(0), out_stride = out.stride(0);
  PAGEDLM_DISPATCH_FLOATING_TYPES(input.scalar_type(), "act_and_mul", [&] {
    const auto* x = input.data_ptr<scalar_t>();
    auto* y = out.data_ptr<scalar_t>();
#if defined(CPU_CAPABILITY_AVX512)
    const uint16_t* table = nullptr;
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) table = bf16_activation_table<kAct>();
#endif
    parallel_for(0, tokens, grain_for(2 * d), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const scalar_t* gate = x + t * in_stride;
        const scalar_t* up = gate + d;
        int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          for (; i + kVecLen <= d; i += kVecLen) {
            const auto bits = [](const scalar_t* p) {
              return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
            };
            store_fp32(y + t * out_stride + i, table_act_and_mul(table, bits(gate + i), bits(up + i)));
          }
        }
#endif
        for (; i < d; i += kVecLen) {
          const int n = static_cast<int>(std::min<int64_t>(kVecLen, d - i));
          store_fp32(y + t * out_stride + i, act_and_mul<kAct, scalar_t>(load_fp32(gate + i, n), load_fp32(up + i, n)), n);
        }
      }
    });
  });
}

}  // namespace

void silu_and_mul(at::Tensor& out, const at::Tensor& input) { act_and_mul_rows<Activation::kSilu>(out, input); }

void gelu_tanh_and_mul(at::Tensor& out, const at::Tensor& input) { act_and_mul_rows<Activation::kGeluTanh>(out, input); }

}  // namespace pagedlm::cpu
