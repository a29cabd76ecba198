// CPU kernels: one task per block of (token, head) rows; each row is two row operations, a copy
// (memcpy where the last dims are unit-stride) or, for the fp8 op, a quantization.
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/Float8_e4m3fn.h>

#include <algorithm>
#include <cstring>

#include "dispatch_utils.h"
#include "ops.h"

namespace {

// Elements per parallel task (ATen's own grain size): small inputs stay on the calling thread.
constexpr int64_t kGrainElements = 32768;

// A row copy inlined into the row loop: 32-byte moves, cloned for AVX-512 and AVX2 machines (the
// loader picks the clone once per process), so a row costs no library call.
[[gnu::target_clones("avx512f", "avx2", "default")]] void copy_bytes(char* dst, const char* src, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) __builtin_memcpy(dst + i, src + i, 32);
  for (; i < n; ++i) dst[i] = src[i];
}

struct CopyRow {
  template <typename scalar_t>
  void operator()(scalar_t* dst, int64_t dst_stride, const scalar_t* src, int64_t src_stride, int64_t n) const {
    if (dst_stride == 1 && src_stride == 1) {
      copy_bytes(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src), n * int64_t{sizeof(scalar_t)});
      return;
    }
    for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = src[i * src_stride];
  }
};

// x * r in float32, clamped to e4m3fn's finite range (NaN stays NaN: both compares are false), then
// the round-to-nearest-even conversion: the same steps as the reference
// (x.float() * scale.reciprocal()).clamp(-448, 448).to(torch.float8_e4m3fn).
struct QuantizeRow {
  float r;  // 1 / scale, correctly rounded
  template <typename scalar_t>
  void operator()(torch::headeronly::Float8_e4m3fn* dst, int64_t dst_stride, const scalar_t* src,
                  int64_t src_stride, int64_t n) const {
    constexpr float kMax = 448.0f;
    for (int64_t i = 0; i < n; ++i) {
      float x = static_cast<float>(src[i * src_stride]) * r;
      x = x > kMax ? kMax : (x < -kMax ? -kMax : x);
      dst[i * dst_stride] = torch::headeronly::Float8_e4m3fn(x);
    }
  }
};

template <typename scalar_t, typename out_t, typename RowOp>
void concat_rows(const Tensor& ql_nope, const Tensor& q_pe, const Tensor& q_out, const RowOp& row_op) {
  const int64_t tokens = q_out.size(0), heads = q_out.size(1);
  const int64_t nope_dim = ql_nope.size(2), rope_dim = q_pe.size(2);
  // A 1-head q_pe is one rope row shared by every head.
  const int64_t pe_head_stride = q_pe.size(1) == 1 ? 0 : q_pe.stride(1);
  const int64_t nope_s0 = ql_nope.stride(0), nope_s1 = ql_nope.stride(1), nope_s2 = ql_nope.stride(2);
  const int64_t pe_s0 = q_pe.stride(0), pe_s2 = q_pe.stride(2);
  const int64_t out_s0 = q_out.stride(0), out_s1 = q_out.stride(1), out_s2 = q_out.stride(2);
  const auto* nope = static_cast<const scalar_t*>(ql_nope.const_data_ptr());
  const auto* pe = static_cast<const scalar_t*>(q_pe.const_data_ptr());
  auto* out = static_cast<out_t*>(q_out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (nope_dim + rope_dim));
  // Rows go in ql_nope's memory order (it is most of the bytes read): token-major, or head-major for
  // the decode layout, where ql_nope is a transposed [heads, tokens, nope] bmm output.
  const bool heads_outer = heads > 1 && tokens > 1 && nope_s1 > nope_s0;
  const int64_t inner = heads_outer ? tokens : heads;
  torch::stable::parallel_for(0, tokens * heads, grain, [&](int64_t begin, int64_t end) {
    // One division per task; its rows then advance along the inner dim.
    int64_t o = begin / inner, i = begin % inner;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = heads_outer ? i : o, h = heads_outer ? o : i;
      out_t* out_row = out + t * out_s0 + h * out_s1;
      row_op(out_row, out_s2, nope + t * nope_s0 + h * nope_s1, nope_s2, nope_dim);
      row_op(out_row + nope_dim * out_s2, out_s2, pe + t * pe_s0 + h * pe_head_stride, pe_s2, rope_dim);
      if (++i == inner) {
        i = 0;
        ++o;
      }
    }
  });
}

}  // namespace

void concat_mla_q_cpu(Tensor ql_nope, Tensor q_pe, Tensor q_out) {
  check_concat_mla_q_args(ql_nope, q_pe, q_out);
  if (q_out.numel() == 0) return;
  VLLM_DISPATCH_HALF_TYPES(ql_nope.scalar_type(), "concat_mla_q", [&] {
    concat_rows<scalar_t, scalar_t>(ql_nope, q_pe, q_out, CopyRow{});
  });
}

void concat_mla_q_fp8_cpu(Tensor ql_nope, Tensor q_pe, Tensor q_out, Tensor scale) {
  check_concat_mla_q_args(ql_nope, q_pe, q_out, scale);
  if (q_out.numel() == 0) return;
  const QuantizeRow quantize{1.0f / *static_cast<const float*>(scale.const_data_ptr())};
  VLLM_DISPATCH_HALF_TYPES(ql_nope.scalar_type(), "concat_mla_q_fp8", [&] {
    concat_rows<scalar_t, torch::headeronly::Float8_e4m3fn>(ql_nope, q_pe, q_out, quantize);
  });
}
