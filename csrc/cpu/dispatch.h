#pragma once

#include <ATen/Dispatch.h>

// fp32 and bf16 run fully vectorised; fp16 goes through ATen's portable conversions.
#define PAGEDLM_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                           \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Calls f(C{}) for the KV cache's entry type C: T (the queries' type) or an fp8 type.
template <typename T, typename F>
void dispatch_cache_type(at::ScalarType cache_dtype, const F& f) {
  switch (cache_dtype) {
    case at::kFloat8_e4m3fn: f(c10::Float8_e4m3fn{}); break;
    case at::kFloat8_e5m2: f(c10::Float8_e5m2{}); break;
    default: f(T{}); break;
  }
}
