#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

#include "mem_overlap.h"
#include "ops.h"

namespace {

// The Python spelling ("torch.bfloat16"), so messages read the same as the fake implementation's.
std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

void check_rank3(const char* op, const at::Tensor& t, const char* name, const char* dims) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D ", dims, ", got ", t.dim(), "-D with shape ",
              t.sizes());
}

void check_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ql_nope) {
  TORCH_CHECK(t.device() == ql_nope.device(), op, ": ", name, " must be on ql_nope's device ",
              ql_nope.device(), ", got ", t.device());
}

}  // namespace

void check_concat_mla_q_args(const at::Tensor& ql_nope, const at::Tensor& q_pe, const at::Tensor& q_out,
                             const std::optional<at::Tensor>& scale) {
  const char* op = scale ? "concat_mla_q_fp8" : "concat_mla_q";
  // Kernels read 2-byte elements; any other width would be copied wrongly, so it never gets in.
  const at::ScalarType dtype = ql_nope.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": ql_nope must be float16 or bfloat16 dtype, got ", dtype_name(dtype));
  check_rank3(op, ql_nope, "ql_nope", "[tokens, heads, nope_dim]");
  check_rank3(op, q_pe, "q_pe", "[tokens, heads or 1, rope_dim]");
  check_rank3(op, q_out, "q_out", "[tokens, heads, nope_dim + rope_dim]");
  TORCH_CHECK(q_pe.scalar_type() == dtype, op, ": q_pe must have ql_nope's dtype ", dtype_name(dtype),
              ", got ", dtype_name(q_pe.scalar_type()));
  if (scale) {
    TORCH_CHECK(q_out.scalar_type() == at::kFloat8_e4m3fn, op, ": q_out must be torch.float8_e4m3fn, got ",
                dtype_name(q_out.scalar_type()));
  } else {
    TORCH_CHECK(q_out.scalar_type() == dtype, op, ": q_out must have ql_nope's dtype ", dtype_name(dtype),
                ", got ", dtype_name(q_out.scalar_type()));
  }
  check_device(op, q_pe, "q_pe", ql_nope);
  check_device(op, q_out, "q_out", ql_nope);

  const int64_t tokens = ql_nope.size(0), heads = ql_nope.size(1);
  const int64_t nope_dim = ql_nope.size(2), rope_dim = q_pe.size(2);
  TORCH_CHECK(q_pe.size(0) == tokens && (q_pe.size(1) == heads || q_pe.size(1) == 1), op,
              ": q_pe must be [tokens, heads or 1, rope_dim] with tokens=", tokens, " and heads=", heads,
              " from ql_nope, got shape ", q_pe.sizes());
  TORCH_CHECK(q_out.size(0) == tokens && q_out.size(1) == heads && q_out.size(2) == nope_dim + rope_dim, op,
              ": q_out must be [tokens, heads, nope_dim + rope_dim] = [", tokens, ", ", heads, ", ",
              nope_dim + rope_dim, "], got shape ", q_out.sizes());
  if (scale) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat, op, ": scale must be a torch.float32 tensor, got ",
                dtype_name(scale->scalar_type()));
    TORCH_CHECK(scale->numel() == 1, op, ": scale must have one element (a per-tensor scale), got shape ",
                scale->sizes());
    check_device(op, *scale, "scale", ql_nope);
  }

  TORCH_CHECK(!vllm_mla_ops::has_internal_overlap(q_out), op, ": q_out must not overlap itself, got shape ",
              q_out.sizes(), " with strides ", q_out.strides(), ", which address one element from two indices");
  TORCH_CHECK(!vllm_mla_ops::overlaps(q_out, ql_nope), op,
              ": q_out must not overlap ql_nope in memory, got views that share bytes");
  TORCH_CHECK(!vllm_mla_ops::overlaps(q_out, q_pe), op,
              ": q_out must not overlap q_pe in memory, got views that share bytes");
  if (scale) {
    TORCH_CHECK(!vllm_mla_ops::overlaps(q_out, *scale), op,
                ": q_out must not overlap scale in memory, got views that share bytes");
  }
}
