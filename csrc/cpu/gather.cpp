// out[i] = input[index[i]]: torch.index_select(input, 0, index) on the kernels' own threads. The
// embedding lookup and the choice of the rows that get logits go through it so that a step opens no
// libgomp region, whose threads would then spin beside the pool's (300,000 spins, ~3.5 ms, when
// torch was imported before pagedlm and OMP_WAIT_POLICY could not be set: a decode step 25% slower).
#include "../checks.h"
#include "ops.h"
#include "parallel.h"

#include <ATen/MemoryOverlap.h>

#include <cstring>

namespace pagedlm::cpu {

void gather_rows(at::Tensor& out, const at::Tensor& input, const at::Tensor& index) {
  check_gather_rows(out, input, index);
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, input);
  const int64_t n = index.size(0), rows = input.size(0), d = input.size(1);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, "index[", i, "] = ", idx[i], " is out of range for input with ", rows,
                " rows");
  }
  const int64_t row_bytes = d * input.element_size();
  const auto* src = static_cast<const char*>(input.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t in_stride = input.stride(0) * input.element_size(), out_stride = out.stride(0) * out.element_size();
  parallel_for(0, n, grain_for(d), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) std::memcpy(dst + i * out_stride, src + idx[i] * in_stride, row_bytes);
  });
}

}  // namespace pagedlm::cpu
