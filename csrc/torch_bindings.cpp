// Schema and kernel registrations of every op, plus the Python module entry point.
//
// TORCH_LIBRARY_FRAGMENT, not TORCH_LIBRARY: another extension (vLLM's own _C, for one) may already
// own the _C namespace in this process, and a fragment adds to it instead of claiming it.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_FRAGMENT(_C, m) {
  m.def("concat_mla_q(Tensor ql_nope, Tensor q_pe, Tensor(a!) q_out) -> ()");
}

TORCH_LIBRARY_IMPL(_C, CPU, m) { m.impl("concat_mla_q", &concat_mla_q_cpu); }

#ifdef VLLM_MLA_OPS_WITH_CUDA
TORCH_LIBRARY_IMPL(_C, CUDA, m) { m.impl("concat_mla_q", &concat_mla_q_cuda); }
#endif

// Importing vllm_mla_ops._C loads this library, whose static initializers above register the ops;
// the module itself is empty.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

// Lets a second copy of the Python package tell, before loading its own library, that this one is
// already mapped in the process (vllm_mla_ops/_loader.py).
extern "C" __attribute__((visibility("default"))) int vllm_mla_ops_library_marker() { return 1; }
