// The validators of every op (every backend calls its op's before touching memory), and the
// formatting of their messages: the Python spelling of dtypes, devices and shapes, as the fake implementation
// prints them.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/stableivalue_conversions.h>
#include <torch/headeronly/core/DeviceType.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
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

// The dtypes the ops take: torch's code for each (read once from the shim), and its element size.
struct KnownDtype {
  int32_t code;
  ScalarType type;
  int64_t element_size;
};
const std::array<KnownDtype, 5>& known_dtypes() {
  static const std::array<KnownDtype, 5> dtypes{{
      {aoti_torch_dtype_bfloat16(), ScalarType::BFloat16, 2},
      {aoti_torch_dtype_float16(), ScalarType::Half, 2},
      {aoti_torch_dtype_float8_e4m3fn(), ScalarType::Float8_e4m3fn, 1},
      {aoti_torch_dtype_float32(), ScalarType::Float, 4},
      {aoti_torch_dtype_int64(), ScalarType::Long, 8},
  }};
  return dtypes;
}

// The element size of a dtype the ops take, without a call into torch; 0 for the others.
int64_t known_element_size(ScalarType t) {
  for (const KnownDtype& d : known_dtypes()) {
    if (d.type == t) return d.element_size;
  }
  return 0;
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
      : t(tensor), name(arg), sizes(t.sizes()), strides(t.strides()), dtype(dtype_of(t)), device(t.device()) {}
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
  const int64_t item_bytes = known_element_size(m.dtype);
  vllm_mla_ops::View view{0, item_bytes ? item_bytes : static_cast<int64_t>(m.t.element_size()), 0, {}, {}};
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

void check_no_overlap(const char* op, const vllm_mla_ops::View& out, const Meta& out_meta, const Meta& input,
                      const vllm_mla_ops::View& input_view) {
  const char* o = out_meta.name;
  switch (vllm_mla_ops::overlap(out, input_view)) {
    case vllm_mla_ops::Overlap::kNo:
      return;
    case vllm_mla_ops::Overlap::kYes:
      fail(op, ": ", o, " must not overlap ", input.name, " in memory, got views that share bytes");
    case vllm_mla_ops::Overlap::kUndecided:
      fail(op, ": could not decide within the search bound whether ", o, " and ", input.name,
           " share bytes (", o, " strides ", list(out_meta.strides), ", ", input.name, " strides ",
           list(input.strides), "); pass a contiguous ", input.name, " (", input.name,
           ".contiguous()) or a contiguous ", o);
  }
}

void check_no_overlap(const char* op, const vllm_mla_ops::View& out, const Meta& out_meta, const Meta& input) {
  if (input.numel() > 0) check_no_overlap(op, out, out_meta, input, checked_view(op, input));
}

// An output's view, once it is known to lie inside its storage and to address each element once;
// nullopt for an empty output (nothing is written, so nothing can collide).
std::optional<vllm_mla_ops::View> checked_output(const char* op, const Meta& out) {
  if (out.numel() == 0) return std::nullopt;
  const vllm_mla_ops::View view = checked_view(op, out);
  switch (vllm_mla_ops::internal_overlap(view)) {
    case vllm_mla_ops::Overlap::kNo:
      return view;
    case vllm_mla_ops::Overlap::kYes:
      fail(op, ": ", out.name, " must not overlap itself, got shape ", list(out.sizes), " with strides ",
           list(out.strides), ", which address one element from two indices");
    case vllm_mla_ops::Overlap::kUndecided:
      fail(op, ": could not decide within the search bound whether ", out.name, " (shape ", list(out.sizes),
           ", strides ", list(out.strides), ") addresses an element twice; pass a contiguous ", out.name);
  }
  return view;
}

// Whether ql_nope is exactly q_out[..., :nope_dim] (same address, dtype, sizes, and the strides of
// every dim that has more than one index): the layout of a bmm that wrote its product into q_out,
// leaving the op only the rope half to write. Any other overlap stays an error.
bool is_nope_half_of(const Meta& ql_nope, const Meta& q_out) {
  if (ql_nope.dtype != q_out.dtype || ql_nope.t.const_data_ptr() != q_out.t.const_data_ptr()) return false;
  for (size_t d = 0; d < 3; ++d) {
    if (ql_nope.sizes[d] > 1 && ql_nope.strides[d] != q_out.strides[d]) return false;
  }
  return ql_nope.sizes[0] == q_out.sizes[0] && ql_nope.sizes[1] == q_out.sizes[1] && ql_nope.sizes[2] <= q_out.sizes[2];
}

void check_scale(const char* op, const Meta& scale, const Meta& ql_nope) {
  MLA_CHECK(scale.dtype == ScalarType::Float, op, ": ", scale.name, " must be a torch.float32 tensor, got ",
            dtype_name(scale.dtype));
  MLA_CHECK(scale.numel() == 1, op, ": ", scale.name, " must have one element (a per-tensor scale), got shape ",
            list(scale.sizes));
  check_device(op, scale, ql_nope);
}

// ql_nope's dtype and the query side's ranks, the first checks of every op.
void check_query_ranks(const char* op, const Meta& ql_nope, const Meta& q_pe, const Meta& q_out) {
  // Kernels read 2-byte elements; any other width would be copied wrongly, so it never gets in.
  MLA_CHECK(ql_nope.dtype == ScalarType::Half || ql_nope.dtype == ScalarType::BFloat16, op,
            ": ql_nope must be float16 or bfloat16 dtype, got ", dtype_name(ql_nope.dtype));
  check_rank3(op, ql_nope, "[tokens, heads, nope_dim]");
  check_rank3(op, q_pe, "[tokens, heads or 1, rope_dim]");
  check_rank3(op, q_out, "[tokens, heads, nope_dim + rope_dim]");
}

// The shapes of the query side, shared by every op: q_pe [tokens, heads or 1, rope_dim] and q_out
// [tokens, heads, nope_dim + rope_dim], tokens and heads from ql_nope.
void check_q_shapes(const char* op, const Meta& ql_nope, const Meta& q_pe, const Meta& q_out) {
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
}

// A None passed for a Tensor argument arrives as an undefined tensor, whose accessors would throw
// from inside torch; it is refused first, by name.
void check_defined(const char* op, std::initializer_list<OpArg> args) {
  for (const OpArg& arg : args) {
    MLA_CHECK(arg.tensor == nullptr || arg.tensor->defined(), op, ": ", arg.name, " must be a tensor, got None");
  }
}

// Everything but the inference-only contract, which needs every argument checked first. Returns
// whether ql_nope is q_out's nope half (is_nope_half_of).
bool check_args(const char* op, const Tensor& ql_nope_t, const Tensor& q_pe_t, const Tensor& q_out_t,
                const std::optional<Tensor>& scale_t) {
  const Meta ql_nope(ql_nope_t, "ql_nope"), q_pe(q_pe_t, "q_pe"), q_out(q_out_t, "q_out");
  check_query_ranks(op, ql_nope, q_pe, q_out);
  const ScalarType dtype = ql_nope.dtype;
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
  check_q_shapes(op, ql_nope, q_pe, q_out);
  std::optional<Meta> scale;
  if (scale_t) {
    scale.emplace(*scale_t, "scale");
    check_scale(op, *scale, ql_nope);
  }

  const auto out = checked_output(op, q_out);
  if (!out) return false;
  const bool nope_in_place = is_nope_half_of(ql_nope, q_out);
  if (!nope_in_place) check_no_overlap(op, *out, q_out, ql_nope);
  check_no_overlap(op, *out, q_out, q_pe);
  if (scale) check_no_overlap(op, *out, q_out, *scale);
  return nope_in_place;
}

}  // namespace

ScalarType dtype_of(const Tensor& t) {
  int32_t code = 0;
  if (aoti_torch_get_dtype(t.get(), &code) == AOTI_TORCH_SUCCESS) {
    for (const KnownDtype& d : known_dtypes()) {
      if (d.code == code) return d.type;
    }
  }
  return t.scalar_type();
}

void check_inference_only(const char* op, std::initializer_list<OpArg> args) {
  // Engines call the ops under no_grad or inference_mode: there this is one thread-local read.
  if (!aoti_torch_grad_mode_is_enabled()) return;
  // The stable ABI reads neither requires_grad nor is_inference nor bumps a version, so a Python
  // kernel does (vllm_mla_ops/_library.py): it returns the index of the first tensor that requires
  // grad, else that of the first written inference tensor (-1 for none), and bumps the written
  // tensors' versions when both are -1.
  std::vector<std::optional<Tensor>> tensors;
  int64_t written = 0;
  for (const OpArg& arg : args) {
    if (arg.written) written |= int64_t{1} << tensors.size();
    tensors.push_back(arg.tensor ? std::optional<Tensor>(*arg.tensor) : std::nullopt);
  }
  std::array<StableIValue, 2> stack{torch::stable::detail::from(tensors), torch::stable::detail::from(written)};
  MLA_CHECK(torch_call_dispatcher("_C::_grad_mode_guard", "", stack.data(), TORCH_ABI_VERSION) == AOTI_TORCH_SUCCESS,
            op, ": the grad-mode check (_C::_grad_mode_guard, registered by `import vllm_mla_ops`) failed");
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

bool check_concat_mla_q_args(const Tensor& ql_nope, const Tensor& q_pe, const Tensor& q_out,
                             const std::optional<Tensor>& scale) {
  const char* op = scale ? "concat_mla_q_fp8" : "concat_mla_q";
  const std::initializer_list<OpArg> args{
      {"ql_nope", &ql_nope, false}, {"q_pe", &q_pe, false}, {"q_out", &q_out, true},
      {"scale", scale ? &*scale : nullptr, false}};
  check_defined(op, args);
  const bool nope_in_place = check_args(op, ql_nope, q_pe, q_out, scale);
  check_inference_only(op, args);
  return nope_in_place;
}

namespace {

void check_rank(const char* op, const Meta& m, size_t rank, const char* dims) {
  MLA_CHECK(m.sizes.size() == rank, op, ": ", m.name, " must be ", rank, "-D ", dims, ", got ", m.sizes.size(),
            "-D with shape ", list(m.sizes));
}

void check_dtype(const char* op, const Meta& m, ScalarType dtype, const char* whose) {
  MLA_CHECK(m.dtype == dtype, op, ": ", m.name, " must have ", whose, " dtype ", dtype_name(dtype), ", got ",
            dtype_name(m.dtype));
}

// An output of the inputs' dtype, or float8_e4m3fn with its scale; the scale exactly when fp8.
void check_output_dtype(const char* op, const Meta& out, ScalarType dtype, const std::optional<Tensor>& scale,
                        const char* scale_name) {
  const bool fp8 = out.dtype == ScalarType::Float8_e4m3fn;
  MLA_CHECK(fp8 || out.dtype == dtype, op, ": ", out.name, " must have ql_nope's dtype ", dtype_name(dtype),
            " or be torch.float8_e4m3fn, got ", dtype_name(out.dtype));
  MLA_CHECK(!fp8 || scale, op, ": ", out.name, " is torch.float8_e4m3fn, which needs ", scale_name,
            " (a one-element float32 tensor)");
  MLA_CHECK(fp8 || !scale, op, ": ", scale_name, " is given, so ", out.name, " must be torch.float8_e4m3fn, got ",
            dtype_name(out.dtype));
}

void check_tokens(const char* op, const Meta& m, int64_t tokens) {
  MLA_CHECK(m.sizes[0] == tokens, op, ": ", m.name, " must be [tokens] with tokens=", tokens,
            " from ql_nope, got shape ", list(m.sizes));
}

}  // namespace

bool check_concat_mla_rope_args(const Tensor& ql_nope_t, const Tensor& q_pe_t, const Tensor& positions_t,
                                const Tensor& cos_sin_cache_t, const Tensor& q_out_t,
                                const std::optional<Tensor>& q_scale_t, const std::optional<Tensor>& kv_c_t,
                                const std::optional<Tensor>& k_pe_t, const std::optional<Tensor>& kv_cache_t,
                                const std::optional<Tensor>& slot_mapping_t, const std::optional<Tensor>& k_scale_t) {
  const char* op = "concat_mla_rope";
  const auto ptr = [](const std::optional<Tensor>& t) { return t ? &*t : nullptr; };
  const std::initializer_list<OpArg> args{
      {"ql_nope", &ql_nope_t, false},       {"q_pe", &q_pe_t, false},          {"positions", &positions_t, false},
      {"cos_sin_cache", &cos_sin_cache_t, false}, {"q_out", &q_out_t, true}, {"q_scale", ptr(q_scale_t), false},
      {"kv_c", ptr(kv_c_t), false},         {"k_pe", ptr(k_pe_t), false},      {"kv_cache", ptr(kv_cache_t), true},
      {"slot_mapping", ptr(slot_mapping_t), false}, {"k_scale", ptr(k_scale_t), false}};
  check_defined(op, args);

  const Meta ql_nope(ql_nope_t, "ql_nope"), q_pe(q_pe_t, "q_pe"), positions(positions_t, "positions");
  const Meta cos_sin_cache(cos_sin_cache_t, "cos_sin_cache"), q_out(q_out_t, "q_out");
  check_query_ranks(op, ql_nope, q_pe, q_out);
  const ScalarType dtype = ql_nope.dtype;
  check_rank(op, positions, 1, "[tokens]");
  check_rank(op, cos_sin_cache, 2, "[max_position, rope_dim]");
  check_dtype(op, q_pe, dtype, "ql_nope's");
  check_output_dtype(op, q_out, dtype, q_scale_t, "q_scale");
  MLA_CHECK(positions.dtype == ScalarType::Long, op, ": positions must be torch.int64, got ",
            dtype_name(positions.dtype));
  MLA_CHECK(cos_sin_cache.dtype == ScalarType::Float || cos_sin_cache.dtype == dtype, op,
            ": cos_sin_cache must be torch.float32 or have ql_nope's dtype ", dtype_name(dtype), ", got ",
            dtype_name(cos_sin_cache.dtype));
  for (const Meta* m : {&q_pe, &positions, &cos_sin_cache, &q_out}) check_device(op, *m, ql_nope);
  check_q_shapes(op, ql_nope, q_pe, q_out);
  const int64_t tokens = ql_nope.sizes[0], rope_dim = q_pe.sizes[2];
  MLA_CHECK(rope_dim % 2 == 0, op, ": rope_dim must be even (pairs rotated by one cos and one sin), got ",
            rope_dim);
  check_tokens(op, positions, tokens);
  MLA_CHECK(cos_sin_cache.sizes[1] == rope_dim, op, ": cos_sin_cache must be [max_position, rope_dim] with rope_dim=",
            rope_dim, " from q_pe, got shape ", list(cos_sin_cache.sizes));
  std::optional<Meta> q_scale;
  if (q_scale_t) {
    q_scale.emplace(*q_scale_t, "q_scale");
    check_scale(op, *q_scale, ql_nope);
  }

  // The K side: all four tensors or none.
  const int given = !!kv_c_t + !!k_pe_t + !!kv_cache_t + !!slot_mapping_t;
  if (given != 0 && given != 4) {
    std::string names;
    for (const OpArg& arg : args) {
      const std::string name = arg.name;
      if (arg.tensor && (name == "kv_c" || name == "k_pe" || name == "kv_cache" || name == "slot_mapping")) {
        names += (names.empty() ? "" : ", ") + name;
      }
    }
    fail(op, ": the K side takes kv_c, k_pe, kv_cache and slot_mapping together, got only ", names);
  }
  MLA_CHECK(given == 4 || !k_scale_t, op,
            ": k_scale is given without the K side (kv_c, k_pe, kv_cache and slot_mapping)");
  std::optional<Meta> kv_c, k_pe, kv_cache, slot_mapping, k_scale;
  if (given == 4) {
    kv_c.emplace(*kv_c_t, "kv_c");
    k_pe.emplace(*k_pe_t, "k_pe");
    kv_cache.emplace(*kv_cache_t, "kv_cache");
    slot_mapping.emplace(*slot_mapping_t, "slot_mapping");
    check_rank(op, *kv_c, 2, "[tokens, kv_dim]");
    MLA_CHECK(k_pe->sizes.size() == 2 || k_pe->sizes.size() == 3, op,
              ": k_pe must be 2-D [tokens, rope_dim] or 3-D [tokens, 1, rope_dim], got ", k_pe->sizes.size(),
              "-D with shape ", list(k_pe->sizes));
    check_rank3(op, *kv_cache, "[num_blocks, block_size, kv_dim + rope_dim]");
    check_rank(op, *slot_mapping, 1, "[tokens]");
    check_dtype(op, *kv_c, dtype, "ql_nope's");
    check_dtype(op, *k_pe, dtype, "ql_nope's");
    check_output_dtype(op, *kv_cache, dtype, k_scale_t, "k_scale");
    MLA_CHECK(slot_mapping->dtype == ScalarType::Long, op, ": slot_mapping must be torch.int64, got ",
              dtype_name(slot_mapping->dtype));
    for (const Meta* m : {&*kv_c, &*k_pe, &*kv_cache, &*slot_mapping}) check_device(op, *m, ql_nope);
    MLA_CHECK(kv_c->sizes[0] == tokens, op, ": kv_c must be [tokens, kv_dim] with tokens=", tokens,
              " from ql_nope, got shape ", list(kv_c->sizes));
    const bool k_pe_ok = k_pe->sizes[0] == tokens && k_pe->sizes.back() == rope_dim &&
                         (k_pe->sizes.size() == 2 || k_pe->sizes[1] == 1);
    MLA_CHECK(k_pe_ok, op, ": k_pe must be [tokens, rope_dim] or [tokens, 1, rope_dim] with tokens=", tokens,
              " and rope_dim=", rope_dim, " from ql_nope and q_pe, got shape ", list(k_pe->sizes));
    int64_t width = 0;
    MLA_CHECK(!__builtin_add_overflow(kv_c->sizes[1], rope_dim, &width) && kv_cache->sizes[2] == width, op,
              ": kv_cache must be [num_blocks, block_size, kv_dim + rope_dim] with kv_dim + rope_dim = ",
              kv_c->sizes[1], " + ", rope_dim, " from kv_c and q_pe, got shape ", list(kv_cache->sizes));
    int64_t slots = 0;
    MLA_CHECK(!__builtin_mul_overflow(kv_cache->sizes[0], kv_cache->sizes[1], &slots), op,
              ": kv_cache's num_blocks * block_size overflows int64, got shape ", list(kv_cache->sizes));
    check_tokens(op, *slot_mapping, tokens);
    if (k_scale_t) {
      k_scale.emplace(*k_scale_t, "k_scale");
      check_scale(op, *k_scale, ql_nope);
    }
  }

  // Every output against itself, every input (each input's view made once) and the other output.
  const auto out = checked_output(op, q_out);
  const bool nope_in_place = out && is_nope_half_of(ql_nope, q_out);
  const auto cache = kv_cache ? checked_output(op, *kv_cache) : std::nullopt;
  if (out || cache) {
    std::vector<std::pair<const Meta*, vllm_mla_ops::View>> inputs;
    for (const Meta* input : std::initializer_list<const Meta*>{
             &ql_nope, &q_pe, &positions, &cos_sin_cache, q_scale ? &*q_scale : nullptr,
                              kv_c ? &*kv_c : nullptr, k_pe ? &*k_pe : nullptr,
                              slot_mapping ? &*slot_mapping : nullptr, k_scale ? &*k_scale : nullptr}) {
      if (input && input->numel() > 0) inputs.emplace_back(input, checked_view(op, *input));
    }
    using Output = std::pair<std::optional<vllm_mla_ops::View>, const Meta*>;
    for (const auto& [view, meta] : {Output{out, &q_out}, Output{cache, kv_cache ? &*kv_cache : nullptr}}) {
      if (!view) continue;
      for (const auto& [input, input_view] : inputs) {
        if (!(nope_in_place && input == &ql_nope && meta == &q_out)) {
          check_no_overlap(op, *view, *meta, *input, input_view);
        }
      }
    }
    if (out && cache) check_no_overlap(op, *out, q_out, *kv_cache, *cache);
  }

  check_inference_only(op, args);
  return nope_in_place;
}

bool check_indices_requested() {
  static const bool requested = [] {
    const char* value = std::getenv("VLLM_MLA_OPS_CHECK_INDICES");
    return value != nullptr && std::string(value) == "1";
  }();
  return requested;
}

void check_rope_indices(const char* op, const std::vector<int64_t>& positions, int64_t max_position,
                        const std::vector<int64_t>& slots, int64_t num_slots) {
  for (size_t t = 0; t < positions.size(); ++t) {
    MLA_CHECK(positions[t] >= 0 && positions[t] < max_position, op, ": positions[", t, "] = ", positions[t],
              " is outside [0, ", max_position, ") (the rows of cos_sin_cache); found by VLLM_MLA_OPS_CHECK_INDICES=1");
  }
  std::vector<std::pair<int64_t, size_t>> written;
  for (size_t t = 0; t < slots.size(); ++t) {
    MLA_CHECK(slots[t] < num_slots, op, ": slot_mapping[", t, "] = ", slots[t], " is outside [0, ", num_slots,
              ") (num_blocks * block_size rows of kv_cache; a negative slot skips the token); found by "
              "VLLM_MLA_OPS_CHECK_INDICES=1");
    if (slots[t] >= 0) written.emplace_back(slots[t], t);
  }
  std::sort(written.begin(), written.end());
  for (size_t i = 1; i < written.size(); ++i) {
    MLA_CHECK(written[i].first != written[i - 1].first, op, ": slot_mapping[", written[i].second, "] = ",
              written[i].first, " repeats slot_mapping[", written[i - 1].second,
              "]: two tokens would write one kv_cache row; found by VLLM_MLA_OPS_CHECK_INDICES=1");
  }
}
