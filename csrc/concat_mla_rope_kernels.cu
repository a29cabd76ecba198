// CUDA kernel of concat_mla_rope: RoPE of q_pe and k_pe, the query concat (+fp8) and the paged
// KV-cache write (+fp8) of an MLA layer in one launch. A block holds rows of one token: query rows
// (token, head) and, with the K side, the token's cache row; a thread moves one pack of the nope
// (or kv_c) half, or rotates the pairs of one rope unit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "dispatch_utils.h"
#include "ops.h"
#include "packs.cuh"

namespace {

using namespace vllm_mla_ops;

// One concat_mla_rope launch: pointers, element strides and widths. The query rows are (token,
// head) rows of q_out; with the K side each token also has one cache row. A row's units are the
// packs of N elements of its nope (or kv_c) half, then its rope units of kPairs rotated pairs.
// Index: uint32_t when every element offset of every tensor fits (fewer instructions a thread, and
// at decode sizes the kernel's time is its instruction chain), else int64_t.
template <typename scalar_t, typename Index>
struct RopeGeometry {
  const scalar_t *nope, *pe, *kv_c, *k_pe;
  const void* cos_sin;
  const int64_t *positions, *slots;
  void *out, *cache;
  Index nope_s0, nope_s1, pe_s0, pe_s1, out_s0, out_s1, cos_sin_s0, positions_s0;
  Index kv_c_s0, k_pe_s0, cache_s0, cache_s1, slots_s0, block_size;
  int64_t tokens, max_position, num_slots;
  int32_t heads, nope_dim, kv_dim, half;      // half: rope_dim / 2
  int32_t nope_units, kv_units, rope_units;   // nope_units is 0 when ql_nope is q_out's nope half
  bool cos_sin_is_float, cos_sin_vector;      // vector: float32 rows read as float4 (aligned, unit stride)
  bool has_k;
  // Last-dim strides, read only by one-element packs (else 1, host-checked).
  Index nope_s2, pe_s2, out_s2, kv_c_s1, k_pe_s1, cache_s2, cos_sin_s1;
};

template <typename scalar_t, int N>
__device__ void load(scalar_t (&dst)[N], const scalar_t* p) {
  const auto pack = __ldg(reinterpret_cast<const Pack<scalar_t, N>*>(p));
  memcpy(dst, &pack, sizeof(pack));
}

template <typename Convert, typename scalar_t, int N>
__device__ void store(typename Convert::out_t* p, const scalar_t (&src)[N], const Convert& convert) {
  Pack<scalar_t, N> pack;
  memcpy(&pack, src, sizeof(pack));
  __stwb(reinterpret_cast<Pack<typename Convert::out_t, N>*>(p), convert(pack));
}

// Makes the value's registers needed here, at no instruction: the loads and arithmetic that produce
// it are not sunk below a later branch (nvcc moves a load whose value only a conditional store uses
// under that condition, behind the condition's own load).
template <typename T>
__device__ void needed_here(const T& value) {
  if constexpr (sizeof(T) % 4 == 0) {
    uint32_t words[sizeof(T) / 4];
    memcpy(words, &value, sizeof(T));
#pragma unroll
    for (uint32_t w : words) asm volatile("" ::"r"(w));
  } else {
    static_assert(sizeof(T) == 2, "one 16-bit element");
    uint16_t half;
    memcpy(&half, &value, sizeof(T));
    asm volatile("" ::"h"(half));
  }
}

// (a, b) rounded to scalar_t, a in the low half: one conversion instruction for the pair.
template <typename scalar_t>
__device__ uint32_t round_pair(float a, float b) {
  uint32_t word;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    memcpy(&word, &v, sizeof(word));
  } else {
    const __half2 v = __floats2half2_rn(a, b);
    memcpy(&word, &v, sizeof(word));
  }
  return word;
}

// cos and sin of pairs i0 .. i0 + kPairs - 1 at position pos; NaN for a position outside the cache.
template <typename scalar_t, typename Index, int kPairs>
__device__ void load_cos_sin(const RopeGeometry<scalar_t, Index>& g, int64_t pos, int i0, float (&c)[kPairs],
                             float (&s)[kPairs]) {
  const bool valid = pos >= 0 && pos < g.max_position;
  const Index row = static_cast<Index>(valid ? pos : 0) * g.cos_sin_s0;
  if constexpr (kPairs % 4 == 0) {
    if (g.cos_sin_vector) {
      const auto* base = static_cast<const float*>(g.cos_sin) + row;
#pragma unroll
      for (int k = 0; k < kPairs; k += 4) {
        const float4 cv = __ldg(reinterpret_cast<const float4*>(base + i0 + k));
        const float4 sv = __ldg(reinterpret_cast<const float4*>(base + g.half + i0 + k));
        c[k] = cv.x, c[k + 1] = cv.y, c[k + 2] = cv.z, c[k + 3] = cv.w;
        s[k] = sv.x, s[k + 1] = sv.y, s[k + 2] = sv.z, s[k + 3] = sv.w;
      }
      if (!valid) {
#pragma unroll
        for (int k = 0; k < kPairs; ++k) c[k] = s[k] = __int_as_float(0x7fc00000);
      }
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < kPairs; ++k) {
    const Index cos_at = row + (i0 + k) * g.cos_sin_s1, sin_at = row + (g.half + i0 + k) * g.cos_sin_s1;
    if (g.cos_sin_is_float) {
      c[k] = __ldg(static_cast<const float*>(g.cos_sin) + cos_at);
      s[k] = __ldg(static_cast<const float*>(g.cos_sin) + sin_at);
    } else {
      c[k] = static_cast<float>(static_cast<const scalar_t*>(g.cos_sin)[cos_at]);
      s[k] = static_cast<float>(static_cast<const scalar_t*>(g.cos_sin)[sin_at]);
    }
    if (!valid) c[k] = s[k] = __int_as_float(0x7fc00000);
  }
}

// Rope unit r of kRows rows that share a token (one position, so one read of cos and sin): pairs
// i0 + k, k < kPairs, i0 = r * kPairs. GPT-J pairs are (2i, 2i + 1), kPairs = N / 2 of them in one
// pack (N == 1: one element a load); NeoX pairs are (i, i + half), kPairs = N of them in two packs.
// Each row's packs are loaded before the position is needed, and the conversion (fp8: its scale's
// load and reciprocal) is made once the loads are in flight. Row j's rope half is written at y(j),
// asked for only once the row is rotated (a cache row's address waits on its slot), and not at all
// when y(j) is null. Each product is rounded on its own (__fmul_rn is never fused into an FMA), then
// the sum, then once to scalar_t.
template <typename Convert, int N, bool kNeox, int kRows, typename scalar_t, typename Index, typename Rows>
__device__ void rope_unit(const RopeGeometry<scalar_t, Index>& g, const scalar_t* const (&x)[kRows], Index x_s,
                          const Rows& y, Index y_s, const int64_t* position, int r, const typename Convert::Args& args) {
  constexpr int kPairs = kNeox ? N : (N > 1 ? N / 2 : 1);
  constexpr bool kTwoLoads = kNeox || N == 1;  // a and b halves in separate packs
  constexpr int kLoad = kTwoLoads ? kPairs : N;
  const int i0 = r * kPairs;
  const Index a_at = (kNeox ? i0 : 2 * i0) * (N > 1 ? 1 : x_s);
  const Index b_at = (kNeox ? i0 + g.half : 2 * i0 + 1) * (N > 1 ? 1 : x_s);
  scalar_t a_in[kRows][kLoad], b_in[kRows][kTwoLoads ? kLoad : 1];
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    load(a_in[j], x[j] + a_at);
    if constexpr (kTwoLoads) load(b_in[j], x[j] + b_at);
  }
  float c[kPairs], s[kPairs];
  load_cos_sin(g, __ldg(position), i0, c, s);
  const Convert convert(args);
  const Index ya = (kNeox ? i0 : 2 * i0) * (N > 1 ? 1 : y_s), yb = (kNeox ? i0 + g.half : 2 * i0 + 1) * (N > 1 ? 1 : y_s);
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    float a_rot[kPairs], b_rot[kPairs];
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      const float a = static_cast<float>(kTwoLoads ? a_in[j][k] : a_in[j][2 * k]);
      const float b = static_cast<float>(kTwoLoads ? b_in[j][k] : a_in[j][2 * k + 1]);
      a_rot[k] = __fsub_rn(__fmul_rn(a, c[k]), __fmul_rn(b, s[k]));
      b_rot[k] = __fadd_rn(__fmul_rn(b, c[k]), __fmul_rn(a, s[k]));
    }
    scalar_t a_out[kLoad], b_out[kTwoLoads ? kLoad : 1];
    if constexpr (kPairs == 1) {  // one-element packs: one element each
      a_out[0] = scalar_t(a_rot[0]);
      b_out[0] = scalar_t(b_rot[0]);
    } else {
      uint32_t a_words[kLoad / 2], b_words[kTwoLoads ? kLoad / 2 : 1];
#pragma unroll
      for (int k = 0; k < kLoad / 2; ++k) {
        if constexpr (kTwoLoads) {  // NeoX: a pack of a's and a pack of b's
          a_words[k] = round_pair<scalar_t>(a_rot[2 * k], a_rot[2 * k + 1]);
          b_words[k] = round_pair<scalar_t>(b_rot[2 * k], b_rot[2 * k + 1]);
        } else {  // GPT-J: each pair side by side
          a_words[k] = round_pair<scalar_t>(a_rot[k], b_rot[k]);
        }
      }
      memcpy(a_out, a_words, sizeof(a_out));
      if constexpr (kTwoLoads) memcpy(b_out, b_words, sizeof(b_out));
    }
    needed_here(a_out);
    if constexpr (kTwoLoads) needed_here(b_out);
    if (typename Convert::out_t* row = y(j)) {
      store(row + ya, a_out, convert);
      if constexpr (kTwoLoads) store(row + yb, b_out, convert);
    }
  }
}

// Query blocks: blockIdx.x * kRows + j (j < kRows) are the heads, threadIdx.x the unit; a thread moves
// its unit of kRows rows, loading all before storing any. A head past the last is the last head again
// (the same bytes to the same place), so no thread branches on it. With the K side, the last block
// column holds the tokens' cache rows: the row is loaded before its slot is known, and a slot
// outside the cache writes nothing. blockIdx.y is the token. kLoop: the block strides over more
// units than it has threads and the grid over more tokens than its 65535 rows; without it each
// thread moves one unit of one token, straight-line code that reads only its own path's parameters
// (with the loops nvcc hoists the parameter reads of every path above them, and a thread issued
// about 70 instructions before its first load, against about 30).
template <typename scalar_t, int N, bool kNeox, int kRows, bool kLoop, typename Index, typename QConvert,
          typename KConvert>
__global__ void concat_mla_rope_kernel(const RopeGeometry<scalar_t, Index> g, const typename QConvert::Args q_args,
                                       const typename KConvert::Args k_args) {
  const bool k_block = g.has_k && blockIdx.x == gridDim.x - 1;
  const int units = (k_block ? g.kv_units : g.nope_units) + g.rope_units;
  const auto at = [](Index i, Index stride) { return N > 1 ? i : i * stride; };
  const auto unit = [&](Index t, int u) {
    if (!k_block) {
      using Out = typename QConvert::out_t;
      Out* out[kRows];
      Index heads[kRows];
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        heads[j] = min(static_cast<int>(blockIdx.x) * kRows + j, g.heads - 1);
        out[j] = static_cast<Out*>(g.out) + t * g.out_s0 + heads[j] * g.out_s1;
      }
      if (u < g.nope_units) {
        scalar_t v[kRows][N];
#pragma unroll
        for (int j = 0; j < kRows; ++j) load(v[j], g.nope + t * g.nope_s0 + heads[j] * g.nope_s1 + at(Index(u) * N, g.nope_s2));
        const QConvert convert(q_args);  // once the loads are in flight (fp8: the scale's load and reciprocal)
#pragma unroll
        for (int j = 0; j < kRows; ++j) store(out[j] + at(Index(u) * N, g.out_s2), v[j], convert);
      } else {
        const scalar_t* x[kRows];
#pragma unroll
        for (int j = 0; j < kRows; ++j) x[j] = g.pe + t * g.pe_s0 + heads[j] * g.pe_s1;
        const auto rope_half = [&](int j) { return out[j] + at(g.nope_dim, g.out_s2); };
        rope_unit<QConvert, N, kNeox, kRows>(g, x, g.pe_s2, rope_half, g.out_s2, g.positions + t * g.positions_s0,
                                             u - g.nope_units, q_args);
      }
    } else {
      // The slot's load first; its value is waited for only once the row's data are in registers.
      using Out = typename KConvert::out_t;
      const int64_t slot_value = __ldg(g.slots + t * g.slots_s0);
      const auto cache_row = [&]() -> Out* {
        if (slot_value < 0 || slot_value >= g.num_slots) return nullptr;
        const auto slot = static_cast<Index>(slot_value);
        return static_cast<Out*>(g.cache) + (slot / g.block_size) * g.cache_s0 + (slot % g.block_size) * g.cache_s1;
      };
      if (u < g.kv_units) {
        scalar_t v[N];
        load(v, g.kv_c + t * g.kv_c_s0 + at(Index(u) * N, g.kv_c_s1));
        needed_here(v);
        if (Out* row = cache_row()) store(row + at(Index(u) * N, g.cache_s2), v, KConvert(k_args));
      } else {
        const scalar_t* const x[1] = {g.k_pe + t * g.k_pe_s0};
        const auto rope_half = [&](int) {
          Out* row = cache_row();
          return row ? row + at(g.kv_dim, g.cache_s2) : nullptr;
        };
        rope_unit<KConvert, N, kNeox, 1>(g, x, g.k_pe_s1, rope_half, g.cache_s2, g.positions + t * g.positions_s0,
                                         u - g.kv_units, k_args);
      }
    }
  };
  if constexpr (kLoop) {
    for (Index t = blockIdx.y; t < g.tokens; t += gridDim.y) {
      for (int u = threadIdx.x; u < units; u += blockDim.x) unit(t, u);
    }
  } else if (static_cast<int>(threadIdx.x) < units) {
    unit(blockIdx.y, threadIdx.x);
  }
}

// Block of one row of units (a warp holds units of one kind where the row allows: nope packs, then
// rope units), kRows query rows a thread: one under kOneRowBelow units in all, where more blocks
// spread the latency over more SMs, else four. The loops only where one pass does not cover the call.
template <typename scalar_t, typename QConvert, typename KConvert, int N, bool kNeox, typename Index>
void launch_rope(const RopeGeometry<scalar_t, Index>& g, const typename QConvert::Args& q_args,
                 const typename KConvert::Args& k_args, cudaStream_t stream) {
  constexpr int64_t kOneRowBelow = int64_t{1} << 16;
  constexpr int kMaxThreads = 1024, kMaxTokens = 65535;
  const int units = std::max(g.nope_units, g.has_k ? g.kv_units : 0) + g.rope_units;
  if (units == 0) return;  // rows of no element (zero widths, or only the nope half, written in place)
  const dim3 block(static_cast<unsigned>(std::min(units, kMaxThreads)));
  const auto run = [&](auto rows, auto loop) {
    constexpr int kRows = decltype(rows)::value;
    const dim3 grid(static_cast<unsigned>((g.heads + kRows - 1) / kRows + (g.has_k ? 1 : 0)),
                    static_cast<unsigned>(std::min<int64_t>(g.tokens, kMaxTokens)));
    concat_mla_rope_kernel<scalar_t, N, kNeox, kRows, decltype(loop)::value, Index, QConvert, KConvert>
        <<<grid, block, 0, stream>>>(g, q_args, k_args);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const auto rows = [&](auto loop) {
    if constexpr (N == 1) {
      run(std::integral_constant<int, 1>{}, loop);
    } else if (g.tokens * g.heads * units < kOneRowBelow) {
      run(std::integral_constant<int, 1>{}, loop);
    } else {
      run(std::integral_constant<int, 4>{}, loop);
    }
  };
  if (units > kMaxThreads || g.tokens > kMaxTokens) {
    rows(std::true_type{});
  } else {
    rows(std::false_type{});
  }
}

// The wide pack: 8 elements, 16 bytes of input.
constexpr int kWide = 8;

// The widest pack every row splits into: kWide elements for the engines' layouts (`wide`: every row
// of the tensors moved in packs splits into them), else one element, which handles any alignment
// and stride.
template <typename scalar_t, typename QConvert, typename KConvert, typename Index>
void rope_rows(RopeGeometry<scalar_t, Index> g, bool wide, const Layout& cos_sin_cache, bool is_neox,
               const typename QConvert::Args& q_args, const typename KConvert::Args& k_args, cudaStream_t stream) {
  wide = wide && (is_neox ? g.half : 2 * g.half) % kWide == 0;
  const auto run = [&](auto n) {
    constexpr int N = decltype(n)::value;
    constexpr int kPairs = N > 1 ? N / 2 : 1;
    g.nope_units /= N;
    g.kv_units /= N;
    g.rope_units = is_neox ? g.half / N : g.half / kPairs;
    const int pairs = is_neox ? N : kPairs;
    g.cos_sin_vector = g.cos_sin_is_float && pairs % 4 == 0 && g.half % 4 == 0 && cos_sin_cache.strides[1] == 1 &&
                       (cos_sin_cache.sizes[0] == 1 || cos_sin_cache.strides[0] % 4 == 0) &&
                       cos_sin_cache.address % 16 == 0;
    if (is_neox) {
      launch_rope<scalar_t, QConvert, KConvert, N, true>(g, q_args, k_args, stream);
    } else {
      launch_rope<scalar_t, QConvert, KConvert, N, false>(g, q_args, k_args, stream);
    }
  };
  if (wide) {
    run(std::integral_constant<int, kWide>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

// positions or slot_mapping on the host, for the checked mode (a synchronization).
std::vector<int64_t> host_indices(const std::optional<Tensor>& t, cudaStream_t stream) {
  std::vector<int64_t> values(t ? static_cast<size_t>(t->size(0)) : 0);
  if (values.empty()) return values;
  const auto* data = static_cast<const int64_t*>(t->const_data_ptr());
  const size_t copied = t->stride(0) == 0 ? 1 : values.size();
  STD_CUDA_CHECK(cudaMemcpy2DAsync(values.data(), sizeof(int64_t), data, sizeof(int64_t) * std::max<int64_t>(1, t->stride(0)),
                                   sizeof(int64_t), copied, cudaMemcpyDeviceToHost, stream));
  STD_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::fill(values.begin() + copied, values.end(), values[0]);
  return values;
}

void concat_mla_rope_cuda(Tensor ql_nope, Tensor q_pe, Tensor positions, Tensor cos_sin_cache, bool is_neox,
                          Tensor q_out, std::optional<Tensor> q_scale, std::optional<Tensor> kv_c,
                          std::optional<Tensor> k_pe, std::optional<Tensor> kv_cache,
                          std::optional<Tensor> slot_mapping, std::optional<Tensor> k_scale) {
  const char* op = "concat_mla_rope";
  const bool nope_in_place = check_concat_mla_rope_args(ql_nope, q_pe, positions, cos_sin_cache, q_out, q_scale, kv_c,
                                                        k_pe, kv_cache, slot_mapping, k_scale);
  const DeviceIfNeeded device_guard(ql_nope.get_device_index());
  void* stream_ptr = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(ql_nope.get_device_index(), &stream_ptr) == AOTI_TORCH_SUCCESS,
                  "could not get the current CUDA stream");
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const bool has_k = kv_cache.has_value();
  if (check_indices_requested()) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    STD_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    STD_TORCH_CHECK(capture == cudaStreamCaptureStatusNone, op,
                    ": VLLM_MLA_OPS_CHECK_INDICES=1 reads positions and slot_mapping on the host, which a CUDA graph "
                    "capture cannot do; capture without it");
    check_rope_indices(op, host_indices(positions, stream), cos_sin_cache.size(0), host_indices(slot_mapping, stream),
                       has_k ? kv_cache->size(0) * kv_cache->size(1) : 0);
  }
  // Each tensor's layout read once (an absent K side's never).
  const Layout nope(ql_nope), pe(q_pe), pos(positions), cs(cos_sin_cache), out(q_out);
  const int64_t tokens = out.sizes[0];
  if (tokens == 0) return;
  std::optional<Layout> kv, kpe, cache, slots;
  if (has_k) kv.emplace(*kv_c), kpe.emplace(*k_pe), cache.emplace(*kv_cache), slots.emplace(*slot_mapping);
  // 32-bit offsets when the last element of every tensor is below 2^32 elements from its base
  // (strides are never negative, so every partial offset is below it too).
  bool narrow = tokens < (int64_t{1} << 31), wide = true;
  const auto fits = [&](const Layout& l) { narrow = narrow && last_offset(l) < (int64_t{1} << 32); };
  const auto packs = [&](const Layout& l) { wide = wide && rows_split_into_packs(l, kWide); };
  for (const Layout* l : {&nope, &pe, &out}) fits(*l), packs(*l);
  fits(pos), fits(cs);
  if (has_k) {
    for (const Layout* l : {&*kv, &*kpe, &*cache}) fits(*l), packs(*l);
    fits(*slots);
  }
  VLLM_DISPATCH_HALF_TYPES(dtype_of(ql_nope), "concat_mla_rope", [&] {
    const auto run = [&](auto index) {
      using Index = decltype(index);
      RopeGeometry<scalar_t, Index> g{};
      g.nope = reinterpret_cast<const scalar_t*>(nope.address);
      g.pe = reinterpret_cast<const scalar_t*>(pe.address);
      g.cos_sin = reinterpret_cast<const void*>(cs.address);
      g.positions = reinterpret_cast<const int64_t*>(pos.address);
      g.out = q_out.mutable_data_ptr();
      g.nope_s0 = nope.strides[0], g.nope_s1 = nope.strides[1], g.nope_s2 = nope.strides[2];
      g.pe_s0 = pe.strides[0], g.pe_s1 = pe.sizes[1] == 1 ? 0 : pe.strides[1], g.pe_s2 = pe.strides[2];
      g.out_s0 = out.strides[0], g.out_s1 = out.strides[1], g.out_s2 = out.strides[2];
      g.cos_sin_s0 = cs.strides[0], g.cos_sin_s1 = cs.strides[1];
      g.positions_s0 = pos.strides[0];
      g.tokens = tokens, g.max_position = cs.sizes[0];
      g.heads = static_cast<int32_t>(out.sizes[1]), g.nope_dim = static_cast<int32_t>(nope.sizes[2]);
      g.half = static_cast<int32_t>(pe.sizes[2] / 2);
      g.nope_units = nope_in_place ? 0 : g.nope_dim;  // elements here; packs once the width is chosen
      g.cos_sin_is_float = dtype_of(cos_sin_cache) == torch::headeronly::ScalarType::Float;
      if (has_k) {
        g.has_k = true;
        g.kv_c = reinterpret_cast<const scalar_t*>(kv->address);
        g.k_pe = reinterpret_cast<const scalar_t*>(kpe->address);
        g.slots = reinterpret_cast<const int64_t*>(slots->address);
        g.cache = kv_cache->mutable_data_ptr();
        g.kv_c_s0 = kv->strides[0], g.kv_c_s1 = kv->strides[1];
        g.k_pe_s0 = kpe->strides[0], g.k_pe_s1 = kpe->strides[kpe->strides.size() - 1];
        g.cache_s0 = cache->strides[0], g.cache_s1 = cache->strides[1], g.cache_s2 = cache->strides[2];
        g.slots_s0 = slots->strides[0];
        g.num_slots = cache->sizes[0] * cache->sizes[1], g.block_size = cache->sizes[1];
        g.kv_dim = static_cast<int32_t>(kv->sizes[1]), g.kv_units = g.kv_dim;
      }
      const ScaleArgs q_args{q_scale ? static_cast<const float*>(q_scale->const_data_ptr()) : nullptr};
      const ScaleArgs k_args{k_scale ? static_cast<const float*>(k_scale->const_data_ptr()) : nullptr};
      const auto with_k = [&](auto q_convert, const auto& qa) {
        using Q = typename decltype(q_convert)::type;
        if (k_scale) {
          rope_rows<scalar_t, Q, DivideE4M3<scalar_t>>(g, wide, cs, is_neox, qa, k_args, stream);
        } else {
          rope_rows<scalar_t, Q, Copy<scalar_t>>(g, wide, cs, is_neox, qa, NoArgs{}, stream);
        }
      };
      if (q_scale) {
        with_k(std::type_identity<QuantizeE4M3<scalar_t>>{}, q_args);
      } else {
        with_k(std::type_identity<Copy<scalar_t>>{}, NoArgs{});
      }
    };
    if (narrow) {
      run(uint32_t{});
    } else {
      run(int64_t{});
    }
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(_C, CUDA, m) {
  m.impl("concat_mla_rope", TORCH_BOX(&concat_mla_rope_cuda));
}
