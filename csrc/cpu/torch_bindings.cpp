#include "ops.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(pagedlm, CPU, m) {
  m.impl("reshape_and_cache", &pagedlm::cpu::reshape_and_cache);
  m.impl("paged_attention", &pagedlm::cpu::paged_attention);
  m.impl("paged_prefill_attention", &pagedlm::cpu::paged_prefill_attention);
  m.impl("copy_blocks", &pagedlm::cpu::copy_blocks);
  m.impl("swap_blocks", &pagedlm::cpu::swap_blocks);
}
