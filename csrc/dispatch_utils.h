// Dispatch macros in vLLM's spelling, built on ATen's AT_DISPATCH_SWITCH / AT_DISPATCH_CASE.
// Any dtype outside a macro's list raises ATen's "<NAME>" not implemented for '<dtype>' error.
#pragma once

#include <ATen/Dispatch.h>

#define VLLM_DISPATCH_CASE_FLOATING_TYPES(...)           \
  AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)   \
  AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)    \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__)

#define VLLM_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, VLLM_DISPATCH_CASE_FLOATING_TYPES(__VA_ARGS__))

#define VLLM_DISPATCH_CASE_HALF_TYPES(...)             \
  AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__)

#define VLLM_DISPATCH_HALF_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, VLLM_DISPATCH_CASE_HALF_TYPES(__VA_ARGS__))
