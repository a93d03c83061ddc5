#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace pagedlm::cpu {

// Called by a linear kernel as it starts on `weight`, an MKLDNN tensor whose bytes are
// [data, data + bytes), read as `parts` equal runs in step: learns which weight follows which (a
// model runs its linears in the same order every step) and asks the pool's idle workers to read the
// front of the weights that followed this one last time (read_while_idle), up to kReadAheadBytes.
void read_next_weights_while_idle(const at::Tensor& weight, const void* data, int64_t bytes, int parts);

}  // namespace pagedlm::cpu
