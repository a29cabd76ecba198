// Host entry points of vllm_mla_ops, on torch's stable ABI. Shapes: T tokens, H heads, N nope width,
// R rope width.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <initializer_list>
#include <optional>
#include <vector>

using torch::stable::Tensor;

// An argument as the checks name it: the tensor (nullptr for an absent optional) and whether the op
// writes it.
struct OpArg {
  const char* name;
  const Tensor* tensor;
  bool written;
};

// A tensor's sizes and strides, read with one call into torch each (size(d) and stride(d) are a
// call a dim); views of the tensor's own arrays, valid while the tensor lives.
struct Shape {
  torch::headeronly::IntHeaderOnlyArrayRef sizes, strides;
  explicit Shape(const Tensor& t) : sizes(t.sizes()), strides(t.strides()) {}
  int64_t numel() const {
    int64_t n = 1;
    for (const int64_t size : sizes) n *= size;
    return n;
  }
};

// t.scalar_type() without its chain of calls into torch (one a dtype, in a fixed order, to map
// torch's dtype code) for the dtypes the ops take.
torch::headeronly::ScalarType dtype_of(const Tensor& t);

// The ops have no autograd formula. In grad mode: refuses an argument that requires grad and a
// written inference tensor (torch forbids writing one outside inference mode), then bumps the
// version of each written tensor, as torch's in-place ops do. Outside grad mode it returns at once
// (docs/design.md, "Host path"). Called by every validator, last.
void check_inference_only(const char* op, std::initializer_list<OpArg> args);

// The validator of concat_mla_q and concat_mla_q_fp8, run by every backend before it touches
// memory: dtypes, ranks, devices, shapes, storage bounds and memory overlap of q_out with itself and
// with the inputs, then check_inference_only. Without `scale` it checks concat_mla_q's arguments, with
// it concat_mla_q_fp8's. Throws std::runtime_error (RuntimeError in Python) naming the argument, the
// expectation and what it got. Returns whether ql_nope is exactly q_out[..., :nope_dim] (a bmm wrote
// it there), in which case only the rope half is to be written.
bool check_concat_mla_q_args(const Tensor& ql_nope,  // [T, H, N] float16 / bfloat16
                             const Tensor& q_pe,     // [T, H or 1, R], ql_nope's dtype
                             const Tensor& q_out,    // [T, H, N + R]
                             const std::optional<Tensor>& scale = std::nullopt);  // [1] float32

// The validator of concat_mla_rope, as the one above (and the K side: all four tensors or none, the
// scales exactly with fp8 outputs, no output overlapping any input or the other output).
bool check_concat_mla_rope_args(const Tensor& ql_nope,        // [T, H, N] float16 / bfloat16
                                const Tensor& q_pe,           // [T, H or 1, R], R even
                                const Tensor& positions,      // [T] int64
                                const Tensor& cos_sin_cache,  // [P, R] float32 or ql_nope's dtype
                                const Tensor& q_out,          // [T, H, N + R] ql_nope's dtype or fp8
                                const std::optional<Tensor>& q_scale,       // [1] float32, iff q_out is fp8
                                const std::optional<Tensor>& kv_c,          // [T, K]
                                const std::optional<Tensor>& k_pe,          // [T, R] or [T, 1, R]
                                const std::optional<Tensor>& kv_cache,      // [blocks, block_size, K + R]
                                const std::optional<Tensor>& slot_mapping,  // [T] int64
                                const std::optional<Tensor>& k_scale);      // [1] float32, iff kv_cache is fp8

// Whether VLLM_MLA_OPS_CHECK_INDICES=1 asks concat_mla_rope to check its device-side indices (read
// once per process).
bool check_indices_requested();
// The checked mode's checks, on host copies of positions and slot_mapping (empty without the K
// side): every position in [0, max_position), every slot below num_slots, no slot written twice.
void check_rope_indices(const char* op, const std::vector<int64_t>& positions, int64_t max_position,
                        const std::vector<int64_t>& slots, int64_t num_slots);

// q_out[t, h] = [ql_nope[t, h] | q_pe[t, h or 0]], bit-exact.
void concat_mla_q_cpu(Tensor ql_nope, Tensor q_pe, Tensor q_out);
// The same, quantized: q_out = e4m3fn(clamp(float(x) * (1 / scale), -448, 448)), round to nearest even.
void concat_mla_q_fp8_cpu(Tensor ql_nope, Tensor q_pe, Tensor q_out, Tensor scale);
// q_out[t, h] = [ql_nope[t, h] | rope(q_pe[t, h or 0], positions[t])] (fp8 with q_scale), and with the
// K side kv_cache row slot_mapping[t] = [kv_c[t] | rope(k_pe[t], positions[t])] (fp8 with k_scale).
void concat_mla_rope_cpu(Tensor ql_nope, Tensor q_pe, Tensor positions, Tensor cos_sin_cache, bool is_neox,
                         Tensor q_out, std::optional<Tensor> q_scale, std::optional<Tensor> kv_c,
                         std::optional<Tensor> k_pe, std::optional<Tensor> kv_cache,
                         std::optional<Tensor> slot_mapping, std::optional<Tensor> k_scale);
