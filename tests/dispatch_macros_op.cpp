// Test-only ops (not part of the package) that run the dispatch macros of csrc/dispatch_utils.h.
// `<macro>(Tensor probe) -> str` returns the name of the scalar_t the probe's dtype reached
// ("Half", ...), so a case that maps a dtype to the wrong type shows up by name; `<macro>_check`
// runs the same dispatch and returns nothing, so a dtype outside the macro's list raises the
// macro's own error. Built on the stable ABI only, as the package is.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <string>

#include "dispatch_utils.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The probe tensor's dtype, read as torch's own dtype code (the values of ScalarType), so that
// every dtype reaches the macros, also those the stable ABI's argument conversion does not carry.
ScalarType dtype_of(const Tensor& probe) {
  int32_t code = 0;
  STD_TORCH_CHECK(aoti_torch_get_dtype(probe.get(), &code) == AOTI_TORCH_SUCCESS, "no dtype");
  return static_cast<ScalarType>(code);
}

template <typename scalar_t>
std::string reached() {
  return torch::headeronly::toString(torch::headeronly::CppTypeToScalarType<scalar_t>::value);
}

std::string floating_types(Tensor probe) {
  std::string name;
  VLLM_DISPATCH_FLOATING_TYPES(dtype_of(probe), "vllm_dispatch_floating", [&] { name = reached<scalar_t>(); });
  return name;
}

std::string half_types(Tensor probe) {
  std::string name;
  VLLM_DISPATCH_HALF_TYPES(dtype_of(probe), "vllm_dispatch_half", [&] { name = reached<scalar_t>(); });
  return name;
}

// The _CASE_ forms compose with other cases inside one THO_DISPATCH_SWITCH.
std::string case_floating_types_and_double(Tensor probe) {
  std::string name;
  THO_DISPATCH_SWITCH(dtype_of(probe), "vllm_dispatch_case_floating",
                      VLLM_DISPATCH_CASE_FLOATING_TYPES([&] { name = reached<scalar_t>(); })
                          THO_DISPATCH_CASE(ScalarType::Double, [&] { name = reached<scalar_t>(); }));
  return name;
}

std::string case_half_types_and_int(Tensor probe) {
  std::string name;
  THO_DISPATCH_SWITCH(dtype_of(probe), "vllm_dispatch_case_half",
                      VLLM_DISPATCH_CASE_HALF_TYPES([&] { name = reached<scalar_t>(); })
                          THO_DISPATCH_CASE(ScalarType::Int, [&] { name = reached<scalar_t>(); }));
  return name;
}

template <std::string (*dispatch)(Tensor)>
void check(Tensor probe) {
  dispatch(probe);
}

}  // namespace

STABLE_TORCH_LIBRARY(vllm_mla_ops_dispatch_test, m) {
  for (const char* name : {"floating_types", "half_types", "case_floating_types_and_double", "case_half_types_and_int"}) {
    m.def((std::string(name) + "(Tensor probe) -> str").c_str());
    m.def((std::string(name) + "_check(Tensor probe) -> ()").c_str());
  }
}

STABLE_TORCH_LIBRARY_IMPL(vllm_mla_ops_dispatch_test, CompositeExplicitAutograd, m) {
  m.impl("floating_types", TORCH_BOX(&floating_types));
  m.impl("half_types", TORCH_BOX(&half_types));
  m.impl("case_floating_types_and_double", TORCH_BOX(&case_floating_types_and_double));
  m.impl("case_half_types_and_int", TORCH_BOX(&case_half_types_and_int));
  m.impl("floating_types_check", TORCH_BOX(&check<&floating_types>));
  m.impl("half_types_check", TORCH_BOX(&check<&half_types>));
  m.impl("case_floating_types_and_double_check", TORCH_BOX(&check<&case_floating_types_and_double>));
  m.impl("case_half_types_and_int_check", TORCH_BOX(&check<&case_half_types_and_int>));
}
