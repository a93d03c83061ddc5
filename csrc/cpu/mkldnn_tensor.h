#pragma once
// An MKLDNN (oneDNN) tensor's buffer: ATen has no data_ptr or nbytes for opaque tensors, so these go
// through oneDNN's own ops.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>

namespace pagedlm::cpu {

inline const void* mkldnn_data(const at::Tensor& weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::data_ptr", "")
                             .typed<int64_t(const at::Tensor&)>();
  return reinterpret_cast<const void*>(op.call(weight));
}

inline int64_t mkldnn_nbytes(const at::Tensor& weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_nbytes", "")
                             .typed<int64_t(const at::Tensor&)>();
  return op.call(weight);
}

}  // namespace pagedlm::cpu
