// Host entry points of vllm_mla_ops, on torch's stable ABI. Shapes: T tokens, H heads, N nope width,
// R rope width.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <initializer_list>
#include <optional>

using torch::stable::Tensor;

// An argument as the checks name it: the tensor (nullptr for an absent optional) and whether the op
// writes it.
struct OpArg {
  const char* name;
  const Tensor* tensor;
  bool written;
};

// The ops have no autograd formula. In grad mode: refuses an argument that requires grad and a
// written inference tensor (torch forbids writing one outside inference mode), then bumps the
// version of each written tensor, as torch's in-place ops do. Outside grad mode it returns at once
// (docs/design.md, "Host path"). Called by every validator, last.
void check_inference_only(const char* op, std::initializer_list<OpArg> args);

// The one validator every backend runs before it touches memory: dtypes, ranks, devices, shapes,
// storage bounds and memory overlap of q_out with itself and with the inputs, then
// check_inference_only. Without `scale` it
// checks concat_mla_q's arguments, with it concat_mla_q_fp8's. Throws std::runtime_error
// (RuntimeError in Python) naming the argument, the expectation and what it got.
void check_concat_mla_q_args(const Tensor& ql_nope,  // [T, H, N] float16 / bfloat16
                             const Tensor& q_pe,     // [T, H or 1, R], ql_nope's dtype
                             const Tensor& q_out,    // [T, H, N + R]
                             const std::optional<Tensor>& scale = std::nullopt);  // [1] float32

// q_out[t, h] = [ql_nope[t, h] | q_pe[t, h or 0]], bit-exact.
void concat_mla_q_cpu(Tensor ql_nope, Tensor q_pe, Tensor q_out);
// The same, quantized: q_out = e4m3fn(clamp(float(x) * (1 / scale), -448, 448)), round to nearest even.
void concat_mla_q_fp8_cpu(Tensor ql_nope, Tensor q_pe, Tensor q_out, Tensor scale);
