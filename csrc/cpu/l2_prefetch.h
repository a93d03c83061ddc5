#pragma once
// Weights a linear kernel reads next, asked into L2 a few lines at a time between the steps of what
// it computes now, so that the next pass starts from L2 instead of waiting on memory (amx_linear.cpp's
// panels, linear.cpp's blocks).

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

namespace pagedlm::cpu {

// The bytes [begin, end), spread over `steps` calls of issue().
struct L2Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t per_step = 0;

  L2Prefetch() = default;
  L2Prefetch(const c10::BFloat16* begin, const c10::BFloat16* stop, int64_t steps)
      : next(reinterpret_cast<const char*>(begin)),
        end(reinterpret_cast<const char*>(stop)),
        per_step(((end - next) / 64 + steps - 1) / steps) {}

  void issue() {
    for (int64_t i = 0; i < per_step && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
};

}  // namespace pagedlm::cpu
