// CPU kernel: one task per block of (token, head) rows; each row is two copies, by memcpy where
// the last dims are unit-stride and element by element otherwise.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cstring>

#include "dispatch_utils.h"
#include "ops.h"

namespace {

// Elements per parallel task (ATen's own grain size): small inputs stay on the calling thread.
constexpr int64_t kGrainElements = 32768;

template <typename scalar_t>
void copy_row(scalar_t* dst, int64_t dst_stride, const scalar_t* src, int64_t src_stride, int64_t n) {
  if (dst_stride == 1 && src_stride == 1) {
    using Vec = at::vec::Vectorized<scalar_t>;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) Vec::loadu(src + i).store(dst + i);
    if (i < n) std::memcpy(dst + i, src + i, (n - i) * sizeof(scalar_t));
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = src[i * src_stride];
}

template <typename scalar_t>
void concat_rows(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out) {
  const int64_t tokens = q_out.size(0), heads = q_out.size(1);
  const int64_t nope_dim = ql_nope.size(2), rope_dim = q_pe.size(2);
  // A 1-head q_pe is one rope row shared by every head.
  const int64_t pe_head_stride = q_pe.size(1) == 1 ? 0 : q_pe.stride(1);
  const int64_t nope_s0 = ql_nope.stride(0), nope_s1 = ql_nope.stride(1), nope_s2 = ql_nope.stride(2);
  const int64_t pe_s0 = q_pe.stride(0), pe_s2 = q_pe.stride(2);
  const int64_t out_s0 = q_out.stride(0), out_s1 = q_out.stride(1), out_s2 = q_out.stride(2);
  const scalar_t* nope = ql_nope.const_data_ptr<scalar_t>();
  const scalar_t* pe = q_pe.const_data_ptr<scalar_t>();
  scalar_t* out = q_out.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (nope_dim + rope_dim));
  // Rows go in ql_nope's memory order (it is most of the bytes read): token-major, or head-major for
  // the decode layout, where ql_nope is a transposed [heads, tokens, nope] bmm output.
  const bool heads_outer = heads > 1 && tokens > 1 && nope_s1 > nope_s0;
  const int64_t inner = heads_outer ? tokens : heads;
  at::parallel_for(0, tokens * heads, grain, [&](int64_t begin, int64_t end) {
    // One division per task; its rows then advance along the inner dim.
    int64_t o = begin / inner, i = begin % inner;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = heads_outer ? i : o, h = heads_outer ? o : i;
      scalar_t* out_row = out + t * out_s0 + h * out_s1;
      copy_row(out_row, out_s2, nope + t * nope_s0 + h * nope_s1, nope_s2, nope_dim);
      copy_row(out_row + nope_dim * out_s2, out_s2, pe + t * pe_s0 + h * pe_head_stride, pe_s2, rope_dim);
      if (++i == inner) {
        i = 0;
        ++o;
      }
    }
  });
}

}  // namespace

void concat_mla_q_cpu(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out) {
  check_concat_mla_q_args(ql_nope, q_pe, q_out);
  if (q_out.numel() == 0) return;
  VLLM_DISPATCH_HALF_TYPES(ql_nope.scalar_type(), "concat_mla_q", [&] {
    concat_rows<scalar_t>(ql_nope, q_pe, q_out);
  });
}
