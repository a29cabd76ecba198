// Dispatch macros under vLLM's names, built on the stable ABI's header-only THO_DISPATCH_SWITCH /
// THO_DISPATCH_CASE. Any dtype outside a macro's list raises "<NAME>" not implemented for '<dtype>'.
#pragma once

#include <torch/headeronly/core/Dispatch.h>

#define VLLM_DISPATCH_CASE_FLOATING_TYPES(...)                             \
  THO_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__)    \
  THO_DISPATCH_CASE(torch::headeronly::ScalarType::Half, __VA_ARGS__)     \
  THO_DISPATCH_CASE(torch::headeronly::ScalarType::BFloat16, __VA_ARGS__)

#define VLLM_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  THO_DISPATCH_SWITCH(TYPE, NAME, VLLM_DISPATCH_CASE_FLOATING_TYPES(__VA_ARGS__))

#define VLLM_DISPATCH_CASE_HALF_TYPES(...)                                 \
  THO_DISPATCH_CASE(torch::headeronly::ScalarType::Half, __VA_ARGS__)     \
  THO_DISPATCH_CASE(torch::headeronly::ScalarType::BFloat16, __VA_ARGS__)

#define VLLM_DISPATCH_HALF_TYPES(TYPE, NAME, ...) \
  THO_DISPATCH_SWITCH(TYPE, NAME, VLLM_DISPATCH_CASE_HALF_TYPES(__VA_ARGS__))
