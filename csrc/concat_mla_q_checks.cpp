#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

#include "mem_overlap.h"
#include "ops.h"

namespace {

// The Python spelling ("torch.bfloat16"), so messages read the same as the fake implementation's.
std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

void check_rank3(const at::Tensor& t, const char* name, const char* dims) {
  TORCH_CHECK(t.dim() == 3, "concat_mla_q: ", name, " must be 3-D ", dims, ", got ", t.dim(),
              "-D with shape ", t.sizes());
}

void check_like_ql_nope(const at::Tensor& t, const char* name, const at::Tensor& ql_nope) {
  TORCH_CHECK(t.scalar_type() == ql_nope.scalar_type(), "concat_mla_q: ", name,
              " must have ql_nope's dtype ", dtype_name(ql_nope.scalar_type()), ", got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == ql_nope.device(), "concat_mla_q: ", name, " must be on ql_nope's device ",
              ql_nope.device(), ", got ", t.device());
}

}  // namespace

void check_concat_mla_q_args(const at::Tensor& ql_nope, const at::Tensor& q_pe, const at::Tensor& q_out) {
  // Kernels move 2-byte elements; any other width would be copied wrongly, so it never gets in.
  const at::ScalarType dtype = ql_nope.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "concat_mla_q: ql_nope must be float16 or bfloat16 dtype, got ", dtype_name(dtype));
  check_rank3(ql_nope, "ql_nope", "[tokens, heads, nope_dim]");
  check_rank3(q_pe, "q_pe", "[tokens, heads or 1, rope_dim]");
  check_rank3(q_out, "q_out", "[tokens, heads, nope_dim + rope_dim]");
  check_like_ql_nope(q_pe, "q_pe", ql_nope);
  check_like_ql_nope(q_out, "q_out", ql_nope);

  const int64_t tokens = ql_nope.size(0), heads = ql_nope.size(1);
  const int64_t nope_dim = ql_nope.size(2), rope_dim = q_pe.size(2);
  TORCH_CHECK(q_pe.size(0) == tokens && (q_pe.size(1) == heads || q_pe.size(1) == 1),
              "concat_mla_q: q_pe must be [tokens, heads or 1, rope_dim] with tokens=", tokens,
              " and heads=", heads, " from ql_nope, got shape ", q_pe.sizes());
  TORCH_CHECK(q_out.size(0) == tokens && q_out.size(1) == heads && q_out.size(2) == nope_dim + rope_dim,
              "concat_mla_q: q_out must be [tokens, heads, nope_dim + rope_dim] = [", tokens, ", ", heads,
              ", ", nope_dim + rope_dim, "], got shape ", q_out.sizes());

  TORCH_CHECK(!vllm_mla_ops::has_internal_overlap(q_out),
              "concat_mla_q: q_out must not overlap itself, got shape ", q_out.sizes(), " with strides ",
              q_out.strides(), ", which address one element from two indices");
  TORCH_CHECK(!vllm_mla_ops::overlaps(q_out, ql_nope),
              "concat_mla_q: q_out must not overlap ql_nope in memory, got views that share bytes");
  TORCH_CHECK(!vllm_mla_ops::overlaps(q_out, q_pe),
              "concat_mla_q: q_out must not overlap q_pe in memory, got views that share bytes");
}
