// CUDA kernels of concat_mla_q and concat_mla_q_fp8. Many rows: a group of kThreadsPerRow threads
// handles one (token, head) row and each thread loads all of its packs of a pass before it stores
// any, so its loads are in flight together. Few rows: one block a row, one pack a thread. Both share
// the row addressing (RowAt); the two ops differ only in the conversion applied to a pack between
// its load and its store.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dispatch_utils.h"
#include "ops.h"

namespace {

// N elements moved by one access, as a native vector type of their size, loaded with __ldg and
// stored with __stwb, so 8 two-byte elements are exactly one 16-byte load and one 16-byte store
// (LDG.E.128 / STG.E.128). A plain struct copy is not: nvcc split some of them into 2- or 4-byte
// stores.
template <int kBytes> struct PackOf;
template <> struct PackOf<16> { using type = uint4; };
template <> struct PackOf<8> { using type = uint2; };
template <> struct PackOf<4> { using type = uint32_t; };
template <> struct PackOf<2> { using type = uint16_t; };
template <> struct PackOf<1> { using type = uint8_t; };
template <typename T, int N>
using Pack = typename PackOf<sizeof(T) * N>::type;

// Row geometry with strides in elements. When N > 1 the last-dim strides are 1 (host-checked).
struct RowGeometry {
  int64_t tokens, heads;
  int64_t nope_s0, nope_s1, nope_s2;
  int64_t pe_s0, pe_s1, pe_s2;  // pe_s1 == 0 for a 1-head q_pe
  int64_t out_s0, out_s1, out_s2;
  int64_t nope_packs, pe_packs;  // a row may pass 2^31 elements
};

// What each conversion reads besides the tensors, passed by value to the kernel.
struct NoArgs {};
struct ScaleArgs {
  const float* scale;
};

// concat_mla_q: a pack is stored as it was loaded.
template <typename scalar_t>
struct Copy {
  using out_t = scalar_t;
  using Args = NoArgs;
  __device__ explicit Copy(Args) {}
  template <typename P>
  __device__ P operator()(const P& pack) const {
    return pack;
  }
};

// concat_mla_q_fp8: e4m3fn(x * r) with r = 1 / scale correctly rounded (read on the device, so a
// graph replay sees the scale of the moment), x * r in float32, rounded to nearest even. The
// saturating conversion (satfinite) maps |x * r| > 448 and +-inf to +-448 and NaN to NaN, which
// is what clamp(-448, 448) followed by a cast does.
template <typename scalar_t>
struct QuantizeE4M3 {
  using out_t = __nv_fp8_storage_t;
  using Args = ScaleArgs;
  float r;
  // An IEEE division (nvcc's default -prec-div=true; this build never uses --use_fast_math).
  __device__ explicit QuantizeE4M3(Args args) : r(1.0f / *args.scale) {}
  template <typename P>
  __device__ Pack<out_t, sizeof(P) / sizeof(scalar_t)> operator()(const P& pack) const {
    constexpr int n = sizeof(P) / sizeof(scalar_t);
    scalar_t x[n];
    out_t q[n];
    memcpy(x, &pack, sizeof(P));
#pragma unroll
    for (int i = 0; i + 1 < n; i += 2) {
      const float2 pair{static_cast<float>(x[i]) * r, static_cast<float>(x[i + 1]) * r};
      const __nv_fp8x2_storage_t q2 = __nv_cvt_float2_to_fp8x2(pair, __NV_SATFINITE, __NV_E4M3);
      memcpy(q + i, &q2, sizeof(q2));
    }
    if constexpr (n % 2 == 1) {
      q[n - 1] = __nv_cvt_float_to_fp8(static_cast<float>(x[n - 1]) * r, __NV_SATFINITE, __NV_E4M3);
    }
    Pack<out_t, n> out;
    memcpy(&out, q, sizeof(out));
    return out;
  }
};

// The three rows of one (token t, head h): where pack p of the concatenated row is read and written.
// With N > 1 the last dims are unit-stride, so pack p of a row starts at element p * N.
template <typename scalar_t, typename out_t, int N>
struct RowAt {
  const scalar_t* nope;
  const scalar_t* pe;
  out_t* out;
  int64_t nope_packs, nope_step, pe_step, out_step;
  __device__ RowAt(const scalar_t* nope_base, const scalar_t* pe_base, out_t* out_base, const RowGeometry& g,
                   int64_t t, int64_t h)
      : nope(nope_base + t * g.nope_s0 + h * g.nope_s1),
        pe(pe_base + t * g.pe_s0 + h * g.pe_s1),
        out(out_base + t * g.out_s0 + h * g.out_s1),
        nope_packs(g.nope_packs),
        nope_step(N > 1 ? N : g.nope_s2),
        pe_step(N > 1 ? N : g.pe_s2),
        out_step(N > 1 ? N : g.out_s2) {}
  // One address selected per pack: no divergent branch between the two inputs.
  __device__ const Pack<scalar_t, N>* src(int64_t p) const {
    return reinterpret_cast<const Pack<scalar_t, N>*>(p < nope_packs ? nope + p * nope_step
                                                                     : pe + (p - nope_packs) * pe_step);
  }
  __device__ Pack<out_t, N>* dst(int64_t p) const {
    return reinterpret_cast<Pack<out_t, N>*>(out + p * out_step);
  }
};

// Many rows. Grid: x covers the heads, blockDim.x / kThreadsPerRow of them per block; y covers the
// tokens (looping past gridDim.y's 65535), so a thread finds its row with no division.
template <typename scalar_t, int N, int kThreadsPerRow, int kPacksPerThread, typename Convert>
__global__ void concat_mla_q_kernel(const scalar_t* __restrict__ nope, const scalar_t* __restrict__ pe,
                                    typename Convert::out_t* __restrict__ out, const RowGeometry g,
                                    const typename Convert::Args args) {
  const int64_t h = int64_t(blockIdx.x) * (blockDim.x / kThreadsPerRow) + threadIdx.x / kThreadsPerRow;
  if (h >= g.heads) return;
  const int lane = threadIdx.x % kThreadsPerRow;
  const int64_t packs = g.nope_packs + g.pe_packs;
  for (int64_t t = blockIdx.y; t < g.tokens; t += gridDim.y) {
    const RowAt<scalar_t, typename Convert::out_t, N> row(nope, pe, out, g, t, h);
    for (int64_t first = lane; first < packs; first += kThreadsPerRow * kPacksPerThread) {
      Pack<scalar_t, N> buf[kPacksPerThread];
#pragma unroll
      for (int i = 0; i < kPacksPerThread; ++i) {
        const int64_t p = first + i * kThreadsPerRow;
        // The address outside the condition: computed inside it, the fp8 kernels ran 12% slower.
        const Pack<scalar_t, N>* src = row.src(p);
        if (p < packs) buf[i] = __ldg(src);
      }
      // Built here, once the data loads are in flight, so the fp8 conversion's scale load and
      // division overlap them instead of delaying them (a second memory round trip at 1 token).
      const Convert convert(args);
#pragma unroll
      for (int i = 0; i < kPacksPerThread; ++i) {
        const int64_t p = first + i * kThreadsPerRow;
        if (p < packs) __stwb(row.dst(p), convert(buf[i]));
      }
    }
  }
}

// Few rows (decode at 1-4 tokens): the time is latency, not bandwidth. One block per row (x: head,
// y: token), one pack per thread, straight-line code; a loop only when a row has more packs than
// the block has threads.
template <typename scalar_t, int N, typename Convert>
__global__ void concat_mla_q_row_kernel(const scalar_t* __restrict__ nope, const scalar_t* __restrict__ pe,
                                        typename Convert::out_t* __restrict__ out, const RowGeometry g,
                                        const typename Convert::Args args) {
  const RowAt<scalar_t, typename Convert::out_t, N> row(nope, pe, out, g, blockIdx.y, blockIdx.x);
  const int64_t packs = g.nope_packs + g.pe_packs;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<scalar_t, N> x = __ldg(row.src(p));
    const Convert convert(args);  // after the load, as above
    __stwb(row.dst(p), convert(x));
  }
}

// Whether every row of t splits into aligned packs of n elements: the width divides, the last dim
// is unit-stride, and the base and the strides of the dims that vary keep each row aligned.
bool rows_split_into_packs(const at::Tensor& t, int64_t n) {
  const auto bytes = static_cast<uintptr_t>(n * t.element_size());
  if (t.size(2) % n != 0 || (t.size(2) > 1 && t.stride(2) != 1)) return false;
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes != 0) return false;
  for (int64_t d = 0; d < 2; ++d) {
    if (t.size(d) > 1 && t.stride(d) % n != 0) return false;
  }
  return true;
}

template <typename scalar_t, typename Convert, int N>
void launch(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out,
            const typename Convert::Args& args, cudaStream_t stream) {
  constexpr int kThreadsPerRow = 32, kPacksPerThread = 4, kRowsPerBlock = 8, kMaxGridY = 65535;
  constexpr int64_t kFewRows = 512, kMaxRowThreads = 1024;
  const RowGeometry g{
      q_out.size(0), q_out.size(1),
      ql_nope.stride(0), ql_nope.stride(1), ql_nope.stride(2),
      q_pe.stride(0), q_pe.size(1) == 1 ? 0 : q_pe.stride(1), q_pe.stride(2),
      q_out.stride(0), q_out.stride(1), q_out.stride(2),
      ql_nope.size(2) / N, q_pe.size(2) / N};
  const auto* nope = ql_nope.const_data_ptr<scalar_t>();
  const auto* pe = q_pe.const_data_ptr<scalar_t>();
  auto* out = static_cast<typename Convert::out_t*>(q_out.mutable_data_ptr());
  // Up to 512 rows (4 tokens of 128 heads) one row a block: at 1 token of 128 heads on the H100,
  // 1.62 -> 1.52 us (bf16) and 1.87 -> 1.54 us (fp8); worse than the kernel below from 16 tokens
  // of 128 heads (docs/perf-notes.md, v4).
  if (g.tokens * g.heads <= kFewRows) {
    const int64_t packs = g.nope_packs + g.pe_packs;
    const int64_t threads = std::min(kMaxRowThreads, (packs + kThreadsPerRow - 1) / kThreadsPerRow * kThreadsPerRow);
    concat_mla_q_row_kernel<scalar_t, N, Convert>
        <<<dim3(static_cast<unsigned>(g.heads), static_cast<unsigned>(g.tokens)), static_cast<unsigned>(threads), 0,
           stream>>>(nope, pe, out, g, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // 8 rows (256 threads) a block, fewer when there are fewer heads. Measured on the H100 for 1 to
  // 1024 tokens: 4 or 8 rows a block are best everywhere; spreading decode-sized inputs over more
  // SMs with 1-row blocks cost up to 40% at 16-64 tokens (docs/perf-notes.md, v3).
  int64_t rows_per_block = kRowsPerBlock;
  while (rows_per_block > g.heads) rows_per_block /= 2;
  const dim3 grid(static_cast<unsigned>((g.heads + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>(std::min<int64_t>(g.tokens, kMaxGridY)));
  concat_mla_q_kernel<scalar_t, N, kThreadsPerRow, kPacksPerThread, Convert>
      <<<grid, rows_per_block * kThreadsPerRow, 0, stream>>>(nope, pe, out, g, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Both ops, on the current stream: the widest pack that every row of the three tensors splits into
// (16 bytes of input for the 512/64 and 256/32 layouts, down to one element for any other layout).
template <typename scalar_t, typename Convert>
void concat_rows(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out,
                 const typename Convert::Args& args) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto packable = [&](int64_t n) {
    return rows_split_into_packs(ql_nope, n) && rows_split_into_packs(q_pe, n) && rows_split_into_packs(q_out, n);
  };
  if (packable(8)) {
    launch<scalar_t, Convert, 8>(ql_nope, q_pe, q_out, args, stream);
  } else if (packable(4)) {
    launch<scalar_t, Convert, 4>(ql_nope, q_pe, q_out, args, stream);
  } else if (packable(2)) {
    launch<scalar_t, Convert, 2>(ql_nope, q_pe, q_out, args, stream);
  } else {
    launch<scalar_t, Convert, 1>(ql_nope, q_pe, q_out, args, stream);
  }
}

}  // namespace

void concat_mla_q_cuda(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out) {
  check_concat_mla_q_args(ql_nope, q_pe, q_out);
  if (q_out.numel() == 0) return;
  const at::cuda::OptionalCUDAGuard device_guard(ql_nope.device());
  VLLM_DISPATCH_HALF_TYPES(ql_nope.scalar_type(), "concat_mla_q", [&] {
    concat_rows<scalar_t, Copy<scalar_t>>(ql_nope, q_pe, q_out, NoArgs{});
  });
}

void concat_mla_q_fp8_cuda(const at::Tensor& ql_nope, const at::Tensor& q_pe, at::Tensor& q_out,
                           const at::Tensor& scale) {
  check_concat_mla_q_args(ql_nope, q_pe, q_out, scale);
  if (q_out.numel() == 0) return;
  const at::cuda::OptionalCUDAGuard device_guard(ql_nope.device());
  VLLM_DISPATCH_HALF_TYPES(ql_nope.scalar_type(), "concat_mla_q_fp8", [&] {
    concat_rows<scalar_t, QuantizeE4M3<scalar_t>>(ql_nope, q_pe, q_out, ScaleArgs{scale.const_data_ptr<float>()});
  });
}
