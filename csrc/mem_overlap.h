// Memory-overlap decisions for strided views, by address, with a bounded amount of work.
//
// Whether two strided views share a byte is an integer feasibility problem (NP-hard in general, as
// NumPy's may_share_memory notes). The common layouts (dense views, rows with padding, views of one
// buffer with the same row pitch) are decided in a few steps; an exact search handles the rest and
// gives up after kMaxSteps steps instead of running for minutes on adversarial strides.
#pragma once

#include <array>
#include <cstdint>

namespace vllm_mla_ops {

// A non-empty strided view: the address of its first element, its element size in bytes, and the
// sizes and strides (in elements) of its dims of more than one element (the others address nothing
// new; the ops' tensors have at most three). Callers have checked that the view lies inside its
// storage, so every byte offset below fits in int64.
struct View {
  int64_t address;
  int64_t item_bytes;
  int dims;
  std::array<int64_t, 3> sizes, strides;
};

enum class Overlap { kNo, kYes, kUndecided };

// Steps of the exact search before it answers kUndecided (about a millisecond of host time).
inline constexpr int64_t kMaxSteps = 100000;

// Whether two distinct indices of `v` address a common byte.
Overlap internal_overlap(const View& v);

// Whether some byte is addressed by both `a` and `b`, whatever storages they belong to: two
// storages can share memory (from_blob, numpy or DLPack views of one buffer).
Overlap overlap(const View& a, const View& b);

}  // namespace vllm_mla_ops
