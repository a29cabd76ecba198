// Host entry points of vllm_mla_ops. Shapes: T tokens, H heads, N nope width, R rope width.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

// The one validator every backend runs before it touches memory: dtypes, ranks, devices, shapes and
// memory overlap of q_out with itself and with the inputs. Without `scale` it checks concat_mla_q's
// arguments, with it concat_mla_q_fp8's. Throws c10::Error (RuntimeError in Python) naming the
// argument, the expectation and what it got.
void check_concat_mla_q_args(const at::Tensor& ql_nope,  // [T, H, N] float16 / bfloat16
                             const at::Tensor& q_pe,     // [T, H or 1, R], ql_nope's dtype
                             const at::Tensor& q_out,    // [T, H, N + R]
                             const std::optional<at::Tensor>& scale = std::nullopt);  // [1] float32

// q_out[t, h] = [ql_nope[t, h] | q_pe[t, h or 0]], bit-exact.
void concat_mla_q_cpu(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out);
// The same, quantized: q_out = e4m3fn(clamp(float(x) * (1 / scale), -448, 448)), round to nearest even.
void concat_mla_q_fp8_cpu(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out,
                          const at::Tensor& scale);
#ifdef VLLM_MLA_OPS_WITH_CUDA
void concat_mla_q_cuda(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out);
void concat_mla_q_fp8_cuda(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out,
                           const at::Tensor& scale);
#endif
