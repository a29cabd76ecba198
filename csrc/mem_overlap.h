// Exact memory-overlap decisions for strided views, by address. ATen's has_internal_overlap answers
// first where it can; where it answers "too hard" (views that are not dense) these decide exactly.
#pragma once

#include <ATen/core/Tensor.h>

namespace vllm_mla_ops {

// True when two distinct indices of `t` address a common byte.
bool has_internal_overlap(const at::Tensor& t);

// True when some byte is addressed by both `a` and `b` (either may be empty), whatever their
// storages: two storages can share memory.
bool overlaps(const at::Tensor& a, const at::Tensor& b);

}  // namespace vllm_mla_ops
