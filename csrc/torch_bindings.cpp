// Schema and CPU kernel registrations of every op, plus the Python module entry point. The CUDA
// kernels register themselves at the end of their files (csrc/concat_mla_q_kernels.cu,
// csrc/concat_mla_rope_kernels.cu), in a library of their own. Built on torch's stable ABI only, so
// one library file serves every torch from the floor it targets up.
//
// A fragment, not a full library: another extension (vLLM's own _C, for one) may already own the _C
// namespace in this process, and a fragment adds to it instead of claiming it. The fakes, the
// Autograd fallthrough and the grad-mode guard's kernel are registered from Python
// (vllm_mla_ops/_library.py): the stable ABI reads grad mode but no requires_grad flag, and bumps
// no version counter.
#include <Python.h>
#include <torch/csrc/stable/library.h>

#include "ops.h"

STABLE_TORCH_LIBRARY_FRAGMENT(_C, m) {
  m.def("concat_mla_q(Tensor ql_nope, Tensor q_pe, Tensor(a!) q_out) -> ()");
  m.def("concat_mla_q_fp8(Tensor ql_nope, Tensor q_pe, Tensor(a!) q_out, Tensor scale) -> ()");
  m.def(
      "concat_mla_rope(Tensor ql_nope, Tensor q_pe, Tensor positions, Tensor cos_sin_cache, bool is_neox, "
      "Tensor(a!) q_out, Tensor? q_scale, Tensor? kv_c, Tensor? k_pe, Tensor(b!)? kv_cache, Tensor? slot_mapping, "
      "Tensor? k_scale) -> ()");
  // Called by the ops' validator in grad mode only (check_inference_only in ops.h); its kernel is
  // Python's (vllm_mla_ops/_library.py). Bit i of `written` marks tensors[i] as written by the op.
  m.def("_grad_mode_guard(Tensor?[] tensors, int written) -> (int, int)");
}

STABLE_TORCH_LIBRARY_IMPL(_C, CPU, m) {
  m.impl("concat_mla_q", TORCH_BOX(&concat_mla_q_cpu));
  m.impl("concat_mla_q_fp8", TORCH_BOX(&concat_mla_q_fp8_cpu));
  m.impl("concat_mla_rope", TORCH_BOX(&concat_mla_rope_cpu));
}

// Importing vllm_mla_ops._C loads this library, whose static initializers above register the ops;
// the module itself is empty. Python's limited API only, so the file is one abi3 extension.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr,
                               nullptr};
  return PyModule_Create(&module);
}

// Lets a second copy of the Python package tell, before loading its own library, that this one is
// already mapped in the process (vllm_mla_ops/_loader.py).
extern "C" __attribute__((visibility("default"))) int vllm_mla_ops_library_marker() { return 1; }
