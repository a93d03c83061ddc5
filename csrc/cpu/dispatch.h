#pragma once

#include <ATen/Dispatch.h>

// fp32 and bf16 run fully vectorised; fp16 goes through ATen's portable conversions.
#define PAGEDLM_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                           \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
