// Schema and kernel registrations of every op, plus the Python module entry point.
//
// TORCH_LIBRARY_FRAGMENT, not TORCH_LIBRARY: another extension (vLLM's own _C, for one) may already
// own the _C namespace in this process, and a fragment adds to it instead of claiming it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <Python.h>
#include <torch/library.h>

#include <string_view>

#include "ops.h"

namespace {

// The Autograd kernel of every op here: the ops are inference-only (no derivative formula), so in
// grad mode a tensor that requires grad is an error, not a silently wrong gradient. Otherwise it
// bumps the version of the tensors the op writes (so autograd still sees those in-place writes, as
// torch's default fallback does) around the backend kernel.
void inference_only(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const auto first = stack->end() - static_cast<std::ptrdiff_t>(args.size());
  std::string_view name = op.schema().name();
  name.remove_prefix(name.find("::") + 2);
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& arg = first[i];
    TORCH_CHECK(!(at::GradMode::is_enabled() && arg.isTensor() && arg.toTensor().requires_grad()), name,
                " is inference-only (no autograd formula): got ", args[i].name(),
                " with requires_grad=True; call it under torch.no_grad() or torch.inference_mode(), or pass "
                "detached tensors");
  }
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].alias_info() && args[i].alias_info()->isWrite()) written.push_back(first[i].toTensor());
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(_C, m) {
  m.def("concat_mla_q(Tensor ql_nope, Tensor q_pe, Tensor(a!) q_out) -> ()");
  m.def("concat_mla_q_fp8(Tensor ql_nope, Tensor q_pe, Tensor(a!) q_out, Tensor scale) -> ()");
}

TORCH_LIBRARY_IMPL(_C, CPU, m) {
  m.impl("concat_mla_q", &concat_mla_q_cpu);
  m.impl("concat_mla_q_fp8", &concat_mla_q_fp8_cpu);
}

#ifdef VLLM_MLA_OPS_WITH_CUDA
TORCH_LIBRARY_IMPL(_C, CUDA, m) {
  m.impl("concat_mla_q", &concat_mla_q_cuda);
  m.impl("concat_mla_q_fp8", &concat_mla_q_fp8_cuda);
}
#endif

TORCH_LIBRARY_IMPL(_C, Autograd, m) {
  m.impl("concat_mla_q", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("concat_mla_q_fp8", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
}

// Importing vllm_mla_ops._C loads this library, whose static initializers above register the ops;
// the module itself is empty.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

// Lets a second copy of the Python package tell, before loading its own library, that this one is
// already mapped in the process (vllm_mla_ops/_loader.py).
extern "C" __attribute__((visibility("default"))) int vllm_mla_ops_library_marker() { return 1; }

// The torch this library was built against, as a string the loader finds in the file's bytes
// before loading it (loading a library built for another torch can crash instead of failing).
extern "C" __attribute__((visibility("default"), used)) const char vllm_mla_ops_build_info[] =
    "vllm_mla_ops build info: torch=" VLLM_MLA_OPS_TORCH_VERSION ";";
