// What the CUDA kernels of every op share: packs of N elements moved by one access, the
// conversions applied to a pack between its load and its store, the host checks that choose a pack
// width and an index type, and the device guard.
#pragma once

#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "ops.h"

namespace vllm_mla_ops {

// N elements moved by one access, as a native vector type of their size, loaded with __ldg and
// stored with __stwb, so 8 two-byte elements are exactly one 16-byte load and one 16-byte store
// (LDG.E.128 / STG.E.128). A struct of c10::BFloat16 was not, nor is a plain store of the vector
// type in the 64-bit index kernel: nvcc split some of them into 2- or 4-byte stores.
template <int kBytes> struct PackOf;
template <> struct PackOf<16> { using type = uint4; };
template <> struct PackOf<8> { using type = uint2; };
template <> struct PackOf<4> { using type = uint32_t; };
template <> struct PackOf<2> { using type = uint16_t; };
template <> struct PackOf<1> { using type = uint8_t; };
template <typename T, int N>
using Pack = typename PackOf<sizeof(T) * N>::type;

// What each conversion reads besides the tensors, passed by value to the kernel.
struct NoArgs {};
struct ScaleArgs {
  const float* scale;
};

// concat_mla_q: a pack is stored as it was loaded. In the flat split, one pack a thread (measured
// faster than two or four on rows of 72 packs: docs/design.md), two on large outputs of short rows
// (see launch()).
template <typename scalar_t>
struct Copy {
  using out_t = scalar_t;
  using Args = NoArgs;
  static constexpr int kPacksPerThread = 1;
  __device__ explicit Copy(Args) {}
  template <typename P>
  __device__ P operator()(const P& pack) const {
    return pack;
  }
};

// n floats to e4m3fn, rounded to nearest even, two a conversion instruction. The saturating
// conversion (satfinite) maps |v| > 448 and +-inf to +-448 and NaN to NaN, which is what
// clamp(-448, 448) followed by a cast does.
template <int n>
__device__ Pack<__nv_fp8_storage_t, n> to_e4m3(const float (&v)[n]) {
  __nv_fp8_storage_t q[n];
#pragma unroll
  for (int i = 0; i + 1 < n; i += 2) {
    const __nv_fp8x2_storage_t q2 = __nv_cvt_float2_to_fp8x2(float2{v[i], v[i + 1]}, __NV_SATFINITE, __NV_E4M3);
    memcpy(q + i, &q2, sizeof(q2));
  }
  if constexpr (n % 2 == 1) q[n - 1] = __nv_cvt_float_to_fp8(v[n - 1], __NV_SATFINITE, __NV_E4M3);
  Pack<__nv_fp8_storage_t, n> out;
  memcpy(&out, q, sizeof(out));
  return out;
}

// concat_mla_q_fp8: e4m3fn(x * r) with r = 1 / scale correctly rounded (read on the device, so a
// graph replay sees the scale of the moment), x * r in float32. Four packs a thread on large
// outputs, where the conversion's instructions would otherwise leave too few loads in flight.
template <typename scalar_t>
struct QuantizeE4M3 {
  using out_t = __nv_fp8_storage_t;
  using Args = ScaleArgs;
  static constexpr int kPacksPerThread = 4;
  float r;
  // An IEEE division (nvcc's default -prec-div=true; this build never uses --use_fast_math).
  __device__ explicit QuantizeE4M3(Args args) : r(1.0f / *args.scale) {}
  template <typename P>
  __device__ Pack<out_t, sizeof(P) / sizeof(scalar_t)> operator()(const P& pack) const {
    constexpr int n = sizeof(P) / sizeof(scalar_t);
    scalar_t x[n];
    memcpy(x, &pack, sizeof(P));
    float v[n];
#pragma unroll
    for (int i = 0; i < n; ++i) v[i] = static_cast<float>(x[i]) * r;
    return to_e4m3(v);
  }
};

// concat_mla_rope's fp8 KV cache: e4m3fn(x / scale), as vLLM's fp8 cache is written (a division,
// where the query's quantization multiplies by the reciprocal). The quotient is IEEE division's
// without a division an element (nvcc's is a reciprocal, its refinement and a check that may call
// a slow path, each in turn): q = x * r with r = 1 / scale correctly rounded, made once a thread,
// then q + (x - q * scale) * r in two fused multiply-adds, which is x / scale correctly rounded
// (Markstein's theorem) when no step underflows or overflows: so for |scale| in [2^-64, 2^64] and
// |q| in [2^-24, 2^24]. Outside the second range q is kept, as its e4m3fn value is the quotient's
// (+-0 below, +-448 above, NaN); outside the first every element is divided.
template <typename scalar_t>
struct DivideE4M3 {
  using out_t = __nv_fp8_storage_t;
  using Args = ScaleArgs;
  float scale, r;
  bool by_reciprocal;
  __device__ explicit DivideE4M3(Args args)
      : scale(*args.scale), r(1.0f / scale), by_reciprocal(fabsf(scale) >= 0x1p-64f && fabsf(scale) <= 0x1p64f) {}
  template <typename P>
  __device__ Pack<out_t, sizeof(P) / sizeof(scalar_t)> operator()(const P& pack) const {
    constexpr int n = sizeof(P) / sizeof(scalar_t);
    scalar_t x[n];
    memcpy(x, &pack, sizeof(P));
    float v[n];
    if (by_reciprocal) {
#pragma unroll
      for (int i = 0; i < n; ++i) {
        const float xi = static_cast<float>(x[i]), q = __fmul_rn(xi, r), m = fabsf(q);
        v[i] = m >= 0x1p-24f && m <= 0x1p24f ? __fmaf_rn(__fmaf_rn(-q, scale, xi), r, q) : q;
      }
    } else {
#pragma unroll
      for (int i = 0; i < n; ++i) v[i] = __fdiv_rn(static_cast<float>(x[i]), scale);
    }
    return to_e4m3(v);
  }
};

// What the launch code reads of a tensor, fetched once: every accessor of the stable ABI is a call
// into torch, and a launch reads the same sizes and strides several times (the concat_mla_rope
// launch made about 170 such calls, now about 60).
struct Layout : Shape {
  uintptr_t address;
  int64_t element_size;
  explicit Layout(const torch::stable::Tensor& t)
      : Shape(t), address(reinterpret_cast<uintptr_t>(t.const_data_ptr())), element_size(static_cast<int64_t>(t.element_size())) {}
};

// Whether every row (the last dim) of t splits into aligned packs of n > 1 elements: the width
// divides, the last dim is unit-stride, and the base and the strides of the dims that vary keep each
// row aligned.
inline bool rows_split_into_packs(const Layout& t, int64_t n) {
  const size_t last = t.sizes.size() - 1;
  if (t.sizes[last] % n != 0 || (t.sizes[last] > 1 && t.strides[last] != 1)) return false;
  if (t.address % static_cast<uintptr_t>(n * t.element_size) != 0) return false;
  for (size_t d = 0; d < last; ++d) {
    if (t.sizes[d] > 1 && t.strides[d] % n != 0) return false;
  }
  return true;
}

// The largest element offset a view addresses (the validator has checked that it lies inside the
// storage, so the sum does not overflow).
inline int64_t last_offset(const Layout& t) {
  int64_t last = 0;
  for (size_t d = 0; d < t.sizes.size(); ++d) last += (t.sizes[d] - 1) * t.strides[d];
  return last;
}

// The launching device made current for the call, as torch's device guard does, but without creating
// one (an allocation and two calls into torch) when it already is current: the usual case, and
// every call costs the engines host time.
class DeviceIfNeeded {
 public:
  explicit DeviceIfNeeded(int32_t index) {
    int current = -1;
    if (cudaGetDevice(&current) != cudaSuccess || current != index) guard_.emplace(index);
  }

 private:
  std::optional<torch::stable::accelerator::DeviceGuard> guard_;
};

}  // namespace vllm_mla_ops
