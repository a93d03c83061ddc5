// A tensor times a scalar, each token's rows times its position's factor, and the soft cap of
// Gemma 2's final logits, in place on the kernels' threads: eager torch would open an OpenMP region
// for each (three for the soft cap), whose threads then spin beside the pool's. A float32 soft cap
// stays ATen's (see soft_cap).
#include "vec.h"

#include "../checks.h"
#include "dispatch.h"
#include "ops.h"
#include "parallel.h"

#include <cmath>

namespace pagedlm::cpu {
namespace {

template <typename T>
struct Dtype {
  using type = T;
};

void check_in_place(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be float32, bfloat16 or float16; got ", x.scalar_type());
}

// x[i] = f(Dtype<T>{}, x[i]) (x's dtype T, the value in fp32) over a tensor check_in_place passed,
// every element with the same vector math (tails too).
template <typename F>
void map_in_place(at::Tensor& x, const F& f) {
  PAGEDLM_DISPATCH_FLOATING_TYPES(x.scalar_type(), "map_in_place", [&] {
    auto* p = x.data_ptr<scalar_t>();
    const int64_t n = x.numel(), vectors = (n + kVecLen - 1) / kVecLen;
    parallel_for(0, vectors, grain_for(kVecLen), [&](int64_t lo, int64_t hi) {
      for (int64_t v = lo; v < hi; ++v) {
        const int count = static_cast<int>(std::min<int64_t>(kVecLen, n - v * kVecLen));
        scalar_t* q = p + v * kVecLen;
        store_fp32(q, f(Dtype<scalar_t>{}, load_fp32(q, count)), count);
      }
    });
  });
}

}  // namespace

void scale(at::Tensor& x, double factor, bool divide) {
  TORCH_CHECK(std::isfinite(factor) && factor != 0.0, "scale: factor must be finite and nonzero; got ", factor);
  check_in_place(x, "scale");
  const fVec s(static_cast<float>(factor));
  if (divide) {
    map_in_place(x, [&](auto, fVec v) { return v / s; });
  } else {
    map_in_place(x, [&](auto, fVec v) { return v * s; });
  }
}

void position_scale(at::Tensor& x, const at::Tensor& positions, const at::Tensor& scales) {
  check_rows(x, "x");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong && positions.size(0) == x.size(0),
              "position_scale: positions must be int64 [num_tokens]");
  TORCH_CHECK(scales.dim() == 1 && scales.is_contiguous() && scales.scalar_type() == x.scalar_type(),
              "position_scale: scales must be a contiguous [max_position] table in x's dtype");
  const at::Tensor pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t heads = x.size(1), head_size = x.size(2), max_position = scales.size(0);
  PAGEDLM_DISPATCH_FLOATING_TYPES(x.scalar_type(), "position_scale", [&] {
    auto* data = x.data_ptr<scalar_t>();
    const auto* table = scales.data_ptr<scalar_t>();
    parallel_for(0, x.size(0), grain_for(heads * head_size), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        TORCH_CHECK(p[t] >= 0 && p[t] < max_position, "position ", p[t], " is outside the scales table");
        const fVec s(static_cast<float>(table[p[t]]));
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* row = data + t * x.stride(0) + h * x.stride(1);
          for (int64_t d = 0; d < head_size; d += kVecLen) {
            const int n = static_cast<int>(std::min<int64_t>(kVecLen, head_size - d));
            store_fp32(row + d, load_fp32(row + d, n) * s, n);
          }
        }
      }
    });
  });
}

void soft_cap(at::Tensor& x, double cap) {
  TORCH_CHECK(std::isfinite(cap) && cap > 0.0, "soft_cap: cap must be finite and positive; got ", cap);
  check_in_place(x, "soft_cap");
  if (x.scalar_type() == at::kFloat) {
    // torch's fp32 tanh is MKL's (VML), whose last bits differ from Sleef's in ~1% of elements:
    // ATen's own ops keep transformers' fp32 logits. No rounding between the steps to fuse here.
    x.div_(cap).tanh_().mul_(cap);
    return;
  }
  const fVec c(static_cast<float>(cap));
  // Each step rounded to x's dtype, as transformers' x / cap, tanh, * cap are.
  map_in_place(x, [&](auto dtype, fVec v) {
    using T = typename decltype(dtype)::type;
    return round_to<T>(round_to<T>(v / c).tanh()) * c;
  });
}

}  // namespace pagedlm::cpu
