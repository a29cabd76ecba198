// CPU kernels: one task per block of (token, head) rows; each row is two row operations, a copy
// (32-byte moves where the last dims are unit-stride, streaming stores on large outputs) or, for
// the fp8 op, a quantization. A task's row loop is compiled for AVX-512, AVX2 and the baseline ISA
// (the loader picks one clone per process), so the wheel stays portable and the row operations
// inline into the wide clone.
#include <torch/csrc/stable/ops.h>

#include <emmintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "dispatch_utils.h"
#include "ops.h"

namespace {

// Elements per parallel task (ATen's own grain size): small inputs stay on the calling thread.
constexpr int64_t kGrainElements = 32768;

// torch's parallel_for runs a range of one grain or less on the calling thread; this runs it
// there without the calls into torch (decode sizes are one grain).
template <typename F>
void parallel_rows(int64_t rows, int64_t grain, const F& f) {
  if (rows <= grain) {
    f(int64_t{0}, rows);
  } else {
    torch::stable::parallel_for(0, rows, grain, f);
  }
}

// The last-level cache the kernels' two size rules compare against. A call whose reads and writes
// together outgrow it walks the rows in ql_nope's memory order (see concat_rows); a copy whose
// output alone outgrows it writes with streaming (non-temporal) stores, which go to memory without
// first reading each cache line in, and which lose to plain stores while the output stays in cache
// (docs/design.md).
//
// Read once: the size of the L3 that CPU 0 belongs to, as Linux reports it in sysfs (what lscpu
// shows). Not sysconf(_SC_LEVEL3_CACHE_SIZE): on AMD processors some glibc releases report there
// the L3 of the whole package, the sum of caches each of which serves one core complex only.
// Where sysfs lists no L3, kDefaultCacheBytes, the L3 of the machine the size rules were measured on.
constexpr int64_t kDefaultCacheBytes = int64_t{32} << 20;

int64_t cache_bytes() {
  static const int64_t bytes = [] {
    for (int index = 0;; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size");
      int level = 0;
      if (!(level_file >> level)) return kDefaultCacheBytes;  // no more cache levels listed
      int64_t size = 0;
      char unit = 0;
      if (level == 3 && size_file >> size >> unit && size > 0) {
        return unit == 'K' ? size << 10 : unit == 'M' ? size << 20 : kDefaultCacheBytes;
      }
    }
  }();
  return bytes;
}

struct CopyRow {
  bool stream;  // unit-stride rows with 16-byte streaming stores
  template <typename scalar_t>
  void operator()(scalar_t* dst, int64_t dst_stride, const scalar_t* src, int64_t src_stride, int64_t n) const {
    if (dst_stride == 1 && src_stride == 1) {
      auto* d = reinterpret_cast<char*>(dst);
      const auto* s = reinterpret_cast<const char*>(src);
      const int64_t bytes = n * int64_t{sizeof(scalar_t)};
      int64_t i = 0;
      if (stream) {  // bytes up to a 16-byte boundary of d, then aligned streaming stores
        for (const int64_t head = std::min<int64_t>(bytes, -reinterpret_cast<intptr_t>(d) & 15); i < head; ++i) {
          d[i] = s[i];
        }
        for (; i + 16 <= bytes; i += 16) {
          _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
        }
      } else {
        for (; i + 32 <= bytes; i += 32) __builtin_memcpy(d + i, s + i, 32);
      }
      for (; i < bytes; ++i) d[i] = s[i];
      return;
    }
    for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = src[i * src_stride];
  }
  // Streaming stores are weakly ordered: fenced before the task reports itself done, so the stores
  // are visible to whichever thread reads q_out after the parallel region.
  void finish() const {
    if (stream) _mm_sfence();
  }
};

// The e4m3fn bits of x for |x| <= 448 or NaN: torch's round-to-nearest-even conversion
// (fp8e4m3fn_from_fp32_value) with its branches turned into selects, so that a row loop of it
// vectorizes. Below 2^-6 a float add aligns the mantissa for the subnormal result; above, the
// mantissa rounds to 3 bits, ties to even, as the exponent is rebiased.
inline uint8_t e4m3fn_bits(float x) {
  constexpr uint32_t kSubnormalMagic = UINT32_C(141) << 23, kSmallestNormal = UINT32_C(121) << 23;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t sign = bits & UINT32_C(0x80000000), mag = bits ^ sign;
  float magnitude, magic, sum;
  std::memcpy(&magnitude, &mag, sizeof(mag));
  std::memcpy(&magic, &kSubnormalMagic, sizeof(magic));
  sum = magnitude + magic;
  uint32_t subnormal;
  std::memcpy(&subnormal, &sum, sizeof(sum));
  subnormal -= kSubnormalMagic;
  const uint32_t normal = (mag + (static_cast<uint32_t>(7 - 127) << 23) + UINT32_C(0x7FFFF) + ((mag >> 20) & 1)) >> 20;
  uint32_t result = mag < kSmallestNormal ? subnormal : normal;
  result = mag > UINT32_C(0x7F800000) ? UINT32_C(0x7F) : result;
  return static_cast<uint8_t>(result | (sign >> 24));
}

// x * r in float32, clamped to e4m3fn's finite range (NaN stays NaN: both compares are false), then
// rounded to nearest even: the steps of the reference
// (x.float() * scale.reciprocal()).clamp(-448, 448).to(torch.float8_e4m3fn).
struct QuantizeRow {
  float r;  // 1 / scale, correctly rounded
  void finish() const {}
  template <typename scalar_t>
  uint8_t operator()(scalar_t v) const {
    constexpr float kMax = 448.0f;
    float x = static_cast<float>(v) * r;
    x = x > kMax ? kMax : (x < -kMax ? -kMax : x);
    return e4m3fn_bits(x);
  }
  template <typename scalar_t>
  void operator()(uint8_t* dst, int64_t dst_stride, const scalar_t* src, int64_t src_stride, int64_t n) const {
    if (dst_stride == 1 && src_stride == 1) {  // the loop that vectorizes
      for (int64_t i = 0; i < n; ++i) dst[i] = (*this)(src[i]);
      return;
    }
    for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = (*this)(src[i * src_stride]);
  }
};

// Where the rows of one op call are: element strides, a 1-head q_pe as head stride 0.
template <typename scalar_t, typename out_t>
struct Rows {
  const scalar_t* nope;
  const scalar_t* pe;
  out_t* out;
  int64_t nope_s0, nope_s1, nope_s2, pe_s0, pe_s1, pe_s2, out_s0, out_s1, out_s2;
  int64_t nope_dim, rope_dim;
  int64_t inner;     // rows along the inner dim of the walk
  bool heads_outer;  // walk head-major (the decode layout's ql_nope order) instead of token-major
  bool copy_nope;    // false when ql_nope is q_out's nope half already
};

// Rows [begin, end) of the walk: one division, then the rows advance along the inner dim. Flattened,
// so that both row operations inline into each clone (else one call stays on the baseline ISA).
template <typename scalar_t, typename out_t, typename RowOp>
[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] void run_rows(const Rows<scalar_t, out_t>& r,
                                                                   const RowOp& row_op, int64_t begin, int64_t end) {
  int64_t o = begin / r.inner, i = begin % r.inner;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t t = r.heads_outer ? i : o, h = r.heads_outer ? o : i;
    out_t* out_row = r.out + t * r.out_s0 + h * r.out_s1;
    if (r.copy_nope) row_op(out_row, r.out_s2, r.nope + t * r.nope_s0 + h * r.nope_s1, r.nope_s2, r.nope_dim);
    row_op(out_row + r.nope_dim * r.out_s2, r.out_s2, r.pe + t * r.pe_s0 + h * r.pe_s1, r.pe_s2, r.rope_dim);
    if (++i == r.inner) {
      i = 0;
      ++o;
    }
  }
  row_op.finish();
}

template <typename scalar_t, typename out_t, typename RowOp>
void concat_rows(const Tensor& ql_nope, const Tensor& q_pe, const Tensor& q_out, const RowOp& row_op, bool copy_nope) {
  const Shape nope(ql_nope), pe(q_pe), out(q_out);
  const int64_t tokens = out.sizes[0], heads = out.sizes[1];
  Rows<scalar_t, out_t> r{static_cast<const scalar_t*>(ql_nope.const_data_ptr()),
                          static_cast<const scalar_t*>(q_pe.const_data_ptr()),
                          static_cast<out_t*>(q_out.mutable_data_ptr()),
                          nope.strides[0], nope.strides[1], nope.strides[2],
                          pe.strides[0], pe.sizes[1] == 1 ? 0 : pe.strides[1], pe.strides[2],
                          out.strides[0], out.strides[1], out.strides[2],
                          nope.sizes[2], pe.sizes[2], 0, false, copy_nope};
  // Rows go in q_out's order (token-major) while the call's bytes fit in the cache, else in ql_nope's
  // memory order (it is most of the bytes read from memory): head-major for the decode layout, where
  // ql_nope is a transposed [heads, tokens, nope] bmm output.
  const int64_t bytes = (nope.numel() + pe.numel()) * int64_t{sizeof(scalar_t)} + out.numel() * int64_t{sizeof(out_t)};
  r.heads_outer = heads > 1 && tokens > 1 && r.nope_s1 > r.nope_s0 && bytes >= cache_bytes();
  r.inner = r.heads_outer ? tokens : heads;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (r.nope_dim + r.rope_dim));
  parallel_rows(tokens * heads, grain, [&](int64_t begin, int64_t end) { run_rows(r, row_op, begin, end); });
}

// x / scale into e4m3fn, saturating: vLLM's fp8 KV-cache write, a division where the query's
// quantization multiplies by the reciprocal.
struct QuantizeDivRow {
  float scale;
  void finish() const {}
  template <typename scalar_t>
  void operator()(uint8_t* dst, int64_t dst_stride, const scalar_t* src, int64_t src_stride, int64_t n) const {
    constexpr float kMax = 448.0f;
    for (int64_t i = 0; i < n; ++i) {
      float x = static_cast<float>(src[i * src_stride]) / scale;
      x = x > kMax ? kMax : (x < -kMax ? -kMax : x);
      dst[i * dst_stride] = e4m3fn_bits(x);
    }
  }
};

// The rotation of one token's rope row: pair i is (x[2i], x[2i + 1]) or, NeoX style, (x[i],
// x[i + half]), turned by c = cache[pos, i] and s = cache[pos, half + i]. Each product is rounded to
// float32 on its own (this file is built with -ffp-contract=off, so no multiply-add is fused), the
// sum once more, then once to scalar_t. A position outside the cache turns by NaN.
template <typename scalar_t>
struct Rotation {
  const void* cache;
  bool cache_is_float;  // else scalar_t
  int64_t cache_s0, cache_s1, max_position, half;
  bool neox;

  float at(int64_t pos, int64_t col) const {
    const int64_t offset = pos * cache_s0 + col * cache_s1;
    return cache_is_float ? static_cast<const float*>(cache)[offset]
                          : static_cast<float>(static_cast<const scalar_t*>(cache)[offset]);
  }
  void operator()(scalar_t* dst, const scalar_t* x, int64_t x_stride, int64_t pos) const {
    const bool valid = pos >= 0 && pos < max_position;
    for (int64_t i = 0; i < half; ++i) {
      const float c = valid ? at(pos, i) : std::numeric_limits<float>::quiet_NaN();
      const float s = valid ? at(pos, half + i) : std::numeric_limits<float>::quiet_NaN();
      const int64_t ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
      const float a = static_cast<float>(x[ia * x_stride]), b = static_cast<float>(x[ib * x_stride]);
      const float ac = a * c, bs = b * s, bc = b * c, as = a * s;
      dst[ia] = static_cast<scalar_t>(ac - bs);
      dst[ib] = static_cast<scalar_t>(bc + as);
    }
  }
};

// Where one call's rows are; element strides. Rows [0, tokens * heads) are the query's (token-major),
// rows [tokens * heads, tokens * (heads + 1)) the cache rows of the K side, one a token.
template <typename scalar_t, typename q_t, typename k_t>
struct RopeRows {
  const scalar_t *nope, *pe, *kv_c, *k_pe;
  const int64_t *positions, *slots;
  q_t* out;
  k_t* cache;
  int64_t nope_s0, nope_s1, nope_s2, pe_s0, pe_s1, pe_s2, out_s0, out_s1, out_s2;
  int64_t kv_c_s0, kv_c_s1, k_pe_s0, k_pe_s1, cache_s0, cache_s1, cache_s2;
  int64_t positions_s0, slots_s0, tokens, heads, nope_dim, kv_dim, rope_dim, block_size, num_slots;
  bool copy_nope;
};

// The rotated rope row goes to a buffer on the stack (on the heap past kStackRope elements).
constexpr int64_t kStackRope = 256;

template <typename scalar_t, typename q_t, typename k_t, typename QOp, typename KOp>
[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] void run_rope_rows(
    const RopeRows<scalar_t, q_t, k_t>& r, const Rotation<scalar_t>& rotate, const QOp& q_op, const KOp& k_op,
    int64_t begin, int64_t end) {
  scalar_t on_stack[kStackRope];
  std::vector<scalar_t> on_heap(r.rope_dim > kStackRope ? static_cast<size_t>(r.rope_dim) : 0);
  scalar_t* const rotated = r.rope_dim > kStackRope ? on_heap.data() : on_stack;
  for (int64_t row = begin; row < end; ++row) {
    if (row < r.tokens * r.heads) {
      const int64_t t = row / r.heads, h = row % r.heads;
      q_t* out_row = r.out + t * r.out_s0 + h * r.out_s1;
      if (r.copy_nope) q_op(out_row, r.out_s2, r.nope + t * r.nope_s0 + h * r.nope_s1, r.nope_s2, r.nope_dim);
      rotate(rotated, r.pe + t * r.pe_s0 + h * r.pe_s1, r.pe_s2, r.positions[t * r.positions_s0]);
      q_op(out_row + r.nope_dim * r.out_s2, r.out_s2, rotated, int64_t{1}, r.rope_dim);
    } else {
      const int64_t t = row - r.tokens * r.heads, slot = r.slots[t * r.slots_s0];
      if (slot < 0 || slot >= r.num_slots) continue;  // padding, or a slot past the cache: nothing written
      k_t* cache_row = r.cache + (slot / r.block_size) * r.cache_s0 + (slot % r.block_size) * r.cache_s1;
      k_op(cache_row, r.cache_s2, r.kv_c + t * r.kv_c_s0, r.kv_c_s1, r.kv_dim);
      rotate(rotated, r.k_pe + t * r.k_pe_s0, r.k_pe_s1, r.positions[t * r.positions_s0]);
      k_op(cache_row + r.kv_dim * r.cache_s2, r.cache_s2, rotated, int64_t{1}, r.rope_dim);
    }
  }
  q_op.finish();
  k_op.finish();
}

template <typename scalar_t, typename q_t, typename k_t, typename QOp, typename KOp>
void rope_rows(const Tensor& ql_nope, const Tensor& q_pe, const Tensor& positions, const Tensor& cos_sin_cache,
               bool is_neox, const Tensor& q_out, const std::optional<Tensor>& kv_c, const std::optional<Tensor>& k_pe,
               const std::optional<Tensor>& kv_cache, const std::optional<Tensor>& slot_mapping, bool copy_nope,
               const QOp& q_op, const KOp& k_op) {
  const Shape nope(ql_nope), pe(q_pe), out(q_out);
  const int64_t tokens = out.sizes[0], heads = out.sizes[1], rope_dim = pe.sizes[2];
  RopeRows<scalar_t, q_t, k_t> r{};
  r.nope = static_cast<const scalar_t*>(ql_nope.const_data_ptr());
  r.pe = static_cast<const scalar_t*>(q_pe.const_data_ptr());
  r.positions = static_cast<const int64_t*>(positions.const_data_ptr());
  r.out = static_cast<q_t*>(q_out.mutable_data_ptr());
  r.nope_s0 = nope.strides[0], r.nope_s1 = nope.strides[1], r.nope_s2 = nope.strides[2];
  r.pe_s0 = pe.strides[0], r.pe_s1 = pe.sizes[1] == 1 ? 0 : pe.strides[1], r.pe_s2 = pe.strides[2];
  r.out_s0 = out.strides[0], r.out_s1 = out.strides[1], r.out_s2 = out.strides[2];
  r.positions_s0 = positions.stride(0);
  r.tokens = tokens, r.heads = heads, r.nope_dim = nope.sizes[2], r.rope_dim = rope_dim;
  r.copy_nope = copy_nope;
  int64_t rows = tokens * heads;
  if (kv_cache) {
    r.kv_c = static_cast<const scalar_t*>(kv_c->const_data_ptr());
    r.k_pe = static_cast<const scalar_t*>(k_pe->const_data_ptr());
    r.slots = static_cast<const int64_t*>(slot_mapping->const_data_ptr());
    r.cache = static_cast<k_t*>(kv_cache->mutable_data_ptr());
    const Shape c(*kv_c), k(*k_pe), cache(*kv_cache);
    r.kv_c_s0 = c.strides[0], r.kv_c_s1 = c.strides[1];
    r.k_pe_s0 = k.strides[0], r.k_pe_s1 = k.strides.back();
    r.cache_s0 = cache.strides[0], r.cache_s1 = cache.strides[1], r.cache_s2 = cache.strides[2];
    r.slots_s0 = slot_mapping->stride(0);
    r.kv_dim = c.sizes[1], r.block_size = cache.sizes[1], r.num_slots = cache.sizes[0] * cache.sizes[1];
    rows += tokens;
  }
  const Shape cache(cos_sin_cache);
  const Rotation<scalar_t> rotate{cos_sin_cache.const_data_ptr(),
                                  dtype_of(cos_sin_cache) == torch::headeronly::ScalarType::Float,
                                  cache.strides[0], cache.strides[1], cache.sizes[0], rope_dim / 2, is_neox};
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (r.nope_dim + rope_dim));
  parallel_rows(rows, grain, [&](int64_t begin, int64_t end) { run_rope_rows(r, rotate, q_op, k_op, begin, end); });
}

// positions and slot_mapping as host vectors, for the checked mode.
std::vector<int64_t> host_indices(const std::optional<Tensor>& t) {
  std::vector<int64_t> values;
  if (!t) return values;
  const auto* data = static_cast<const int64_t*>(t->const_data_ptr());
  for (int64_t i = 0; i < t->size(0); ++i) values.push_back(data[i * t->stride(0)]);
  return values;
}

float scale_value(const std::optional<Tensor>& scale) {
  return scale ? *static_cast<const float*>(scale->const_data_ptr()) : 1.0f;
}

}  // namespace

void concat_mla_q_cpu(Tensor ql_nope, Tensor q_pe, Tensor q_out) {
  const bool nope_in_place = check_concat_mla_q_args(ql_nope, q_pe, q_out);
  const int64_t numel = q_out.numel();
  if (numel == 0) return;
  VLLM_DISPATCH_HALF_TYPES(dtype_of(ql_nope), "concat_mla_q", [&] {
    const bool stream = numel * int64_t{sizeof(scalar_t)} >= cache_bytes();
    concat_rows<scalar_t, scalar_t>(ql_nope, q_pe, q_out, CopyRow{stream}, !nope_in_place);
  });
}

void concat_mla_q_fp8_cpu(Tensor ql_nope, Tensor q_pe, Tensor q_out, Tensor scale) {
  check_concat_mla_q_args(ql_nope, q_pe, q_out, scale);
  if (q_out.numel() == 0) return;
  const QuantizeRow quantize{1.0f / *static_cast<const float*>(scale.const_data_ptr())};
  VLLM_DISPATCH_HALF_TYPES(dtype_of(ql_nope), "concat_mla_q_fp8", [&] {
    concat_rows<scalar_t, uint8_t>(ql_nope, q_pe, q_out, quantize, true);
  });
}

void concat_mla_rope_cpu(Tensor ql_nope, Tensor q_pe, Tensor positions, Tensor cos_sin_cache, bool is_neox,
                         Tensor q_out, std::optional<Tensor> q_scale, std::optional<Tensor> kv_c,
                         std::optional<Tensor> k_pe, std::optional<Tensor> kv_cache,
                         std::optional<Tensor> slot_mapping, std::optional<Tensor> k_scale) {
  const bool nope_in_place = check_concat_mla_rope_args(ql_nope, q_pe, positions, cos_sin_cache, q_out, q_scale, kv_c,
                                                        k_pe, kv_cache, slot_mapping, k_scale);
  if (check_indices_requested()) {
    check_rope_indices("concat_mla_rope", host_indices(positions), cos_sin_cache.size(0), host_indices(slot_mapping),
                       kv_cache ? kv_cache->size(0) * kv_cache->size(1) : 0);
  }
  if (q_out.numel() == 0 && !(kv_cache && kv_cache->numel() > 0)) return;
  const bool copy_nope = !nope_in_place;
  const CopyRow copy{false};
  const QuantizeRow q_quantize{1.0f / scale_value(q_scale)};
  const QuantizeDivRow k_quantize{scale_value(k_scale)};
  VLLM_DISPATCH_HALF_TYPES(dtype_of(ql_nope), "concat_mla_rope", [&] {
    const auto with_k = [&](auto q_t, const auto& q_op) {
      using Q = decltype(q_t);
      if (k_scale) {
        rope_rows<scalar_t, Q, uint8_t>(ql_nope, q_pe, positions, cos_sin_cache, is_neox, q_out, kv_c, k_pe,
                                        kv_cache, slot_mapping, copy_nope, q_op, k_quantize);
      } else {
        rope_rows<scalar_t, Q, scalar_t>(ql_nope, q_pe, positions, cos_sin_cache, is_neox, q_out, kv_c, k_pe,
                                         kv_cache, slot_mapping, copy_nope, q_op, copy);
      }
    };
    if (q_scale) {
      with_k(uint8_t{}, q_quantize);
    } else {
      with_k(scalar_t{}, copy);
    }
  });
}
