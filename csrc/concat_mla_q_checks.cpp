// The validator of both ops (every backend calls it before touching memory), and the formatting of
// its messages: the Python spelling of dtypes, devices and shapes, as the fake implementation
// prints them.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/stableivalue_conversions.h>
#include <torch/headeronly/core/DeviceType.h>
#include <torch/headeronly/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "mem_overlap.h"
#include "ops.h"

namespace {

using torch::headeronly::ScalarType;

// TORCH_CHECK's shape: the message is the arguments streamed together, raised as RuntimeError.
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream message;
  (message << ... << args);
  throw std::runtime_error(message.str());
}
#define MLA_CHECK(cond, ...) \
  if (!(cond)) fail(__VA_ARGS__)

std::string dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return "torch.float16";
    case ScalarType::BFloat16: return "torch.bfloat16";
    case ScalarType::Float: return "torch.float32";
    case ScalarType::Double: return "torch.float64";
    case ScalarType::Byte: return "torch.uint8";
    case ScalarType::Char: return "torch.int8";
    case ScalarType::Short: return "torch.int16";
    case ScalarType::Int: return "torch.int32";
    case ScalarType::Long: return "torch.int64";
    case ScalarType::Bool: return "torch.bool";
    case ScalarType::ComplexHalf: return "torch.complex32";
    case ScalarType::ComplexFloat: return "torch.complex64";
    case ScalarType::ComplexDouble: return "torch.complex128";
    case ScalarType::Float8_e4m3fn: return "torch.float8_e4m3fn";
    case ScalarType::Float8_e5m2: return "torch.float8_e5m2";
    case ScalarType::Float8_e4m3fnuz: return "torch.float8_e4m3fnuz";
    case ScalarType::Float8_e5m2fnuz: return "torch.float8_e5m2fnuz";
    default: return std::string("torch.") + torch::headeronly::toString(t);
  }
}

std::string device_name(const torch::stable::Device& d) {
  std::string name = d.type() == torch::headeronly::DeviceType::CUDA ? "cuda"
                     : d.type() == torch::headeronly::DeviceType::CPU ? "cpu"
                                                                      : "device";
  return d.has_index() && !d.is_cpu() ? name + ":" + std::to_string(d.index()) : name;
}

template <typename Ints>
std::string list(const Ints& values) {
  std::string text = "[";
  for (size_t i = 0; i < values.size(); ++i) text += (i ? ", " : "") + std::to_string(values[i]);
  return text + "]";
}

// What the checks read of a tensor, fetched once: each accessor of the stable ABI is a call into
// torch, and the validator runs on every op call.
struct Meta {
  const Tensor& t;
  const char* name;
  torch::headeronly::IntHeaderOnlyArrayRef sizes, strides;
  ScalarType dtype;
  torch::stable::Device device;
  explicit Meta(const Tensor& tensor, const char* arg)
      : t(tensor), name(arg), sizes(t.sizes()), strides(t.strides()), dtype(t.scalar_type()), device(t.device()) {}
  int64_t numel() const {
    int64_t n = 1;
    for (size_t d = 0; d < sizes.size(); ++d) n *= sizes[d];
    return n;
  }
};

void check_rank3(const char* op, const Meta& m, const char* dims) {
  MLA_CHECK(m.sizes.size() == 3, op, ": ", m.name, " must be 3-D ", dims, ", got ", m.sizes.size(), "-D with shape ",
            list(m.sizes));
}

void check_device(const char* op, const Meta& m, const Meta& ql_nope) {
  MLA_CHECK(m.device == ql_nope.device, op, ": ", m.name, " must be on ql_nope's device ",
            device_name(ql_nope.device), ", got ", device_name(m.device));
}

int64_t storage_bytes(const Tensor& t) {
  int64_t bytes = 0;
  if (aoti_torch_get_storage_size(t.get(), &bytes) != AOTI_TORCH_SUCCESS) return -1;
  return bytes;
}

// The view as the overlap search takes it, once it is known to lie inside its storage.
// A view addresses elements [storage_offset, storage_offset + sum (size - 1) * stride] of its
// storage; computed in 128 bits, since sizes and strides of size-1 or stride-0 dims may be huge.
vllm_mla_ops::View checked_view(const char* op, const Meta& m) {
  const int64_t offset = m.t.storage_offset();
  __int128 last = offset;
  vllm_mla_ops::View view{0, static_cast<int64_t>(m.t.element_size()), 0, {}, {}};
  for (size_t d = 0; d < m.sizes.size(); ++d) {
    if (m.sizes[d] <= 1) continue;
    last += static_cast<__int128>(m.sizes[d] - 1) * m.strides[d];
    view.sizes[view.dims] = m.sizes[d];
    view.strides[view.dims++] = m.strides[d];
  }
  const __int128 needed = (last + 1) * view.item_bytes;
  const int64_t available = storage_bytes(m.t);
  MLA_CHECK(needed <= available, op, ": ", m.name, " addresses bytes past the end of its storage (shape ",
            list(m.sizes), ", strides ", list(m.strides), ", storage offset ", offset, ": needs ",
            needed > INT64_MAX ? std::string("over 2^63") : std::to_string(static_cast<int64_t>(needed)),
            " bytes, the storage holds ", available, "); was the storage resized after the view was made?");
  view.address = reinterpret_cast<intptr_t>(m.t.const_data_ptr());
  return view;
}

void check_no_overlap(const char* op, const vllm_mla_ops::View& out, const Meta& out_meta, const Meta& input) {
  if (input.numel() == 0) return;
  switch (vllm_mla_ops::overlap(out, checked_view(op, input))) {
    case vllm_mla_ops::Overlap::kNo:
      return;
    case vllm_mla_ops::Overlap::kYes:
      fail(op, ": q_out must not overlap ", input.name, " in memory, got views that share bytes");
    case vllm_mla_ops::Overlap::kUndecided:
      fail(op, ": could not decide within the search bound whether q_out and ", input.name,
           " share bytes (q_out strides ", list(out_meta.strides), ", ", input.name, " strides ",
           list(input.strides), "); pass a contiguous ", input.name, " (", input.name,
           ".contiguous()) or a contiguous q_out");
  }
}

// A None passed for a Tensor argument arrives as an undefined tensor, whose accessors would throw
// from inside torch; it is refused first, by name.
void check_defined(const char* op, std::initializer_list<OpArg> args) {
  for (const OpArg& arg : args) {
    MLA_CHECK(arg.tensor == nullptr || arg.tensor->defined(), op, ": ", arg.name, " must be a tensor, got None");
  }
}

// Everything but the inference-only contract, which needs every argument checked first.
void check_args(const char* op, const Tensor& ql_nope_t, const Tensor& q_pe_t, const Tensor& q_out_t,
                const std::optional<Tensor>& scale_t) {
  const Meta ql_nope(ql_nope_t, "ql_nope"), q_pe(q_pe_t, "q_pe"), q_out(q_out_t, "q_out");
  // Kernels read 2-byte elements; any other width would be copied wrongly, so it never gets in.
  const ScalarType dtype = ql_nope.dtype;
  MLA_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16, op,
            ": ql_nope must be float16 or bfloat16 dtype, got ", dtype_name(dtype));
  check_rank3(op, ql_nope, "[tokens, heads, nope_dim]");
  check_rank3(op, q_pe, "[tokens, heads or 1, rope_dim]");
  check_rank3(op, q_out, "[tokens, heads, nope_dim + rope_dim]");
  MLA_CHECK(q_pe.dtype == dtype, op, ": q_pe must have ql_nope's dtype ", dtype_name(dtype), ", got ",
            dtype_name(q_pe.dtype));
  if (scale_t) {
    MLA_CHECK(q_out.dtype == ScalarType::Float8_e4m3fn, op, ": q_out must be torch.float8_e4m3fn, got ",
              dtype_name(q_out.dtype));
  } else {
    MLA_CHECK(q_out.dtype == dtype, op, ": q_out must have ql_nope's dtype ", dtype_name(dtype), ", got ",
              dtype_name(q_out.dtype));
  }
  check_device(op, q_pe, ql_nope);
  check_device(op, q_out, ql_nope);

  const int64_t tokens = ql_nope.sizes[0], heads = ql_nope.sizes[1];
  const int64_t nope_dim = ql_nope.sizes[2], rope_dim = q_pe.sizes[2];
  MLA_CHECK(q_pe.sizes[0] == tokens && (q_pe.sizes[1] == heads || q_pe.sizes[1] == 1), op,
            ": q_pe must be [tokens, heads or 1, rope_dim] with tokens=", tokens, " and heads=", heads,
            " from ql_nope, got shape ", list(q_pe.sizes));
  int64_t width = 0;
  MLA_CHECK(!__builtin_add_overflow(nope_dim, rope_dim, &width), op, ": nope_dim + rope_dim = ", nope_dim, " + ",
            rope_dim, " overflows int64");
  MLA_CHECK(q_out.sizes[0] == tokens && q_out.sizes[1] == heads && q_out.sizes[2] == width, op,
            ": q_out must be [tokens, heads, nope_dim + rope_dim] = [", tokens, ", ", heads, ", ", width,
            "], got shape ", list(q_out.sizes));
  std::optional<Meta> scale;
  if (scale_t) {
    scale.emplace(*scale_t, "scale");
    MLA_CHECK(scale->dtype == ScalarType::Float, op, ": scale must be a torch.float32 tensor, got ",
              dtype_name(scale->dtype));
    MLA_CHECK(scale->numel() == 1, op, ": scale must have one element (a per-tensor scale), got shape ",
              list(scale->sizes));
    check_device(op, *scale, ql_nope);
  }

  if (q_out.numel() == 0) return;  // nothing is written, so nothing can collide
  const vllm_mla_ops::View out = checked_view(op, q_out);
  switch (vllm_mla_ops::internal_overlap(out)) {
    case vllm_mla_ops::Overlap::kNo:
      break;
    case vllm_mla_ops::Overlap::kYes:
      fail(op, ": q_out must not overlap itself, got shape ", list(q_out.sizes), " with strides ",
           list(q_out.strides), ", which address one element from two indices");
    case vllm_mla_ops::Overlap::kUndecided:
      fail(op, ": could not decide within the search bound whether q_out (shape ", list(q_out.sizes),
           ", strides ", list(q_out.strides), ") addresses an element twice; pass a contiguous q_out");
  }
  check_no_overlap(op, out, q_out, ql_nope);
  check_no_overlap(op, out, q_out, q_pe);
  if (scale) check_no_overlap(op, out, q_out, *scale);
}

}  // namespace

void check_inference_only(const char* op, std::initializer_list<OpArg> args) {
  // Engines call the ops under no_grad or inference_mode: there this is one thread-local read.
  if (!aoti_torch_grad_mode_is_enabled()) return;
  // The stable ABI reads neither requires_grad nor is_inference nor bumps a version, so a Python
  // kernel does (vllm_mla_ops/_library.py): it returns the index of the first tensor that requires
  // grad and of the first written inference tensor (-1 for none), and bumps the written tensors'
  // versions when both are -1.
  std::vector<std::optional<Tensor>> tensors;
  int64_t written = 0;
  for (const OpArg& arg : args) {
    if (arg.written) written |= int64_t{1} << tensors.size();
    tensors.push_back(arg.tensor ? std::optional<Tensor>(*arg.tensor) : std::nullopt);
  }
  std::array<StableIValue, 2> stack{torch::stable::detail::from(tensors), torch::stable::detail::from(written)};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher("_C::_grad_mode_guard", "", stack.data(), TORCH_ABI_VERSION));
  const auto requires_grad = torch::stable::detail::to<int64_t>(stack[0]);
  const auto inference = torch::stable::detail::to<int64_t>(stack[1]);
  const auto name = [&](int64_t i) { return args.begin()[i].name; };
  MLA_CHECK(requires_grad < 0, op, " is inference-only (no autograd formula): got ", name(requires_grad),
            " with requires_grad=True; call it under torch.no_grad() or torch.inference_mode(), or pass detached "
            "tensors");
  MLA_CHECK(inference < 0, op, ": ", name(inference),
            " is an inference tensor (created under torch.inference_mode()) and cannot be written outside inference "
            "mode; call the op under torch.inference_mode() or pass a ", name(inference), " created outside it");
}

void check_concat_mla_q_args(const Tensor& ql_nope, const Tensor& q_pe, const Tensor& q_out,
                             const std::optional<Tensor>& scale) {
  const char* op = scale ? "concat_mla_q_fp8" : "concat_mla_q";
  const std::initializer_list<OpArg> args{
      {"ql_nope", &ql_nope, false}, {"q_pe", &q_pe, false}, {"q_out", &q_out, true},
      {"scale", scale ? &*scale : nullptr, false}};
  check_defined(op, args);
  check_args(op, ql_nope, q_pe, q_out, scale);
  check_inference_only(op, args);
}
