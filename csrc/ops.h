// Host entry points of vllm_mla_ops. Shapes: T tokens, H heads, N nope width, R rope width.
#pragma once

#include <ATen/core/Tensor.h>

// The one validator every backend runs before it touches memory: dtypes, ranks, devices, shapes and
// memory overlap of q_out with itself and with the inputs. Throws c10::Error (RuntimeError in
// Python) naming the argument, the expectation and what it got.
void check_concat_mla_q_args(const at::Tensor& ql_nope,  // [T, H, N]
                             const at::Tensor& q_pe,     // [T, H or 1, R]
                             const at::Tensor& q_out);   // [T, H, N + R]

// q_out[t, h] = [ql_nope[t, h] | q_pe[t, h or 0]], bit-exact.
void concat_mla_q_cpu(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out);
#ifdef VLLM_MLA_OPS_WITH_CUDA
void concat_mla_q_cuda(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out);
#endif
