// Test-only ops (not part of the package) that run the dispatch macros of csrc/dispatch_utils.h and
// report which C++ type each dtype reached: each returns the ATen name of scalar_t ("Half", ...),
// so a case that maps a dtype to the wrong type, or a missing or extra case, shows up by name.
#include <torch/library.h>

#include <string>

#include "dispatch_utils.h"

namespace {

template <typename scalar_t>
std::string reached() {
  return c10::toString(c10::CppTypeToScalarType<scalar_t>::value);
}

std::string floating_types(c10::ScalarType dtype) {
  std::string name;
  VLLM_DISPATCH_FLOATING_TYPES(dtype, "vllm_dispatch_floating", [&] { name = reached<scalar_t>(); });
  return name;
}

std::string half_types(c10::ScalarType dtype) {
  std::string name;
  VLLM_DISPATCH_HALF_TYPES(dtype, "vllm_dispatch_half", [&] { name = reached<scalar_t>(); });
  return name;
}

// The _CASE_ forms compose with other cases inside one AT_DISPATCH_SWITCH.
std::string case_floating_types_and_double(c10::ScalarType dtype) {
  std::string name;
  AT_DISPATCH_SWITCH(dtype, "vllm_dispatch_case_floating",
                     VLLM_DISPATCH_CASE_FLOATING_TYPES([&] { name = reached<scalar_t>(); })
                         AT_DISPATCH_CASE(at::ScalarType::Double, [&] { name = reached<scalar_t>(); }));
  return name;
}

std::string case_half_types_and_int(c10::ScalarType dtype) {
  std::string name;
  AT_DISPATCH_SWITCH(dtype, "vllm_dispatch_case_half",
                     VLLM_DISPATCH_CASE_HALF_TYPES([&] { name = reached<scalar_t>(); })
                         AT_DISPATCH_CASE(at::ScalarType::Int, [&] { name = reached<scalar_t>(); }));
  return name;
}

}  // namespace

TORCH_LIBRARY(vllm_mla_ops_dispatch_test, m) {
  m.def("floating_types(ScalarType dtype) -> str", &floating_types);
  m.def("half_types(ScalarType dtype) -> str", &half_types);
  m.def("case_floating_types_and_double(ScalarType dtype) -> str", &case_floating_types_and_double);
  m.def("case_half_types_and_int(ScalarType dtype) -> str", &case_half_types_and_int);
}
